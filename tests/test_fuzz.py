"""Hostile input: every handler fuzzed with hypothesis, forged buttons, admin commands from others, injections.

The real handlers run on an unthreaded TeleBot fed from the loopback Telegram (test_faults.Chat), so an
exception in a handler fails the example. The world holds valid, used-up and expired promo codes, paid and
pending invoices, an inviter, a channel member and the admin, so money CAN move: each update must get a clear
answer and move exactly what its input allows (a valid code's days once, a gift to a member once, the presser's
own paid invoice once, an inviter recorded for a new user, the admin's grants), nothing else.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from peewee import fn

from bot import ADMIN_COMMANDS
from keyboards import MENU_ACTIONS, parse_callback
from models import PAID, PENDING, Gift, Grant, Payment, PromoAttempt, PromoCode, Redemption, Referral, User, utcnow
from shop import PROMO_FAILURES_ALLOWED, PROMO_LOCKOUT
from test_e2e import CHANNEL_CHAT_ID, invoice_id_of
from test_faults import Chat, make_rig
from texts import t

ADMIN_ID = 900  # ADMIN_IDS in conftest.settings_env
BOT_USERNAME = 'spn_test_bot'
# CI's budget; FUZZ_EXAMPLES=2000 hunts longer (docs/dev/RELIABILITY.md)
FUZZ = settings(max_examples=int(os.environ.get('FUZZ_EXAMPLES', '80')), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COMMANDS = ('start', 'help', 'cancel', 'menu', 'promo') + ADMIN_COMMANDS
SQL = ("'; DROP TABLE users; --", "1' OR '1'='1", "x'); DELETE FROM grants; --", 'Robert"); TRUNCATE payments;--',
       "%' UNION SELECT * FROM promo_codes --", '\\x27; SELECT pg_sleep(5); --')
HTML = ('<b>bold</b>', '<script>alert(1)</script>', '</code><a href="https://evil.test">x</a>', '&lt;&amp;&gt;',
        '<i>unclosed', '<tg-emoji emoji-id="x">😀</tg-emoji>', '&#0;&#x110000;')
REFUSED = (t('en', 'payment_not_found'), t('en', 'stale'))  # the clear answers to a forged Check button


@pytest.fixture
def rig(database, tmp_path):
    with make_rig(database, tmp_path) as made:
        yield made


@pytest.fixture
def chat(rig):
    return Chat(rig, rig.shop())


# The world the fuzzed updates land in: money CAN move in it, so "nothing moved" means something.

VALID, USED_UP, EXPIRED_CODE, VALID_DAYS = 'VALID10', 'USEDUP10', 'EXPIRED10', 10
OWNER, INVITER = {'id': 7101, 'first_name': 'Olga'}, {'id': 7102, 'first_name': 'Ivan'}
ADMIN = {'id': ADMIN_ID, 'first_name': 'Boss', 'username': 'boss', 'language_code': 'en'}
WORLD_IDS = {ADMIN_ID, OWNER['id'], INVITER['id']}


@dataclass
class World:
    rig: object
    chat: Chat
    shop: object
    others_paid: int  # OWNER's invoice, paid at Crypto Pay, not settled yet: nobody else may settle it
    invite_code: str


@pytest.fixture
def world(rig):
    """Valid, used-up and expired codes; paid, pending and settled invoices; an inviter; the admin."""
    shop = rig.shop()
    chat = Chat(rig, shop)
    for someone in (ADMIN, OWNER, INVITER):
        chat.say(someone, '/start')
    shop.create_promo(ADMIN_ID, days=VALID_DAYS, uses=10 ** 6, code=VALID)
    PromoCode.create(code=USED_UP, days=30, max_uses=1, used=1)
    PromoCode.create(code=EXPIRED_CODE, days=30, max_uses=100, expires_at=utcnow() - timedelta(days=1))
    owner = shop.get_user(OWNER['id'])
    settled = shop.create_invoice(owner, 30)
    rig.cryptopay.pay(settled.invoice_id)
    assert shop.check_payment(OWNER['id'], settled.invoice_id).status == PAID
    others_paid = shop.create_invoice(owner, 90)
    rig.cryptopay.pay(others_paid.invoice_id)
    shop.create_invoice(owner, 30)  # pending, unpaid
    return World(rig, chat, shop, others_paid.invoice_id, shop.get_user(INVITER['id']).invite_code)


def money():
    """Return everything worth money, in a shape whose differences say exactly what moved."""
    return {
        'grants': [(grant.user.telegram_id, grant.reason, grant.days, grant.granted_by)
                   for grant in Grant.select(Grant, User).join(User).order_by(Grant.id)],
        'expiries': {user.telegram_id: user.expires_at for user in User.select()},
        'paid': {payment.invoice_id for payment in Payment.select().where(Payment.status == PAID)},
        'codes': {promo.code: promo.used for promo in PromoCode.select()},
        'redemptions': {(row.promo.code, row.user.telegram_id) for row in Redemption.select()},
        'gifts': {gift.telegram_id for gift in Gift.select()},
        'referrals': {(row.invited.telegram_id, row.inviter.telegram_id) for row in Referral.select()},
    }


NOTHING = {'grants': [], 'rewritten': False, 'expiry changed': [], 'paid': [], 'unpaid': [], 'new codes': [],
           'uses': {}, 'redemptions': [], 'gifts': [], 'referrals': []}


def moved(before, after):
    """Return what changed between two money() snapshots (all NOTHING's keys; rows are only ever added)."""
    count = len(before['grants'])
    return {
        'grants': sorted(after['grants'][count:], key=str), 'rewritten': after['grants'][:count] != before['grants'],
        'expiry changed': sorted(user for user, expiry in after['expiries'].items()
                                 if before['expiries'].get(user) != expiry and expiry is not None
                                 or user in before['expiries'] and expiry is None and before['expiries'][user]),
        'paid': sorted(after['paid'] - before['paid']), 'unpaid': sorted(before['paid'] - after['paid']),
        'new codes': sorted(set(after['codes']) - set(before['codes'])),
        'uses': {code: after['codes'].get(code, 0) - used for code, used in before['codes'].items()
                 if after['codes'].get(code) != used},
        'redemptions': sorted(after['redemptions'] ^ before['redemptions']),
        'gifts': sorted(after['gifts'] ^ before['gifts']),
        'referrals': sorted(after['referrals'] ^ before['referrals']),
    }


def redeemed(before, telegram_id, code):
    """What redeeming code moves for a user: the valid code's days once per user, else nothing; nothing at all
    while the user is locked out by their failed attempts (the examples share one world, so they add up)."""
    if (code or '').strip().upper() != VALID or (VALID, telegram_id) in before['redemptions'] \
            or telegram_id in before['locked out']:
        return NOTHING
    return {**NOTHING, 'grants': [(telegram_id, 'promo', VALID_DAYS, None)], 'expiry changed': [telegram_id],
            'uses': {VALID: 1}, 'redemptions': [(VALID, telegram_id)]}


def expected_for_text(before, person, text, awaiting):
    """Exactly what a text message may move; None for an admin's /give or /newcode (checked apart)."""
    telegram_id = person['id']
    if not text.startswith('/'):
        return redeemed(before, telegram_id, text) if awaiting == 'promo' else NOTHING
    if addressed_elsewhere(text):
        return NOTHING
    command = text.split(maxsplit=1)[0][1:].partition('@')[0].lower()
    argument = text.split(maxsplit=1)[1].strip() if len(text.split(maxsplit=1)) > 1 else ''
    if command == 'start' and telegram_id not in before['expiries'] and argument \
            and argument.strip().lower()[:16] == before['invite_code'] and telegram_id != INVITER['id']:
        return {**NOTHING, 'referrals': [(telegram_id, INVITER['id'])]}
    if command == 'promo' and argument:
        return redeemed(before, telegram_id, argument)
    if telegram_id == ADMIN_ID and command in ('give', 'newcode'):
        return None
    return NOTHING


def check_admin_change(change, text):
    """An admin's /give may add admin grants (by the admin) and /newcode new codes; nothing else moves."""
    command = text.split(maxsplit=1)[0][1:].partition('@')[0].lower()
    rest = dict(change)
    if command == 'give':
        assert all(reason == 'admin' and by == ADMIN_ID for _, reason, _, by in change['grants']), change
        assert sorted({user for user, *_ in change['grants']}) == change['expiry changed'], change
        rest.update(grants=[], **{'expiry changed': []})
    else:
        assert all(PromoCode.get(PromoCode.code == code).created_by == ADMIN_ID for code in change['new codes'])
        assert all(change['uses'].get(code, 0) == 0 for code in change['new codes'])
        rest.update({'new codes': [], 'uses': {}})
    assert rest == NOTHING, f'{text!r} moved {change}'


def snapshot(world):
    before = money()
    before['invite_code'] = world.invite_code
    recent = (PromoAttempt.select(User.telegram_id).join(User)
              .where(PromoAttempt.created_at > utcnow() - PROMO_LOCKOUT).group_by(User.telegram_id)
              .having(fn.COUNT(PromoAttempt.id) >= PROMO_FAILURES_ALLOWED))
    before['locked out'] = {row.user.telegram_id for row in recent}
    return before


def without_extras(snap):
    return {key: value for key, value in snap.items() if key not in ('invite_code', 'locked out')}


def replies(chat, since, chat_id):
    """Return what the bot said in chat_id since the since-th recorded call (new messages and edits)."""
    return [call for call in chat.telegram.sent[since:]
            if call.ok and call.method in ('sendMessage', 'editMessageText', 'sendPhoto')
            and str(call.params.get('chat_id')) == str(chat_id)]


def addressed_elsewhere(text):
    """Tell whether text is a command addressed to another bot (/cmd@other), which the bot leaves alone."""
    word = text.split(maxsplit=1)[0] if text.startswith('/') and text.strip() else ''
    mention = word.partition('@')[2]
    return bool(mention) and mention.lower() != BOT_USERNAME


chars = st.characters(codec='utf-8')  # any character a Telegram message can carry, U+0000 included
number = r'-?\d{1,25}'  # beyond 64 bits too
names = st.text(chars, min_size=1, max_size=64).filter(str.strip) | st.sampled_from(SQL + HTML)
strangers = st.fixed_dictionaries({
    'id': st.integers(1, 2 ** 52).filter(lambda telegram_id: telegram_id not in WORLD_IDS),
    'first_name': names,
    'username': st.none() | st.from_regex(r'[A-Za-z][A-Za-z0-9_]{4,31}', fullmatch=True),
    'language_code': st.none() | st.sampled_from(['ru', 'en', 'uk', 'kk', 'de', 'pt-br']) | st.text(chars, max_size=8),
})
people = strangers | st.sampled_from([ADMIN, OWNER, INVITER])  # the admin and the invoice owner too
arguments = (st.text(chars, max_size=200) | st.sampled_from(SQL + HTML)
             | st.from_regex(rf'{number}( {number}){{0,3}}', fullmatch=True))
commands = st.builds(lambda name, mention, argument: f'/{name}{mention} {argument}'.rstrip(),
                     st.sampled_from(COMMANDS) | st.from_regex(r'[A-Za-z0-9_]{1,40}', fullmatch=True),
                     st.sampled_from(['', '@' + BOT_USERNAME, '@SPN_TEST_BOT', '@other_bot']), arguments)
# inputs that move money in this world ({invite} becomes the inviter's code)
money_texts = st.sampled_from([f'/promo {VALID}', f'/promo {VALID.lower()} ', f'/promo {USED_UP}',
                               f'/promo {EXPIRED_CODE}', VALID, f' {VALID.lower()}', USED_UP, '/start {invite}',
                               '/start {INVITE}', f'/give {OWNER["id"]} 5', f'/give @boss 3650', '/newcode 5 1',
                               '/newcode 7 3 FUZZ{n}'])
texts = (st.text(chars, min_size=1, max_size=4096).filter(str.strip) | commands | st.sampled_from(SQL + HTML)
         | st.text(chars, min_size=3000, max_size=4096) | money_texts)
callback_data = (st.text(max_size=64).filter(lambda data: len(data.encode()) <= 64)
                 | st.from_regex(rf'(check|plan|buy|sub|gift|promo|invite|help|menu|x{{3,9}})(:{number})?',
                                 fullmatch=True)
                 | st.sampled_from(MENU_ACTIONS + ('plan:30', 'plan:31', 'check:0', 'check:1', 'plan:', 'check:'))
                 # {paid}, {pending}: the presser's own invoices; {others}: the owner's paid one
                 | st.sampled_from(('check:{paid}', 'check:{pending}', 'check:{others}', 'gift', 'check:0{paid}')))


def fill(text, world, n=0):
    return text.replace('{invite}', world.invite_code).replace('{INVITE}', world.invite_code.upper()) \
        .replace('{n}', str(n))


def send(world, person, text):
    """Send text as person and return (what moved, what was expected or None for admin changes)."""
    assume(not (person['id'] == ADMIN_ID and text.lower().startswith('/broadcast')))  # a real broadcast: slow
    awaiting = getattr(User.get_or_none(User.telegram_id == person['id']), 'awaiting', None)
    before, since = snapshot(world), len(world.chat.telegram.sent)
    world.chat.telegram.send_text(person, text)
    world.chat.pump()
    change = moved(without_extras(before), money())
    if not addressed_elsewhere(text):
        assert replies(world.chat, since, person['id']), f'no answer to {text!r}'
    return change, expected_for_text(before, person, text, awaiting)


def assert_moved(change, expected, text):
    if expected is None:
        check_admin_change(change, text)
    else:
        assert change == expected, f'{text!r} moved {change}, expected {expected}'


@FUZZ
@given(person=people, text=texts)
@example(person=OWNER, text=f'/promo {VALID}')
@example(person=ADMIN, text=f'/give {OWNER["id"]} 5')
@example(person=OWNER, text=f'/promo {USED_UP}')
@example(person={**INVITER, 'id': 7103}, text='/start {invite}')
def test_any_message_gets_an_answer_and_moves_exactly_what_it_may(world, person, text):
    text = fill(text, world, len(world.chat.telegram.sent))
    change, expected = send(world, person, text)
    assert_moved(change, expected, text)
    if not addressed_elsewhere(text):
        stored = User.get(User.telegram_id == person['id']).first_name  # as sent, less U+0000 (PostgreSQL)
        assert stored == person['first_name'].replace('\x00', '')


@FUZZ
@given(person=people, text=texts)
@example(person=INVITER, text=f' {VALID.lower()} ')
@example(person=INVITER, text=USED_UP)
@example(person=OWNER, text=EXPIRED_CODE.lower())
def test_any_promo_code_text_gets_an_answer_and_moves_exactly_what_it_may(world, person, text):
    text = fill(text, world, len(world.chat.telegram.sent))
    menu = world.chat.say(person, '/start')
    world.chat.press(person, menu, 'promo')
    change, expected = send(world, person, text)
    assert_moved(change, expected, text)


@FUZZ
@given(person=people, data=callback_data, member=st.booleans())
@example(person=INVITER, data='check:{paid}', member=False)
@example(person=INVITER, data='gift', member=True)
def test_any_button_data_is_answered_and_moves_exactly_what_it_may(world, person, data, member):
    rig, shop = world.rig, world.shop
    menu = world.chat.say(person, '/start')
    user = shop.get_user(person['id'])
    paid, pending = shop.create_invoice(user, 30), shop.create_invoice(user, 90)  # pending ones are reused
    if rig.cryptopay.invoices[paid.invoice_id]['status'] == 'active':
        rig.cryptopay.pay(paid.invoice_id)
    rig.telegram.set_member(CHANNEL_CHAT_ID, person['id'], 'member' if member else 'left')
    # fill the placeholders only: fuzzed data may hold any other '{' or '}' (str.format would choke on it)
    for name, value in (('paid', paid.invoice_id), ('pending', pending.invoice_id), ('others', world.others_paid)):
        data = data.replace('{' + name + '}', str(value))
    before = money()
    world.chat.press(person, menu, data)  # raises unless the press is answered
    change = moved(before, money())
    telegram_id = person['id']
    payable = {paid.invoice_id: 30}  # the presser's own invoices that are paid and not settled yet
    if telegram_id == OWNER['id'] and world.others_paid not in before['paid']:
        payable[world.others_paid] = 90
    action, invoice_id = parse_callback(data)
    if action == 'check' and invoice_id in payable:  # (nobody here was invited: no referral bonus)
        expected = {**NOTHING, 'grants': [(telegram_id, 'payment', payable[invoice_id], None)],
                    'expiry changed': [telegram_id], 'paid': [invoice_id]}
    elif data == 'gift' and member and telegram_id not in before['gifts']:
        expected = {**NOTHING, 'grants': [(telegram_id, 'gift', rig.settings().trial_days, None)],
                    'expiry changed': [telegram_id], 'gifts': [telegram_id]}
    else:
        expected = NOTHING
    assert change == expected, f'{data!r} moved {change}, expected {expected}'


@FUZZ
@given(person=strangers, name=st.sampled_from(ADMIN_COMMANDS), argument=arguments)
def test_admin_commands_from_anyone_else_get_the_unknown_answer(world, person, name, argument):
    before = money()
    reply = world.chat.say(person, f'/{name} {argument}'.rstrip())
    language = User.get(User.telegram_id == person['id']).language
    assert reply['text'] == t(language, 'unknown')
    assert moved(before, money()) == NOTHING


@FUZZ
@given(name=st.sampled_from([name for name in ADMIN_COMMANDS if name != 'broadcast']), argument=arguments)
def test_admin_commands_with_any_arguments_answer_the_admin(world, name, argument):
    text = f'/{name} {argument}'.rstrip()
    change, expected = send(world, ADMIN, text)
    assert_moved(change, expected, text)


def test_a_forged_check_for_someone_elses_paid_invoice_moves_nothing(rig, chat):
    alice, mallory = {'id': 7001, 'first_name': 'Alice'}, {'id': 7066, 'first_name': 'Mallory'}
    invoice = chat.buy(alice)
    invoice_id = invoice_id_of(rig.telegram, rig.telegram.get_message(7001, invoice['message_id']))
    rig.cryptopay.pay(invoice_id)
    menu = chat.say(mallory, '/start')
    for data in (f'check:{invoice_id}', f'check:{invoice_id:018d}', f'check:{invoice_id:019d}'):
        assert chat.press(mallory, menu, data)['text'] in REFUSED
    assert Payment.get(Payment.invoice_id == invoice_id).status == PENDING
    assert User.get(User.telegram_id == 7066).expires_at is None and Grant.select().count() == 0
    chat.press(alice, invoice, f'check:{invoice_id}')  # the owner's press still settles it
    assert Payment.get(Payment.invoice_id == invoice_id).status == PAID
    assert Grant.get().user.telegram_id == 7001


def test_a_forged_check_with_a_number_beyond_64_bits_is_answered(chat):
    alice = {'id': 7002, 'first_name': 'Alice'}
    menu = chat.say(alice, '/start')
    before = money()
    assert chat.press(alice, menu, 'check:9999999999999999999')['text'] in REFUSED
    assert moved(before, money()) == NOTHING


@pytest.mark.parametrize('command', ['/user 99999999999999999999', '/give 99999999999999999999 5', '/user ²',
                                     '/give 7005 ²', '/give ² 5', '/user -9223372036854775809', '/give 7005 ٣'])
def test_admin_numbers_that_are_not_ids_get_an_answer(chat, command):
    chat.say({'id': 7005, 'first_name': 'Alice', 'username': 'alice7005'}, '/start')
    admin = {'id': ADMIN_ID, 'first_name': 'Boss', 'language_code': 'en'}
    before = money()
    reply = chat.say(admin, command)['text']
    assert reply.startswith('Usage') or reply.startswith('No such user'), reply
    assert moved(before, money()) == NOTHING


@pytest.mark.parametrize('person,text', [({'id': 7006, 'first_name': 'Al\x00ice'}, '/start'),
                                         ({'id': 7007, 'first_name': 'Bob', 'username': 'bob\x00'}, '/help'),
                                         ({'id': 7008, 'first_name': 'Eve'}, '/start ab\x00cd')])
def test_nul_characters_from_telegram_are_harmless(chat, person, text):
    before, since = money(), len(chat.telegram.sent)
    chat.telegram.send_text(person, text)
    chat.pump()
    assert replies(chat, since, person['id']) and moved(before, money()) == NOTHING


@pytest.mark.parametrize('code', SQL + HTML + ('SPRING24\'--', 'A' * 33, 'ABC', 'КОД12345', 'CODE 1234', ''))
def test_injection_in_promo_codes_is_refused_plainly(chat, code):
    PromoCode.create(code='SPRING24', days=10, max_uses=5)
    alice = {'id': 7003, 'first_name': 'Alice'}
    menu = chat.say(alice, '/start')
    before = money()
    assert chat.say(alice, f'/promo {code}'.rstrip())['text'] in (t('en', 'promo_invalid'), t('en', 'promo_ask'))
    chat.press(alice, menu, 'promo')
    if code:
        assert chat.say(alice, code)['text'] == t('en', 'promo_invalid')
    assert moved(before, money()) == NOTHING and PromoCode.get().used == 0


@pytest.mark.parametrize('hostile', SQL + HTML)
def test_injection_in_names_and_usernames_is_stored_and_shown_verbatim(chat, hostile):
    person = {'id': 7004, 'first_name': hostile, 'username': hostile, 'language_code': 'en'}
    welcome = chat.say(person, '/start')
    assert hostile.strip() in welcome['text']  # shown as sent: escaped for HTML, not interpreted
    stored = User.get(User.telegram_id == 7004)
    assert (stored.first_name, stored.username) == (hostile, hostile)
    admin = {'id': ADMIN_ID, 'first_name': 'Boss', 'language_code': 'en'}
    found = chat.say(admin, f'/user @{hostile}')
    assert '7004' in found['text'] and hostile.strip() in found['text']
    assert User.select().count() == 2 and Grant.select().count() == 0


@pytest.mark.parametrize('command', ['/newcode 5 1 <script>', "/newcode 5 1 A'--", '/newcode 5 1 КОД12345',
                                     '/newcode 99999999999999999999 1', '/newcode 5 -1', '/newcode x y z w',
                                     "/give '; DROP TABLE users; -- 5", '/give 7005 99999999999999999999',
                                     '/give 7005 -5', '/give 7005 5 extra', '/user %', '/user _'])
def test_malformed_admin_commands_get_usage_and_move_nothing(chat, command):
    chat.say({'id': 7005, 'first_name': 'Alice', 'username': 'alice7005'}, '/start')
    admin = {'id': ADMIN_ID, 'first_name': 'Boss', 'language_code': 'en'}
    before = money()
    reply = chat.say(admin, command)['text']
    assert reply.startswith('Usage') or reply.startswith('No such user'), reply
    assert moved(before, money()) == NOTHING
