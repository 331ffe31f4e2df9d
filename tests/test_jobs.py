"""The scheduled jobs, called directly with a chosen clock, against the real database and the loopback fakes."""
import logging
import threading
from datetime import datetime, timedelta, timezone


import jobs
import models
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
    for number in range(2500):
        Payment.create(invoice_id=10_000_000 + number, user=user, plan_days=30, amount=100, currency='RUB',
                       pay_url='x', created_at=NOW)
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
