"""The money rules, one test each, written to kill the mutants of the money paths (scripts/mutate.sh).

Each test drives the shop and the jobs through their public functions, against the real database and the
loopback fakes, and pins the exact days, rows and answers a rule promises: a rule that only holds "roughly"
lets a mutant through.
"""
from datetime import datetime, timedelta

import pytest
from peewee import IntegrityError

import jobs
import models
from conftest import race_held_at_a_lock
from models import EXPIRED, PAID, PENDING, Gift, Grant, PanelClient, Payment, PromoCode, Redemption, Referral, User

NOW = datetime(2026, 11, 26, 12, 0, 0)
DAY = timedelta(days=1)


def customer(shop, telegram=None, telegram_id=1001, lang='en', invite_code=None):
    if telegram is not None:
        telegram.add_user({'id': telegram_id, 'first_name': 'Anna', 'language_code': lang})
    user, _ = shop.register(telegram_id, f'u{telegram_id}', 'Anna', lang, invite_code=invite_code)
    return user


def fresh(user):
    return User.get_by_id(user.id)


def state(user, panel='main'):
    """The user's client state on a panel (a clean one when the panel has never been told of them)."""
    return (PanelClient.get_or_none(PanelClient.user == user.id, PanelClient.panel == panel)
            or PanelClient(dirty=False, failures=0, retry_at=None, alerted=False, refused=False))


def grants(reason=None):
    query = Grant.select().order_by(Grant.id)
    return list(query if reason is None else query.where(Grant.reason == reason))


# Settlement

def test_a_paid_invoice_we_had_marked_expired_settles_once(shop, cryptopay):
    """Crypto Pay still took the money (or our clock ran ahead): the buyer must be credited, once."""
    user = customer(shop)
    payment = shop.create_invoice(user, 30)
    assert shop.expire_payment(payment.invoice_id)  # e.g. the poller saw it missing from an answer
    assert Payment.get_by_id(payment.id).status == EXPIRED
    cryptopay.pay(payment.invoice_id)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.status == PAID and result.provisioned
    again = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert again.status == PAID
    assert [(g.reason, g.reference, g.days) for g in grants()] == [('payment', str(payment.invoice_id), 30)]
    assert shop.settle(payment.invoice_id) is False  # a late poller or a second press credits nothing
    assert len(grants()) == 1


def asked_about(cryptopay, invoice_id):
    """How many getInvoices calls named invoice_id."""
    return sum(str(invoice_id) in str(params.get('invoice_ids', '')).split(',')
               for method, params in cryptopay.calls if method == 'getInvoices')


def test_the_poller_alone_settles_a_paid_invoice_it_had_marked_expired_once(shop, cryptopay, telegram, messenger,
                                                                          settings):
    """Nobody presses Check: the poller itself must find the money paid for an invoice it had given up on."""
    user = customer(shop, telegram)
    payment = shop.create_invoice(user, 30, now=NOW)
    gone = NOW + timedelta(seconds=settings.invoice_expires_seconds) + jobs.MISSING_GRACE
    cryptopay.hide(payment.invoice_id)  # one answer without it, once it could no longer be paid by our clock
    jobs.poll_payments(shop, messenger, now=gone)
    assert Payment.get_by_id(payment.id).status == EXPIRED
    cryptopay.hide(payment.invoice_id, False)
    cryptopay.pay(payment.invoice_id)  # Crypto Pay's clock: still payable there
    assert jobs.poll_payments(shop, messenger, now=gone + timedelta(minutes=1)) == 1
    assert jobs.poll_payments(shop, messenger, now=gone + timedelta(minutes=2)) == 0
    assert Payment.get_by_id(payment.id).status == PAID
    assert [(g.reason, g.reference, g.days) for g in grants()] == [('payment', str(payment.invoice_id), 30)]
    [link] = links_sent(telegram)
    assert shop.subscription_link(fresh(user)) in link.params['text']


def test_the_poller_asks_about_an_expired_invoice_until_crypto_pays_expiry_plus_a_margin(shop, cryptopay, messenger,
                                                                                        settings):
    user = customer(shop)
    payment = shop.create_invoice(user, 30, now=NOW)
    assert shop.expire_payment(payment.invoice_id)
    until = NOW + timedelta(seconds=settings.invoice_expires_seconds) + jobs.RECHECK_EXPIRED_FOR
    jobs.poll_payments(shop, messenger, now=until - timedelta(seconds=1))
    assert asked_about(cryptopay, payment.invoice_id) == 1
    jobs.poll_payments(shop, messenger, now=until)  # older than that: never asked again, the cost is bounded
    assert asked_about(cryptopay, payment.invoice_id) == 1
    cryptopay.pay(payment.invoice_id)
    assert jobs.poll_payments(shop, messenger, now=until) == 0 and grants() == []
    assert Payment.get_by_id(payment.id).status == EXPIRED


# Panel retries: the backoff, and whose row a failure touches

def test_a_failed_push_backs_off_30_s_then_every_minute_for_that_user_only(shop, panel):
    buyer, bystander = customer(shop, telegram_id=1001), customer(shop, telegram_id=1002)
    for user in (buyer, bystander):
        models.grant_days(user.id, 30, 'admin', f'a{user.id}', now=NOW)
    panel.refuse()
    assert shop.provision(buyer.id, now=NOW) is False
    assert (state(buyer).failures, state(buyer).retry_at) == (1, NOW + timedelta(seconds=30))
    assert shop.provision(buyer.id, now=NOW + DAY) is False
    assert (state(buyer).failures, state(buyer).retry_at) == (2, NOW + DAY + timedelta(seconds=60))
    for _ in range(12):
        shop.provision(buyer.id, now=NOW + DAY)
    assert state(buyer).retry_at == NOW + DAY + timedelta(seconds=60)  # capped at a minute
    assert (state(bystander).failures, state(bystander).retry_at) == (0, None)


def test_a_panel_refusal_is_kept_in_its_own_words_up_to_500_characters_and_counted_on_that_panel(shop, panel):
    from metrics import REGISTRY  # the bot's own registry, served at /metrics
    user = customer(shop)
    models.grant_days(user.id, 30, 'admin', 'a1', now=NOW)
    before = REGISTRY.get_sample_value('spn_panel_failures_total', {'panel': 'main'}) or 0
    words = 'Duplicate email: ' + 'x' * 600
    panel.success_false_next(n=10, msg=words)
    assert shop.provision(user.id, now=NOW) is False
    assert (state(user).last_error, state(user).refused, state(user).failures) == (words[:500], True, 1)
    assert REGISTRY.get_sample_value('spn_panel_failures_total', {'panel': 'main'}) == before + 1


def test_a_push_that_succeeds_clears_the_reason_of_the_last_failure(shop, panel):
    """/panels shows the last push error of a panel's pending clients: a new grant after a success is pending
    with no error of its own, so it must not show the old one."""
    user = customer(shop)
    models.grant_days(user.id, 30, 'admin', 'a1', now=NOW)
    panel.refuse()
    assert shop.provision(user.id, now=NOW) is False
    assert 'cannot connect' in shop.panel_report()[0]['last_error']
    panel.accept()
    assert shop.provision(user.id, now=NOW)
    models.grant_days(user.id, 7, 'admin', 'a2', now=NOW)
    report = shop.panel_report()[0]
    assert (report['pending'], report['last_error']) == (1, None)



def test_retry_pushes_every_due_user_in_one_run_and_waits_for_the_due_time(shop, panel, telegram, messenger):
    users = [customer(shop, telegram, telegram_id) for telegram_id in (1001, 1002, 1003)]
    for user in users:
        models.grant_days(user.id, 30, 'admin', f'a{user.id}', now=NOW)
    panel.refuse()
    shop.provision(users[2].id, now=NOW)  # due again at NOW + 30 s exactly
    panel.accept()
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(seconds=29))
    assert [state(user).dirty for user in users] == [False, False, True]
    jobs.retry_provisioning(shop, messenger, now=NOW + timedelta(seconds=30))
    assert [state(user).dirty for user in users] == [False, False, False]


def test_retry_tries_never_tried_users_first_when_the_panel_is_down(shop, panel, telegram, messenger):
    waiting, new = customer(shop, telegram, 1001), customer(shop, telegram, 1002)
    models.grant_days(waiting.id, 30, 'admin', 'w', now=NOW)
    panel.refuse()
    shop.provision(waiting.id, now=NOW)  # failed once, due again at NOW + 30 s
    models.grant_days(new.id, 30, 'admin', 'n', now=NOW)
    PanelClient.update(retry_at=NOW).where(PanelClient.user == waiting.id).execute()  # due, but tried before
    jobs.retry_provisioning(shop, messenger, now=NOW + DAY)  # one failed call per run
    assert (state(waiting).failures, state(new).failures) == (1, 1)
    assert state(new).retry_at == NOW + DAY + timedelta(seconds=30)
    assert state(waiting).retry_at == NOW  # not tried this run


def test_a_down_panel_still_lets_waiting_links_go_out(shop, cryptopay, panel, telegram, messenger):
    buyer, other = customer(shop, telegram, 1001), customer(shop, telegram, 1002)
    payment = shop.create_invoice(buyer, 30)
    cryptopay.pay(payment.invoice_id)
    assert shop.settle(payment.invoice_id, now=NOW) and shop.provision(buyer.id, now=NOW)  # then the process died
    assert Payment.get_by_id(payment.id).notified_at is None
    models.grant_days(other.id, 30, 'admin', 'o', now=NOW)
    panel.refuse()
    assert jobs.retry_provisioning(shop, messenger, now=NOW + DAY) == 1  # the link, despite the panel
    assert Payment.get_by_id(payment.id).notified_at is not None


def test_admins_are_alerted_at_the_fifth_failure_with_the_stuck_ids_once_each(shop, panel, telegram, messenger):
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    first, later, fine = (customer(shop, telegram, telegram_id) for telegram_id in (1001, 1002, 1003))
    models.grant_days(first.id, 30, 'admin', 'f', now=NOW)
    panel.refuse()
    for failure in range(1, jobs.ALERT_AFTER_FAILURES + 1):
        alerts = [call for call in telegram.sent if str(call.params.get('chat_id')) == '900']
        assert not alerts, f'alerted before failure {failure}'
        jobs.retry_provisioning(shop, messenger, now=NOW + failure * DAY)
    models.grant_days(fine.id, 1, 'admin', 'x', now=NOW)  # dirty, one failure below: not stuck
    PanelClient.update(retry_at=NOW + 100 * DAY).where(PanelClient.user == fine.id).execute()
    alerts = [call.params['text'] for call in telegram.sent if str(call.params.get('chat_id')) == '900']
    assert len(alerts) == 1 and alerts[0].startswith('⚠️ The panel has refused updates for 1 user(s). Their days are '
                                                     'safe in the database.')
    assert '• 1001: cannot connect to the panel' in alerts[0] and '1002' not in alerts[0] and '1003' not in alerts[0]
    models.grant_days(later.id, 30, 'admin', 'l', now=NOW)
    for failure in range(6, 24):  # one failed call per run, the two stuck users take turns
        jobs.retry_provisioning(shop, messenger, now=NOW + failure * DAY)
    alerts = [call.params['text'] for call in telegram.sent if str(call.params.get('chat_id')) == '900']
    assert len(alerts) == 2 and '• 1002:' in alerts[1] and '1001' not in alerts[1]  # the later one too, the first not again
    assert not state(fine).alerted
    panel.accept()
    jobs.retry_provisioning(shop, messenger, now=NOW + 30 * DAY)
    assert (state(first).dirty, state(first).alerted) == (False, False)  # re-armed for next time


def test_a_stuck_buyer_who_gets_new_days_is_reported_again_after_five_more_failures(shop, panel, telegram, messenger):
    """The alert is once per stuck delivery: new days are a new delivery, so the admins hear of it again."""
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    buyer = customer(shop, telegram, 1001)
    models.grant_days(buyer.id, 30, 'admin', 'first', now=NOW)
    panel.refuse()

    def alerts():
        return [call.params['text'] for call in telegram.sent if str(call.params.get('chat_id')) == '900']

    for failure in range(1, 10):
        jobs.retry_provisioning(shop, messenger, now=NOW + failure * DAY)
    assert len(alerts()) == 1 and '• 1001:' in alerts()[0]
    models.grant_days(buyer.id, 30, 'admin', 'second', now=NOW + 10 * DAY)  # the buyer pays again
    for failure in range(11, 11 + jobs.ALERT_AFTER_FAILURES):
        assert len(alerts()) == 1
        jobs.retry_provisioning(shop, messenger, now=NOW + failure * DAY)
    assert len(alerts()) == 2 and '• 1001:' in alerts()[1]



def test_releasing_a_notification_touches_only_that_unsent_payment(shop, cryptopay, telegram):
    user = customer(shop, telegram)
    first, second = shop.create_invoice(user, 30), shop.create_invoice(user, 90)
    for payment in (first, second):
        cryptopay.pay(payment.invoice_id)
        shop.check_payment(user.telegram_id, payment.invoice_id)
    sent = Payment.get_by_id(first.id)
    assert sent.notified_at is not None  # check_payment marks it told
    Payment.update(notified_at=None, notify_claimed_at=None).where(Payment.id == second.id).execute()
    assert shop.claim_notification(Payment.get_by_id(second.id), now=NOW)
    shop.release_notification(Payment.get_by_id(first.id))  # already told: nothing to release
    assert Payment.get_by_id(first.id).notify_claimed_at == sent.notify_claimed_at
    assert Payment.get_by_id(second.id).notify_claimed_at == NOW
    shop.release_notification(Payment.get_by_id(second.id))
    assert Payment.get_by_id(second.id).notify_claimed_at is None


# Gifts and promo codes

def test_the_gift_is_recorded_as_the_trial_with_its_reference(shop, settings):
    user = customer(shop)
    assert shop.claim_gift(user, now=NOW)
    assert [(gift.telegram_id, gift.kind) for gift in Gift.select()] == [(1001, 'trial')]
    assert [(g.reason, g.reference, g.days) for g in grants()] == [('gift', '1001:trial', settings.trial_days)]


def test_promo_expiry_is_judged_at_the_given_moment_and_is_exclusive(shop):
    user, other = customer(shop, telegram_id=1001), customer(shop, telegram_id=1002)
    PromoCode.create(code='EDGE1234', days=5, max_uses=5, expires_at=NOW)
    PromoCode.create(code='LATER123', days=5, max_uses=5, expires_at=NOW + DAY)  # past by the wall clock
    assert shop.redeem_promo(user, 'EDGE1234', now=NOW)[0] == 'expired'
    assert shop.redeem_promo(user, 'EDGE1234', now=NOW - timedelta(seconds=1))[0] == 'ok'
    assert shop.redeem_promo(other, 'LATER123', now=NOW)[0] == 'ok'
    assert [row.created_at for row in Redemption.select().order_by(Redemption.id)] == \
        [NOW - timedelta(seconds=1), NOW]
    assert shop.redeem_promo(user, None, now=NOW)[0] == 'invalid'
    assert shop.redeem_promo(user, '', now=NOW)[0] == 'invalid'


def test_promo_lockout_ends_exactly_ten_minutes_after_the_fifth_failure(shop):
    from shop import PROMO_LOCKOUT
    user = customer(shop)
    shop.create_promo(900, days=10, uses=5, code='RIGHT123')
    for guess in ('AAAA1111', 'BBBB2222', 'CCCC3333', 'DDDD4444', 'EEEE5555'):
        assert shop.redeem_promo(user, guess, now=NOW)[0] == 'unknown'
    assert shop.redeem_promo(user, 'RIGHT123', now=NOW + PROMO_LOCKOUT - timedelta(seconds=1))[0] == 'locked'
    assert shop.promo_lock_minutes(user, now=NOW + PROMO_LOCKOUT) == 0
    assert shop.redeem_promo(user, 'RIGHT123', now=NOW + PROMO_LOCKOUT)[0] == 'ok'  # the same moment the wait ends


def test_a_redeemed_code_does_not_count_toward_the_lockout(shop):
    user = customer(shop)
    shop.create_promo(900, days=10, uses=5, code='RIGHT123')
    for guess in ('AAAA1111', 'BBBB2222', 'CCCC3333', 'DDDD4444'):
        assert shop.redeem_promo(user, guess, now=NOW)[0] == 'unknown'
    assert shop.redeem_promo(user, 'RIGHT123', now=NOW)[0] == 'ok'
    assert shop.redeem_promo(user, 'EEEE5555', now=NOW)[0] == 'unknown'  # the fifth failure is still heard
    assert shop.redeem_promo(user, 'FFFF6666', now=NOW)[0] == 'locked'


# The link after a payment: told once, in the buyer's language and time zone, retried when it failed

def links_sent(telegram):
    return [call for call in telegram.sent if call.method == 'sendMessage' and call.ok]


def paid_and_provisioned(shop, cryptopay, user, days=30):
    payment = shop.create_invoice(user, days)
    cryptopay.pay(payment.invoice_id)
    assert shop.settle(payment.invoice_id, now=NOW) and shop.provision(user.id, now=NOW)
    return Payment.get_by_id(payment.id)


def test_the_link_goes_once_in_the_buyers_language_and_the_shops_time_zone(panel, cryptopay, database, telegram,
                                                                           messenger):
    import config
    from conftest import make_shop, settings_env
    shop = make_shop(config.load(settings_env(panel, cryptopay, database, TIMEZONE='Europe/Moscow')))
    user = customer(shop, telegram, lang='ru')
    payment = paid_and_provisioned(shop, cryptopay, user)
    assert jobs.deliver_link(shop, messenger, payment, now=NOW + DAY) is True
    [sent] = links_sent(telegram)
    expiry = (NOW + 30 * DAY + timedelta(hours=3)).strftime('%d.%m.%Y %H:%M')  # Moscow is UTC+3
    assert str(sent.params['chat_id']) == '1001'
    assert sent.params['text'] == (f'✅ Ваш VPN готов, активен до <b>{expiry}</b>.\n\nВаша ссылка:\n'
                                   f'<code>{shop.subscription_link(fresh(user))}</code>')
    assert sent.params['reply_markup'] == {'inline_keyboard': [[{'text': '« Меню', 'callback_data': 'menu'}]]}
    stored = Payment.get_by_id(payment.id)
    assert stored.notified_at == NOW + DAY and stored.notify_claimed_at == NOW + DAY
    assert jobs.deliver_link(shop, messenger, stored, now=NOW + 2 * DAY) is False
    assert len(links_sent(telegram)) == 1


def test_no_link_for_an_unpaid_unprovisioned_or_claimed_payment(shop, cryptopay, panel, telegram, messenger):
    user = customer(shop, telegram)
    pending = shop.create_invoice(user, 30)
    assert jobs.deliver_link(shop, messenger, Payment.get_by_id(pending.id), now=NOW) is False
    unpushed = shop.create_invoice(user, 90)
    cryptopay.pay(unpushed.invoice_id)
    panel.refuse()
    assert shop.settle(unpushed.invoice_id, now=NOW) and not shop.provision(user.id, now=NOW)
    assert jobs.deliver_link(shop, messenger, Payment.get_by_id(unpushed.id), now=NOW) is False
    panel.accept()
    assert shop.provision(user.id, now=NOW)
    claimed = Payment.get_by_id(unpushed.id)
    assert shop.claim_notification(claimed, now=NOW)  # another sender has it
    assert jobs.deliver_link(shop, messenger, Payment.get_by_id(unpushed.id), now=NOW + timedelta(seconds=1)) \
        is False
    assert links_sent(telegram) == []


def test_a_link_that_could_not_be_sent_is_released_for_the_next_run(shop, cryptopay, telegram, messenger):
    from messenger import Messenger
    user = customer(shop, telegram)
    payment = paid_and_provisioned(shop, cryptopay, user)
    telegram.close()  # Telegram unreachable: the send fails after its retries
    hasty = Messenger(messenger.bot, sleep=lambda seconds: None)
    assert jobs.deliver_link(shop, hasty, payment, now=NOW) is False
    stored = Payment.get_by_id(payment.id)
    assert (stored.notified_at, stored.notify_claimed_at) == (None, None)


def test_notification_claims_and_marks_touch_one_payment_and_respect_the_lease(shop, cryptopay, telegram):
    from shop import NOTIFY_LEASE
    user = customer(shop, telegram)
    first, second = paid_and_provisioned(shop, cryptopay, user), paid_and_provisioned(shop, cryptopay, user, 90)
    assert shop.claim_notification(first, now=NOW)
    assert Payment.get_by_id(second.id).notify_claimed_at is None
    assert not shop.claim_notification(first, now=NOW + NOTIFY_LEASE)  # the lease runs until its end
    assert shop.claim_notification(first, now=NOW + NOTIFY_LEASE + timedelta(seconds=1))
    shop.mark_notified(first, now=NOW + DAY)
    shop.mark_notified(first, now=NOW + 2 * DAY)  # told once: the first time stays
    assert Payment.get_by_id(first.id).notified_at == NOW + DAY
    assert Payment.get_by_id(second.id).notified_at is None
    assert not shop.claim_notification(Payment.get_by_id(first.id), now=NOW + 3 * DAY)  # told: never again


# Invoice checks

def test_a_check_returns_the_payment_it_looked_at(shop, cryptopay):
    user = customer(shop)
    payment = shop.create_invoice(user, 30)
    assert shop.check_payment(user.telegram_id, payment.invoice_id).payment.invoice_id == payment.invoice_id
    cryptopay.pay(payment.invoice_id)
    paid = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert (paid.payment.invoice_id, paid.payment.status) == (payment.invoice_id, PAID)


def test_each_settlement_is_counted_once_under_the_path_that_made_it(shop, cryptopay, messenger):
    from metrics import REGISTRY  # the bot's own registry, served at /metrics

    def settled(path):
        return REGISTRY.get_sample_value('spn_payments_settled_total', {'provider': 'cryptopay', 'path': path}) or 0
    user = customer(shop)
    by_button, by_poller = shop.create_invoice(user, 30), shop.create_invoice(user, 90)
    before = {path: settled(path) for path in ('button', 'poller')}
    for payment in (by_button, by_poller):
        cryptopay.pay(payment.invoice_id)
    shop.check_payment(user.telegram_id, by_button.invoice_id)
    shop.check_payment(user.telegram_id, by_button.invoice_id)  # paid already: not counted again
    jobs.poll_payments(shop, messenger, now=NOW)
    assert {path: settled(path) - before[path] for path in before} == {'button': 1, 'poller': 1}


def test_a_mismatch_is_reported_for_its_own_payment_only(shop, cryptopay):
    user = customer(shop)
    forged, honest = shop.create_invoice(user, 30), shop.create_invoice(user, 90)
    cryptopay.pay(forged.invoice_id)
    cryptopay.forge(forged.invoice_id, amount='0.01')  # "paid", but not what we asked for
    result = shop.check_payment(user.telegram_id, forged.invoice_id)
    assert (result.status, result.payment.id) == ('mismatch', forged.id)
    assert shop.check_payment(user.telegram_id, honest.invoice_id).status == PENDING  # Crypto Pay says active
    assert grants() == []


def test_settling_a_paid_invoice_says_true_once_whoever_comes_second(shop, cryptopay, telegram, messenger):
    user = customer(shop, telegram)
    payment = shop.create_invoice(user, 30)
    invoice = cryptopay.pay(payment.invoice_id)
    assert jobs.settle_paid(shop, messenger, payment, invoice, 'webhook', NOW) is True
    assert jobs.settle_paid(shop, messenger, Payment.get_by_id(payment.id), invoice, 'poller', NOW) is False
    assert len(grants()) == 1 and len(links_sent(telegram)) == 1
    assert Payment.get_by_id(payment.id).notified_at == NOW  # told at the caller's clock


def test_the_pollers_counts_add_up_over_several_invoices(shop, cryptopay, telegram, messenger):
    """Two paid and two expired in one round are counted as two and two (the counts feed the metrics and log)."""
    buyers = [customer(shop, telegram, 1001 + i) for i in range(4)]
    payments = [shop.create_invoice(user, 30) for user in buyers]
    for payment in payments[:2]:
        cryptopay.pay(payment.invoice_id)
    for payment in payments[2:]:
        cryptopay.expire(payment.invoice_id)
    counts = {}
    assert jobs.poll_payments(shop, messenger, now=NOW, counts=counts) == 2
    assert counts == {'settled': 2, 'expired': 2}
    assert [Payment.get_by_id(p.id).status for p in payments] == [PAID, PAID, EXPIRED, EXPIRED]


def test_the_poller_judges_each_buyers_invoice_as_theirs_and_stamps_a_mismatch_at_its_clock(shop, cryptopay,
                                                                                             telegram, messenger):
    from models import InvoiceMismatch
    first, second = customer(shop, telegram, 1001), customer(shop, telegram, 1002)
    shop.create_invoice(first, 30)
    honest, forged = shop.create_invoice(second, 30), shop.create_invoice(second, 90)
    for payment in (honest, forged):
        cryptopay.pay(payment.invoice_id)
    cryptopay.forge(forged.invoice_id, amount='0.01')
    assert shop.apply_invoice_state(forged, cryptopay.invoices[forged.invoice_id] | {'amount': '0.01'}, now=NOW) \
        is False
    counts = {}
    assert jobs.poll_payments(shop, messenger, now=NOW, counts=counts) == 1
    assert counts == {'settled': 1, 'expired': 0}
    assert Payment.get_by_id(honest.id).status == PAID and Payment.get_by_id(forged.id).status == PENDING
    assert [(m.payment_id, m.created_at) for m in InvoiceMismatch.select()] == [(forged.id, NOW)]


def test_a_paid_invoice_we_asked_about_is_never_taken_for_another_missing_one(shop, cryptopay, telegram, messenger):
    """Two invoices of one buyer for one plan carry the same payload: the paid one answers only for itself."""
    from models import InvoiceMismatch
    user = customer(shop, telegram)
    paid = shop.create_invoice(user, 30, now=NOW)
    Payment.update(created_at=NOW - DAY).where(Payment.id == paid.id).execute()  # so the next is a new invoice
    missing = shop.create_invoice(user, 30, now=NOW)
    assert missing.id != paid.id
    cryptopay.pay(paid.invoice_id)
    cryptopay.hide(missing.invoice_id)
    assert jobs.poll_payments(shop, messenger, now=NOW) == 1
    assert Payment.get_by_id(missing.id).status == PENDING and InvoiceMismatch.select().count() == 0


def test_a_strangers_answer_never_replaces_an_invoices_own_answer(shop, cryptopay, telegram, messenger):
    honest_buyer, other = customer(shop, telegram, 1001), customer(shop, telegram, 1002)
    settled_before = shop.create_invoice(other, 30)
    cryptopay.pay(settled_before.invoice_id)
    assert jobs.poll_payments(shop, messenger, now=NOW) == 1
    honest, odd = shop.create_invoice(honest_buyer, 30), shop.create_invoice(other, 90)
    cryptopay.pay(honest.invoice_id)
    cryptopay.forge(odd.invoice_id, as_invoice=settled_before.invoice_id)  # a paid invoice we did not ask about
    assert jobs.poll_payments(shop, messenger, now=NOW) == 1
    assert Payment.get_by_id(honest.id).status == PAID and Payment.get_by_id(odd.id).status == PENDING


def test_the_poller_leaves_stars_payments_to_their_own_job(shop, cryptopay, messenger):
    user = customer(shop)
    stars_row = Payment.create(user=user, plan_days=30, amount=250, currency='XTR', provider='stars', pay_url='',
                               created_at=NOW - DAY)
    crypto = shop.create_invoice(user, 30, now=NOW)
    jobs.poll_payments(shop, messenger, now=NOW + 2 * DAY)
    assert Payment.get_by_id(stars_row.id).status == PENDING
    asked = [params['invoice_ids'] for method, params in cryptopay.calls if method == 'getInvoices']
    assert asked == [str(crypto.invoice_id)]


def test_an_invoice_gone_from_crypto_pay_is_expired_at_the_check(shop, cryptopay):
    user = customer(shop)
    payment = shop.create_invoice(user, 30)
    cryptopay.delete(payment.invoice_id)
    assert shop.check_payment(user.telegram_id, payment.invoice_id).status == EXPIRED
    assert Payment.get_by_id(payment.id).status == EXPIRED and grants() == []


def test_the_poller_records_crypto_pays_payment_time_and_grants_at_its_own_clock(shop, cryptopay, telegram,
                                                                                   messenger):
    from cryptobot import parse_time
    user = customer(shop, telegram)
    payment = shop.create_invoice(user, 30)
    paid_at = parse_time(cryptopay.pay(payment.invoice_id)['paid_at']).replace(tzinfo=None)
    assert jobs.poll_payments(shop, messenger, now=NOW) == 1
    assert Payment.get_by_id(payment.id).paid_at == paid_at != NOW
    [grant] = grants()
    assert (grant.created_at, grant.expires_after) == (NOW, NOW + 30 * DAY)


def test_applying_an_invoice_state_says_whether_it_settled_now(shop, cryptopay):
    user = customer(shop)
    payment = shop.create_invoice(user, 30)
    assert shop.apply_invoice_state(payment, dict(cryptopay.invoices[payment.invoice_id]), now=NOW) is False
    assert Payment.get_by_id(payment.id).status == PENDING
    invoice = {key: value for key, value in cryptopay.pay(payment.invoice_id).items() if key != 'paid_at'}
    assert shop.apply_invoice_state(payment, invoice, now=NOW) is True  # no paid_at: our clock
    assert Payment.get_by_id(payment.id).paid_at == NOW
    assert shop.apply_invoice_state(payment, invoice, now=NOW) is False
    other = shop.create_invoice(user, 30)
    assert shop.apply_invoice_state(other, {'status': 'expired', 'invoice_id': other.invoice_id}, now=NOW) is False
    assert Payment.get_by_id(other.id).status == EXPIRED
    third = shop.create_invoice(user, 90)
    assert shop.apply_invoice_state(third, None, now=NOW) is False
    assert Payment.get_by_id(third.id).status == EXPIRED and len(grants()) == 1


def test_each_code_once_per_user_and_a_racing_second_try_is_already(shop, settings):
    import threading
    from conftest import make_shop
    user = customer(shop)
    shop.create_promo(900, days=3, uses=100, code='FIRST123')
    shop.create_promo(900, days=4, uses=100, code='SECOND12')
    assert shop.redeem_promo(user, 'FIRST123', now=NOW)[0] == 'ok'
    assert shop.redeem_promo(user, 'SECOND12', now=NOW)[0] == 'ok'  # another code is another redemption
    shop.create_promo(900, days=5, uses=100, code='RACE1234')
    outcomes, barrier = [], threading.Barrier(8)

    def redeem():
        with models.db.connection_context():
            barrier.wait()  # started together: the look-up or, for a thread past it, the unique index decides
            outcomes.append(make_shop(settings).redeem_promo(user, 'RACE1234', now=NOW)[0])

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count('ok') == 1 and set(outcomes) - {'ok'} <= {'already', 'locked'}, outcomes
    assert PromoCode.get(PromoCode.code == 'RACE1234').used == 1
    assert [g.days for g in grants('promo')] == [3, 4, 5]


def test_a_redemption_that_loses_the_race_at_the_insert_is_already_and_takes_no_use(shop):
    """Another thread redeems the same code for the same buyer and commits only once ours, past its "already?"
    look-up, waits on it to take a use. PostgreSQL shows the wait in pg_locks; SQLite shows no waiting writer, so
    there the race cannot be held at that point (test_each_code_once_per_user_and_a_racing_second_try_is_already
    races freely)."""
    if models.is_sqlite():
        pytest.skip('SQLite shows no waiting writer: the race cannot be held past the look-up')
    user = customer(shop)
    shop.create_promo(900, days=5, uses=100, code='RACE5678')
    promo = PromoCode.get(PromoCode.code == 'RACE5678')

    def take_a_use():  # the other thread's redemption (Shop._redeem's steps), held once it has taken a use
        PromoCode.update(used=PromoCode.used + 1).where(PromoCode.id == promo.id).execute()

    def credit():
        redemption = Redemption.create(promo=promo, user=user, created_at=NOW)
        models.grant_days(user.id, promo.days, 'promo', redemption.id, now=NOW)

    outcome = race_held_at_a_lock(take_a_use, credit, lambda: shop.redeem_promo(user, 'RACE5678', now=NOW)[0])
    assert outcome == 'already'
    assert PromoCode.get_by_id(promo.id).used == 1 and [g.days for g in grants('promo')] == [5]


def test_clean_users_never_crowd_a_due_push_out_of_the_retry_batch(shop, panel, telegram, messenger):
    with models.transaction():
        for telegram_id in range(20_000, 20_501):  # more clean users than one run takes
            User.create(telegram_id=telegram_id, panel_email=f'spn-{telegram_id}')
    user = customer(shop, telegram)
    models.grant_days(user.id, 30, 'admin', 'a', now=NOW)
    panel.refuse()
    shop.provision(user.id, now=NOW)
    panel.accept()
    jobs.retry_provisioning(shop, messenger, now=NOW + DAY)
    assert not state(user).dirty and user.panel_email in panel.clients


# Settlement touches one invoice; referrals pay once per invited user, at the settlement's clock

def test_settling_one_invoice_leaves_the_others_alone(shop, cryptopay):
    user, other = customer(shop, telegram_id=1001), customer(shop, telegram_id=1002)
    mine, also_mine, theirs = shop.create_invoice(user, 30), shop.create_invoice(user, 90), \
        shop.create_invoice(other, 30)
    shop.expire_payment(also_mine.invoice_id)
    assert shop.settle(mine.invoice_id, now=NOW)
    assert [Payment.get_by_id(p.id).status for p in (mine, also_mine, theirs)] == [PAID, EXPIRED, PENDING]
    assert [(g.user_id, g.reference) for g in grants()] == [(user.id, str(mine.invoice_id))]


def test_expiring_touches_only_that_pending_invoice(shop, cryptopay):
    user = customer(shop)
    first, second, paid = (shop.create_invoice(user, days) for days in (30, 90, 180))  # a plan's pending one is reused
    cryptopay.pay(paid.invoice_id)
    assert shop.settle(paid.invoice_id, now=NOW)
    assert shop.expire_payment(first.invoice_id) is True
    assert shop.expire_payment(first.invoice_id) is False  # already expired
    assert shop.expire_payment(paid.invoice_id) is False  # paid stays paid
    assert [Payment.get_by_id(p.id).status for p in (first, second, paid)] == [EXPIRED, PENDING, PAID]


def test_each_invited_user_pays_their_inviter_once_at_the_settlement_time(shop, settings):
    inviter, other_inviter = customer(shop, telegram_id=1001), customer(shop, telegram_id=1004)
    first = customer(shop, telegram_id=1002, invite_code=f'  {inviter.invite_code.upper()} ')
    second = customer(shop, telegram_id=1003, invite_code=other_inviter.invite_code)
    payments = [shop.create_invoice(user, days) for user, days in ((first, 30), (first, 90), (second, 30))]
    assert shop.settle(payments[0].invoice_id, now=NOW)
    assert Referral.get(Referral.invited == first.id).rewarded_at == NOW
    assert Referral.get(Referral.invited == second.id).rewarded_at is None
    assert shop.settle(payments[1].invoice_id, now=NOW + DAY)  # the same invited user again: no bonus
    assert shop.settle(payments[2].invoice_id, now=NOW + 2 * DAY)
    bonus = settings.referral_bonus_days
    assert [(g.user_id, g.reference, g.days, g.created_at) for g in grants('referral')] == \
        [(inviter.id, str(first.id), bonus, NOW), (other_inviter.id, str(second.id), bonus, NOW + 2 * DAY)]
    assert fresh(inviter).expires_at == NOW + bonus * DAY
    assert fresh(other_inviter).expires_at == NOW + 2 * DAY + bonus * DAY
    assert shop.referral_counts(fresh(inviter)) == (1, 1)


def test_registering_again_refreshes_the_profile_and_never_the_inviter(shop):
    inviter = customer(shop, telegram_id=1001)
    user, created = shop.register(1002, 'ann\x00a', 'An\x00na', 'ru', invite_code=inviter.invite_code + '\x00')
    assert created and (user.username, user.first_name, user.language) == ('anna', 'Anna', 'ru')
    assert user.panel_email == 'spn-1002' and Referral.get().inviter_id == inviter.id
    User.update(blocked=True).where(User.id == user.id).execute()
    again, created = shop.register(1002, 'anna', 'Anna', 'ru')  # nothing changed but the block
    assert not created and again.blocked is False and fresh(user).blocked is False
    again, created = shop.register(1002, 'anna_b', None, 'en', invite_code=inviter.invite_code)
    assert not created and (again.username, again.first_name, again.language) == ('anna_b', '', 'en')
    assert fresh(user).username == 'anna_b' and fresh(inviter).username == 'u1001'
    assert Referral.select().count() == 1


def test_registering_the_same_user_at_once_on_many_threads_creates_one(shop, settings):
    import threading
    from conftest import make_shop
    outcomes, barrier = [], threading.Barrier(6)

    def start():
        with models.db.connection_context():
            barrier.wait()
            user, created = make_shop(settings).register(1009, 'zed', 'Zed', 'en')
            outcomes.append((user.telegram_id, created))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [(1009, False)] * 5 + [(1009, True)]
    assert User.select().count() == 1


# The day grant and the panel push

def test_days_extend_from_the_later_of_now_and_the_expiry_in_whole_seconds(shop):
    user = customer(shop)
    moment = NOW.replace(microsecond=654321)
    assert models.grant_days(user.id, 30, 'admin', 'a', granted_by=900, now=moment) == NOW + 30 * DAY
    assert models.grant_days(user.id, 5, 'promo', 'p', now=NOW + DAY) == NOW + 35 * DAY  # from the expiry
    assert models.grant_days(user.id, 2, 'gift', 'g', now=NOW + 40 * DAY) == NOW + 42 * DAY  # lapsed: from now
    assert [(g.reason, g.days, g.granted_by, g.expires_before, g.expires_after, g.created_at) for g in grants()] == [
        ('admin', 30, 900, None, NOW + 30 * DAY, NOW),
        ('promo', 5, None, NOW + 30 * DAY, NOW + 35 * DAY, NOW + DAY),
        ('gift', 2, None, NOW + 35 * DAY, NOW + 42 * DAY, NOW + 40 * DAY)]
    with pytest.raises(IntegrityError):
        models.grant_days(user.id, 2, 'gift', 'g', now=NOW + 50 * DAY)
    assert fresh(user).expires_at == NOW + 42 * DAY == models.derive_expiry(user.id)


def test_a_grant_marks_the_user_for_a_fresh_push_and_clears_the_backoff(shop, panel):
    user, other = customer(shop, telegram_id=1001), customer(shop, telegram_id=1002)
    models.grant_days(user.id, 30, 'admin', 'a', now=NOW)
    panel.refuse()
    for _ in range(3):
        shop.provision(user.id, now=NOW)
    models.grant_days(other.id, 30, 'admin', 'o', now=NOW)
    assert state(user).failures == 3 and state(user).retry_at is not None
    models.grant_days(user.id, 1, 'admin', 'b', now=NOW)
    assert (state(user).dirty, state(user).failures, state(user).retry_at) == (True, 0, None)
    assert fresh(other).expires_at == NOW + 30 * DAY  # one user's grant moves one user


def test_a_push_sends_the_ledger_to_the_panel_and_marks_only_that_users_paid_payments(shop, cryptopay, panel):
    from test_shop import panel_expiry
    user, other = customer(shop, telegram_id=1001), customer(shop, telegram_id=1002)
    assert shop.provision(user.id, now=NOW) is True and panel.count('') == 0  # no days: nothing to push
    mine, theirs = shop.create_invoice(user, 30), shop.create_invoice(other, 30)
    pending = shop.create_invoice(user, 90)
    for payment in (mine, theirs):
        cryptopay.pay(payment.invoice_id)
        shop.settle(payment.invoice_id, now=NOW)
    panel.refuse()
    shop.provision(user.id, now=NOW)
    assert state(user).failures == 1
    panel.accept()
    assert shop.provision(user.id, now=NOW + DAY) is True
    stored = fresh(user)
    client = panel.clients[stored.panel_email]
    assert (client['subId'], client['tgId'], client['enable']) == (stored.panel_sub_id, 1001, True)
    assert panel_expiry(panel, stored) == stored.expires_at == NOW + 30 * DAY
    assert state(user).uuid == client['id'] and not state(user).dirty
    assert (state(user).failures, state(user).retry_at, state(user).alerted) == (0, None, False)
    assert [Payment.get_by_id(p.id).provisioned_at for p in (mine, theirs, pending)] == [NOW + DAY, None, None]
    calls = panel.count('')
    assert shop.provision(user.id, now=NOW + 2 * DAY) is True  # clean: nothing to push, no panel call
    assert panel.count('') == calls
    later = shop.create_invoice(user, 30)
    cryptopay.pay(later.invoice_id)
    shop.settle(later.invoice_id, now=NOW + 3 * DAY)
    assert shop.provision(user.id, now=NOW + 3 * DAY)
    assert [Payment.get_by_id(p.id).provisioned_at for p in (mine, later)] == [NOW + DAY, NOW + 3 * DAY]


def test_the_poller_expires_a_missing_invoice_from_the_exact_end_of_its_grace(shop, telegram, messenger, settings):
    user = customer(shop, telegram)
    Payment.create(invoice_id=424242, user=user, plan_days=30, amount=100, currency='RUB', pay_url='x',
                   created_at=NOW)
    gone_from = NOW + timedelta(seconds=settings.invoice_expires_seconds) + jobs.MISSING_GRACE
    jobs.poll_payments(shop, messenger, now=gone_from - timedelta(seconds=1))
    assert Payment.get().status == PENDING
    jobs.poll_payments(shop, messenger, now=gone_from)
    assert Payment.get().status == EXPIRED
