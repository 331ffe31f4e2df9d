"""The fault suite: races, kill -9 crashes, outages and a database down, against the real bot and database.

Each scenario is a plain function over a Rig (the database, the three loopback fakes, a scratch directory)
that drives the bot, then audits money and links and returns an Outcome. The tests assert on it;
soak/run.py runs the same scenarios many times to fill docs/dev/RELIABILITY.md. Nothing of ours is mocked:
bot.py runs as a subprocess (or its handlers on an unthreaded TeleBot), the fakes hold it at a precise
step of settlement, and SIGKILL ends it there.
"""
import contextlib
import os
import pwd
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import telebot
from peewee import InterfaceError, OperationalError
from telebot import apihelper

import config
import jobs
import models
from bot import ShopBot
from conftest import (BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD, PANEL_USER, PG_URL, ROOT, TIMEOUT,
                      settings_env)
from cryptobot import CryptoPayClient
from fake_cryptopay import FakeCryptoPay
from fake_telegram import FakeTelegram
from fake_xui import NEWEST, FakePanel
from messenger import Messenger
from models import PAID, PENDING, Grant, Payment, User, utcnow
from shop import NOTIFY_LEASE, Shop
from test_e2e import CHANNEL, CHANNEL_CHAT_ID, buy, invoice_id_of, person
from xui import XuiClient

EPOCH = datetime(1970, 1, 1)
HANG = 30  # seconds a fake holds the bot at a step; far longer than it takes to kill it there
JOB_STEP = timedelta(seconds=20)  # how often jobs.py runs retry_provisioning
CRASH_POINTS = ('invoice_paid', 'settled', 'panel_write', 'panel_answered', 'before_message')
PANEL_FAULTS = ('refused', 'hang', 'http_500', 'success_false')
CRYPTOPAY_FAULTS = ('http_5xx', 'rate_limited', 'hang')
BUSY = 'try again in a minute'  # the end of every "busy"/"service down" answer (texts.py)
# 3x-ui record and body shapes the panel scenarios run on: the first v3.1 release and the newest (v3.4.2+ records
# carry wireguard fields and a string allowedIPs that the update body must not echo); the rest run on NEWEST
PANEL_SHAPES = ('3.1.0', NEWEST)


# The audit

@dataclass
class Outcome:
    """What a scenario did to money: paid invoices, how many were lost or double-credited, recovery time."""
    payments: int = 0
    lost: int = 0  # paid, but not settled, credited, on the panel with the ledger's expiry, and told
    double: int = 0  # days credited beyond what was paid, or a panel client ahead of the ledger
    recovery: float = 0.0  # seconds from the end of the fault until everything was complete
    problems: list = field(default_factory=list)
    notes: str = ''

    def flag(self, kind, count, problem):
        setattr(self, kind, getattr(self, kind) + count)
        self.problems.append(problem)


def panel_ms(moment):
    """Turn a stored naive UTC datetime into the panel's expiryTime milliseconds."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def link_messages(telegrams, user):
    """Return the delivered messages (new or edited) that carried the user's subscription link."""
    return [call for telegram in telegrams for call in list(telegram.sent)
            if call.ok and call.method in ('sendMessage', 'editMessageText')
            and str(call.params.get('chat_id')) == str(user.telegram_id)
            and user.panel_sub_id in str(call.params.get('text'))]


def ready_messages(telegrams, user):
    """Return the unprompted "your VPN is ready" messages the user got."""
    return [call for call in link_messages(telegrams, user) if call.method == 'sendMessage']


def audit(rig, invoice_ids, recovery=0.0, messages=True, telegrams=None):
    """Check every paid invoice end to end: ledger, grants, panel and the buyer's link; return the Outcome."""
    outcome = Outcome(payments=len(invoice_ids), recovery=recovery)
    telegrams = telegrams or [rig.telegram]
    by_user = {}
    for invoice_id in invoice_ids:
        payment = Payment.get_or_none(Payment.invoice_id == invoice_id)
        grants = list(Grant.select().where(Grant.reason == 'payment', Grant.reference == str(invoice_id)))
        if payment is None or payment.status != PAID or not grants:
            outcome.flag('lost', 1, f'invoice {invoice_id} was paid but is not settled and credited')
            continue
        if len(grants) > 1 or grants[0].days != payment.plan_days:
            outcome.flag('double', 1, f'invoice {invoice_id} credited {[g.days for g in grants]} days')
        if payment.provisioned_at is None or payment.notified_at is None:
            outcome.flag('lost', 1, f'invoice {invoice_id}: provisioned {payment.provisioned_at}, '
                                    f'told {payment.notified_at}')
        by_user.setdefault(payment.user_id, []).append(payment)
    for user_id, payments in by_user.items():
        user, count = User.get_by_id(user_id), len(payments)
        paid_days = sum(payment.plan_days for payment in payments)
        granted = sum(grant.days for grant in Grant.select().where(Grant.user == user_id))
        if granted > paid_days:
            outcome.flag('double', count, f'user {user.telegram_id} got {granted} days for {paid_days} paid')
        derived = models.derive_expiry(user_id)
        if derived != user.expires_at:
            kind = 'double' if user.expires_at and derived and user.expires_at > derived else 'lost'
            outcome.flag(kind, count, f'user {user.telegram_id}: expiry {user.expires_at}, ledger says {derived}')
        client = rig.panel.clients.get(user.panel_email)
        if client is None or client['enable'] is not True or client['subId'] != user.panel_sub_id:
            outcome.flag('lost', count, f'user {user.telegram_id} has no working panel client: {client}')
        elif user.expires_at and client['expiryTime'] > panel_ms(user.expires_at):
            outcome.flag('double', count, f'user {user.telegram_id}: the panel is ahead of the ledger')
        elif user.expires_at and client['expiryTime'] < panel_ms(user.expires_at):
            outcome.flag('lost', count, f'user {user.telegram_id}: the panel is behind the ledger')
        if messages and not link_messages(telegrams, user):
            outcome.flag('lost', count, f'user {user.telegram_id} never got the link')
    return outcome


def wait_until(predicate, timeout, what):
    """Poll predicate until it returns something true and return that; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'{what}: not within {timeout} s')
        time.sleep(0.05)


def told(invoice_id):
    """Tell whether the buyer of this invoice has been recorded as having their link."""
    payment = Payment.get_or_none(Payment.invoice_id == invoice_id)
    return payment is not None and payment.notified_at is not None


# The world a scenario runs in

class BotProcess:
    """bot.py in a subprocess that a test can kill -9; its output goes to a log that survives restarts."""

    def __init__(self, env, log_path, telegram):
        self.log_path = log_path
        self.telegram = telegram
        self.polls = telegram.counts['getUpdates']
        with open(log_path, 'a') as log:
            self.process = subprocess.Popen([sys.executable, str(ROOT / 'bot.py')], env=env, cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=30):
        """Wait until this process long-polls its fake Telegram (it has started its handlers and jobs)."""
        wait_until(lambda: self.telegram.counts['getUpdates'] > self.polls or self.process.poll() is not None,
                   timeout, 'the bot starting')
        if self.process.poll() is not None:
            raise AssertionError(f'the bot exited with {self.process.returncode}:\n{self.output()}')
        return self

    def kill(self):
        """SIGKILL the bot: no cleanup, no finally blocks, exactly like a power cut."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self):
        return self.log_path.read_text(errors='replace')


class Rig:
    """One scenario's world: the real database, a 3x-ui panel, Crypto Pay and Telegram, and scratch space."""

    def __init__(self, database_url, scratch, panel, cryptopay, telegram):
        self.database_url = database_url
        self.scratch = Path(scratch)
        self.panel = panel
        self.cryptopay = cryptopay
        self.telegram = telegram
        self.bots = []
        self.logs = []

    def env(self, telegram, **overrides):
        settings = {'TELEGRAM_API_URL': telegram.url, 'PAYMENT_POLL_SECONDS': 1,
                    'BACKUP_DIR': self.scratch / 'backups', **overrides}
        env = {**os.environ, **settings_env(self.panel, self.cryptopay, self.database_url, **settings)}
        env.pop('TEST_DATABASE_URL', None)
        return env

    def launch(self, telegram=None, log='bot', **overrides):
        """Start bot.py without waiting for it; settings as env overrides (e.g. PAYMENT_POLL_SECONDS=1)."""
        telegram = telegram or self.telegram
        log_path = self.scratch / f'{log}.log'
        if log_path not in self.logs:
            self.logs.append(log_path)
        process = BotProcess(self.env(telegram, **overrides), log_path, telegram)
        self.bots.append(process)
        return process

    def start_bot(self, telegram=None, **overrides):
        """Start bot.py and wait until it serves."""
        return self.launch(telegram, **overrides).wait_ready()

    def settings(self):
        return config.load(settings_env(self.panel, self.cryptopay, self.database_url))

    def shop(self, panel_timeout=TIMEOUT, pay_timeout=TIMEOUT, sleep=time.sleep):
        """Build a Shop on the fakes with short timeouts, one retry and tiny backoffs."""
        settings = self.settings()
        panel = XuiClient(settings.xui_url, settings.xui_inbound_id, settings.xui_sub_url,
                          username=settings.xui_username, password=settings.xui_password,
                          timeout=panel_timeout, retries=1, backoff=0.01)
        cryptopay = CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, timeout=pay_timeout,
                                    retries=1, backoff=0.01, sleep=sleep)
        return Shop(settings, panel, cryptopay)

    def messenger(self):
        apihelper.API_URL = self.telegram.url + '/bot{0}/{1}'
        return Messenger(telebot.TeleBot(BOT_TOKEN, threaded=False), sleep=lambda seconds: None)

    def customer(self, shop, telegram_id, telegrams=None, invoices=1):
        """Register a buyer who has opened the bot, with invoices paid at Crypto Pay; return the (last) id."""
        for telegram in telegrams or [self.telegram]:
            telegram.add_user(person(telegram_id))
        user, _ = shop.register(telegram_id, f'buyer{telegram_id}', 'Buyer', 'en')
        lifetime = timedelta(seconds=shop.settings.invoice_expires_seconds)
        for n in range(invoices):
            # bought an invoice lifetime apart: a buyer's pending invoice for the same plan is reused
            payment = shop.create_invoice(user, 30, now=utcnow() - lifetime * (invoices - 1 - n))
            self.cryptopay.pay(payment.invoice_id)
        return payment.invoice_id

    def close(self):
        for bot in self.bots:
            bot.stop()

    def output(self):
        return '\n'.join(f'--- {path.name}\n{path.read_text(errors="replace")}' for path in self.logs
                         if path.exists())


@contextlib.contextmanager
def make_rig(database_url, scratch, panel_version=NEWEST):
    """Run the three fakes (and any bots started on them) for the duration of a with block."""
    with FakePanel(generation='v3', version=panel_version, username=PANEL_USER, password=PANEL_PASSWORD) as panel, \
            FakeCryptoPay(token=CRYPTOPAY_TOKEN) as cryptopay, FakeTelegram(token=BOT_TOKEN) as telegram:
        telegram.add_chat(CHANNEL_CHAT_ID, username=CHANNEL)
        rig = Rig(database_url, scratch, panel, cryptopay, telegram)
        try:
            yield rig
        finally:
            rig.close()


class Chat:
    """The real handlers on an unthreaded TeleBot, fed from the fake Telegram's queue as polling would."""

    def __init__(self, rig, shop):
        apihelper.API_URL = rig.telegram.url + '/bot{0}/{1}'
        self.telegram = rig.telegram
        self.bot = telebot.TeleBot(BOT_TOKEN, threaded=False)
        self.handlers = ShopBot(self.bot, shop, shop.settings)
        self.handlers.username = self.bot.get_me().username
        self.offset = 0

    def fetch(self):
        """Take every queued update from the fake, confirming the ones taken before."""
        updates = self.bot.get_updates(offset=self.offset, timeout=5, long_polling_timeout=0)
        if updates:
            self.offset = updates[-1].update_id + 1
        return updates

    def pump(self):
        """Handle every queued update in this thread; return how many there were."""
        updates = self.fetch()
        self.bot.process_new_updates(updates)
        return len(updates)

    def say(self, user, text):
        """Send text as the user, let the bot handle it and return the bot's newest message to them."""
        self.telegram.send_text(user, text)
        self.pump()
        return self.telegram.messages_to(user['id'])[-1]

    def press(self, user, message, data):
        """Press a button (any data, as a forged client can) and return the press's answer."""
        update_id = self.telegram.press(user, message, data, strict=False)
        self.pump()
        return self.telegram.wait_for_answer(update_id, timeout=1)

    def shown(self, message):
        """Return the text of a message as it looks now."""
        return self.telegram.get_message(message['chat']['id'], message['message_id'])['text']

    def buy(self, user, days=30):
        """Open the menu, press Buy and a plan; return the invoice message."""
        menu = self.say(user, '/start')
        self.press(user, menu, 'buy')
        self.press(user, menu, f'plan:{days}')
        return menu


@pytest.fixture
def rig(database, tmp_path, request):
    """The scenario's world; a test parametrized indirectly over PANEL_SHAPES picks the panel's version."""
    with make_rig(database, tmp_path, getattr(request, 'param', NEWEST)) as made:
        yield made
        output = made.output()
        print(output)  # shown only when the test fails
    for secret in (BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD):
        assert secret not in output, 'a secret reached the log'


def threads_at_once(targets):
    """Run each callable in its own thread (with its own database connection), all released together."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def run(target):
        try:
            barrier.wait()
            with models.db.connection_context():  # after the barrier: more threads than pooled connections
                target()
        except BaseException as exc:  # noqa: BLE001 — reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# Races

def race_checks_in_threads(rig, presses=50):
    """50 Check presses for one paid invoice at once, each a thread with its own Shop and connection."""
    invoice_id = rig.customer(rig.shop(), 2001)
    results = []

    def check():
        results.append(rig.shop().check_payment(2001, invoice_id))

    started = time.monotonic()
    threads_at_once([check] * presses)
    assert [result.status for result in results] == [PAID] * presses
    assert any(result.provisioned for result in results)
    return audit(rig, [invoice_id], time.monotonic() - started, messages=False)


def race_presses_through_bot(rig, presses=50):
    """50 Check presses queued at once to the bot process, which handles them on its worker threads."""
    rig.start_bot(PAYMENT_POLL_SECONDS=3600)  # the poller stays out: the presses race each other
    alice = person(2002)
    invoice = buy(rig.telegram, alice)
    invoice_id = invoice_id_of(rig.telegram, invoice)
    rig.cryptopay.pay(invoice_id)
    # hold the fake's lock so every press is queued before the bot's next getUpdates takes any
    with rig.telegram._cond:
        updates = [rig.telegram.press(alice, invoice, f'check:{invoice_id}', strict=False)
                   for _ in range(presses)]
    started = time.monotonic()
    for update_id in updates:
        rig.telegram.wait_for_answer(update_id, timeout=60)
    wait_until(lambda: told(invoice_id), 30, 'the buyer told')
    return audit(rig, [invoice_id], time.monotonic() - started)


def race_poller_and_presses(rig, invoices=5, presses=10, pollers=2):
    """Pollers (jobs.poll_payments) and Check presses through the real handlers, all at the same moment."""
    shop = rig.shop()
    chat = Chat(rig, shop)
    buyers = [person(2100 + n) for n in range(invoices)]
    invoice_ids = [rig.customer(shop, buyer['id']) for buyer in buyers]
    menus = [chat.say(buyer, '/start') for buyer in buyers]
    for buyer, menu, invoice_id in zip(buyers, menus, invoice_ids):
        for _ in range(presses):
            rig.telegram.press(buyer, menu, f'check:{invoice_id}', strict=False)
    updates = chat.fetch()
    assert len(updates) == invoices * presses

    def press(update):
        return lambda: chat.bot.process_new_updates([update])

    def poll():
        jobs.poll_payments(rig.shop(), rig.messenger())

    started = time.monotonic()
    threads_at_once([press(update) for update in updates] + [poll] * pollers)
    assert len(rig.telegram.callback_answers) == invoices * presses
    outcome = audit(rig, invoice_ids, time.monotonic() - started)
    for invoice_id in invoice_ids:
        user = Payment.get(Payment.invoice_id == invoice_id).user
        if len(ready_messages([rig.telegram], user)) > 1:
            outcome.problems.append(f'user {user.telegram_id} was sent the link more than once')
    return outcome


def race_two_bots(rig, buyers=50, invoices_each=4):
    """Two bot.py processes on one database, each with its own Telegram, polling the same paid invoices.

    Each buyer has several invoices, so the two processes also race to push one buyer's growing expiry.
    """
    second = FakeTelegram(token=BOT_TOKEN)
    try:
        telegrams = [rig.telegram, second]
        shop = rig.shop()
        for n in range(buyers):
            rig.customer(shop, 30000 + n, telegrams, invoices=invoices_each)
        invoice_ids = [payment.invoice_id for payment in Payment.select()]
        bots = [rig.launch(telegram, log=f'bot{n}') for n, telegram in enumerate(telegrams)]
        started = time.monotonic()
        for bot in bots:
            bot.wait_ready()
        wait_until(lambda: Payment.select().where(Payment.notified_at.is_null()).count() == 0, 120,
                   'every buyer told')
        outcome = audit(rig, invoice_ids, time.monotonic() - started, telegrams=telegrams)
        outcome.notes = f'settled per process: {[bot.output().count("payment settled") for bot in bots]}'
        for user in User.select():
            if len(ready_messages(telegrams, user)) != invoices_each:
                outcome.problems.append(f'user {user.telegram_id}: {len(ready_messages(telegrams, user))} '
                                        f'link messages for {invoices_each} payments')
        return outcome
    finally:
        for bot in rig.bots:
            bot.stop()
        second.close()


def test_ledger_replays_grants_in_the_order_they_were_applied(rig):
    """Two bot processes credit one buyer; the one that read its clock first commits second (found by
    test_two_bot_processes_settle_two_hundred_invoices_once: the replayed ledger was 1 s short)."""
    user, _ = rig.shop().register(2201, 'buyer2201', 'Buyer', 'en')
    now = utcnow().replace(microsecond=0)
    models.grant_days(user.id, 30, 'payment', 'committed-first', now=now + timedelta(seconds=1))
    models.grant_days(user.id, 30, 'payment', 'read-its-clock-first', now=now)
    assert models.derive_expiry(user.id) == User.get_by_id(user.id).expires_at


def test_fifty_concurrent_checks_settle_once(rig):
    outcome = race_checks_in_threads(rig)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems
    assert Grant.select().where(Grant.reason == 'payment').count() == 1


def test_fifty_presses_queued_at_once_to_the_bot_settle_once(rig):
    outcome = race_presses_through_bot(rig)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems
    assert len(rig.telegram.callback_answers) == 50 + 2  # and the Buy and plan presses
    assert 'Traceback' not in rig.output()


def test_pollers_and_presses_at_once_settle_once_and_link_once(rig):
    outcome = race_poller_and_presses(rig)
    assert (outcome.lost, outcome.double) == (0, 0) and not outcome.problems, outcome.problems


@pytest.mark.parametrize('rig', PANEL_SHAPES, indirect=True)
def test_two_bot_processes_settle_two_hundred_invoices_once(rig):
    if not PG_URL:
        pytest.skip('a second bot process refuses to share a SQLite file')
    outcome = race_two_bots(rig)
    assert outcome.payments == 200, outcome.payments
    assert (outcome.lost, outcome.double) == (0, 0) and not outcome.problems, outcome.problems
    assert Grant.select().where(Grant.reason == 'payment').count() == 200
    assert 'Traceback' not in rig.output()


# Crashes: kill -9 at each step of settlement and provisioning

def hold_at(rig, point, buyer, invoice, invoice_id):
    """Make the fakes hold the running bot at a step of settling this invoice; return once it is there."""
    email = f'spn-{buyer["id"]}'
    lookup = f'GET panel/api/clients/get/{email}'
    if point == 'invoice_paid':  # Crypto Pay says paid; the bot asked and waits for the answer
        rig.cryptopay.pay(invoice_id)
        asked = len(rig.cryptopay.calls)
        rig.cryptopay.hang_next(1, seconds=HANG)
        rig.telegram.press(buyer, invoice, f'check:{invoice_id}')
        wait_until(lambda: [m for m, _ in rig.cryptopay.calls[asked:] if m == 'getInvoices'], 20, 'the bot asking')
        return
    if point == 'settled':  # the guarded update committed; the panel lookup before the write hangs
        rig.panel.hang_next(1, seconds=HANG, route=lookup)
        route, hits = lookup, 1
    elif point == 'panel_write':  # the panel applied the new client, its answer never reaches the bot
        route, hits = 'POST panel/api/clients/add', 1
        rig.panel.hang_next(1, seconds=HANG, route=route)
    elif point == 'panel_answered':  # the write was answered; the read-back after it hangs
        rig.panel.hang_next(1, seconds=0.001, route=lookup)
        rig.panel.hang_next(1, seconds=HANG, route=lookup)
        route, hits = lookup, 2
    else:  # before_message: provisioned, the link claimed; Telegram answers 429 and the bot waits
        rig.telegram.rate_limit_next(1, retry_after=HANG, method='sendMessage')
        rig.cryptopay.pay(invoice_id)
        wait_until(lambda: [c for c in rig.telegram.sent if c.method == 'sendMessage' and c.status == 429],
                   20, 'the bot sending the link')
        return
    rig.cryptopay.pay(invoice_id)
    wait_until(lambda: rig.panel.count(route) >= hits, 20, f'the bot reaching {route}')


def check_killed_at(rig, point, invoice_id, email):
    """Assert the database and panel are as the killed step leaves them (the kill landed where meant)."""
    payment = Payment.get(Payment.invoice_id == invoice_id)
    grants = Grant.select().where(Grant.reason == 'payment').count()
    if point == 'invoice_paid':
        assert (payment.status, grants) == (PENDING, 0)
        return
    assert (payment.status, grants) == (PAID, 1)
    assert (email in rig.panel.clients) == (point != 'settled')
    assert (payment.provisioned_at is not None) == (point == 'before_message')
    assert payment.notified_at is None
    assert (payment.notify_claimed_at is not None) == (point == 'before_message')


def crash(rig, point, real_lease=False):
    """Kill -9 the bot at one step of a buyer's payment, restart it, and audit once all has completed.

    The killed sender of the link holds its lease (shop.NOTIFY_LEASE, 2 min): with real_lease the restarted
    bot is left to resend it after the lease; otherwise the jobs are run here with a clock past the lease.
    """
    buyer = person(4001)
    bot = rig.start_bot(PAYMENT_POLL_SECONDS=3600 if point == 'invoice_paid' else 1)
    invoice = buy(rig.telegram, buyer)
    invoice_id = invoice_id_of(rig.telegram, invoice)
    hold_at(rig, point, buyer, invoice, invoice_id)
    bot.kill()
    killed = time.monotonic()
    check_killed_at(rig, point, invoice_id, f'spn-{buyer["id"]}')
    if point == 'before_message' and not real_lease:
        shop, messenger = rig.shop(), rig.messenger()
        assert jobs.retry_provisioning(shop, messenger, now=utcnow() + NOTIFY_LEASE / 4) == 0  # still leased
        assert jobs.retry_provisioning(shop, messenger, now=utcnow() + NOTIFY_LEASE + JOB_STEP) == 1
    else:
        rig.start_bot(PAYMENT_POLL_SECONDS=1)
        wait_until(lambda: told(invoice_id), NOTIFY_LEASE.total_seconds() + 90 if real_lease else 60,
                   'the restarted bot completing the payment')
    outcome = audit(rig, [invoice_id], time.monotonic() - killed)
    user = User.get(User.telegram_id == buyer['id'])
    if len(ready_messages([rig.telegram], user)) != 1:
        outcome.problems.append(f'{len(ready_messages([rig.telegram], user))} link messages, not 1')
    return outcome


def crash_during_check_then_press_again(rig):
    """Kill -9 the bot inside the panel write of a Check press; after the restart the buyer presses again."""
    buyer = person(4002)
    bot = rig.start_bot(PAYMENT_POLL_SECONDS=3600)
    invoice = buy(rig.telegram, buyer)
    invoice_id = invoice_id_of(rig.telegram, invoice)
    rig.cryptopay.pay(invoice_id)
    rig.panel.hang_next(1, seconds=HANG, route='POST panel/api/clients/add')
    rig.telegram.press(buyer, invoice, f'check:{invoice_id}')
    wait_until(lambda: rig.panel.count('POST panel/api/clients/add'), 20, 'the bot writing to the panel')
    bot.kill()
    killed = time.monotonic()
    check_killed_at(rig, 'panel_write', invoice_id, f'spn-{buyer["id"]}')
    rig.start_bot(PAYMENT_POLL_SECONDS=3600)
    again = rig.telegram.press(buyer, invoice, f'check:{invoice_id}')
    rig.telegram.wait_for_answer(again, timeout=30)
    return audit(rig, [invoice_id], time.monotonic() - killed)


@pytest.mark.parametrize('point', CRASH_POINTS)
def test_kill_9_at_each_step_completes_exactly_once(rig, point):
    outcome = crash(rig, point)
    assert (outcome.lost, outcome.double) == (0, 0) and not outcome.problems, outcome.problems
    user = User.get(User.telegram_id == 4001)
    assert models.derive_expiry(user.id) == user.expires_at
    assert rig.panel.clients[user.panel_email]['expiryTime'] == panel_ms(user.expires_at)


def test_kill_9_inside_a_check_press_then_pressing_again_gives_the_link(rig):
    outcome = crash_during_check_then_press_again(rig)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems
    user = User.get(User.telegram_id == 4002)
    shown = rig.telegram.messages_to(4002)[-1]
    assert user.panel_sub_id in shown['text'] and 'Payment received' in shown['text']


# Outages: the panel

def start_panel_fault(panel, fault, tries=2, hang=4.0):
    """Break the panel one way (knob faults heal once used): `tries` per call, `hang` past the read timeout."""
    write = 'POST panel/api/clients/'  # add for a new buyer, update for a returning one
    if fault == 'refused':
        panel.refuse()
    elif fault == 'hang':  # applied, answered only after the bot's read timeout
        panel.hang_next(1, seconds=hang, route=write)
    elif fault == 'http_500':  # every try of one call
        panel.fail_next(tries, status=500)
    else:
        panel.success_false_next(1, route=write)


def panel_outage(rig, fault, outage=timedelta(minutes=2), returning=False):
    """A buyer pays while the panel is broken; the bot keeps answering, the jobs finish once it heals.

    The jobs run here on a simulated clock, every JOB_STEP as jobs.py schedules them; recovery is the
    simulated time from the panel healing to the buyer having their link. A returning buyer already has
    a client on the panel, so the broken write is a renewal (clients/update) rather than clients/add.
    """
    shop = rig.shop(panel_timeout=(5, 1.5))
    chat, messenger = Chat(rig, shop), rig.messenger()
    buyer = person(6001)
    paid_before = []
    if returning:
        invoice = chat.buy(buyer)
        paid_before.append(int(invoice_id_of(rig.telegram, rig.telegram.get_message(6001, invoice['message_id']))))
        rig.cryptopay.pay(paid_before[0])
        chat.press(buyer, invoice, f'check:{paid_before[0]}')
        assert 'Payment received! Your subscription is active' in chat.shown(invoice)
    invoice = chat.buy(buyer)
    invoice_id = int(invoice_id_of(rig.telegram, rig.telegram.get_message(6001, invoice['message_id'])))
    rig.cryptopay.pay(invoice_id)
    start_panel_fault(rig.panel, fault)
    answer = chat.press(buyer, invoice, f'check:{invoice_id}')
    assert answer['text'] is None and 'will arrive here shortly' in chat.shown(invoice)
    menu = chat.say(buyer, '/start')
    assert 'Hi, Alice' in menu['text']  # the bot keeps answering
    chat.press(buyer, menu, 'sub')  # raises unless the press is answered
    assert 'Active until' in chat.shown(menu)
    payment = Payment.get(Payment.invoice_id == invoice_id)
    assert payment.status == PAID and payment.provisioned_at is None
    clock = utcnow()
    if fault == 'refused':
        while clock < utcnow() + outage:  # the jobs keep failing, harmlessly, while it is down
            clock += JOB_STEP
            jobs.poll_payments(shop, messenger, now=clock)
            jobs.retry_provisioning(shop, messenger, now=clock)
        rig.panel.accept()
    healed = clock
    while not told(invoice_id) and clock < healed + timedelta(hours=1):
        clock += JOB_STEP
        jobs.poll_payments(shop, messenger, now=clock)
        jobs.retry_provisioning(shop, messenger, now=clock)
    outcome = audit(rig, paid_before + [invoice_id], (clock - healed).total_seconds())
    ready = ready_messages([rig.telegram], User.get(User.telegram_id == 6001))
    if len(ready) != 1:
        outcome.problems.append(f'{len(ready)} unprompted link messages, not 1')
    return outcome


@pytest.mark.parametrize('rig', PANEL_SHAPES, indirect=True)
@pytest.mark.parametrize('returning', [False, True], ids=['new buyer', 'renewal'])
@pytest.mark.parametrize('fault', PANEL_FAULTS)
def test_panel_outage_keeps_answering_and_loses_nothing(rig, fault, returning):
    outcome = panel_outage(rig, fault, returning=returning)
    assert (outcome.lost, outcome.double) == (0, 0) and not outcome.problems, outcome.problems


def panel_session_expiry(rig):
    """Two buyers pay; between them the panel forgets every session: the second press logs in again, once."""
    shop = rig.shop()
    chat = Chat(rig, shop)
    invoice_ids, logins = [], []
    for telegram_id in (6101, 6102):
        buyer = person(telegram_id)
        invoice = chat.buy(buyer)
        invoice_id = invoice_id_of(rig.telegram, rig.telegram.get_message(telegram_id, invoice['message_id']))
        rig.cryptopay.pay(invoice_id)
        logins.append(rig.panel.count('POST login'))
        chat.press(buyer, invoice, f'check:{invoice_id}')
        assert 'Payment received! Your subscription is active' in chat.shown(invoice)
        invoice_ids.append(invoice_id)
        rig.panel.expire_sessions()  # the panel restarted with a new secret, or the cookie died
    outcome = audit(rig, invoice_ids)
    if rig.panel.count('POST login') != logins[-1] + 1:
        outcome.problems.append(f'{rig.panel.count("POST login") - logins[-1]} logins for the second press, not 1')
    return outcome


@pytest.mark.parametrize('rig', PANEL_SHAPES, indirect=True)
def test_panel_session_expiring_mid_run_is_invisible_to_buyers(rig):
    outcome = panel_session_expiry(rig)
    assert (outcome.lost, outcome.double) == (0, 0) and not outcome.problems, outcome.problems


def long_panel_outage(rig, outage=timedelta(minutes=10)):
    """A buyer pays at the start of a long panel outage: how long after the panel is back do they get the link?"""
    shop, messenger = rig.shop(panel_timeout=(5, 1.5)), rig.messenger()
    invoice_id = rig.customer(shop, 6201)
    rig.panel.refuse()
    start = clock = utcnow()
    jobs.poll_payments(shop, messenger, now=clock)
    while clock < start + outage:
        clock += JOB_STEP
        jobs.retry_provisioning(shop, messenger, now=clock)
    rig.panel.accept()
    healed = clock
    while not told(invoice_id) and clock < healed + timedelta(hours=1):
        clock += JOB_STEP
        jobs.retry_provisioning(shop, messenger, now=clock)
    return audit(rig, [invoice_id], (clock - healed).total_seconds())


def test_link_follows_within_about_a_minute_of_a_long_panel_outage(rig):
    outcome = long_panel_outage(rig)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems
    assert outcome.recovery <= 80  # simulated seconds: a minute plus one run of the job


# Outages: Crypto Pay

def start_cryptopay_fault(cryptopay, fault, requests=2, hang=4.0):
    """Make the next `requests` Crypto Pay calls fail one way (a hang lasts past the read timeout)."""
    if fault == 'http_5xx':
        cryptopay.fail_next(requests, status=503)
    elif fault == 'rate_limited':
        cryptopay.rate_limit_next(requests, retry_after=7)
    else:
        cryptopay.hang_next(requests, seconds=hang)


def cryptopay_outage(rig, fault):
    """A paid buyer presses Check, the poller runs and another buyer picks a plan, all while Crypto Pay fails."""
    slept = []
    shop = rig.shop(pay_timeout=(5, 1.5), sleep=slept.append)
    chat, messenger = Chat(rig, shop), rig.messenger()
    buyer = person(6301)
    invoice = chat.buy(buyer)
    invoice_id = invoice_id_of(rig.telegram, rig.telegram.get_message(6301, invoice['message_id']))
    rig.cryptopay.pay(invoice_id)
    start_cryptopay_fault(rig.cryptopay, fault)
    assert BUSY in chat.press(buyer, invoice, f'check:{invoice_id}')['text']
    start_cryptopay_fault(rig.cryptopay, fault)
    assert jobs.guarded(jobs.poll_payments)(shop, messenger) is None  # logged, not raised
    other = person(6302)
    menu = chat.say(other, '/start')
    chat.press(other, menu, 'buy')
    # creating an invoice is retried only when the request surely did not land (a hang may have)
    start_cryptopay_fault(rig.cryptopay, fault, requests=1 if fault == 'hang' else 2)
    assert BUSY in chat.press(other, menu, 'plan:30')['text']
    assert Payment.select().count() == 1 and Payment.get().status == PENDING and Grant.select().count() == 0
    assert 'Hi, Alice' in chat.say(buyer, '/start')['text']  # the bot keeps answering
    healed = time.monotonic()
    start_cryptopay_fault(rig.cryptopay, fault, requests=1)  # one more failure: retried unseen
    assert chat.press(buyer, invoice, f'check:{invoice_id}')['text'] is None
    assert 'Payment received!' in chat.shown(invoice)
    if fault == 'rate_limited':
        assert 7 in slept  # Retry-After was honoured
    return audit(rig, [invoice_id], time.monotonic() - healed)


@pytest.mark.parametrize('fault', CRYPTOPAY_FAULTS)
def test_cryptopay_outage_says_try_again_and_loses_nothing(rig, fault):
    outcome = cryptopay_outage(rig, fault)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems


# Outages: the database

@contextlib.contextmanager
def database_down(rig):
    """Take the database away for real, as when the server or the disk is gone.

    PostgreSQL: the server is stopped (and started again after). SQLite: this thread's connection is closed
    and the database file moved off, with a directory standing in its place, so no connection can open it
    (the tests run as root, who reads any file, so permissions would not do).
    """
    if PG_URL:
        server = PostgresServer()
        server.stop()
        try:
            yield
        finally:
            server.start()
            reconnect_here()
        return
    path = Path(rig.database_url.removeprefix('sqlite:///'))
    models.db.close()  # this thread's connection; closing the last one folds the WAL into the file
    files = [Path(f'{path}{suffix}') for suffix in ('', '-wal', '-shm')]
    moved = [(file, file.with_name(file.name + '.away')) for file in files if file.exists()]
    for file, away in moved:
        file.rename(away)
    path.mkdir()
    try:
        yield
    finally:
        path.rmdir()
        for file, away in moved:
            away.rename(file)


def database_outage(rig):
    """A buyer pays while the database cannot be reached: every message is answered busy, nothing is lost."""
    shop = rig.shop()
    chat, messenger = Chat(rig, shop), rig.messenger()
    buyer = person(6401)
    invoice = chat.buy(buyer)
    invoice_id = invoice_id_of(rig.telegram, rig.telegram.get_message(6401, invoice['message_id']))
    rig.cryptopay.pay(invoice_id)
    with database_down(rig):
        for text in ('/start', '/promo', 'SPRING24', '/stats'):
            assert 'temporarily unavailable' in chat.say(buyer, text)['text']
        assert jobs.guarded(jobs.poll_payments)(shop, messenger) is None  # logged; runs again next time
    healed = time.monotonic()
    assert 'Hi, Alice' in chat.say(buyer, '/start')['text']
    assert chat.press(buyer, invoice, f'check:{invoice_id}')['text'] is None
    assert 'Payment received!' in chat.shown(invoice)
    return audit(rig, [invoice_id], time.monotonic() - healed)


def test_database_down_messages_are_answered_busy_and_nothing_is_lost(rig):
    outcome = database_outage(rig)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems


def test_database_down_button_presses_are_answered(rig):
    """Each press gets the outage notice in its buyer's language, in time (the fake refuses late answers)."""
    chat = Chat(rig, rig.shop())
    buyers = person(6402), person(6403, lang='ru')
    menus = [chat.say(buyer, '/start') for buyer in buyers]
    with database_down(rig):
        presses = [rig.telegram.press(buyer, menu, 'buy') for buyer, menu in zip(buyers, menus)]
        chat.pump()
    assert [rig.telegram.wait_for_answer(update_id, timeout=1)['text'] for update_id in presses] == [
        '⚠️ The shop is temporarily unavailable. Please try again in a minute.',
        '⚠️ Магазин временно недоступен. Попробуйте через минуту.']


class PostgresServer:
    """The PostgreSQL server the tests use, stopped and started with pg_ctl as the owner of its data."""

    def __init__(self):
        self.data = Path(models.db.execute_sql('SHOW data_directory').fetchone()[0])
        options = shlex.split((self.data / 'postmaster.opts').read_text())
        self.binary = str(Path(options[0]).with_name('pg_ctl'))
        skip = {i for i, option in enumerate(options) if option == '-D'} | \
               {i + 1 for i, option in enumerate(options) if option == '-D'}
        self.options = shlex.join(option for i, option in enumerate(options[1:], 1) if i not in skip)
        self.owner = pwd.getpwuid(self.data.stat().st_uid).pw_name

    def pg_ctl(self, *args):
        command = [self.binary, '-D', str(self.data), '-w', '-t', '60', *args]
        if os.geteuid() == 0 and self.owner != 'root':  # postgres refuses to run as root
            command = ['runuser', '-u', self.owner, '--'] + command
        subprocess.run(command, cwd=self.data.parent, check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        self.pg_ctl('-m', 'fast', 'stop')

    def start(self):
        self.pg_ctl('-l', str(self.data.parent / 'server.log'), '-o', self.options, 'start')


def reconnect_here():
    """Drop this process's pooled connections, which died with the server, and connect again."""
    with contextlib.suppress(OperationalError, InterfaceError):
        models.db.close()
    models.db.obj.close_all()
    models.db.connect(reuse_if_open=True)


def postgres_restart(rig, downtime=1.0):
    """Stop PostgreSQL under a serving bot, pay meanwhile, start it again: the bot must carry on by itself.

    :return: the Outcome and the answers to the first few /start after the server was back.
    """
    server = PostgresServer()
    rig.start_bot(PAYMENT_POLL_SECONDS=1)
    buyer = person(6501)
    invoice = buy(rig.telegram, buyer)
    invoice_id = invoice_id_of(rig.telegram, invoice)
    with rig.telegram._cond:  # a burst the worker threads serve at once, filling the bot's connection pool
        for _ in range(30):
            rig.telegram.send_text(buyer, '/help')
    for _ in range(30):
        rig.telegram.wait_for_message(6501, timeout=30)
    server.stop()
    try:
        rig.cryptopay.pay(invoice_id)
        rig.telegram.send_text(buyer, '/start')
        assert BUSY in rig.telegram.wait_for_message(6501, timeout=30)['text']
        time.sleep(downtime)  # the poller keeps failing meanwhile
    finally:
        server.start()
    back = time.monotonic()
    reconnect_here()
    answers = []
    while not answers or BUSY in answers[-1]:
        assert len(answers) < 50, f'the bot still says busy: {answers}'
        rig.telegram.send_text(buyer, '/start')
        answers.append(rig.telegram.wait_for_message(6501, timeout=30)['text'])
    wait_until(lambda: told(invoice_id), 60, 'the buyer told after the restart')
    return audit(rig, [invoice_id], time.monotonic() - back), answers


needs_postgres = pytest.mark.skipif(not PG_URL, reason='restarts the test PostgreSQL server (SQLite has none)')


@needs_postgres
def test_postgres_restart_while_the_bot_serves_loses_nothing_and_serves_at_once(rig):
    outcome, answers = postgres_restart(rig)
    assert (outcome.lost, outcome.double) == (0, 0), outcome.problems
    assert len(answers) == 1 and 'Hi, Alice' in answers[0], answers  # no "busy" once the server is back
