"""Frozen copy of models.py as released in wave 1 (commit 2751ac3), to build wave-1 databases for upgrade tests.

The customer ledger: Peewee models, database set-up and the day-granting primitive.

All times are naive UTC datetimes. The database itself refuses a double credit:
every grant of days is a Grant row, unique per (reason, reference).
"""
import contextlib
import secrets
from datetime import datetime, timedelta, timezone

from peewee import (SQL, BigIntegerField, BooleanField, CharField, DatabaseProxy, DateTimeField,
                    DecimalField, ForeignKeyField, IntegerField, InterfaceError, Model, OperationalError,
                    SqliteDatabase, TextField)
from playhouse import db_url
from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate
from playhouse.pool import PooledPostgresqlDatabase
from playhouse.shortcuts import ReconnectMixin

db = DatabaseProxy()

PENDING, PAID, EXPIRED = 'pending', 'paid', 'expired'
REASONS = ('payment', 'promo', 'gift', 'referral', 'admin')


def utcnow():
    """Return the current time as a naive UTC datetime (how the database stores it)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def random_code(length=8, alphabet='ABCDEFGHJKLMNPQRSTUVWXYZ23456789'):
    """Return a random code without look-alike characters (0/O, 1/I)."""
    return ''.join(secrets.choice(alphabet) for _ in range(length))


class BaseModel(Model):
    class Meta:
        database = db


class User(BaseModel):
    telegram_id = BigIntegerField(unique=True)
    username = TextField(null=True, index=True)
    first_name = TextField(default='')
    language = CharField(max_length=8, default='en')
    invite_code = CharField(max_length=16, unique=True, default=lambda: random_code(10).lower())
    referrer = ForeignKeyField('self', null=True, backref='invitees', on_delete='SET NULL')
    blocked = BooleanField(default=False)  # the user blocked the bot
    awaiting = CharField(max_length=16, null=True)  # pending text input, e.g. 'promo'
    expires_at = DateTimeField(null=True, index=True)
    # The panel client is derived from expires_at; panel_dirty says it must be pushed again.
    panel_email = CharField(max_length=64, unique=True)
    panel_sub_id = CharField(max_length=32, unique=True, default=lambda: random_code(16, 'abcdefghijklmnopqrstuvwxyz0123456789'))
    panel_uuid = CharField(max_length=64, null=True)
    panel_dirty = BooleanField(default=False, index=True)
    panel_failures = IntegerField(default=0)
    panel_retry_at = DateTimeField(null=True)
    panel_alerted = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow, index=True)

    def is_active(self, now=None):
        """Tell whether the subscription runs now."""
        return self.expires_at is not None and self.expires_at > (now or utcnow())

    class Meta:
        table_name = 'users'


class Payment(BaseModel):
    """One Crypto Pay invoice."""
    invoice_id = BigIntegerField(unique=True)
    user = ForeignKeyField(User, backref='payments', index=True)
    plan_days = IntegerField()
    amount = DecimalField(max_digits=12, decimal_places=2, auto_round=False)
    currency = CharField(max_length=8)
    status = CharField(max_length=8, default=PENDING)
    pay_url = TextField()
    chat_id = BigIntegerField(null=True)  # where the Pay message is, to edit it later
    message_id = IntegerField(null=True)
    created_at = DateTimeField(default=utcnow)
    paid_at = DateTimeField(null=True)
    provisioned_at = DateTimeField(null=True)
    notified_at = DateTimeField(null=True)
    notify_claimed_at = DateTimeField(null=True)  # a lease, so a crashed sender is retried

    class Meta:
        table_name = 'payments'
        indexes = (
            (('status', 'created_at'), False),
            (('status', 'provisioned_at'), False),
            (('status', 'notified_at'), False),
        )


class PromoCode(BaseModel):
    code = CharField(max_length=32, unique=True)  # stored upper-case
    days = IntegerField()
    max_uses = IntegerField()
    used = IntegerField(default=0)
    expires_at = DateTimeField(null=True)
    created_by = BigIntegerField(null=True)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'promo_codes'


class Redemption(BaseModel):
    promo = ForeignKeyField(PromoCode, backref='redemptions')
    user = ForeignKeyField(User, backref='redemptions')
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'redemptions'
        indexes = ((('promo', 'user'), True),)


class Referral(BaseModel):
    invited = ForeignKeyField(User, unique=True, backref='referral')
    inviter = ForeignKeyField(User, index=True, backref='referrals')
    created_at = DateTimeField(default=utcnow)
    rewarded_at = DateTimeField(null=True)

    class Meta:
        table_name = 'referrals'


class Gift(BaseModel):
    """A one-time gift, keyed by Telegram id so it survives anything done to the user row."""
    telegram_id = BigIntegerField()
    kind = CharField(max_length=16)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'gifts'
        indexes = ((('telegram_id', 'kind'), True),)


class Grant(BaseModel):
    """Append-only ledger of subscription days; a user's expiry can be re-derived from it."""
    user = ForeignKeyField(User, backref='grants', index=True)
    days = IntegerField()
    reason = CharField(max_length=16)
    reference = CharField(max_length=64)
    granted_by = BigIntegerField(null=True)  # the admin's Telegram id for reason 'admin'
    expires_before = DateTimeField(null=True)
    expires_after = DateTimeField()
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'grants'
        indexes = ((('reason', 'reference'), True),)
        constraints = [SQL("CHECK (reason IN ('payment', 'promo', 'gift', 'referral', 'admin'))")]


class Reminder(BaseModel):
    """An expiry reminder sent once per subscription period (period = the expiry it warned about)."""
    user = ForeignKeyField(User, backref='reminders')
    kind = CharField(max_length=8)
    period_end = DateTimeField()
    sent_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'reminders'
        indexes = ((('user', 'kind', 'period_end'), True),)


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'schema_versions'


MODELS = [User, Payment, PromoCode, Redemption, Referral, Gift, Grant, Reminder, SchemaVersion]

# Schema changes after the first release: (version, function(migrator) -> list of operations).
MIGRATIONS = []

class ReconnectingPostgresqlDatabase(ReconnectMixin, PooledPostgresqlDatabase):
    """A pooled PostgreSQL database that survives a server restart (or Neon dropping idle connections).

    A statement outside a transaction that finds its connection dead is retried once on a new one;
    the other idle connections of the pool died with it, so they are dropped at the same time.
    """
    reconnect_errors = (
        (OperationalError, 'terminat'),  # terminating connection due to administrator command
        (OperationalError, 'server closed the connection'),
        (OperationalError, 'could not receive data'),
        (OperationalError, 'ssl syscall error'),
        (OperationalError, 'ssl connection has been closed'),
        (InterfaceError, 'connection already closed'),
    )

    def _reconnect(self, func, *args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            if self.in_transaction() or not any(
                    isinstance(exc, kind) and fragment in str(exc).lower()
                    for kind, fragment in self.reconnect_errors):
                raise
            self.close()
            self.close_idle()
            self.connect()
            return func(*args, **kwargs)


def connect_database(url, pool_size=20):
    """Bind the models to the database named by url (sqlite:///file or postgresql://...)."""
    if url.startswith(('postgres://', 'postgresql://')):
        params = db_url.parse(url)
        database = ReconnectingPostgresqlDatabase(
            params.pop('database'), max_connections=pool_size, stale_timeout=300, timeout=10,
            connect_timeout=10, **params)
    elif url.startswith('sqlite:'):
        # 2 MB of page cache per connection: every handler thread keeps its own (see connection())
        database = db_url.connect(url, pragmas={
            'journal_mode': 'wal', 'synchronous': 'normal', 'foreign_keys': 1,
            'busy_timeout': 15000, 'cache_size': -2000})
    else:
        raise ValueError('DATABASE_URL must start with sqlite:/// or postgresql://')
    db.initialize(database)
    return database


def connection():
    """Hold a connection for one unit of work: from the pool on PostgreSQL; on SQLite the thread's own.

    A SQLite connection is cheap to keep and costs about a millisecond to open (with its pragmas),
    so each handler thread keeps one open for its life instead.
    """
    if is_sqlite():
        db.connect(reuse_if_open=True)
        return contextlib.nullcontext()
    return db.connection_context()


def is_sqlite():
    return isinstance(db.obj, SqliteDatabase)


def transaction():
    """Open a write transaction; on SQLite take the write lock at once so writers queue instead of failing."""
    return db.atomic('IMMEDIATE') if is_sqlite() else db.atomic()


def locked(query):
    """Lock the selected rows until the transaction ends (SQLite's IMMEDIATE lock already does)."""
    return query if is_sqlite() else query.for_update()


def create_schema():
    """Create missing tables and apply pending migrations; safe to run on every start."""
    with db.connection_context():
        fresh = not db.table_exists(SchemaVersion._meta.table_name)
        db.create_tables(MODELS, safe=True)
        if fresh:  # create_tables made the latest schema: nothing to migrate
            for version, _ in MIGRATIONS:
                SchemaVersion.create(version=version)
        apply_migrations(MIGRATIONS)


def apply_migrations(migrations):
    """Apply each (version, operations) migration not yet recorded, in order, each in one transaction."""
    migrator = SqliteMigrator(db.obj) if is_sqlite() else PostgresqlMigrator(db.obj)
    done = {row.version for row in SchemaVersion.select()}
    for version, operations in sorted(migrations, key=lambda pair: pair[0]):
        if version in done:
            continue
        with db.atomic():
            migrate(*operations(migrator))
            SchemaVersion.create(version=version)


def grant_days(user_id, days, reason, reference, granted_by=None, now=None):
    """Add days to a user's subscription from max(now, expiry), recorded in the ledger.

    :return: the new expiry.
    :raise IntegrityError: this (reason, reference) was granted before; nothing changes.
    """
    with transaction():
        user = locked(User.select().where(User.id == user_id)).get()
        # The clock is read under the lock, so grants are stamped in the order they are applied.
        now = (now or utcnow()).replace(microsecond=0)  # whole seconds: the panel keeps milliseconds
        new_expiry = max(now, user.expires_at or now) + timedelta(days=days)
        Grant.create(user=user_id, days=days, reason=reason, reference=str(reference),
                     granted_by=granted_by, expires_before=user.expires_at,
                     expires_after=new_expiry, created_at=now)
        User.update(expires_at=new_expiry, panel_dirty=True, panel_failures=0,
                    panel_retry_at=None).where(User.id == user_id).execute()
    return new_expiry


def derive_expiry(user_id):
    """Re-derive a user's expiry from the ledger alone (for audits), replaying grants in the order applied."""
    expiry = None
    for grant in Grant.select().where(Grant.user == user_id).order_by(Grant.id):
        start = max(grant.created_at, expiry or grant.created_at)
        expiry = start + timedelta(days=grant.days)
    return expiry
