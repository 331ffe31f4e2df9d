"""The shop's business operations against a real database and the loopback panel and Crypto Pay fakes."""
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from peewee import IntegrityError

import models
from cryptobot import CryptoPayError
from models import EXPIRED, PAID, PENDING, Grant, Payment, PromoCode, Referral, User
from shop import language_for

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
        shop.create_invoice(user, 30)
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
    shop.create_promo(900, days=3, uses=3, code='RACE1')
    users = [register(shop, 100 + i) for i in range(10)]
    outcomes, barrier = [], threading.Barrier(10)

    def redeem(user):
        with models.db.connection_context():
            barrier.wait()
            outcomes.append(make_shop(settings).redeem_promo(user, 'RACE1')[0])

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
