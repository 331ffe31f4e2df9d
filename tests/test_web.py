"""The HTTP side (web.py): health, metrics, the Crypto Pay webhook and Telegram's, over real HTTP on 127.0.0.1."""
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
import telebot
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

import config
import jobs
import leases
import metrics
import models
import web
from conftest import BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD, ROOT, settings_env
from models import PAID, PENDING, Grant, Payment, User
from test_e2e import RunningBot, buy, eventually, invoice_id_of, person
from test_faults import rig  # noqa: F401 (a fixture)

BUYER = {'id': 5001, 'first_name': 'Bob <&>', 'username': 'bob', 'language_code': 'en'}
SECRETS = (BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD, BOT_TOKEN.partition(':')[2])


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def serve(app):
    return web.Server(app, '127.0.0.1', 0).start()


@pytest.fixture
def http(settings, shop, messenger):
    """The App (no Telegram webhook) served by waitress on a free port; yields its base URL."""
    server = serve(web.App(settings, shop, messenger))
    yield f'http://127.0.0.1:{server.port}'
    server.stop()


def pending_invoice(shop, telegram, buyer=BUYER, days=30):
    """Register buyer (a chat in the fake Telegram too) and create a pending invoice; return the Payment."""
    telegram.add_user(buyer)
    user, _ = shop.register(buyer['id'], buyer['username'], buyer['first_name'], buyer['language_code'])
    return shop.create_invoice(user, days)


def payment_grants(invoice_id):
    return Grant.select().where(Grant.reason == 'payment', Grant.reference == str(invoice_id)).count()


def link_messages(telegram, chat_id):
    return [m for m in telegram.messages_to(chat_id) if 'vpn.example.test' in (m.get('text') or '')]


def assert_no_secrets(text):
    for secret in SECRETS:
        assert secret not in text


# health and metrics

def test_unknown_paths_get_404_and_wrong_methods_405_with_nothing_inside(http):
    for path in ('/', '/admin', '/healthz/', '/metrics.txt', '/../etc/passwd', '/telegram'):
        reply = requests.get(http + path, timeout=5)
        assert reply.status_code in (404, 405), path
        assert_no_secrets(reply.text)
    assert requests.get(http + '/nothing', timeout=5).json() == {'error': 'not found'}
    assert requests.post(http + '/healthz', timeout=5).status_code == 405
    assert requests.get(http + '/cryptopay', timeout=5).status_code == 405
    # the Telegram webhook exists only in webhook mode
    assert requests.post(http + '/telegram', json={'update_id': 1}, timeout=5).status_code == 404


def test_healthz_is_200_while_starting_and_after_a_recent_poll(settings, shop, messenger):
    server = serve(web.App(settings, shop, messenger))
    url = f'http://127.0.0.1:{server.port}/healthz'
    try:
        reply = requests.get(url, timeout=5)
        assert reply.status_code == 200, reply.text
        assert reply.json()['status'] == 'ok'
        lease = leases.JobLeases(['poll_payments'])
        lease.refresh()
        lease.record_run('poll_payments')
        reply = requests.get(url, timeout=5)
        assert reply.status_code == 200 and reply.json()['payment_poll_age_seconds'] < 5
    finally:
        server.stop()


def test_healthz_is_503_naming_a_stale_or_missing_payment_poll(settings, shop, messenger):
    long_ago = time.monotonic() - 10 * settings.payment_poll_seconds
    server = serve(web.App(settings, shop, messenger, started=long_ago))
    url = f'http://127.0.0.1:{server.port}/healthz'
    try:
        reply = requests.get(url, timeout=5)
        assert reply.status_code == 503
        assert 'payment poll has not run' in reply.json()['problems'][0]
        lease = leases.JobLeases(['poll_payments'])
        lease.refresh()
        lease.record_run('poll_payments', now=models.utcnow() - timedelta(seconds=3 * settings.payment_poll_seconds + 5))
        reply = requests.get(url, timeout=5)
        assert reply.status_code == 503
        assert 'payment poll last ran' in reply.json()['problems'][0]
        lease.record_run('poll_payments')
        assert requests.get(url, timeout=5).status_code == 200
    finally:
        server.stop()


def test_healthz_is_503_when_the_database_is_down(settings, shop, messenger, database):
    server = serve(web.App(settings, shop, messenger))
    url = f'http://127.0.0.1:{server.port}'
    try:
        # a real database that does not answer: nothing listens on this port
        models.connect_database(f'postgresql://postgres@127.0.0.1:{free_port()}/gone')
        reply = requests.get(url + '/healthz', timeout=15)
        assert reply.status_code == 503
        assert reply.json()['problems'] == ['database unavailable']
        metrics.forget()  # within CACHE_SECONDS of an earlier scrape (another test's) the ledger is remembered
        reply = requests.get(url + '/metrics', timeout=15)
        assert reply.status_code == 503 and 'Traceback' not in reply.text
    finally:
        models.connect_database(database, pool_size=40)
        server.stop()


def metric(text, name, **labels):
    """Return a sample's value from the exposition text (0 when absent)."""
    want = name + ('{' + ','.join(f'{k}="{v}"' for k, v in labels.items()) + '}' if labels else '')
    for line in text.splitlines():
        if line.startswith(want + ' '):
            return float(line.split()[-1])
    return 0.0


def test_metrics_expose_the_ledger_and_counters_move(http, shop, telegram, cryptopay):
    before = requests.get(http + '/metrics', timeout=5)
    assert before.status_code == 200
    assert before.headers['Content-Type'].startswith('text/plain; version=0.0.4')
    for name in ('spn_pending_invoices', 'spn_oldest_pending_invoice_age_seconds', 'spn_buyers_waiting_for_panel',
                 'process_resident_memory_bytes', 'spn_updates_handled_total', 'spn_update_handling_seconds',
                 'spn_payments_settled_total', 'spn_panel_failures_total', 'spn_telegram_sends_failed_total'):
        assert f'# HELP {name.removesuffix("_total")}' in before.text or f'# HELP {name}' in before.text, name
    payment = pending_invoice(shop, telegram)

    def scraped(name, **labels):
        return metric(requests.get(http + '/metrics', timeout=5).text, name, **labels)
    # the ledger is read at most once per CACHE_SECONDS: the new invoice shows within that
    assert eventually(lambda: scraped('spn_pending_invoices') == 1, timeout=metrics.CACHE_SECONDS + 5)
    time.sleep(1.1)
    assert scraped('spn_oldest_pending_invoice_age_seconds') >= 1  # counted at each scrape, never cached
    cryptopay.pay(payment.invoice_id)
    assert cryptopay.post_webhook(http + '/cryptopay', payment.invoice_id) == 200
    assert eventually(lambda: scraped('spn_pending_invoices') == 0, timeout=metrics.CACHE_SECONDS + 5)
    after = requests.get(http + '/metrics', timeout=5).text
    assert metric(after, 'spn_payments_settled_total', path='webhook', provider='cryptopay') == \
        metric(before.text, 'spn_payments_settled_total', path='webhook', provider='cryptopay') + 1
    assert_no_secrets(after)
    assert '_created' not in after  # OpenMetrics-only series, a third of the lines in this format


def test_the_ledger_gauges_are_read_once_per_cache_period_and_a_failed_read_is_not_kept(database):
    clock = [1000.0]
    ledger = metrics.LedgerCollector(seconds=2, clock=lambda: clock[0])
    reads = []
    ledger.values.read = lambda: reads.append(1) or metrics.LedgerCollector.read()
    values = {family.name: family.samples[0].value for family in ledger.collect()}
    assert values == {'spn_pending_invoices': 0, 'spn_oldest_pending_invoice_age_seconds': 0,
                      'spn_buyers_waiting_for_panel': 0}
    ledger.collect()
    clock[0] += 1.9
    ledger.collect()
    assert len(reads) == 1
    clock[0] += 0.2
    ledger.collect()
    assert len(reads) == 2
    clock[0] += 5
    ledger.values.read = lambda: (_ for _ in ()).throw(models.OperationalError('down'))
    with pytest.raises(models.OperationalError):
        ledger.collect()
    with pytest.raises(models.OperationalError):  # the failure was not remembered as a value
        ledger.collect()


# the Crypto Pay webhook

def test_cryptopay_webhook_settles_and_sends_the_link_before_answering(http, shop, telegram, cryptopay):
    payment = pending_invoice(shop, telegram)
    cryptopay.pay(payment.invoice_id)
    assert cryptopay.post_webhook(http + '/cryptopay', payment.invoice_id) == 200
    # the reply came after the commit and the message: no waiting needed
    assert Payment.get_by_id(payment.id).status == PAID
    assert payment_grants(payment.invoice_id) == 1
    assert User.get_by_id(payment.user_id).expires_at is not None
    assert len(link_messages(telegram, BUYER['id'])) == 1


def test_cryptopay_webhook_refuses_forged_and_missing_signatures(http, shop, telegram, cryptopay):
    payment = pending_invoice(shop, telegram)
    cryptopay.pay(payment.invoice_id)
    raw, signature = cryptopay.webhook_body(payment.invoice_id)
    forged_key = hashlib.sha256(b'4242:not-the-token').digest()
    forged = hmac.new(forged_key, raw, 'sha256').hexdigest()
    tampered = raw.replace(b'"status":"paid"', b'"status":"paid" ')
    for body, headers in ((raw, {}), (raw, {'crypto-pay-api-signature': ''}),
                          (raw, {'crypto-pay-api-signature': forged}),
                          (tampered, {'crypto-pay-api-signature': signature}),
                          (raw, {'crypto-pay-api-signature': signature[:-1]}),
                          (raw, {'crypto-pay-api-signature': 'ü' * 64})):
        reply = requests.post(http + '/cryptopay', data=body, headers=headers, timeout=5)
        assert reply.status_code == 401, headers
        assert_no_secrets(reply.text)
    assert Payment.get_by_id(payment.id).status == PENDING
    assert payment_grants(payment.invoice_id) == 0


def signed(body):
    key = hashlib.sha256(CRYPTOPAY_TOKEN.encode()).digest()
    return {'crypto-pay-api-signature': hmac.new(key, body, 'sha256').hexdigest()}


@pytest.mark.parametrize('body', [b'', b'not json', b'[]', b'"invoice_paid"', b'{"update_type": 5}',
                                  b'{"update_type": "invoice_paid"}',
                                  b'{"update_type": "invoice_paid", "payload": {"invoice_id": "7", "status": "paid"}}',
                                  b'{"update_type": "invoice_paid", "payload": {"invoice_id": true, "status": "paid"}}',
                                  b'{"update_type": "invoice_paid", "payload": [1]}', b'[' * 100000, b'\xff\xfe'])
def test_cryptopay_webhook_answers_400_to_a_signed_malformed_body(http, body):
    reply = requests.post(http + '/cryptopay', data=body, headers=signed(body), timeout=5)
    assert reply.status_code == 400, reply.text


def test_cryptopay_webhook_replayed_17_times_credits_once(http, shop, telegram, cryptopay):
    payment = pending_invoice(shop, telegram)
    cryptopay.pay(payment.invoice_id)
    statuses = [cryptopay.post_webhook(http + '/cryptopay', payment.invoice_id) for _ in range(17)]
    assert statuses == [200] * 17
    assert payment_grants(payment.invoice_id) == 1
    assert len(link_messages(telegram, BUYER['id'])) == 1
    first = User.get_by_id(payment.user_id).expires_at
    assert cryptopay.post_webhook(http + '/cryptopay', payment.invoice_id) == 200
    assert User.get_by_id(payment.user_id).expires_at == first


def test_cryptopay_webhook_for_an_unknown_invoice_changes_nothing(http, shop, telegram, cryptopay):
    ours = pending_invoice(shop, telegram)
    # an invoice of the same app that we have no record of (made in @CryptoBot by hand)
    invoice = shop.cryptopay.create_invoice(amount=100, fiat='RUB', description='by hand', payload='x',
                                            expires_in=600)
    cryptopay.pay(invoice['invoice_id'])
    assert cryptopay.post_webhook(http + '/cryptopay', invoice['invoice_id']) == 200
    assert Payment.select().count() == 1 and Payment.get_by_id(ours.id).status == PENDING
    assert Grant.select().count() == 0


def test_cryptopay_webhook_racing_the_poller_and_a_check_press_settles_once(http, shop, telegram, cryptopay,
                                                                              messenger):
    buyers = [dict(BUYER, id=6000 + n, username=f'racer{n}') for n in range(6)]
    payments = [pending_invoice(shop, telegram, buyer) for buyer in buyers]
    for payment in payments:
        cryptopay.pay(payment.invoice_id)
    errors = []

    def run(work):
        try:
            with models.db.connection_context():
                work()
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    for payment, buyer in zip(payments, buyers):
        start = threading.Barrier(3)
        racers = [
            lambda: (start.wait(), cryptopay.post_webhook(http + '/cryptopay', payment.invoice_id)),
            lambda: (start.wait(), jobs.poll_payments(shop, messenger)),
            lambda: (start.wait(), shop.check_payment(buyer['id'], payment.invoice_id)),
        ]
        threads = [threading.Thread(target=run, args=(work,)) for work in racers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    for payment, buyer in zip(payments, buyers):
        assert payment_grants(payment.invoice_id) == 1
        user = User.get_by_id(payment.user_id)
        grants = list(Grant.select().where(Grant.user == user.id))
        assert len(grants) == 1 and grants[0].days == 30
        assert len(link_messages(telegram, buyer['id'])) <= 1


# the Telegram webhook

@pytest.fixture
def webhook_app(panel, cryptopay, database, shop, messenger):
    """The App in webhook mode over a TeleBot whose one handler records what it is given."""
    settings = config.load(settings_env(panel, cryptopay, database, WEBHOOK_URL='https://bot.example.test',
                                        WEBHOOK_SECRET='s3cret_-Token'))
    bot = telebot.TeleBot(BOT_TOKEN, threaded=False)
    seen = []
    bot.register_message_handler(lambda message: seen.append(message.text), content_types=['text'])
    server = serve(web.App(settings, shop, messenger, bot=bot))
    yield f'http://127.0.0.1:{server.port}/telegram', seen
    server.stop()


def update(n, text='/start'):
    return {'update_id': n, 'message': {'message_id': n, 'date': 1700000000, 'text': text,
                                        'chat': {'id': 77, 'type': 'private', 'first_name': 'A'},
                                        'from': {'id': 77, 'is_bot': False, 'first_name': 'A'}}}


def test_telegram_webhook_hands_updates_over_with_the_right_secret_only(webhook_app):
    url, seen = webhook_app
    good = {'X-Telegram-Bot-Api-Secret-Token': 's3cret_-Token'}
    for headers in ({}, {'X-Telegram-Bot-Api-Secret-Token': ''}, {'X-Telegram-Bot-Api-Secret-Token': 's3cret_-Toke'},
                    {'X-Telegram-Bot-Api-Secret-Token': 's3cret_-Token_'},
                    {'X-Telegram-Bot-Api-Secret-Token': 'S3CRET_-TOKEN'},
                    {'X-Telegram-Bot-Api-Secret-Token': ('ж' * 13).encode()}):
        reply = requests.post(url, json=update(1, 'forged'), headers=headers, timeout=5)
        assert reply.status_code == 403, headers
    assert seen == []
    assert requests.post(url, json=update(2, 'hello'), headers=good, timeout=5).status_code == 200
    assert seen == ['hello']


def test_telegram_webhook_refuses_bodies_that_are_not_updates(webhook_app):
    url, seen = webhook_app
    good = {'X-Telegram-Bot-Api-Secret-Token': 's3cret_-Token'}
    for body in (b'', b'{}', b'[]', b'{"update_id": "1"}', b'{"update_id": -5}', b'{"update_id": true}',
                 b'{"update_id": 3, "message": "text"}', b'{"update_id": 3, "message": {"chat": 5}}',
                 b'\x00\xff', b'{' * 50000):
        reply = requests.post(url, data=body, headers=good, timeout=5)
        assert reply.status_code == 400, body[:40]
    too_big = b'{"update_id": 1, "x": "' + b'a' * web.MAX_BODY + b'"}'
    assert requests.post(url, data=too_big, headers=good, timeout=10).status_code == 413
    assert seen == []


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                   lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                                       st.sampled_from(['update_id', 'message', 'callback_query', 'chat', 'from',
                                                        'text', 'id', 'date', 'message_id', 'data']), kids,
                                       max_size=5), max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_telegram_webhook_never_fails_on_fuzzed_bodies(webhook_app, body):
    url, _ = webhook_app
    reply = requests.post(url, data=body, headers={'X-Telegram-Bot-Api-Secret-Token': 's3cret_-Token'}, timeout=5)
    assert reply.status_code in (200, 400), (reply.status_code, body)


def test_webhook_settings_refuse_plain_http_except_on_loopback(panel, cryptopay, database):
    def load(**overrides):
        return config.load(settings_env(panel, cryptopay, database, **overrides))

    for bad in ('http://bot.example.com', 'ftp://x', 'bot.example.com', 'https://', 'https://x/?a=1'):
        with pytest.raises(config.SettingError, match='WEBHOOK_URL is malformed'):
            load(WEBHOOK_URL=bad)
    assert load(WEBHOOK_URL='http://127.0.0.1:8080/').webhook_url == 'http://127.0.0.1:8080'
    assert load(WEBHOOK_URL='https://bot.example.com/hook').webhook_url == 'https://bot.example.com/hook'
    for bad in ('with space', 'ü', 'a' * 257, 'semi;colon'):
        with pytest.raises(config.SettingError, match='WEBHOOK_SECRET is malformed'):
            load(WEBHOOK_SECRET=bad)
    derived = load().webhook_secret
    assert derived == load().webhook_secret and BOT_TOKEN.partition(':')[2] not in derived
    assert config.webhook_secret(derived) == derived
    with pytest.raises(config.SettingError, match='HTTP_PORT'):
        load(HTTP_PORT='70000')


# the real process

def bot_env(telegram, panel, cryptopay, database, tmp_path, **overrides):
    env = {**os.environ, **settings_env(panel, cryptopay, database, TELEGRAM_API_URL=telegram.url,
                                         BACKUP_DIR=tmp_path / 'backups', **overrides)}
    env.pop('TEST_DATABASE_URL', None)
    return env


@pytest.fixture
def started(telegram, panel, cryptopay, database, tmp_path):
    """Start bot.py processes; stop them all and check their logs at the end."""
    bots = []

    def start(wait='polling', **overrides):
        running = RunningBot(bot_env(telegram, panel, cryptopay, database, tmp_path, **overrides),
                             tmp_path / f'bot{len(bots)}.log')
        bots.append(running)
        if wait == 'polling':
            telegram.wait_polling(timeout=20)
        elif wait == 'webhook':
            telegram.wait_webhook(timeout=20)
        return running

    yield start
    for running in bots:
        running.stop()
        output = running.output()
        assert_no_secrets(output)
        assert 'Traceback' not in output, output


def test_a_taken_port_stops_the_bot_with_one_line(started):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = started(wait=None, HTTP_PORT=port)
        assert running.process.wait(20) == 1
    errors = [line for line in running.output().splitlines() if 'error' in line.lower()]
    assert errors == [f'error: HTTP_PORT 127.0.0.1:{port} is already in use; choose another '
                      'HTTP_PORT or HTTP_PORT=0']


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(started, shop, telegram, cryptopay, panel):
    port = free_port()
    running = started(HTTP_PORT=port, PAYMENT_POLL_SECONDS=3600)
    assert requests.get(f'http://127.0.0.1:{port}/healthz', timeout=5).status_code == 200
    payment = pending_invoice(shop, telegram)
    cryptopay.pay(payment.invoice_id)
    panel.hang_next(1, seconds=2.0)  # the panel push inside the webhook takes 2 s
    replies = []
    poster = threading.Thread(target=lambda: replies.append(
        cryptopay.post_webhook(f'http://127.0.0.1:{port}/cryptopay', payment.invoice_id)))
    poster.start()
    assert eventually(lambda: Payment.get_by_id(payment.id).status == PAID, timeout=10)
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(20) == 0
    poster.join(10)
    assert replies == [200]
    assert len(link_messages(telegram, BUYER['id'])) == 1
    with pytest.raises(requests.ConnectionError):
        requests.get(f'http://127.0.0.1:{port}/healthz', timeout=5)


def test_webhook_mode_end_to_end_buy_pay_link(started, telegram, cryptopay, panel):
    port = free_port()
    started(wait='webhook', HTTP_PORT=port, WEBHOOK_URL=f'http://127.0.0.1:{port}', PAYMENT_POLL_SECONDS=3600)
    assert telegram.webhook_url == f'http://127.0.0.1:{port}/telegram'
    assert telegram.webhook_secret == config.derived_secret(BOT_TOKEN)
    assert {'message', 'callback_query'} <= set(telegram._get_webhook_info({}, {})['allowed_updates'])
    cryptopay.deliver_webhooks(f'http://127.0.0.1:{port}/cryptopay')
    buyer = person(7001, lang='ru', name='Вася')
    invoice = buy(telegram, buyer)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.pay(invoice_id)  # the poller sleeps an hour: only the webhook can deliver the link now
    link = telegram.wait_for_message(buyer['id'], contains='vpn.example.test', timeout=15)
    assert link is not None
    assert payment_grants(invoice_id) == 1
    assert telegram.stats()['webhook_delivered'] >= 3 and telegram.pending_updates() == 0
    # a forged update straight to the bot changes nothing
    reply = requests.post(f'http://127.0.0.1:{port}/telegram', json=update(1, '/start'), timeout=5)
    assert reply.status_code == 403


def test_switching_from_webhook_back_to_polling_loses_no_update(started, telegram):
    port = free_port()
    first = started(wait='webhook', HTTP_PORT=port, WEBHOOK_URL=f'http://127.0.0.1:{port}')
    first.stop()
    buyer = person(7002)
    telegram.send_text(buyer, '/start')  # arrives while no bot runs: Telegram holds it
    started(wait='polling')
    assert telegram.wait_for_message(buyer['id'], contains='SPN', timeout=15)


# a soak scenario (soak/run.py) and its test

def race_webhooks_and_the_poller(rig, buyers=5, replays=17):
    """Crypto Pay's webhook, 17 deliveries per paid invoice all at once, while bot.py's poller also settles them."""
    from test_faults import audit, told, wait_until as wait_for
    shop = rig.shop()
    invoice_ids = [rig.customer(shop, 2600 + n) for n in range(buyers)]
    port = free_port()
    rig.start_bot(HTTP_PORT=port, PAYMENT_POLL_SECONDS=1)
    url = f'http://127.0.0.1:{port}/cryptopay'
    statuses, start = [], threading.Barrier(buyers * replays)

    def deliver(invoice_id):
        start.wait()
        statuses.append(rig.cryptopay.post_webhook(url, invoice_id, timeout=60))

    started = time.monotonic()
    threads = [threading.Thread(target=deliver, args=(invoice_id,)) for invoice_id in invoice_ids
               for _ in range(replays)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    for invoice_id in invoice_ids:
        wait_for(lambda: told(invoice_id), 30, 'the buyer told')
    outcome = audit(rig, invoice_ids, time.monotonic() - started)
    if statuses != [200] * len(threads):
        outcome.problems.append(f'webhook replies: {sorted(set(statuses))}, {len(statuses)} of {len(threads)}')
    return outcome


def test_webhooks_replayed_17_times_while_the_poller_runs_settle_once(rig):
    outcome = race_webhooks_and_the_poller(rig)
    assert (outcome.lost, outcome.double) == (0, 0) and not outcome.problems, outcome.problems
    assert 'Traceback' not in rig.output()
