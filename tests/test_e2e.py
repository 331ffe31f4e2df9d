"""End to end: bot.py runs as a real process against loopback Telegram, panel and Crypto Pay servers."""
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD, ROOT, settings_env
from fake_telegram import FakeTelegram
from models import Grant, Payment, PromoCode, User
from texts import t

ADMIN = {'id': 900, 'first_name': 'Boss', 'username': 'boss', 'language_code': 'en'}
CHANNEL = '@spn_channel'
CHANNEL_CHAT_ID = -1001234567890


def person(telegram_id, lang='en', name='Alice'):
    return {'id': telegram_id, 'first_name': name, 'username': f'{name.lower()}{telegram_id}',
            'language_code': lang}


@pytest.fixture
def telegram():
    with FakeTelegram(token=BOT_TOKEN) as fake:
        fake.add_chat(CHANNEL_CHAT_ID, username=CHANNEL)
        yield fake


class RunningBot:
    """bot.py in a subprocess, with its output kept for the failure report."""

    def __init__(self, env, log_path):
        self.log_path = log_path
        self.log = open(log_path, 'w')
        self.process = subprocess.Popen([sys.executable, str(ROOT / 'bot.py')], env=env, cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def output(self):
        return self.log_path.read_text()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def start_bot(telegram, panel, cryptopay, database, tmp_path, **overrides):
    env = {**os.environ, **settings_env(panel, cryptopay, database, TELEGRAM_API_URL=telegram.url,
                                         PAYMENT_POLL_SECONDS=1, BACKUP_DIR=tmp_path / 'backups', **overrides)}
    env.pop('TEST_DATABASE_URL', None)
    bot = RunningBot(env, tmp_path / 'bot.log')
    try:
        telegram.wait_polling(timeout=20)
    except AssertionError:
        bot.stop()
        raise AssertionError(f'bot did not start:\n{bot.output()}') from None
    return bot


@pytest.fixture
def bot(telegram, panel, cryptopay, database, tmp_path):
    running = start_bot(telegram, panel, cryptopay, database, tmp_path)
    yield running
    running.stop()
    output = running.output()
    print(output)  # pytest shows a passing teardown's output only when the test failed: the bot's log
    for secret in (BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD):
        assert secret not in output, 'a secret reached the log'
    assert 'Traceback' not in output, output
    refused = [call for call in telegram.sent if "can't parse entities" in str(call.description)
               or 'too long' in str(call.description)]
    assert not refused, f'Telegram refused messages: {refused}'


def eventually(condition, timeout=10):
    """Wait until condition() is true (the bot works in another process); return its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def ask(telegram, user, text, contains=None):
    telegram.send_text(user, text)
    return telegram.wait_for_message(user['id'], contains=contains)


def press(telegram, user, message, data, strict=True):
    """Press a button and return the press's callback answer."""
    update_id = telegram.press(user, message, data, strict=strict)
    return telegram.wait_for_answer(update_id)


def current(telegram, message):
    return telegram.get_message(message['chat']['id'], message['message_id'])


def text_of(message):
    return message.get('text') or message.get('caption') or ''


def buy(telegram, user, days=30):
    """Go through Buy → plan and return the invoice message."""
    menu = ask(telegram, user, '/start')
    press(telegram, user, menu, 'buy')
    press(telegram, user, current(telegram, menu), f'plan:{days}')
    return current(telegram, menu)


def invoice_id_of(telegram, message):
    return int(next(data for _, data in telegram.buttons(message) if str(data).startswith('check:')).split(':')[1])


def panel_expiry(panel, email):
    ms = panel.clients[email]['expiryTime']
    return datetime.fromtimestamp(ms / 1000, timezone.utc).replace(tzinfo=None)


def test_new_user_buys_a_month_and_gets_a_working_link(bot, telegram, panel, cryptopay):
    alice = person(1001)
    invoice = buy(telegram, alice, 30)
    buttons = telegram.buttons(invoice)
    pay_url = next(url for text, url in buttons if text.startswith('💳 Pay'))
    invoice_id = invoice_id_of(telegram, invoice)
    assert pay_url == cryptopay.invoices[invoice_id]['bot_invoice_url']
    assert '100' in text_of(invoice) and '1 month' in text_of(invoice)
    assert cryptopay.invoices[invoice_id]['fiat'] == 'RUB' and cryptopay.invoices[invoice_id]['amount'] == '100'

    answer = press(telegram, alice, invoice, f'check:{invoice_id}')
    assert 'not arrived' in answer['text']
    cryptopay.pay(invoice_id)
    press(telegram, alice, current(telegram, invoice), f'check:{invoice_id}')
    paid = current(telegram, invoice)
    user = User.get(User.telegram_id == 1001)
    assert user.panel_sub_id in text_of(paid) and 'https://vpn.example.test:2096/sub/' in text_of(paid)
    client = panel.clients[user.panel_email]
    assert client['subId'] == user.panel_sub_id and client['enable'] and client['tgId'] == 1001
    assert panel_expiry(panel, user.panel_email) == user.expires_at
    assert abs(user.expires_at - (datetime.utcnow() + timedelta(days=30))) < timedelta(minutes=1)


def test_renewal_extends_from_current_expiry(bot, telegram, panel, cryptopay):
    alice = person(1002, lang='ru')
    for days in (30, 90):
        invoice = buy(telegram, alice, days)
        invoice_id = invoice_id_of(telegram, invoice)
        cryptopay.pay(invoice_id)
        press(telegram, alice, invoice, f'check:{invoice_id}')
        assert 'Оплата получена' in text_of(current(telegram, invoice))
    user = User.get(User.telegram_id == 1002)
    first, second = Grant.select().where(Grant.user == user).order_by(Grant.id)
    assert second.expires_before == first.expires_after
    assert user.expires_at == first.expires_after + timedelta(days=90)
    assert panel_expiry(panel, user.panel_email) == user.expires_at and len(panel.clients) == 1


def polls(cryptopay):
    """Return how many getInvoices calls Crypto Pay has had (Check presses and the poller)."""
    return sum(1 for method, _ in list(cryptopay.calls) if method == 'getInvoices')


def test_two_presses_and_the_poller_settle_once(bot, telegram, panel, cryptopay):
    alice = person(1003)
    buy(telegram, person(1013, name='Bob'))  # left pending, so every poll asks Crypto Pay: we can see it ran
    invoice = buy(telegram, alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.pay(invoice_id)
    first = telegram.press(alice, invoice, f'check:{invoice_id}')
    second = telegram.press(alice, invoice, f'check:{invoice_id}')
    telegram.wait_for_answer(first), telegram.wait_for_answer(second)
    answered = polls(cryptopay)
    # the presses are answered, so a getInvoices from now on is the poller's (PAYMENT_POLL_SECONDS=1):
    # wait until it has run after the settlement, when a second credit by the poller would have happened
    assert eventually(lambda: polls(cryptopay) > answered, timeout=15), 'the poller never ran'
    assert Grant.select().where(Grant.reason == 'payment').count() == 1
    user = User.get(User.telegram_id == 1003)
    assert user.expires_at == Grant.get().expires_after
    assert Payment.get(Payment.invoice_id == invoice_id).status == 'paid'
    assert panel_expiry(panel, user.panel_email) == user.expires_at


def test_poller_settles_and_sends_the_link_unprompted(bot, telegram, panel, cryptopay):
    alice = person(1004)
    invoice = buy(telegram, alice)
    cryptopay.pay(invoice_id_of(telegram, invoice))
    message = telegram.wait_for_message(1004, contains='VPN is ready', timeout=15)
    user = User.get(User.telegram_id == 1004)
    assert user.panel_sub_id in text_of(message)
    assert eventually(lambda: Payment.get().notified_at is not None)  # recorded once Telegram answered


def test_expired_invoice_says_so(bot, telegram, cryptopay):
    alice = person(1005)
    invoice = buy(telegram, alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.expire(invoice_id)
    telegram.wait_for(lambda call: call.method == 'editMessageText' and 'expired' in str(call.params.get('text')),
                      timeout=15)
    assert Payment.get().status == 'expired'
    assert 'expired' in text_of(current(telegram, invoice))


def test_someone_elses_invoice_is_refused(bot, telegram, cryptopay):
    alice, mallory = person(1006), person(1066, name='Mallory')
    invoice = buy(telegram, alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.pay(invoice_id)
    menu = ask(telegram, mallory, '/start')
    answer = press(telegram, mallory, menu, f'check:{invoice_id}', strict=False)
    assert 'not yours' in answer['text']
    assert User.get(User.telegram_id == 1066).expires_at is None


def test_my_subscription_shows_status_traffic_link_and_qr(bot, telegram, panel, cryptopay):
    alice = person(1007)
    invoice = buy(telegram, alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.pay(invoice_id)
    press(telegram, alice, invoice, f'check:{invoice_id}')
    user = User.get(User.telegram_id == 1007)
    panel.traffic[user.panel_email]['up'] = 3 * 1024 ** 3
    menu = ask(telegram, alice, '/start')
    press(telegram, alice, menu, 'sub')
    shown = text_of(current(telegram, menu))
    assert 'Active until' in shown and '3.0 GB' in shown and user.panel_sub_id in shown
    photo = telegram.wait_for(lambda call: call.method == 'sendPhoto')
    assert photo.params['chat_id'] in (1007, '1007')


def test_gift_refused_then_granted_once(bot, telegram, panel):
    alice = person(1008)
    menu = ask(telegram, alice, '/start')
    telegram.set_member(CHANNEL_CHAT_ID, 1008, 'left')
    press(telegram, alice, menu, 'gift')
    refusal = current(telegram, menu)
    assert 'https://t.me/spn_channel' in text_of(refusal)
    assert ('📢 Open the channel', 'https://t.me/spn_channel') in telegram.buttons(refusal)
    telegram.set_member(CHANNEL_CHAT_ID, 1008, 'member')
    press(telegram, alice, refusal, 'gift')
    assert '3 free days' in text_of(current(telegram, menu))
    user = User.get(User.telegram_id == 1008)
    assert panel_expiry(panel, user.panel_email) == user.expires_at
    again = ask(telegram, alice, '/start')
    answer = press(telegram, alice, again, 'gift')
    assert 'already' in answer['text']
    assert Grant.select().where(Grant.reason == 'gift').count() == 1


@pytest.mark.parametrize('status,is_member,granted', [
    ('administrator', None, True), ('creator', None, True), ('restricted', True, True),
    ('restricted', False, False), ('kicked', None, False)])
def test_gift_membership_statuses(bot, telegram, status, is_member, granted):
    alice = person(1009)
    menu = ask(telegram, alice, '/start')
    telegram.set_member(CHANNEL_CHAT_ID, 1009, status, is_member=is_member)
    press(telegram, alice, menu, 'gift')
    assert (User.get(User.telegram_id == 1009).expires_at is not None) == granted


def test_every_promo_answer(bot, telegram):
    PromoCode.create(code='SPRING24', days=10, max_uses=1)
    PromoCode.create(code='OLDONE', days=10, max_uses=5, expires_at=datetime(2020, 1, 1))
    alice, bob = person(1010), person(1011, name='Bob')
    menu = ask(telegram, alice, '/start')
    press(telegram, alice, menu, 'promo')
    assert 'promo code' in text_of(current(telegram, menu))
    assert 'accepted' in text_of(ask(telegram, alice, 'spring24'))
    assert 'already used' in text_of(ask(telegram, alice, '/promo SPRING24'))
    assert 'no such' in text_of(ask(telegram, alice, '/promo NOSUCH99'))
    assert 'expired' in text_of(ask(telegram, alice, '/promo OLDONE'))
    assert 'does not look like' in text_of(ask(telegram, alice, "/promo <b>'; DROP TABLE user;--"))
    ask(telegram, bob, '/start')
    assert 'used up' in text_of(ask(telegram, bob, '/promo SPRING24'))
    assert User.get(User.telegram_id == 1011).expires_at is None
    assert Grant.select().where(Grant.reason == 'promo').count() == 1


def test_referral_bonus_once(bot, telegram, cryptopay):
    inviter, friend = person(1012, name='Ivan'), person(1013, name='Fred')
    menu = ask(telegram, inviter, '/start')
    press(telegram, inviter, menu, 'invite')
    code = User.get(User.telegram_id == 1012).invite_code
    assert f'https://t.me/spn_test_bot?start={code}' in text_of(current(telegram, menu))
    ask(telegram, friend, f'/start {code}')
    for _ in range(2):
        invoice = buy(telegram, friend)
        invoice_id = invoice_id_of(telegram, invoice)
        cryptopay.pay(invoice_id)
        press(telegram, friend, invoice, f'check:{invoice_id}')
    bonus = Grant.select().where(Grant.reason == 'referral')
    assert bonus.count() == 1 and bonus.get().user.telegram_id == 1012 and bonus.get().days == 7
    again = ask(telegram, inviter, '/start')
    press(telegram, inviter, again, 'invite')
    assert 'Joined: 1 · paid: 1' in text_of(current(telegram, again))


def test_admin_commands(bot, telegram, cryptopay):
    alice = person(1014)
    ask(telegram, alice, '/start')
    ask(telegram, ADMIN, '/start')
    assert 'Users' in text_of(ask(telegram, ADMIN, '/stats'))
    created = text_of(ask(telegram, ADMIN, '/newcode 15 3 SUMMER25'))
    assert 'SUMMER25' in created and PromoCode.get(PromoCode.code == 'SUMMER25').max_uses == 3
    random_code = text_of(ask(telegram, ADMIN, '/newcode'))
    assert PromoCode.select().count() == 2 and 'Promo code' in random_code
    assert 'Usage' in text_of(ask(telegram, ADMIN, '/newcode 0 1'))
    assert 'Usage' in text_of(ask(telegram, ADMIN, '/newcode 5 1 ab'))
    assert '1014' in text_of(ask(telegram, ADMIN, '/user @alice1014'))
    assert 'Granted 5 days' in text_of(ask(telegram, ADMIN, '/give 1014 5'))
    grant = Grant.get(Grant.reason == 'admin')
    assert grant.granted_by == 900 and grant.user.telegram_id == 1014
    assert 'Usage' in text_of(ask(telegram, ADMIN, '/give 1014 -5'))
    telegram.block_user(1014)
    ask(telegram, ADMIN, '/broadcast Hello <everyone>')
    final = telegram.wait_for(lambda call: call.method == 'editMessageText'
                              and 'finished' in str(call.params.get('text')), timeout=15)
    assert 'delivered 1' in final.params['text'] and 'blocked 1' in final.params['text']
    assert User.get(User.telegram_id == 1014).blocked


@pytest.mark.parametrize('command', ['/stats', '/newcode 5 5 FREEBIE', '/user 1', '/give 1015 365',
                                     '/broadcast spam', '/sync'])
def test_admin_commands_refused_to_others(bot, telegram, command):
    mallory = person(1015, name='Mallory')
    ask(telegram, mallory, '/start')
    unknown = text_of(ask(telegram, mallory, '/nonsense'))
    assert text_of(ask(telegram, mallory, command)) == unknown
    assert PromoCode.select().count() == 0 and User.get(User.telegram_id == 1015).expires_at is None


def test_garbage_and_stale_buttons_are_answered(bot, telegram):
    alice = person(1016)
    menu = ask(telegram, alice, '/start')
    assert 'did not understand' in text_of(ask(telegram, alice, 'hello there'))
    assert 'did not understand' in text_of(ask(telegram, alice, '/unknowncommand'))
    for data, notice in (('check:999999', 'payment_not_found'), ('plan:7', 'stale'), ('plan:abc', 'stale'),
                         ('drop table', 'stale'), ('', 'stale'), ('x' * 64, 'stale'), ('check:-1', 'stale')):
        assert press(telegram, alice, menu, data, strict=False)['text'] == t('en', notice), data
    assert 'Hi, Alice' in text_of(ask(telegram, alice, '/start'))  # still alive


def test_without_bot_token_exits_2_with_one_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != 'BOT_TOKEN'}
    env['BOT_TOKEN'] = ''
    done = subprocess.run([sys.executable, str(ROOT / 'bot.py')], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == '' and done.stderr.strip().splitlines() == ['error: BOT_TOKEN is not set (see .env.example)']


def test_malformed_setting_named_without_its_value(telegram, panel, cryptopay, database, tmp_path):
    env = {**os.environ, **settings_env(panel, cryptopay, database, XUI_INBOUND_ID='one-two-secret')}
    done = subprocess.run([sys.executable, str(ROOT / 'bot.py')], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and 'XUI_INBOUND_ID' in done.stderr and 'one-two-secret' not in done.stderr


def test_wrong_bot_token_stops_with_a_clear_line(telegram, panel, cryptopay, database, tmp_path):
    env = {**os.environ, **settings_env(panel, cryptopay, database, TELEGRAM_API_URL=telegram.url,
                                         BOT_TOKEN='654321:wrong-token-value')}
    done = subprocess.run([sys.executable, str(ROOT / 'bot.py')], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and 'check BOT_TOKEN' in done.stdout
    assert 'wrong-token-value' not in done.stdout + done.stderr and 'Traceback' not in done.stdout


def test_sigterm_stops_the_bot_promptly(telegram, panel, cryptopay, database, tmp_path):
    running = start_bot(telegram, panel, cryptopay, database, tmp_path)
    running.process.terminate()
    assert running.process.wait(10) == 0
    running.stop()
    assert 'stopping on signal' in running.output()
