"""The customer ledger: Peewee models, database set-up and the day-granting primitive.

All times are naive UTC datetimes. The database itself refuses a double credit:
every grant of days is a Grant row, unique per (reason, reference).
"""
import contextlib
import re
import secrets
from datetime import datetime, timedelta, timezone

import peewee
from peewee import (SQL, BigIntegerField, BooleanField, CharField, DatabaseProxy,
                    DecimalField, ForeignKeyField, IntegerField, InterfaceError, Model, OperationalError,
                    SqliteDatabase, TextField)
from playhouse import db_url
from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate
from playhouse.pool import PooledPostgresqlDatabase
from playhouse.shortcuts import ReconnectMixin

db = DatabaseProxy()

PENDING, PAID, EXPIRED, REFUNDED = 'pending', 'paid', 'expired', 'refunded'
CRYPTOPAY, STARS = 'cryptopay', 'stars'  # payment providers
REASONS = ('payment', 'promo', 'gift', 'referral', 'admin', 'refund')  # 'refund': negative days, a reversal


def utcnow():
    """Return the current time as a naive UTC datetime (how the database stores it)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def random_code(length=8, alphabet='ABCDEFGHJKLMNPQRSTUVWXYZ23456789'):
    """Return a random code without look-alike characters (0/O, 1/I)."""
    return ''.join(secrets.choice(alphabet) for _ in range(length))


class DateTimeField(peewee.DateTimeField):
    """peewee's DateTimeField, the text SQLite keeps read by datetime.fromisoformat.

    peewee writes a datetime as str(value), 'YYYY-MM-DD HH:MM:SS' with '.ffffff' when it has microseconds, and
    reads it back by trying strptime formats in turn: 4-5 µs a value, and every update reads a buyer's two.
    fromisoformat reads exactly those two shapes in 0.3-0.4 µs (timeit). Any other value (a PostgreSQL
    datetime, other text, which fromisoformat may read otherwise than peewee) is peewee's to read.
    """

    STORED = re.compile(r'[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?')

    def python_value(self, value):
        if isinstance(value, str) and self.STORED.fullmatch(value):
            try:
                return datetime.fromisoformat(value)
            except ValueError:  # e.g. 2026-02-30: peewee gives the text back
                pass
        return super().python_value(value)


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
    # The buyer's client has this email and subId on every panel; its state per panel is a PanelClient.
    panel_email = CharField(max_length=64, unique=True)
    panel_sub_id = CharField(max_length=32, unique=True, default=lambda: random_code(16, 'abcdefghijklmnopqrstuvwxyz0123456789'))
    link_base = CharField(max_length=255, null=True)  # the link the buyer was last given is this + subId
    created_at = DateTimeField(default=utcnow, index=True)
    # The QR code of the link, once uploaded: Telegram's file_id of the photo and the link it encodes.
    qr_link = TextField(null=True)
    qr_file_id = TextField(null=True)

    def is_active(self, now=None):
        """Tell whether the subscription runs now."""
        return self.expires_at is not None and self.expires_at > (now or utcnow())

    class Meta:
        table_name = 'users'


class Payment(BaseModel):
    """One payment of a buyer: a Crypto Pay invoice, or a Telegram Stars invoice and its charge.

    provider_id is the provider's own id, unique per provider: Crypto Pay's invoice_id (as text), Telegram's
    telegram_payment_charge_id (set when the Stars payment arrives). amount is in currency's units: XTR in
    whole Stars. A Stars payment has no invoice_id: its invoice payload names this row (stars.payload_of).
    """
    invoice_id = BigIntegerField(unique=True, null=True)  # Crypto Pay's invoice id
    provider = CharField(max_length=16, default=CRYPTOPAY)
    provider_id = CharField(max_length=128, null=True)
    # A Stars subscription (STARS_RECURRING), on its first payment's row: paid until, and renewal canceled
    subscription_until = DateTimeField(null=True)
    renewal_canceled = BooleanField(null=True)
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
            (('provider', 'provider_id'), True),
        )

    def save(self, *args, **kwargs):
        if self.provider == CRYPTOPAY and self.provider_id is None and self.invoice_id is not None:
            self.provider_id = str(self.invoice_id)
        return super().save(*args, **kwargs)


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


GRANT_REASON_CHECK = "CHECK (reason IN ('payment', 'promo', 'gift', 'referral', 'admin', 'refund'))"


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
        constraints = [SQL(GRANT_REASON_CHECK)]


class Reminder(BaseModel):
    """An expiry reminder sent once per subscription period (period = the expiry it warned about)."""
    user = ForeignKeyField(User, backref='reminders')
    kind = CharField(max_length=8)
    period_end = DateTimeField()
    sent_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'reminders'
        indexes = ((('user', 'kind', 'period_end'), True),)


class PanelClient(BaseModel):
    """A buyer's client on one panel, derived from the ledger: dirty means the panel must be pushed again."""
    user = ForeignKeyField(User, backref='panel_clients', on_delete='CASCADE')
    panel = CharField(max_length=32)  # the panel's name (PANELS_FILE), 'main' for the XUI_* panel
    dirty = BooleanField(default=True)
    pushed_expiry = DateTimeField(null=True)  # the expiry the panel last confirmed
    uuid = CharField(max_length=64, null=True)
    failures = IntegerField(default=0)
    retry_at = DateTimeField(null=True)
    last_error = TextField(null=True)  # the panel's own words when it refused, else what went wrong
    refused = BooleanField(default=False)  # the last failure was the panel refusing (it will not pass by itself)
    alerted = BooleanField(default=False)

    class Meta:
        table_name = 'panel_clients'
        indexes = ((('user', 'panel'), True), (('panel', 'dirty', 'retry_at'), False))
class PromoAttempt(BaseModel):
    """A promo code a user tried that did not give days (rows in flight count too, so threads cannot race past)."""
    user = ForeignKeyField(User, backref='promo_attempts', on_delete='CASCADE')
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'promo_attempts'
        indexes = ((('user', 'created_at'), False),)


class InvoiceMismatch(BaseModel):
    """A 'paid' answer from Crypto Pay that did not match our payment row: nothing was settled for it."""
    payment = ForeignKeyField(Payment, unique=True, backref='mismatch', on_delete='CASCADE')
    detail = TextField()  # which fields differed, e.g. "amount '0.01' (ours 900.00)"
    created_at = DateTimeField(default=utcnow)
    alerted_at = DateTimeField(null=True)  # when the admins were told; they are told once

    class Meta:
        table_name = 'invoice_mismatches'


class JobLease(BaseModel):
    """Which process runs a scheduled job now (leases.py): held until expires_at, renewed while alive."""
    name = CharField(max_length=64, unique=True)
    holder = CharField(max_length=128, default='')
    expires_at = DateTimeField(default=datetime(1970, 1, 1))
    ran_at = DateTimeField(null=True)  # the end of the last run that raised nothing

    class Meta:
        table_name = 'job_leases'
class Cursor(BaseModel):
    """Where a job stopped reading a list: an outside one (e.g. 'stars': how many getStarTransactions it has
    read), or the buyers, by id (passes.py: 'backfill:<panel>', 'announce#<hash of the link base>')."""
    name = CharField(max_length=32, unique=True)
    position = BigIntegerField(default=0)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'cursors'


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'schema_versions'



# The enabled panels' names: every grant marks the buyer's client dirty on each (use_panels sets them).
panel_names = ('main',)


def use_panels(names):
    """Name the enabled panels that grants must reach."""
    global panel_names
    panel_names = tuple(names)


def move_panel_state(migrator):
    """Wave 1 → 2: move each buyer's panel columns into a PanelClient of the one panel, 'main'.

    A client the panel already matched keeps pushed_expiry = expires_at; a dirty one is pushed again.
    """
    db.execute_sql(
        'INSERT INTO panel_clients (user_id, panel, dirty, pushed_expiry, uuid, failures, retry_at, refused, alerted) '
        "SELECT id, 'main', panel_dirty, CASE WHEN panel_dirty THEN NULL ELSE expires_at END, panel_uuid, "
        'panel_failures, panel_retry_at, false, panel_alerted FROM users WHERE expires_at IS NOT NULL')
    return [migrator.drop_index('users', 'user_panel_dirty')] + [
        migrator.drop_column('users', column) for column in
        ('panel_uuid', 'panel_dirty', 'panel_failures', 'panel_retry_at', 'panel_alerted')]

MODELS = [User, Payment, PromoCode, Redemption, Referral, Gift, Grant, Reminder, PromoAttempt, InvoiceMismatch,
          PanelClient, Cursor, JobLease, SchemaVersion]

def add_qr_columns(migrator):
    """20: users.qr_link and users.qr_file_id, the QR photo Telegram keeps for the link."""
    return [migrator.add_column('users', 'qr_link', User.qr_link),
            migrator.add_column('users', 'qr_file_id', User.qr_file_id)]


class RawStep:
    """A migration step of our own SQL, run like playhouse.migrate's operations (an object with run())."""

    def __init__(self, function):
        self.run = function


def relax_sqlite_table(table, replacements):
    """Loosen a SQLite table's constraints (drop a NOT NULL, widen a CHECK) by editing its CREATE TABLE text.

    SQLite's documented procedure for removing constraints (sqlite.org/lang_altertable.html, "making other
    kinds of table schema changes"): the rows already satisfy the looser schema, so no copy of the table
    is needed and no table that references it is touched. Runs inside the migration's transaction.
    :raise RuntimeError: a text to replace is not in the table's definition (nothing is changed).
    """
    sql = db.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
    for old, new in replacements:
        if old not in sql:
            raise RuntimeError(f'{table}: {old!r} not found in its definition')
        sql = sql.replace(old, new)
    version = db.execute_sql('PRAGMA schema_version').fetchone()[0]
    db.execute_sql('PRAGMA writable_schema = ON')
    try:
        db.execute_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql, table))
        db.execute_sql(f'PRAGMA schema_version = {int(version) + 1}')
    finally:
        db.execute_sql('PRAGMA writable_schema = OFF')
    problems = db.execute_sql('PRAGMA quick_check').fetchall()
    if problems != [('ok',)]:
        raise RuntimeError(f'{table}: integrity check after the change: {problems}')


def payments_for_providers(migrator):
    """Wave 2: payments of several providers: provider, provider_id (unique per provider), no invoice_id for Stars."""
    steps = [migrator.add_column('payments', 'provider', Payment.provider),
             migrator.add_column('payments', 'provider_id', Payment.provider_id),
             RawStep(lambda: db.execute_sql("UPDATE payments SET provider_id = CAST(invoice_id AS VARCHAR(32)) "
                                            "WHERE provider_id IS NULL")),
             migrator.add_index('payments', ('provider', 'provider_id'), True)]
    if is_sqlite():
        steps.append(RawStep(lambda: relax_sqlite_table(
            'payments', [('"invoice_id" INTEGER NOT NULL', '"invoice_id" INTEGER')])))
    else:
        steps.append(migrator.drop_not_null('payments', 'invoice_id'))
    return steps


def grants_with_refunds(migrator):
    """Wave 2: the ledger takes 'refund' rows (a refunded payment's days taken back): widen the reason CHECK."""
    old_check = "CHECK (reason IN ('payment', 'promo', 'gift', 'referral', 'admin'))"
    if is_sqlite():
        return [RawStep(lambda: relax_sqlite_table('grants', [(old_check, GRANT_REASON_CHECK)]))]

    def replace_check():
        names = [name for (name,) in db.execute_sql(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'grants'::regclass AND contype = 'c' "
            "AND pg_get_constraintdef(oid) LIKE %s", ('%reason%',)).fetchall()]
        for name in names:
            db.execute_sql(f'ALTER TABLE grants DROP CONSTRAINT "{name}"')
        db.execute_sql(f'ALTER TABLE grants ADD CONSTRAINT grants_reason_check {GRANT_REASON_CHECK}')
    return [RawStep(replace_check)]


# Schema changes after the first release: (version, function(migrator) -> list of operations).
MIGRATIONS = [(20, add_qr_columns), (40, payments_for_providers), (41, grants_with_refunds),
              (42, lambda migrator: [migrator.add_column('payments', 'subscription_until', Payment.subscription_until),
                                     migrator.add_column('payments', 'renewal_canceled', Payment.renewal_canceled)]),
              (50, move_panel_state),
              (51, lambda migrator: [migrator.add_column('users', 'link_base', User.link_base)])]


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


SQLITE_STATEMENTS = 32  # compiled statements a SQLite connection keeps (sqlite3's cached_statements)


def connect_database(url, pool_size=20):
    """Bind the models to the database named by url (sqlite:///file or postgresql://...)."""
    if url.startswith(('postgres://', 'postgresql://')):
        params = db_url.parse(url)
        database = ReconnectingPostgresqlDatabase(
            params.pop('database'), max_connections=pool_size, stale_timeout=300, timeout=10,
            connect_timeout=10, **params)
    elif url.startswith('sqlite:'):
        # Every handler thread keeps its own connection (see connection()), so what one keeps counts WORKER_THREADS
        # times: 1 MB of page cache (the OS caches the file too) and 32 compiled statements, not sqlite3's 128.
        # Against 2 MB and 128: the same CPU per update, ~0.4 MB less a thread (docs/dev/PERFORMANCE.md).
        database = db_url.connect(url, pragmas={
            'journal_mode': 'wal', 'synchronous': 'normal', 'foreign_keys': 1,
            'busy_timeout': 15000, 'cache_size': -1000}, cached_statements=SQLITE_STATEMENTS)
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


_PREPARED = {}  # (build's code, database class) -> (model, SQL)


def prepared(build, *params):
    """Run the SELECT build(*params) with its SQL built by peewee only once per database class.

    peewee spends about 1 ms of CPU building the SQL of a SELECT over a wide table, ten times what SQLite
    takes to run it (bench/user_lookup.py), and the lookups every update starts with are the same SQL each
    time with other parameters. The first call builds the query and checks that its parameters are exactly
    params, in order; later calls bind params to that SQL. Rows come back as model instances, converted
    by the fields as peewee's own queries convert them. The SQL is kept per build's code (a lambda written
    in one place is one code, however often the function around it runs), so two queries never share one.

    :return: an iterable of model instances (peewee's ModelRaw).
    :raise ValueError: the built query's parameters are not params (a programming error).
    """
    key = (build.__code__, type(db.obj))
    entry = _PREPARED.get(key)
    if entry is None:
        query = build(*params)
        sql, built = query.sql()
        if list(built) != list(params):
            where = f'{build.__code__.co_filename}:{build.__code__.co_firstlineno}'
            raise ValueError(f'prepared query at {where}: it binds {len(built)} parameters other than the ones given')
        entry = _PREPARED[key] = (query.model, sql)
    model, sql = entry
    return model.raw(sql, *params)


def prepared_first(build, *params):
    """Return the first row of prepared(build, *params), or None when it has none."""
    return next(iter(prepared(build, *params)), None)


def prepared_get(build, *params):
    """Return the first row of prepared(build, *params), as build(*params).get() would.

    :raise DoesNotExist: the query's model's, when it has no row.
    """
    rows = prepared(build, *params)
    row = next(iter(rows), None)
    if row is None:
        raise rows.model.DoesNotExist(f'no {rows.model.__name__} for {params}')
    return row


def forget_prepared():
    """Drop every SQL built by prepared(), so the next calls build it again (tests: a mutant's query is run)."""
    _PREPARED.clear()


def user_by_telegram_id(telegram_id):
    """Return the User with this Telegram id, or None: the lookup every update starts with (prepared)."""
    return prepared_first(lambda tid: User.select().where(User.telegram_id == tid), telegram_id)


def locked_expiry(user_id):
    """Lock the buyer's row until the transaction ends (see locked) and return their expiry (None: no days).

    :raise User.DoesNotExist: no such buyer.
    """
    return prepared_get(lambda uid: locked(User.select(User.expires_at).where(User.id == uid)), user_id).expires_at


SCHEMA_LOCK = 0x53504E01  # pg_advisory_xact_lock key: one process at a time changes the schema


def create_schema():
    """Create missing tables and apply pending migrations; safe to run on every start, by several processes at once.

    On PostgreSQL it all happens in one transaction under a transaction-scoped advisory lock (PgBouncer's
    transaction mode keeps those), so processes starting together wait for each other instead of racing
    to create the same table (CREATE TABLE IF NOT EXISTS is not safe against a concurrent one).
    """
    with db.connection_context():
        with contextlib.nullcontext() if is_sqlite() else db.atomic():
            if not is_sqlite():
                db.execute_sql('SELECT pg_advisory_xact_lock(%s)', (SCHEMA_LOCK,))
            fresh = not db.table_exists(SchemaVersion._meta.table_name)
            # Only missing tables: an existing table changes by migrations alone. (Creating a model's indexes on
            # a table that lacks their new columns is worse than an error on SQLite: a double-quoted unknown
            # column is read as a string, and the index it makes corrupts the table for the migration after it.)
            existing = set(db.get_tables())
            db.create_tables([model for model in MODELS if model._meta.table_name not in existing], safe=True)
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
        expires_at = locked_expiry(user_id)
        # The clock is read under the lock, so grants are stamped in the order they are applied.
        now = (now or utcnow()).replace(microsecond=0)  # whole seconds: the panel keeps milliseconds
        new_expiry = max(now, expires_at or now) + timedelta(days=days)
        Grant.create(user=user_id, days=days, reason=reason, reference=str(reference),
                     granted_by=granted_by, expires_before=expires_at,
                     expires_after=new_expiry, created_at=now)
        User.update(expires_at=new_expiry).where(User.id == user_id).execute()
        mark_dirty(user_id)
    return new_expiry


def mark_dirty(user_id):
    """Say the buyer's client must be pushed again to every enabled panel, now."""
    rows = [{'user': user_id, 'panel': name, 'dirty': True} for name in panel_names]
    if rows:
        (PanelClient.insert_many(rows)
         .on_conflict(conflict_target=[PanelClient.user, PanelClient.panel],
                      update={PanelClient.dirty: True, PanelClient.failures: 0, PanelClient.retry_at: None,
                              PanelClient.alerted: False})
         .execute())


def derive_expiry(user_id):
    """Re-derive a user's expiry from the ledger alone (for audits), replaying grants in the order applied."""
    expiry = None
    for grant in Grant.select().where(Grant.user == user_id).order_by(Grant.id):
        start = max(grant.created_at, expiry or grant.created_at)
        expiry = start + timedelta(days=grant.days)
    return expiry
