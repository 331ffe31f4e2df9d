"""The shop's business operations against a real database and the loopback panel and Crypto Pay fakes."""
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from peewee import IntegrityError

import models
from conftest import ROOT, race_held_at_a_lock, settings_env
from cryptobot import CryptoPayError
from models import EXPIRED, PAID, PENDING, Grant, Payment, PromoCode, Referral, User
from shop import Shop, language_for
from xui import XuiClient

NOW = datetime(2026, 11, 26, 12, 0, 0)


def panel_expiry(panel, user):
    """Return the expiry the fake panel holds for the user, as a naive UTC datetime."""
    client = panel.clients[user.panel_email]
    return datetime.fromtimestamp(client['expiryTime'] / 1000, timezone.utc).replace(tzinfo=None)


def register(shop, telegram_id=1001, **kwargs):
    user, _ = shop.register(telegram_id, f'user{telegram_id}', 'Anna', kwargs.pop('lang', 'ru'), **kwargs)
    return user


def buy_and_pay(shop, cryptopay, user, days=30):
    payment = shop.create_invoice(user, days)
    cryptopay.pay(payment.invoice_id)
    return payment


@pytest.mark.parametrize('code,lang', [('ru', 'ru'), ('uk', 'ru'), ('kk', 'ru'), ('ru-RU', 'ru'), ('en', 'en'),
                                       ('de', 'en'), (None, 'en'), ('', 'en')])
def test_language_follows_region(code, lang):
    assert language_for(code) == lang


def test_register_once_and_refresh_name(shop):
    user, created = shop.register(1, 'anna', 'Anna', 'ru')
    again, created_again = shop.register(1, 'anna_new', 'Anna B', 'ru')
    assert created and not created_again
    assert again.id == user.id and again.username == 'anna_new' and again.first_name == 'Anna B'
    assert User.select().count() == 1


def test_referral_recorded_only_for_new_user_and_never_self(shop):
    inviter = register(shop, 1)
    invited, _ = shop.register(2, 'b', 'B', 'en', invite_code=inviter.invite_code)
    assert invited.referrer_id == inviter.id
    assert Referral.get(Referral.invited == invited).inviter_id == inviter.id
    other = register(shop, 3)
    again, created = shop.register(2, 'b', 'B', 'en', invite_code=other.invite_code)
    assert not created and User.get_by_id(invited.id).referrer_id == inviter.id
    existing, _ = shop.register(1, 'a', 'A', 'en', invite_code=inviter.invite_code)
    assert existing.referrer_id is None
    garbage, _ = shop.register(4, 'd', 'D', 'en', invite_code="'; DROP TABLE user; --")
    assert garbage.referrer_id is None and User.select().count() == 4


def test_invoice_created_for_exact_plan_price(shop, cryptopay):
    user = register(shop)
    payment = shop.create_invoice(user, 90)
    invoice = cryptopay.invoices[payment.invoice_id]
    assert invoice['currency_type'] == 'fiat' and invoice['fiat'] == 'RUB'
    assert Decimal(invoice['amount']) == Decimal('270') == payment.amount
    assert payment.status == PENDING and payment.pay_url == invoice['bot_invoice_url']


def test_unknown_plan_refused(shop):
    with pytest.raises(KeyError):
        shop.create_invoice(register(shop), 31)


def test_paid_invoice_settles_and_provisions(shop, cryptopay, panel):
    user = register(shop)
    payment = buy_and_pay(shop, cryptopay, user)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.status == PAID and result.provisioned
    user = User.get_by_id(user.id)
    assert panel_expiry(panel, user) == user.expires_at
    client = panel.clients[user.panel_email]
    assert client['enable'] is True and client['subId'] == user.panel_sub_id and client['tgId'] == 1001
    assert Payment.get_by_id(payment.id).provisioned_at is not None


def test_pending_invoice_stays_pending(shop, cryptopay):
    user = register(shop)
    payment = shop.create_invoice(user, 30)
    assert shop.check_payment(user.telegram_id, payment.invoice_id).status == PENDING
    assert User.get_by_id(user.id).expires_at is None


def test_expired_invoice_marked(shop, cryptopay):
    user = register(shop)
    payment = shop.create_invoice(user, 30)
    cryptopay.expire(payment.invoice_id)
    assert shop.check_payment(user.telegram_id, payment.invoice_id).status == EXPIRED
    assert Payment.get_by_id(payment.id).status == EXPIRED


def test_someone_elses_invoice_refused(shop, cryptopay):
    owner, thief = register(shop, 1), register(shop, 2)
    payment = buy_and_pay(shop, cryptopay, owner)
    assert shop.check_payment(thief.telegram_id, payment.invoice_id).status == 'not_found'
    assert Payment.get_by_id(payment.id).status == PENDING
    assert User.get_by_id(thief.id).expires_at is None


def test_renewal_extends_from_current_expiry_and_keeps_link(shop, cryptopay, panel):
    user = register(shop)
    first = buy_and_pay(shop, cryptopay, user)
    shop.check_payment(user.telegram_id, first.invoice_id)
    expiry = User.get_by_id(user.id).expires_at
    uuid = panel.clients[user.panel_email]['id']
    second = buy_and_pay(shop, cryptopay, user, 90)
    shop.check_payment(user.telegram_id, second.invoice_id)
    user = User.get_by_id(user.id)
    assert user.expires_at == expiry + timedelta(days=90)
    assert panel_expiry(panel, user) == user.expires_at
    assert panel.clients[user.panel_email]['id'] == uuid and len(panel.clients) == 1


def test_check_twice_settles_once(shop, cryptopay):
    user = register(shop)
    payment = buy_and_pay(shop, cryptopay, user)
    shop.check_payment(user.telegram_id, payment.invoice_id)
    expiry = User.get_by_id(user.id).expires_at
    shop.check_payment(user.telegram_id, payment.invoice_id)
    assert User.get_by_id(user.id).expires_at == expiry
    assert Grant.select().where(Grant.reason == 'payment').count() == 1


def test_concurrent_checks_settle_once(shop, cryptopay, settings):
    from conftest import make_shop
    user = register(shop)
    payment = buy_and_pay(shop, cryptopay, user)
    results, barrier = [], threading.Barrier(8)

    def press():
        with models.db.connection_context():
            other = make_shop(settings)
            barrier.wait()
            results.append(other.settle(payment.invoice_id))

    threads = [threading.Thread(target=press) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert User.get_by_id(user.id).expires_at == models.derive_expiry(user.id)
    assert Grant.select().count() == 1


def test_panel_down_keeps_payment_paid_not_provisioned(shop, cryptopay, panel):
    user = register(shop)
    payment = buy_and_pay(shop, cryptopay, user)
    panel.refuse()
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.status == PAID and not result.provisioned
    stored = Payment.get_by_id(payment.id)
    assert stored.status == PAID and stored.provisioned_at is None
    state = models.PanelClient.get(models.PanelClient.user == user.id)
    assert state.dirty and state.failures == 1 and 'cannot connect' in state.last_error
    panel.accept()
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.provisioned and Grant.select().count() == 1
    assert panel_expiry(panel, User.get_by_id(user.id)) == User.get_by_id(user.id).expires_at


def test_cryptopay_down_raises_and_changes_nothing(shop, cryptopay):
    user = register(shop)
    payment = shop.create_invoice(user, 30)
    cryptopay.refuse()
    with pytest.raises(CryptoPayError):
        shop.check_payment(user.telegram_id, payment.invoice_id)
    with pytest.raises(CryptoPayError):
        shop.create_invoice(user, 90)  # (another 30 would reuse the pending one, with no call)
    cryptopay.accept()
    assert Payment.select().count() == 1 and Payment.get_by_id(payment.id).status == PENDING


def test_referral_bonus_once_at_first_payment(shop, cryptopay, settings):
    inviter = register(shop, 1)
    invited, _ = shop.register(2, 'b', 'B', 'en', invite_code=inviter.invite_code)
    for _ in range(2):
        payment = buy_and_pay(shop, cryptopay, invited)
        shop.check_payment(invited.telegram_id, payment.invoice_id)
    grants = Grant.select().where(Grant.reason == 'referral')
    assert grants.count() == 1 and grants.get().user_id == inviter.id
    assert grants.get().days == settings.referral_bonus_days
    assert shop.referral_counts(User.get_by_id(inviter.id)) == (1, 1)


def test_gift_once_per_telegram_id(shop, settings):
    user = register(shop)
    assert shop.claim_gift(user, now=NOW)
    assert not shop.claim_gift(user, now=NOW)
    assert User.get_by_id(user.id).expires_at == NOW + timedelta(days=settings.trial_days)


def test_promo_answers(shop):
    user = register(shop)
    shop.create_promo(900, days=10, uses=1, code='Winter2026')
    PromoCode.create(code='OLDCODE', days=5, max_uses=5, expires_at=NOW - timedelta(days=1))
    assert shop.redeem_promo(user, 'bad code!', now=NOW)[0] == 'invalid'
    assert shop.redeem_promo(user, 'NOPE1234', now=NOW)[0] == 'unknown'
    assert shop.redeem_promo(user, 'oldcode', now=NOW)[0] == 'expired'
    assert shop.redeem_promo(user, ' winter2026 ', now=NOW)[0] == 'ok'
    assert shop.redeem_promo(user, 'WINTER2026', now=NOW)[0] == 'already'
    other = register(shop, 2)
    assert shop.redeem_promo(other, 'WINTER2026', now=NOW)[0] == 'used_up'
    assert User.get_by_id(user.id).expires_at == NOW + timedelta(days=10)
    assert User.get_by_id(other.id).expires_at is None
    assert PromoCode.get(PromoCode.code == 'WINTER2026').used == 1


def test_promo_uses_never_exceeded_under_race(shop, settings):
    from conftest import make_shop
    shop.create_promo(900, days=3, uses=3, code='RACE01')
    users = [register(shop, 100 + i) for i in range(10)]
    outcomes, barrier = [], threading.Barrier(10)

    def redeem(user):
        with models.db.connection_context():
            barrier.wait()
            outcomes.append(make_shop(settings).redeem_promo(user, 'RACE01')[0])

    threads = [threading.Thread(target=redeem, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count('ok') == 3 and outcomes.count('used_up') == 7
    assert Grant.select().where(Grant.reason == 'promo').count() == 3


def test_admin_give_once_per_reference(shop):
    user = register(shop)
    shop.admin_give(900, user, 5, 'chat:1')
    with pytest.raises(IntegrityError):
        shop.admin_give(900, user, 5, 'chat:1')
    grant = Grant.get(Grant.reason == 'admin')
    assert grant.granted_by == 900 and grant.days == 5


def test_find_user(shop):
    register(shop, 555)
    assert shop.find_user('555').telegram_id == 555
    assert shop.find_user('@USER555').telegram_id == 555
    assert shop.find_user('@nobody') is None and shop.find_user('') is None


def test_stats(shop, cryptopay):
    user = register(shop)
    payment = buy_and_pay(shop, cryptopay, user)
    shop.check_payment(user.telegram_id, payment.invoice_id)
    shop.create_invoice(user, 90)
    stats = shop.stats()
    assert stats['users'] == 1 and stats['paid_total'] == 1 and stats['pending'] == 1
    assert Decimal(stats['revenue_total']) == Decimal('100') and stats['active'] == 1


def test_provision_repushes_when_a_grant_lands_meanwhile(shop, panel, settings):
    """A grant that commits while a push is in flight gets pushed too: the panel ends on the newest expiry."""
    from conftest import make_shop
    user = register(shop)
    models.grant_days(user.id, 30, 'admin', 'a1')
    shop.provision(user.id)  # logged in, client exists
    models.grant_days(user.id, 30, 'admin', 'a2')
    updates_before = panel.count('POST panel/api/clients/update')
    panel.hang_next(1, seconds=0.5, route='POST panel/api/clients/update')
    outcome = []

    def push():
        with models.db.connection_context():
            outcome.append(make_shop(settings).provision(user.id))

    pusher = threading.Thread(target=push)
    pusher.start()
    while panel.count('POST panel/api/clients/update') == updates_before:  # the slow push reached the panel
        threading.Event().wait(0.01)
    models.grant_days(user.id, 7, 'admin', 'a3')
    pusher.join()
    user = User.get_by_id(user.id)
    assert outcome == [True] and not models.PanelClient.get(models.PanelClient.user == user.id).dirty
    assert panel_expiry(panel, user) == user.expires_at == models.derive_expiry(user.id)


PUSH_IN_ANOTHER_PROCESS = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import config, models
from conftest import make_shop
settings = config.load()
models.connect_database(settings.database_url)
with models.connection():
    print(make_shop(settings).provision(int(sys.argv[2])))
"""


def test_a_push_that_reaches_the_panel_after_a_newer_one_from_another_process_is_pushed_again(
        shop, panel, cryptopay, database):
    """Two bot processes push one buyer: ours is slow on the way and lands on the panel after the other's newer
    expiry. The other process has marked the client level, so only our own check that the ledger moved on
    while we pushed can put the newest expiry back."""
    user = register(shop)
    models.grant_days(user.id, 30, 'admin', 'a1')
    assert shop.provision(user.id)
    models.grant_days(user.id, 30, 'admin', 'a2')
    late = panel.hold_next(route='POST panel/api/clients/update')
    outcome = []

    def push():  # a read timeout that outlasts the other process's start on a loaded machine
        settings = shop.settings
        patient = XuiClient(settings.xui_url, settings.xui_inbound_id, settings.xui_sub_url,
                            username=settings.xui_username, password=settings.xui_password, timeout=(5, 300),
                            retries=0)
        with models.connection():
            outcome.append(Shop(settings, patient, shop.cryptopay).provision(user.id))

    pusher = threading.Thread(target=push)
    pusher.start()
    assert late.arrived.wait(60)  # our push of a1 + a2 is on its way
    models.grant_days(user.id, 7, 'admin', 'a3')
    env = {**os.environ, **settings_env(panel, cryptopay, database)}
    other = subprocess.run([sys.executable, '-c', PUSH_IN_ANOTHER_PROCESS, str(ROOT), str(user.id)], env=env,
                           capture_output=True, text=True, timeout=240)
    assert other.stdout.strip() == 'True', other.stderr[-2000:]
    newest = User.get_by_id(user.id).expires_at
    assert panel_expiry(panel, user) == newest  # the other process pushed a1 + a2 + a3
    late.release()  # now our older value lands on top of it
    pusher.join(60)
    assert outcome == [True]
    assert panel_expiry(panel, user) == newest == models.derive_expiry(user.id)
    assert not models.PanelClient.get(models.PanelClient.user == user.id).dirty


def test_a_push_gives_up_after_five_tries_while_grants_keep_landing_and_the_retry_finishes_it(shop, panel):
    """Each push is overtaken by a new grant: the call stops after five pushes (the link is not yet level) and
    leaves the client due, so the retry job pushes the newest expiry."""
    user = register(shop)
    models.grant_days(user.id, 30, 'admin', 'a0')
    assert shop.provision(user.id)
    models.grant_days(user.id, 1, 'admin', 'b0')
    updates = panel.count('POST panel/api/clients/update')
    holds = [panel.hold_next(route='POST panel/api/clients/update') for _ in range(5)]
    outcome = []

    def push():
        with models.connection():
            outcome.append(shop.provision(user.id))

    pusher = threading.Thread(target=push)
    pusher.start()
    for n, hold in enumerate(holds, 1):
        assert hold.arrived.wait(30)
        models.grant_days(user.id, 1, 'admin', f'b{n}')  # lands while push n is on its way
        hold.release()
    pusher.join(30)
    assert outcome == [False]
    assert panel.count('POST panel/api/clients/update') - updates == 5
    assert models.PanelClient.get(models.PanelClient.user == user.id).dirty
    assert shop.provision(user.id)
    assert panel_expiry(panel, user) == User.get_by_id(user.id).expires_at == models.derive_expiry(user.id)


def test_a_new_buyer_is_stored_with_the_link_base_they_are_given_and_an_empty_name_when_telegram_has_none(shop):
    user, created = shop.register(7, None, None, 'en')
    assert created
    stored = User.get_by_id(user.id)
    assert stored.first_name == '' and stored.link_base == shop.link_base


def test_a_new_buyer_whose_start_races_another_one_is_found_not_created_twice(shop):
    """Another thread inserts the same buyer and commits only once our insert waits on it. PostgreSQL shows the
    wait in pg_locks; SQLite shows no waiting writer, so there the race cannot be held at the insert."""
    if models.is_sqlite():
        pytest.skip('SQLite shows no waiting writer: the race cannot be held at the insert')
    register(shop, 1)  # someone else is a buyer already
    user, created = race_held_at_a_lock(
        lambda: User.create(telegram_id=4242, username='first', first_name='First', panel_email='spn-4242'),
        lambda: None, lambda: shop.register(4242, 'second', 'Second', 'en'))
    assert not created and user.telegram_id == 4242 and user.username == 'first'
    assert User.select().where(User.telegram_id == 4242).count() == 1


# Per-buyer limits (issue 9 item 6)

def test_same_plan_reuses_the_pending_invoice(shop, cryptopay):
    user = register(shop)
    first = shop.create_invoice(user, 30)
    again = [shop.create_invoice(user, 30) for _ in range(5)]
    assert {payment.invoice_id for payment in again} == {first.invoice_id}
    assert [method for method, _ in cryptopay.calls].count('createInvoice') == 1
    assert Payment.select().count() == 1


def test_expired_pending_invoice_is_not_reused(shop, cryptopay, settings):
    user = register(shop)
    old = shop.create_invoice(user, 30)
    Payment.update(created_at=models.utcnow() - timedelta(seconds=settings.invoice_expires_seconds)).execute()
    assert shop.create_invoice(user, 30).invoice_id != old.invoice_id


def test_pending_invoices_capped_at_three_per_buyer(shop, cryptopay):
    from shop import TooManyInvoices
    user, other = register(shop, 1), register(shop, 2)
    for days in (30, 90, 180):
        shop.create_invoice(user, days)
    with pytest.raises(TooManyInvoices):
        shop.create_invoice(user, 365)
    assert shop.create_invoice(user, 90).plan_days == 90  # the ones already made are still offered
    assert shop.create_invoice(other, 365).plan_days == 365  # the cap is per buyer
    assert [method for method, _ in cryptopay.calls].count('createInvoice') == 4


def test_paid_or_expired_invoices_do_not_count_towards_the_cap(shop, cryptopay):
    user = register(shop)
    for days in (30, 90, 180):
        payment = buy_and_pay(shop, cryptopay, user, days)
        shop.check_payment(user.telegram_id, payment.invoice_id)
    assert shop.create_invoice(user, 365).status == PENDING


def test_handler_shop_tries_crypto_pay_once_and_jobs_retry(settings, cryptopay, messenger):
    import bot
    import jobs
    handlers, background = bot.build_shop(settings), bot.build_shop(settings, for_jobs=True)
    user = register(handlers)
    cryptopay.rate_limit_next(1, retry_after=30)
    with pytest.raises(CryptoPayError):  # no waiting out Retry-After inside a handler: one call, then the error
        handlers.create_invoice(user, 30)
    assert [method for method, _ in cryptopay.calls] == ['createInvoice']
    payment = handlers.create_invoice(user, 30)
    cryptopay.pay(payment.invoice_id)
    cryptopay.fail_next(1, status=503)
    with pytest.raises(CryptoPayError):
        handlers.check_payment(user.telegram_id, payment.invoice_id)
    calls = [method for method, _ in cryptopay.calls]
    assert calls.count('createInvoice') == 2 and calls.count('getInvoices') == 1
    background.cryptopay.backoff = 0.01
    cryptopay.fail_next(1, status=503)
    assert jobs.poll_payments(background, messenger) == 1
    assert Payment.get_by_id(payment.id).status == PAID  # the job retried past the 503


def test_handler_shop_tries_the_panel_once(settings, cryptopay, panel):
    import bot
    handlers = bot.build_shop(settings)
    user = register(handlers)
    models.grant_days(user.id, 30, 'admin', 'a1')
    panel.fail_next(1, status=502)
    assert not handlers.provision(user.id)
    assert models.PanelClient.get(models.PanelClient.user == user.id).dirty  # the job pushes it later
    assert handlers.provision(user.id)


def test_promo_guessing_locked_after_five_failures_in_ten_minutes(shop):
    user, other = register(shop, 1), register(shop, 2)
    shop.create_promo(900, days=10, uses=5, code='RIGHT123')
    for guess in ('AAAA1111', 'BBBB2222', 'short', 'CCCC3333', 'DDDD4444'):
        assert shop.redeem_promo(user, guess, now=NOW)[0] in ('unknown', 'invalid')
    assert shop.redeem_promo(user, 'RIGHT123', now=NOW + timedelta(minutes=1))[0] == 'locked'
    assert shop.promo_lock_minutes(user, now=NOW + timedelta(minutes=1)) == 9
    assert User.get_by_id(user.id).expires_at is None
    assert shop.redeem_promo(other, 'RIGHT123', now=NOW)[0] == 'ok'  # the lockout is per buyer
    assert shop.redeem_promo(user, 'RIGHT123', now=NOW + timedelta(minutes=10, seconds=1))[0] == 'ok'


def test_promo_lockout_holds_across_threads(shop, settings):
    from conftest import make_shop
    user = register(shop)
    outcomes, barrier = [], threading.Barrier(12)

    def guess(n):
        with models.db.connection_context():
            barrier.wait()
            outcomes.append(make_shop(settings).redeem_promo(user, f'GUESS{n:04d}')[0])

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count('unknown') == 5 and outcomes.count('locked') == 7


@pytest.mark.parametrize('code', ['ABCD', 'ABC12', 'abc-123', 'Ж12345'])
def test_new_promo_codes_have_at_least_six_characters(shop, code):
    with pytest.raises(ValueError):
        shop.create_promo(900, days=7, uses=1, code=code)
    assert len(shop.create_promo(900, days=7, uses=1).code) >= 6
    assert shop.create_promo(900, days=7, uses=1, code='abc123').code == 'ABC123'


# Settling only what we created (issue 9 item 7)

def forged_answers(cryptopay, payment):
    """The ways a wrong or hostile server at CRYPTOPAY_URL can answer about our invoice, each 'paid'."""
    penny = cryptopay._create_invoice({'currency_type': 'fiat', 'fiat': 'USD', 'amount': '0.01',
                                       'accepted_assets': 'USDT', 'payload': f'user:1001:days:{payment.plan_days}'})
    cryptopay.pay(penny['invoice_id'])
    return {
        'other_invoice': dict(as_invoice=penny['invoice_id']),
        'fiat': dict(fiat='USD'),
        'amount': dict(amount='0.01'),
        'payload': dict(payload='user:666:days:365'),
        'no_payload': dict(payload=None),
        'crypto': dict(currency_type='crypto', asset='USDT', fiat=None),
        'hostile_payload': dict(payload='</code><a href="tg://user?id=1">&amp'),
    }


@pytest.mark.parametrize('forgery', ['other_invoice', 'fiat', 'amount', 'payload', 'no_payload', 'crypto',
                                     'hostile_payload'])
@pytest.mark.parametrize('path', ['check', 'poller'])
def test_a_paid_answer_that_does_not_match_our_invoice_settles_nothing(shop, cryptopay, telegram, messenger,
                                                                       forgery, path, caplog):
    import jobs
    telegram.add_user({'id': 900, 'first_name': 'Admin'})
    user = register(shop)
    payment = shop.create_invoice(user, 365)
    cryptopay.pay(payment.invoice_id)
    cryptopay.forge(payment.invoice_id, **forged_answers(cryptopay, payment)[forgery])
    for _ in range(2):
        if path == 'check':
            assert shop.check_payment(user.telegram_id, payment.invoice_id).status == 'mismatch'
        jobs.poll_payments(shop, messenger)
    assert Payment.get_by_id(payment.id).status == PENDING and Grant.select().count() == 0
    assert User.get_by_id(user.id).expires_at is None
    alerts = [m for m in telegram.messages_to(900) if str(payment.invoice_id) in m['text']]
    assert len(alerts) == 1 and 'does not match' in alerts[0]['text']
    assert 'does not match' in caplog.text
    cryptopay.forge(payment.invoice_id)  # the real answer again: it settles
    assert shop.check_payment(user.telegram_id, payment.invoice_id).status == PAID


def test_a_matching_answer_with_amount_written_differently_settles(shop, cryptopay):
    user = register(shop)
    payment = shop.create_invoice(user, 30)
    cryptopay.pay(payment.invoice_id)
    cryptopay.forge(payment.invoice_id, amount='100.00')  # "100" and "100.00" are the same money
    assert shop.check_payment(user.telegram_id, payment.invoice_id).status == PAID


# Money as Decimal (issue 9 item 8)

def test_stats_revenue_is_exact_on_both_databases(shop, cryptopay, panel):
    import config
    from conftest import make_shop, settings_env
    priced = make_shop(config.load(settings_env(panel, cryptopay, shop.settings.database_url,
                                                PLANS='30:100.10,90:100.20,180:170.10')))
    for n, days in enumerate((30, 90, 180)):
        user = register(priced, 10 + n)
        payment = buy_and_pay(priced, cryptopay, user, days)
        priced.check_payment(user.telegram_id, payment.invoice_id)
    stats = priced.stats()
    for key in ('revenue_today', 'revenue_month', 'revenue_total'):
        assert isinstance(stats[key], Decimal) and str(stats[key]) == '370.40', (key, stats[key])


@pytest.mark.parametrize('plans,currency,message', [
    ('30:99.999', 'RUB', 'PLANS price 99.999 has more decimals than RUB has (2)'),
    ('30:99.5,90:1.001', 'USD', 'PLANS price 1.001 has more decimals than USD has (2)'),
    ('30:100,90', 'RUB', 'PLANS must be days:price pairs, like 30:100,90:270'),
    ('30:abc', 'RUB', 'PLANS must be days:price pairs, like 30:100,90:270'),
    ('30:NaN', 'RUB', 'PLANS must be days:price pairs, like 30:100,90:270'),
    ('30:1e3', 'RUB', 'PLANS must be days:price pairs, like 30:100,90:270'),
])
def test_plan_prices_limited_to_the_currency_minor_units(panel, cryptopay, database, plans, currency, message):
    import config
    from conftest import settings_env
    with pytest.raises(config.SettingError) as error:
        config.load(settings_env(panel, cryptopay, database, PLANS=plans, CURRENCY=currency))
    assert str(error.value) == message


def test_plan_prices_with_allowed_decimals_kept_exact(panel, cryptopay, database):
    import config
    from conftest import settings_env
    settings = config.load(settings_env(panel, cryptopay, database, PLANS='30:99.99,90:270.5,180:500,365:899.990'))
    assert [str(plan.price) for plan in settings.plans] == ['99.99', '270.5', '500', '899.99']


def test_one_invoice_creation_per_buyer_at_a_time(shop, cryptopay, settings):
    from conftest import make_shop
    from shop import InvoiceInProgress
    first, second = register(shop, 1), register(shop, 2)
    for n in range(3, 66):  # so that user ids 1 and 65 exist: a lock shared by ids would show here
        register(shop, n)
    neighbour = User.get_by_id(first.id + 64)
    cryptopay.hang_next(1, seconds=1)
    created = []

    def slow():
        with models.db.connection_context():
            created.append(make_shop(settings).create_invoice(first, 30))

    thread = threading.Thread(target=slow)
    thread.start()
    while not any(method == 'createInvoice' for method, _ in cryptopay.calls):
        time.sleep(0.01)
    with pytest.raises(InvoiceInProgress):
        shop.create_invoice(first, 90)
    assert shop.create_invoice(second, 30).status == PENDING  # other buyers are not held up
    assert shop.create_invoice(neighbour, 30).status == PENDING
    thread.join()
    assert created and shop.create_invoice(first, 30).invoice_id == created[0].invoice_id


def test_limits_hold_with_short_invoice_lifetimes(panel, cryptopay, database):
    import config
    from conftest import make_shop, settings_env
    from shop import TooManyInvoices
    quick = make_shop(config.load(settings_env(panel, cryptopay, database, INVOICE_EXPIRES_SECONDS=60)))
    user = register(quick)
    assert quick.create_invoice(user, 30).invoice_id == quick.create_invoice(user, 30).invoice_id
    for days in (90, 180):
        quick.create_invoice(user, days)
    with pytest.raises(TooManyInvoices):
        quick.create_invoice(user, 365)
