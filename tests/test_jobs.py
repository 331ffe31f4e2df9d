"""The scheduled jobs, called directly with a chosen clock, against the real database and the loopback fakes."""
import logging
import threading
from datetime import datetime, timedelta, timezone


import pytest
from telebot import apihelper

import jobs
import models
import passes
from conftest import BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD, our_threads, pool_in_use, wait_threads_back
from cryptobot import CryptoPayError
from outages import Outage, Watched, cryptopay_unreachable
from peewee import OperationalError
from models import EXPIRED, PAID, PENDING, Payment, Reminder, User

NOW = datetime(2026, 11, 26, 12, 0, 0)


def client_state(user, panel='main'):
    """Return the user's PanelClient row on a panel."""
    return models.PanelClient.get(models.PanelClient.user == user.id, models.PanelClient.panel == panel)


def customer(shop, telegram, telegram_id=1001, lang='en'):
    telegram.add_user({'id': telegram_id, 'first_name': 'Anna', 'language_code': lang})
    user, _ = shop.register(telegram_id, f'u{telegram_id}', 'Anna', lang)
    return user


def pending_invoice(shop, user, days=30, message=(None, None)):
    payment = shop.create_invoice(user, days)
    if message[0]:
        shop.attach_message(payment, *message)
    return payment


def test_poller_settles_paid_provisions_and_tells_the_buyer_once(shop, cryptopay, panel, telegram, messenger):
    user = customer(shop, telegram)
    payment = pending_invoice(shop, user)
    assert jobs.poll_payments(shop, messenger) == 0
    cryptopay.pay(payment.invoice_id)
    assert jobs.poll_payments(shop, messenger) == 1
    assert jobs.poll_payments(shop, messenger) == 0
    stored = Payment.get_by_id(payment.id)
    assert stored.status == PAID and stored.provisioned_at and stored.notified_at
    user = User.get_by_id(user.id)
    assert user.panel_email in panel.clients
    links = [call for call in telegram.sent if call.method == 'sendMessage' and user.panel_sub_id in call.params['text']]
    assert len(links) == 1
    jobs.retry_provisioning(shop, messenger)
    assert len([c for c in telegram.sent if c.method == 'sendMessage']) == 1


def test_poller_batches_by_one_thousand(shop, cryptopay, telegram, messenger):
    user = customer(shop, telegram)
    Payment.insert_many([dict(invoice_id=10_000_000 + number, user=user, plan_days=30, amount=100, currency='RUB',
                              pay_url='x', created_at=NOW) for number in range(2500)]).execute()
    calls_before = len(cryptopay.calls)
    jobs.poll_payments(shop, messenger, now=NOW + timedelta(hours=2))
    polls = [params for method, params in cryptopay.calls[calls_before:] if method == 'getInvoices']
    assert len(polls) == 3
    assert sorted(len(str(params['invoice_ids']).split(',')) for params in polls) == [500, 1000, 1000]
    # unknown to Crypto Pay and older than the grace period: expired
    assert Payment.select().where(Payment.status == EXPIRED).count() == 2500


def test_poller_expires_an_unlisted_invoice_only_once_it_is_past_paying(shop, telegram, messenger, settings):
    user = customer(shop, telegram)
    Payment.create(invoice_id=424242, user=user, plan_days=30, amount=100, currency='RUB', pay_url='x',
                   created_at=NOW)
    payable_until = NOW + timedelta(seconds=settings.invoice_expires_seconds)
    jobs.poll_payments(shop, messenger, now=payable_until)
    assert Payment.get().status == PENDING
    jobs.poll_payments(shop, messenger, now=payable_until + timedelta(minutes=11))
    assert Payment.get().status == EXPIRED


def test_poller_edits_the_pay_message_of_an_expired_invoice(shop, cryptopay, telegram, messenger):
    user = customer(shop, telegram)
    sent = messenger.bot.send_message(1001, 'Pay here')
    payment = pending_invoice(shop, user, message=(1001, sent.message_id))
    cryptopay.expire(payment.invoice_id)
    jobs.poll_payments(shop, messenger)
    assert Payment.get_by_id(payment.id).status == EXPIRED
    assert 'expired' in telegram.get_message(1001, sent.message_id)['text']


def test_provisioning_retried_until_panel_is_back_and_buyer_told_once(shop, cryptopay, panel, telegram,
                                                                      messenger):
    user = customer(shop, telegram)
    payment = pending_invoice(shop, user)
    cryptopay.pay(payment.invoice_id)
    panel.refuse()
    jobs.poll_payments(shop, messenger, now=NOW)
    assert Payment.get_by_id(payment.id).status == PAID and Payment.get_by_id(payment.id).provisioned_at is None
    jobs.retry_provisioning(shop, messenger, now=NOW)  # not due yet: backoff
    assert client_state(user).failures == 1
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(minutes=1))
    assert client_state(user).failures == 2
    panel.accept()
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(hours=1))
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(hours=2))
    user = User.get_by_id(user.id)
    assert not client_state(user).dirty and user.panel_email in panel.clients
    ready = [c for c in telegram.sent if c.method == 'sendMessage' and 'ready' in c.params['text']]
    assert len(ready) == 1 and user.panel_sub_id in ready[0].params['text']


def test_admins_alerted_once_about_a_stuck_panel(shop, panel, telegram, messenger):
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    user = customer(shop, telegram)
    models.grant_days(user.id, 30, 'admin', 'x')
    panel.refuse()
    for minute in range(0, 600, 31):
        jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(minutes=minute))
    alerts = [c for c in telegram.sent if c.method == 'sendMessage' and str(c.params['chat_id']) == '900']
    assert client_state(user).failures >= jobs.ALERT_AFTER_FAILURES
    assert len(alerts) == 1 and '1001' in alerts[0].params['text']
    # the alert names the panel's own reason
    assert 'cannot connect to the panel' in alerts[0].params['text']


def test_a_crashed_notification_is_resent_after_its_lease(shop, cryptopay, telegram, messenger):
    user = customer(shop, telegram)
    payment = pending_invoice(shop, user)
    cryptopay.pay(payment.invoice_id)
    shop.settle(payment.invoice_id)
    shop.provision(user.id)
    assert shop.claim_notification(Payment.get_by_id(payment.id), now=NOW)  # then the process died
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(seconds=30))
    assert not [c for c in telegram.sent if c.method == 'sendMessage']
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(minutes=5))
    assert len([c for c in telegram.sent if c.method == 'sendMessage']) == 1


def test_reminders_once_per_period_and_rearmed_by_renewal(shop, telegram, messenger):
    user = customer(shop, telegram)
    User.update(expires_at=NOW + timedelta(days=2, hours=12)).execute()
    assert jobs.send_reminders(shop, messenger, now=NOW) == 1
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(hours=1)) == 0
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=1, hours=13)) == 1  # 1 day left
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=2, hours=13)) == 1  # expired
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=2, hours=14)) == 0
    assert {r.kind for r in Reminder.select()} == {'3', '1', '0'}
    models.grant_days(user.id, 30, 'admin', 'renew', now=NOW + timedelta(days=3))
    renewed = User.get_by_id(user.id).expires_at
    assert jobs.send_reminders(shop, messenger, now=renewed - timedelta(days=2)) == 1
    texts = [c.params['text'] for c in telegram.sent if c.method == 'sendMessage']
    assert len(texts) == 4 and 'buy' in str(telegram.sent[-1].params['reply_markup'])


def test_reminders_skip_users_who_blocked_the_bot(shop, telegram, messenger):
    customer(shop, telegram)
    User.update(expires_at=NOW + timedelta(hours=12), blocked=True).execute()
    assert jobs.send_reminders(shop, messenger, now=NOW) == 0


def test_reconcile_repairs_towards_the_ledger_and_reports_strangers(shop, panel, telegram):
    missing, wrong, disabled, fine = (customer(shop, telegram, 2000 + n) for n in range(4))
    for user in (missing, wrong, disabled, fine):
        models.grant_days(user.id, 30, 'admin', f'g{user.id}')
        assert shop.provision(user.id)
    shop.panel.delete_client(missing.panel_email)
    shop.panel.ensure_client(email=wrong.panel_email, expiry=datetime(2026, 12, 1, tzinfo=timezone.utc),
                             sub_id=wrong.panel_sub_id, tg_id=wrong.telegram_id)
    panel.disable(disabled.panel_email)
    shop.panel.ensure_client(email='stranger@example', expiry=None, sub_id='strangersub1', tg_id=1)
    report = jobs.reconcile(shop)
    assert report.missing == [missing.telegram_id] and report.wrong_expiry == [wrong.telegram_id]
    assert report.disabled == [disabled.telegram_id] and report.fixed == 3
    assert 'stranger@example' in report.unknown and 'stranger@example' in panel.clients
    again = jobs.reconcile(shop)
    assert again.fixed == 0 and not again.missing and not again.wrong_expiry and not again.disabled
    assert 'Unknown panel clients' in again.text()


def test_reconcile_reports_panel_down(shop, panel):
    panel.refuse()
    report = jobs.reconcile(shop)
    assert report.error and 'Sync failed' in report.text()


def test_a_failing_job_is_logged_and_the_thread_lives_on(caplog):
    def broken():
        raise RuntimeError('boom')

    with caplog.at_level(logging.ERROR):
        assert jobs.guarded(broken)() is None
    assert 'boom' in caplog.text and 'Traceback' in caplog.text


def test_jobs_thread_runs_and_stops(shop, messenger, settings, cryptopay, telegram):
    user = customer(shop, telegram)
    payment = pending_invoice(shop, user)
    cryptopay.pay(payment.invoice_id)
    fast = settings.__class__(**{**settings.__dict__, 'payment_poll_seconds': 1})
    stop = jobs.start(shop, messenger, fast)
    try:
        telegram.wait_for(lambda call: call.method == 'sendMessage', timeout=10)
    finally:
        stop.set()
    assert Payment.get_by_id(payment.id).status == PAID
    for _ in range(100):
        if not any(thread.name == 'jobs' for thread in threading.enumerate()):
            break
        threading.Event().wait(0.05)
    assert not any(thread.name == 'jobs' for thread in threading.enumerate())


# Each outside call of each job failing in turn (issue 9 item 5)

FAULTS = ['refused', 'hang', 'http_5xx']  # connection error, read timeout, 5xx
SERVICES = ['telegram', 'cryptopay', 'panel']
SECRETS = (BOT_TOKEN, BOT_TOKEN.split(':')[1], CRYPTOPAY_TOKEN, PANEL_PASSWORD)


def break_service(service, fault, telegram, cryptopay, panel):
    """Make every call to one service fail one way from now on."""
    if service == 'telegram':
        telegram.break_next(10_000, {'refused': 'drop', 'hang': 'hang', 'http_5xx': 'bad_gateway'}[fault],
                            seconds=2)
    elif fault == 'refused':
        (cryptopay if service == 'cryptopay' else panel).refuse()
    elif fault == 'hang':
        (cryptopay if service == 'cryptopay' else panel).hang_next(10_000, seconds=2)
    else:
        (cryptopay if service == 'cryptopay' else panel).fail_next(10_000, status=503)


def world_for_every_job(shop, telegram, messenger):
    """Give each job outside calls to make: a paid and an expired invoice, a reminder due, a dirty user."""
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    payer = customer(shop, telegram, 1001)
    paid = pending_invoice(shop, payer)
    shop.cryptopay.get_invoices([paid.invoice_id])  # logged in, sessions warm
    expiring = customer(shop, telegram, 1002)
    sent = messenger.bot.send_message(1002, 'Pay here')
    gone = pending_invoice(shop, expiring, message=(1002, sent.message_id))
    models.grant_days(expiring.id, 2, 'admin', 'reminder-due')
    return paid, gone


@pytest.mark.parametrize('fault', FAULTS)
@pytest.mark.parametrize('service', SERVICES)
def test_every_job_ends_cleanly_whichever_outside_call_fails(settings, telegram, cryptopay, panel, messenger,
                                                            monkeypatch, caplog, capfd, tmp_path, service, fault):
    from conftest import TIMEOUT
    from cryptobot import CryptoPayClient
    from shop import Shop
    from xui import XuiClient
    short = (TIMEOUT[0], 0.5)  # a hang outlasts the read timeout
    shop = Shop(settings,
                XuiClient(settings.xui_url, settings.xui_inbound_id, settings.xui_sub_url,
                          username=settings.xui_username, password=settings.xui_password, timeout=short,
                          retries=1, backoff=0.01),
                CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, timeout=short, retries=1,
                                backoff=0.01))
    monkeypatch.setattr(apihelper, 'READ_TIMEOUT', 0.5)
    messenger.sleep = lambda seconds: None
    paid, gone = world_for_every_job(shop, telegram, messenger)
    cryptopay.pay(paid.invoice_id)
    cryptopay.expire(gone.invoice_id)
    backups = settings.__class__(**{**settings.__dict__, 'backup_dir': tmp_path / 'backups'})
    outages = (Outage('Telegram', alert_after=0, alert_while_down=False), Outage('Crypto Pay', alert_after=0))
    runs = [(jobs.poll_payments, (shop, messenger)), (jobs.retry_provisioning, (shop, messenger)),
            (jobs.send_reminders, (shop, messenger)), (jobs.backup_database, (backups,)),
            (jobs.report_reconcile, (shop, messenger)), (jobs.report_outages, (shop, messenger, outages))]
    break_service(service, fault, telegram, cryptopay, panel)
    models.db.close()
    before = our_threads()
    with caplog.at_level(logging.INFO):
        for job, args in runs:
            jobs.guarded(job, settings=settings, messenger=messenger, needs=outages[1])(*args)
            assert wait_threads_back(before) == set(), job.__name__
            assert pool_in_use() == 0, job.__name__
    out, err = capfd.readouterr()
    for secret in SECRETS:
        assert secret not in out + err + caplog.text
    assert 'Traceback' not in err and 'Traceback' not in caplog.text


# The admins hear about failures (issue 10 item 10)

def admin_texts(telegram):
    return [call.params['text'] for call in telegram.sent
            if call.method == 'sendMessage' and str(call.params['chat_id']) == '900' and call.status == 200]


def test_a_failing_job_tells_the_admins_once_with_its_counts_and_again_when_it_works(settings, telegram,
                                                                                      messenger, caplog):
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    broken = [True]

    def poll_payments(counts=None):
        counts.update(settled=2)
        if broken[0]:
            raise OperationalError('could not connect to server')

    job = jobs.guarded(poll_payments, settings=settings, messenger=messenger)
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            job()
        broken[0] = False
        job()
        job()
    texts = admin_texts(telegram)
    assert len(texts) == 2, texts
    assert 'Job poll_payments failed (settled 2 before the failure): OperationalError: could not connect' in texts[0]
    assert texts[1] == '✅ Job poll_payments works again after 5 failed run(s).'
    assert caplog.text.count('Traceback') == 1


def test_a_failed_daily_backup_alerts_the_admins_every_time(settings, telegram, messenger, tmp_path):
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    blocked = tmp_path / 'not-a-folder'
    blocked.write_text('a file where the backup folder should be')
    broken = settings.__class__(**{**settings.__dict__, 'backup_dir': blocked})
    job = jobs.guarded(jobs.backup_database, settings=settings, messenger=messenger, every_failure=True)
    job(broken)
    job(broken)
    texts = admin_texts(telegram)
    assert len(texts) == 2 and all('Job backup_database failed' in text and 'FileExistsError' in text
                                   for text in texts), texts


def test_the_stuck_panel_alert_says_the_panels_reason_and_which_needs_the_admin(shop, panel, telegram, messenger):
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    refused, timing_out = customer(shop, telegram, 1001), customer(shop, telegram, 1002)
    models.grant_days(refused.id, 30, 'admin', 'x')
    models.grant_days(timing_out.id, 30, 'admin', 'y')
    for minute in range(0, 600, 31):
        panel.success_false_next(1, msg='Duplicate email: taken@example\n', route='POST panel/api/clients/add')
        panel.fail_next(2, status=502, route='POST panel/api/clients/add')
        jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(minutes=minute))
    texts = admin_texts(telegram)
    assert len(texts) >= 1
    everything = '\n'.join(texts)
    assert everything.count('1001') == 1 and everything.count('1002') == 1, texts
    assert 'the panel says "Duplicate email: taken@example"' in everything and 'will not pass by itself' in everything
    line_1002 = next(line for line in everything.splitlines() if '1002' in line)
    assert 'retried until the panel answers' in line_1002 and 'Duplicate' not in line_1002


def test_outage_news_reaches_the_admins_once_each_way(shop, cryptopay, telegram, messenger):
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    clock = [1000.0]
    outage = Outage('Crypto Pay', alert_after=300, clock=lambda: clock[0])
    watched = Watched(shop.cryptopay, outage, CryptoPayError, cryptopay_unreachable, methods=['get_me'])
    shop.cryptopay = watched
    cryptopay.refuse()
    with pytest.raises(CryptoPayError):
        shop.cryptopay.get_me()  # a buyer's or the poller's call finds it away
    for _ in range(40):  # 20 minutes of the job every 30 s
        jobs.report_outages(shop, messenger, [outage])
        clock[0] += 30
    cryptopay.accept()
    for _ in range(20):
        jobs.report_outages(shop, messenger, [outage])
        clock[0] += 30
    texts = admin_texts(telegram)
    assert len(texts) == 2, texts
    assert texts[0].startswith('⚠️ Crypto Pay has been unreachable for 5 min') and 'cannot connect' in texts[0]
    assert texts[1].startswith('✅ Crypto Pay is back after')


def test_reconciliation_runs_at_reconcile_time(settings, panel, cryptopay, database):
    import config
    from conftest import settings_env
    assert settings.reconcile_time == '03:30'
    later = config.load({**settings_env(panel, cryptopay, database), 'RECONCILE_TIME': '5:07'})
    scheduler = jobs.build_scheduler(None, None, later)
    times = {job.job_func.func.__name__: job.at_time for job in scheduler.jobs if job.at_time}
    assert str(times['report_reconcile']) == '05:07:00'



@pytest.fixture
def three_panels():
    from fake_xui import FakePanel
    from conftest import PANEL_USER
    started = [(name, FakePanel(generation=generation, username=PANEL_USER, password=PANEL_PASSWORD).start())
               for name, generation in (('Germany', 'legacy'), ('Finland', 'v3'), ('Japan', 'v3'))]
    yield started
    for _, fake in started:
        fake.stop()


@pytest.mark.parametrize('count', [2, 3])
def test_a_retry_round_pushes_every_panel_and_counts_what_it_did(tmp_path, panel, cryptopay, database, telegram,
                                                                  messenger, three_panels, count):
    from test_locations import make_settings, make_shop
    shop = make_shop(make_settings(tmp_path, panel, cryptopay, database, three_panels[:count],
                                   PUBLIC_URL='https://shop.example.test/'))
    user = customer(shop, telegram)
    models.grant_days(user.id, 30, 'admin', 'a1', now=NOW)
    finland = dict(three_panels)['Finland']
    finland.refuse()
    assert shop.provision(user.id, now=NOW)  # Finland failed: due again 30 s later, by the job's clock
    finland.accept()
    counts, held = {}, pool_in_use()  # this test's own connection
    assert jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(seconds=29), counts=counts) == 0
    assert counts == {'pushed': 0, 'delivered': 0}
    assert jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(seconds=30), counts=counts) == 0
    assert counts == {'pushed': 1, 'delivered': 0}
    assert [(row.panel, row.dirty) for row in models.PanelClient.select().order_by(models.PanelClient.panel)] == \
        sorted((name, False) for name, _ in three_panels[:count])
    assert pool_in_use() == held  # each panel's thread gave its connection back


def test_a_retry_round_on_one_panel_counts_pushes_and_links(shop, cryptopay, telegram, messenger, panel):
    buyers = [customer(shop, telegram, telegram_id) for telegram_id in (1001, 1002)]
    panel.refuse()
    for buyer in buyers:
        payment = pending_invoice(shop, buyer)
        cryptopay.pay(payment.invoice_id)
        assert shop.settle(payment.invoice_id, now=NOW) and not shop.provision(buyer.id, now=NOW)
    other = customer(shop, telegram, 1003)
    models.grant_days(other.id, 7, 'admin', 'a2', now=NOW)
    panel.accept()
    counts, held = {}, pool_in_use()
    assert jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(minutes=1), counts=counts) == 2
    assert counts == {'pushed': 3, 'delivered': 2}
    assert pool_in_use() == held


def test_a_pass_over_the_buyers_keeps_its_place_in_the_database(database):
    # a 32-character panel name still names a cursor that fits cursors.name (VARCHAR(32) on PostgreSQL)
    name = passes.cursor_name('backfill', 'P' * 32)
    assert len(name) == 32 and name != passes.cursor_name('backfill', 'P' * 31 + 'Q')
    assert passes.cursor_name('backfill', 'Germany') == 'backfill:Germany'
    assert passes.next_range(name, NOW) is None  # no buyers yet
    User.insert_many([{'telegram_id': 5000 + n, 'panel_email': f'spn-{n}', 'invite_code': f'i{n:09d}',
                       'panel_sub_id': f'sub{n:013d}'} for n in range(12)]).execute()
    first = User.select(User.id).order_by(User.id).scalar() - 1  # ids are dense on both databases, from any start
    assert passes.next_range(name, NOW, chunk=5) == (0, first + 5)  # buyers above the cursor are read
    passes.advance(name, 0, first + 5)
    assert passes.next_range(name, NOW, chunk=5) == (first + 5, first + 10)
    passes.advance(name, 0, 3)  # a round that another process overtook meanwhile leaves the pass where it is
    assert passes.next_range(name, NOW, chunk=5) == (first + 5, first + 10)
    passes.advance(name, first + 5, first + 10)
    assert passes.next_range(name, NOW, chunk=5) == (first + 10, first + 12)
    passes.advance(name, first + 10, first + 12)
    assert passes.next_range(name, NOW + timedelta(minutes=59), chunk=5) is None  # done: idle...
    assert passes.next_range(name, NOW + timedelta(hours=1), chunk=5) == (0, first + 5)  # ...until it starts again
    passes.advance(name, 0, first + 12)
    # a clock set back by an hour does not stall the pass until the clock catches up
    assert passes.next_range(name, NOW, chunk=5) == (0, first + 5)
