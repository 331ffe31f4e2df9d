"""The ledger refuses every double credit by itself, and the schema set-up is repeatable."""
from datetime import datetime, timedelta
from decimal import Decimal

import peewee
import pytest
from peewee import CharField, IntegrityError

import models
from models import Gift, Grant, Payment, PromoCode, Redemption, Referral, Reminder, User, grant_days

NOW = datetime(2026, 11, 26, 12, 0, 0)


def make_user(telegram_id=1001, **fields):
    return User.create(telegram_id=telegram_id, panel_email=f'spn-{telegram_id}', **fields)


def test_grant_extends_from_now_when_nothing_runs(database):
    user = make_user()
    assert grant_days(user.id, 30, 'payment', 'inv-1', now=NOW) == NOW + timedelta(days=30)
    user = User.get_by_id(user.id)
    assert user.expires_at == NOW + timedelta(days=30)
    assert models.PanelClient.get(models.PanelClient.user == user.id, models.PanelClient.panel == 'main').dirty


def test_grant_extends_from_current_expiry(database):
    user = make_user(expires_at=NOW + timedelta(days=5))
    assert grant_days(user.id, 30, 'payment', 'inv-1', now=NOW) == NOW + timedelta(days=35)


def test_grant_after_expiry_starts_from_now(database):
    user = make_user(expires_at=NOW - timedelta(days=5))
    assert grant_days(user.id, 3, 'gift', 'g', now=NOW) == NOW + timedelta(days=3)


@pytest.mark.parametrize('reason', models.REASONS)
def test_second_grant_for_same_reference_is_refused(database, reason):
    user = make_user()
    grant_days(user.id, 30, reason, 'ref-1', now=NOW)
    with pytest.raises(IntegrityError):
        grant_days(user.id, 30, reason, 'ref-1', now=NOW)
    assert User.get_by_id(user.id).expires_at == NOW + timedelta(days=30)
    assert Grant.select().count() == 1


def test_grant_refused_by_the_database_itself(database):
    user = make_user()
    Grant.create(user=user, days=1, reason='payment', reference='42', expires_after=NOW)
    with pytest.raises(IntegrityError), models.db.atomic():
        Grant.create(user=user, days=1, reason='payment', reference='42', expires_after=NOW)


def test_unknown_reason_refused(database):
    user = make_user()
    with pytest.raises(IntegrityError), models.db.atomic():
        Grant.create(user=user, days=1, reason='gift-card', reference='x', expires_after=NOW)


def test_double_payment_row_refused(database):
    user = make_user()
    Payment.create(invoice_id=77, user=user, plan_days=30, amount=Decimal('100.50'), currency='RUB', pay_url='u')
    with pytest.raises(IntegrityError), models.db.atomic():
        Payment.create(invoice_id=77, user=user, plan_days=30, amount=Decimal('1'), currency='RUB', pay_url='u')
    assert Payment.get(Payment.invoice_id == 77).amount == Decimal('100.50')


def test_promo_redeemed_once_per_user(database):
    user = make_user()
    promo = PromoCode.create(code='SPRING', days=7, max_uses=10)
    Redemption.create(promo=promo, user=user)
    with pytest.raises(IntegrityError), models.db.atomic():
        Redemption.create(promo=promo, user=user)


def test_referral_once_per_invited_user(database):
    inviter, other, invited = make_user(1), make_user(2), make_user(3)
    Referral.create(invited=invited, inviter=inviter)
    with pytest.raises(IntegrityError), models.db.atomic():
        Referral.create(invited=invited, inviter=other)


def test_gift_once_per_telegram_id_and_kind(database):
    Gift.create(telegram_id=5, kind='trial')
    Gift.create(telegram_id=5, kind='other')
    with pytest.raises(IntegrityError), models.db.atomic():
        Gift.create(telegram_id=5, kind='trial')


def test_reminder_once_per_period(database):
    user = make_user()
    Reminder.create(user=user, kind='3', period_end=NOW)
    Reminder.create(user=user, kind='3', period_end=NOW + timedelta(days=30))
    with pytest.raises(IntegrityError), models.db.atomic():
        Reminder.create(user=user, kind='3', period_end=NOW)


def test_expiry_rederived_from_ledger(database):
    user = make_user()
    grant_days(user.id, 30, 'payment', '1', now=NOW)
    grant_days(user.id, 7, 'promo', '2', now=NOW + timedelta(days=10))
    grant_days(user.id, 3, 'gift', '3', now=NOW + timedelta(days=100))
    assert models.derive_expiry(user.id) == User.get_by_id(user.id).expires_at == NOW + timedelta(days=103)


def test_times_and_amounts_round_trip(database):
    user = make_user(expires_at=datetime(2027, 1, 2, 3, 4, 5, 678000))
    Payment.create(invoice_id=2**40, user=user, plan_days=365, amount=Decimal('1234567.89'), currency='RUB',
                   pay_url='u')
    assert User.get_by_id(user.id).expires_at == datetime(2027, 1, 2, 3, 4, 5, 678000)
    payment = Payment.get(Payment.invoice_id == 2**40)
    assert payment.amount == Decimal('1234567.89') and isinstance(payment.amount, Decimal)


@pytest.mark.parametrize('text', [
    '2026-12-01 10:00:00', '2026-12-01 10:00:00.123456', '2026-12-01 10:00:00.000001', '2026-02-29 10:00:00',
    '2026-13-01 10:00:00', '2026-12-01 25:00:00', '2026-12-01 10:00:00.12345x', '2026-12-01 10:00:00+03:00',
    '2026-12-01T10:00:00', '2026-12-01 10:00', '2026-12-01', '2026-12-01 10:00:00.5', '', 'garbage' * 4,
    '2026-12-01 10:00:00.123', '20261201 100000000000000000', '2026-12-01 10:00+03', '2026-12-01 100000.1',
    '2026-12-01 10:00:00.12345Z', '2026-12-01 10:00:00.123+01', '2026-W48-1 10:00:00', '２０２６-12-01 10:00:00'])
def test_a_stored_time_is_read_as_peewee_reads_it(text):
    """models.DateTimeField reads its two stored shapes with fromisoformat; every text comes back as peewee's."""
    assert models.DateTimeField().python_value(text) == peewee.DateTimeField().python_value(text)


def test_times_read_back_exactly(database):
    moments = [datetime(2026, 12, 1, 10, 0, 0), datetime(2026, 12, 1, 10, 0, 0, 1), datetime(1999, 1, 1)]
    users = [User.create(telegram_id=70 + n, panel_email=f'spn-{70 + n}', expires_at=moment, created_at=moment)
             for n, moment in enumerate(moments)]
    for user, moment in zip(users, moments):
        again = models.user_by_telegram_id(user.telegram_id)
        assert (again.expires_at, again.created_at) == (moment, moment)
        assert User.get_by_id(user.id).expires_at == moment


def test_create_schema_is_repeatable(database):
    make_user()
    models.create_schema()
    models.create_schema()
    assert User.select().count() == 1


def test_migration_applied_once(database):
    calls = []

    def add_note(migrator):
        calls.append(1)
        return [migrator.add_column('users', 'note', CharField(null=True))]

    models.apply_migrations([(9001, add_note)])
    models.apply_migrations([(9001, add_note)])
    assert calls == [1]
    assert 'note' in [column.name for column in models.db.get_columns('users')]
    models.db.execute_sql('ALTER TABLE users DROP COLUMN note')
    models.SchemaVersion.delete().where(models.SchemaVersion.version == 9001).execute()


def test_pending_payments_and_expiry_queries_use_indexes(database):
    indexed = {tuple(index.columns) for index in models.db.get_indexes('payments')}
    assert ('status', 'created_at') in indexed
    assert ('expires_at',) in {tuple(index.columns) for index in models.db.get_indexes('users')}


def test_wave_one_database_gains_the_money_tables_and_keeps_its_rows(database):
    """promo_attempts and invoice_mismatches are new tables: create_schema adds them to an older database."""
    user = make_user()
    payment = Payment.create(invoice_id=5, user=user, plan_days=30, amount=Decimal('100.10'), currency='RUB',
                             pay_url='u')
    models.db.drop_tables([models.PromoAttempt, models.InvoiceMismatch])
    assert not models.db.table_exists('promo_attempts')
    models.create_schema()
    assert models.db.table_exists('promo_attempts') and models.db.table_exists('invoice_mismatches')
    models.PromoAttempt.create(user=user, created_at=NOW)
    models.InvoiceMismatch.create(payment=payment, detail='amount', created_at=NOW)
    with pytest.raises(IntegrityError), models.db.atomic():  # one mismatch record (and one alert) per payment
        models.InvoiceMismatch.create(payment=payment, detail='fiat', created_at=NOW)
    assert Payment.get_by_id(payment.id).amount == Decimal('100.10') and User.select().count() == 1


def test_prepared_user_lookup_returns_what_peewee_returns(database):
    """The lookup every update starts with binds new parameters to SQL built once; rows convert as peewee's own."""
    expiry = datetime(2026, 3, 4, 5, 6, 7)
    made = User.create(telegram_id=9_000_000_001, panel_email='spn-x', username='<a&b>', expires_at=expiry,
                       blocked=True)
    User.create(telegram_id=9_000_000_002, panel_email='spn-y')
    for _ in range(2):  # the first call builds the SQL, the second reuses it
        found = models.user_by_telegram_id(9_000_000_001)
        assert found.__data__ == User.get(User.telegram_id == 9_000_000_001).__data__
        assert (found.id, found.expires_at, found.blocked, found.username) == (made.id, expiry, True, '<a&b>')
        assert models.user_by_telegram_id(9_000_000_002).panel_email == 'spn-y'
        assert models.user_by_telegram_id(1) is None


def test_the_locked_expiry_and_a_grant_to_nobody(database):
    """The prepared row lock returns the committed expiry; a missing buyer raises as peewee's get() did."""
    expiry = datetime(2026, 3, 4, 5, 6, 7)
    user, none = make_user(expires_at=expiry), User.create(telegram_id=9_000_000_003, panel_email='spn-z')
    with models.transaction():
        assert (models.locked_expiry(user.id), models.locked_expiry(none.id)) == (expiry, None)
    with pytest.raises(User.DoesNotExist):
        grant_days(10**9, 1, 'admin', 'nobody')
    assert Grant.select().count() == 0


def test_two_prepared_queries_never_share_their_sql(database):
    """The SQL is kept per build: queries of the same shape written in two places each run their own."""
    first, second = User.create(telegram_id=5, panel_email='spn-5'), User.create(telegram_id=6, panel_email='spn-6')
    for _ in range(2):
        assert models.prepared_first(lambda n: User.select().where(User.telegram_id == n), 5).id == first.id
        assert models.prepared_first(lambda n: User.select().where(User.id == n), second.id).id == second.id
        assert models.prepared_first(lambda n: User.select().where(User.id == n), 5) is None


def test_prepared_refuses_a_query_whose_parameters_are_not_the_given_ones(database):
    with pytest.raises(ValueError, match='parameters'):
        models.prepared(lambda tid: User.select().where(
            User.telegram_id == tid, User.blocked == False), 1)  # noqa: E712
