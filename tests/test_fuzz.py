"""Hostile input: every handler fuzzed with hypothesis, forged buttons, admin commands from others, injections.

The real handlers run on an unthreaded TeleBot fed from the loopback Telegram (test_faults.Chat), so an
exception in a handler fails the example. Each update must get a clear answer and leave the ledger alone.
"""
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from peewee import fn

from bot import ADMIN_COMMANDS
from keyboards import MENU_ACTIONS
from models import PAID, PENDING, Gift, Grant, Payment, PromoCode, Redemption, Referral, User
from test_e2e import invoice_id_of
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


def ledger():
    """Return everything that is worth money in the database, to compare before and after an update."""
    return {'grants': Grant.select().count(),
            'credited': User.select().where(User.expires_at.is_null(False)).count(),
            'paid': Payment.select().where(Payment.status == PAID).count(),
            'promo codes': PromoCode.select().count(),
            'promo uses': PromoCode.select(fn.COALESCE(fn.SUM(PromoCode.used), 0)).scalar(),
            'redemptions': Redemption.select().count(),
            'gifts': Gift.select().count(),
            'referrals': Referral.select().count()}


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
people = st.fixed_dictionaries({
    'id': st.integers(1, 2 ** 52).filter(lambda telegram_id: telegram_id != ADMIN_ID),
    'first_name': names,
    'username': st.none() | st.from_regex(r'[A-Za-z][A-Za-z0-9_]{4,31}', fullmatch=True),
    'language_code': st.none() | st.sampled_from(['ru', 'en', 'uk', 'kk', 'de', 'pt-br']) | st.text(chars, max_size=8),
})
arguments = (st.text(chars, max_size=200) | st.sampled_from(SQL + HTML)
             | st.from_regex(rf'{number}( {number}){{0,3}}', fullmatch=True))
commands = st.builds(lambda name, mention, argument: f'/{name}{mention} {argument}'.rstrip(),
                     st.sampled_from(COMMANDS) | st.from_regex(r'[A-Za-z0-9_]{1,40}', fullmatch=True),
                     st.sampled_from(['', '@' + BOT_USERNAME, '@SPN_TEST_BOT', '@other_bot']), arguments)
texts = (st.text(chars, min_size=1, max_size=4096).filter(str.strip) | commands | st.sampled_from(SQL + HTML)
         | st.text(chars, min_size=3000, max_size=4096))
callback_data = (st.text(max_size=64).filter(lambda data: len(data.encode()) <= 64)
                 | st.from_regex(rf'(check|plan|buy|sub|gift|promo|invite|help|menu|x{{3,9}})(:{number})?',
                                 fullmatch=True)
                 | st.sampled_from(MENU_ACTIONS + ('plan:30', 'plan:31', 'check:0', 'check:1', 'plan:', 'check:')))


@FUZZ
@given(person=people, text=texts)
def test_any_message_gets_an_answer_and_moves_no_money(chat, person, text):
    before, since = ledger(), len(chat.telegram.sent)
    chat.telegram.send_text(person, text)
    chat.pump()
    assert ledger() == before
    if not addressed_elsewhere(text):
        assert replies(chat, since, person['id']), f'no answer to {text!r}'
        stored = User.get(User.telegram_id == person['id']).first_name  # as sent, less U+0000 (PostgreSQL)
        assert stored == person['first_name'].replace('\x00', '')


@FUZZ
@given(person=people, text=texts)
def test_any_promo_code_text_gets_an_answer_and_moves_no_money(chat, person, text):
    menu = chat.say(person, '/start')
    chat.press(person, menu, 'promo')
    before, since = ledger(), len(chat.telegram.sent)
    chat.telegram.send_text(person, text)
    chat.pump()
    assert ledger() == before
    if not addressed_elsewhere(text):
        assert replies(chat, since, person['id'])


@FUZZ
@given(person=people, data=callback_data)
def test_any_button_data_is_answered_and_moves_no_money(chat, person, data):
    menu = chat.say(person, '/start')
    before = ledger()
    answer = chat.press(person, menu, data)
    assert answer is not None
    assert ledger() == before


@FUZZ
@given(person=people, name=st.sampled_from(ADMIN_COMMANDS), argument=arguments)
def test_admin_commands_from_anyone_else_get_the_unknown_answer(chat, person, name, argument):
    before = ledger()
    reply = chat.say(person, f'/{name} {argument}'.rstrip())
    language = User.get(User.telegram_id == person['id']).language
    assert reply['text'] == t(language, 'unknown')
    assert ledger() == before


@FUZZ
@given(name=st.sampled_from([name for name in ADMIN_COMMANDS if name != 'broadcast']), argument=arguments)
def test_admin_commands_with_any_arguments_answer_the_admin(chat, name, argument):
    admin = {'id': ADMIN_ID, 'first_name': 'Boss', 'username': 'boss', 'language_code': 'en'}
    since = len(chat.telegram.sent)
    chat.telegram.send_text(admin, f'/{name} {argument}'.rstrip())
    chat.pump()
    assert replies(chat, since, ADMIN_ID)


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
    before = ledger()
    assert chat.press(alice, menu, 'check:9999999999999999999')['text'] in REFUSED
    assert ledger() == before


@pytest.mark.parametrize('command', ['/user 99999999999999999999', '/give 99999999999999999999 5', '/user ²',
                                     '/give 7005 ²', '/give ² 5', '/user -9223372036854775809', '/give 7005 ٣'])
def test_admin_numbers_that_are_not_ids_get_an_answer(chat, command):
    chat.say({'id': 7005, 'first_name': 'Alice', 'username': 'alice7005'}, '/start')
    admin = {'id': ADMIN_ID, 'first_name': 'Boss', 'language_code': 'en'}
    before = ledger()
    reply = chat.say(admin, command)['text']
    assert reply.startswith('Usage') or reply.startswith('No such user'), reply
    assert ledger() == before


@pytest.mark.parametrize('person,text', [({'id': 7006, 'first_name': 'Al\x00ice'}, '/start'),
                                         ({'id': 7007, 'first_name': 'Bob', 'username': 'bob\x00'}, '/help'),
                                         ({'id': 7008, 'first_name': 'Eve'}, '/start ab\x00cd')])
def test_nul_characters_from_telegram_are_harmless(chat, person, text):
    before, since = ledger(), len(chat.telegram.sent)
    chat.telegram.send_text(person, text)
    chat.pump()
    assert replies(chat, since, person['id']) and ledger() == before


@pytest.mark.parametrize('code', SQL + HTML + ('SPRING24\'--', 'A' * 33, 'ABC', 'КОД12345', 'CODE 1234', ''))
def test_injection_in_promo_codes_is_refused_plainly(chat, code):
    PromoCode.create(code='SPRING24', days=10, max_uses=5)
    alice = {'id': 7003, 'first_name': 'Alice'}
    menu = chat.say(alice, '/start')
    before = ledger()
    assert chat.say(alice, f'/promo {code}'.rstrip())['text'] in (t('en', 'promo_invalid'), t('en', 'promo_ask'))
    chat.press(alice, menu, 'promo')
    if code:
        assert chat.say(alice, code)['text'] == t('en', 'promo_invalid')
    assert ledger() == before and PromoCode.get().used == 0


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
    before = ledger()
    reply = chat.say(admin, command)['text']
    assert reply.startswith('Usage') or reply.startswith('No such user'), reply
    assert ledger() == before
