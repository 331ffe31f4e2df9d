"""Dump the whole database to a portable tar.gz and restore it.

An archive holds manifest.json (format, schema version, row count per table) followed by one
JSON-lines file per table, <table>.jsonl, one object per row keyed by column name. Values are
plain JSON; decimals and datetimes are ISO/decimal strings, so a dump taken on SQLite restores
into PostgreSQL and back. Nothing here needs pg_dump.

    python backup.py make       # back up now into BACKUP_DIR and prune old backups
    python bot.py restore FILE  # restore (refuses a non-empty database without --force)
    python backup.py recover    # ask Crypto Pay for invoices newer than the restored backup

An archive is read as a stream with caps (members, manifest size, line length), so a crafted
file cannot make the process grow: it is refused with a clear error instead.
"""
import io
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path

from peewee import BooleanField, DatabaseError, DateField, DateTimeField, DecimalField

import models
from cryptobot import CryptoPayError, parse_amount, parse_time

log = logging.getLogger('backup')

FORMAT = 'spn-vpn-bot-backup'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
NAME_FORMAT = 'backup_%Y%m%d_%H%M%S.tar.gz'
# Rows read or written per query: keeps memory flat for any number of users.
BATCH_ROWS = 1000
# Bound parameters per INSERT: SQLite allows 32766 (3.32+), PostgreSQL 65535.
MAX_PARAMETERS = 30000
# Caps for reading an archive: ours has one member per table plus the manifest, a manifest of a
# few hundred bytes and rows of at most a few KB. Anything far past these is not a backup of ours.
MAX_MEMBERS = 64
MAX_MANIFEST_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 20
# The payload shop.create_invoice writes: user:<telegram id>:days:<plan days>
PAYLOAD = re.compile(r'user:(-?\d{1,19}):days:(\d{1,5})(?::.*)?', re.DOTALL)
PAGE = 1000  # invoices per getInvoices page (the API's maximum)


class BackupError(Exception):
    """The archive cannot be read or does not fit this database."""


class RestoreRefused(BackupError):
    """Restoring would overwrite data or mix schemas; nothing was changed."""


def make_backup(backup_dir, now=None):
    """Dump every table into backup_dir/backup_YYYYMMDD_HHMMSS.tar.gz (UTC) and return its path.

    The archive appears whole or not at all: it is written to a hidden temporary file in the same
    directory, synced to disk, then renamed into place.
    """
    now = to_utc(now or datetime.now(timezone.utc))
    backup_dir = Path(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    path = backup_dir / now.strftime(NAME_FORMAT)
    dumps = []
    try:
        with snapshot():
            manifest = {'format': FORMAT, 'version': FORMAT_VERSION, 'schema_version': schema_version(),
                        'database': 'sqlite' if models.is_sqlite() else 'postgresql',
                        'created_at': now.isoformat(timespec='seconds'), 'tables': {}}
            for model in models.MODELS:
                # unnamed temporary files: they vanish even if the process dies mid-dump
                dump = tempfile.TemporaryFile(dir=backup_dir)
                dumps.append((model._meta.table_name, dump))
                manifest['tables'][model._meta.table_name] = dump_table(model, dump)
        write_archive(path, manifest, dumps)
    finally:
        for _, dump in dumps:
            dump.close()
    return path


def to_utc(moment):
    """Return moment as a naive UTC datetime (a naive one is taken to be UTC already)."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


@contextmanager
def snapshot():
    """Hold a transaction in which every table is read as of the same moment."""
    with models.db.atomic():
        # SQLite in WAL mode reads from one snapshot per transaction already; PostgreSQL must be asked
        if not models.is_sqlite() and models.db.transaction_depth() == 1:
            models.db.execute_sql('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY')
        yield


def schema_version():
    """Return the newest migration applied to this database (0 for the first schema)."""
    return max((row.version for row in models.SchemaVersion.select()), default=0)


def dump_table(model, out):
    """Write every row of model as JSON lines to the binary file out, in primary-key order; return the count."""
    fields = model._meta.sorted_fields
    key = model._meta.primary_key
    count, last = 0, None
    while True:
        query = model.select(*fields).order_by(key).limit(BATCH_ROWS)
        if last is not None:
            query = query.where(key > last)
        rows = list(query.tuples())
        for row in rows:
            record = {field.column_name: encode(field, value) for field, value in zip(fields, row)}
            out.write(json.dumps(record, ensure_ascii=False, separators=(',', ':')).encode() + b'\n')
        count += len(rows)
        if len(rows) < BATCH_ROWS:
            return count
        last = rows[-1][fields.index(key)]


def encode(field, value):
    """Turn a column value into JSON that decode() turns back into the same value."""
    if value is None:
        return None
    if isinstance(field, DecimalField):
        return str(value)
    if isinstance(field, (DateTimeField, DateField)):
        return value.isoformat()
    if isinstance(field, BooleanField):
        return bool(value)
    return value


def decode(field, value):
    """Turn a JSON value from encode() back into the column's Python value."""
    if value is None:
        return None
    if isinstance(field, DecimalField):
        return Decimal(value)
    if isinstance(field, DateTimeField):
        return datetime.fromisoformat(value)
    if isinstance(field, DateField):
        return date.fromisoformat(value)
    return value


def write_archive(path, manifest, dumps):
    """Write the manifest and the table dumps into a tar.gz at path, atomically."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix='.backup_', suffix='.tmp')  # mode 600
    try:
        with os.fdopen(handle, 'wb') as raw:
            with tarfile.open(fileobj=raw, mode='w:gz') as archive:
                add_member(archive, MANIFEST, json.dumps(manifest, indent=1).encode())
                for table, dump in dumps:
                    add_member(archive, f'{table}.jsonl', dump)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    sync_directory(path.parent)


def add_member(archive, name, content):
    """Add bytes, or a binary file read from its start, to the archive under name."""
    info = tarfile.TarInfo(name)
    info.mode = 0o600
    info.mtime = int(datetime.now(timezone.utc).timestamp())
    if isinstance(content, bytes):
        info.size = len(content)
        content = io.BytesIO(content)
    else:
        info.size = content.seek(0, os.SEEK_END)
        content.seek(0)
    archive.addfile(info, content)


def sync_directory(directory):
    """Make a rename in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_backups(backup_dir, keep_days, now=None):
    """Delete backup_*.tar.gz files older than keep_days (by the time in their name), never the newest; return them."""
    now = to_utc(now or datetime.now(timezone.utc))
    dated = []
    for path in Path(backup_dir).glob('backup_*.tar.gz'):
        try:
            dated.append((datetime.strptime(path.name, NAME_FORMAT), path))
        except ValueError:
            continue  # not ours: leave it alone
    dated.sort()
    removed = []
    for taken, path in dated[:-1]:
        if taken < now - timedelta(days=keep_days):
            path.unlink()
            removed.append(path)
    return removed


LEGACY_PANEL_COLUMNS = ('panel_uuid', 'panel_dirty', 'panel_failures', 'panel_retry_at', 'panel_alerted')


def restore(path, force=False):
    """Load a backup into the database in one transaction and return {table: rows restored}.

    :param force: empty the tables first instead of refusing when they hold rows.
    :raise RestoreRefused: the database holds data (and not force), or the backup is from a newer schema.
    :raise BackupError: the file is not a readable backup; nothing was changed.
    """
    name = Path(path).name
    try:
        with tarfile.open(path, mode='r:gz') as archive:
            members = index_members(archive)
            manifest = read_manifest(archive, members)
            check_fits(manifest)
            with models.transaction():
                if has_data():
                    if not force:
                        raise RestoreRefused('the database already holds data; '
                                             'restore with --force to replace it')
                    for model in reversed(data_models()):
                        model.delete().execute()
                counts, carried = {}, []
                for model in data_models():
                    table = model._meta.table_name
                    if table not in manifest['tables'] and manifest['schema_version'] < current_version():
                        continue  # a table newer than the backup (filled by upgrade_record below)
                    counts[table] = load_table(archive, members, model, manifest['tables'][table], carried)
                if carried:
                    models.PanelClient.insert_many(carried).execute()
                    counts[models.PanelClient._meta.table_name] = len(carried)
                reset_sequences()
            return counts
    except RestoreRefused:
        raise
    except BackupError as exc:
        raise BackupError(f'{name} is not a readable backup: {exc}; nothing was changed') from exc
    except (tarfile.TarError, EOFError, zlib.error, UnicodeDecodeError, ValueError, InvalidOperation,
            KeyError, TypeError, AttributeError, RecursionError) as exc:
        # gzip reports damage as BadGzipFile/EOFError/zlib.error; a damaged manifest or line as
        # ValueError (bad JSON, bad date or number), KeyError, TypeError or AttributeError
        raise BackupError(f'{name} is not a readable backup: the file is damaged '
                          f'({type(exc).__name__}: {exc}); nothing was changed') from exc


def index_members(archive):
    """Read the archive's member headers once, streaming; return {name: TarInfo}.

    :raise BackupError: more than MAX_MEMBERS members, a repeated name, or a member that is not a file.
    """
    members = {}
    while (info := archive.next()) is not None:
        if len(members) >= MAX_MEMBERS:
            raise BackupError(f'it has more than {MAX_MEMBERS} members')
        if info.name in members or not info.isfile():
            raise BackupError(f'member {info.name[:80]!r} is repeated or not a file')
        members[info.name] = info
        archive.members = []  # tarfile would keep every header it has read: keep only ours
    return members


def open_member(archive, members, name):
    """Return a binary stream of one member, or raise BackupError when it is missing."""
    if name not in members:
        raise BackupError(f'{name} is missing')
    return archive.extractfile(members[name])


def read_manifest(archive, members):
    """Return the archive's manifest, checking that it is a backup of ours."""
    data = open_member(archive, members, MANIFEST).read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BackupError(f'the manifest is larger than {MAX_MANIFEST_BYTES} bytes')
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT \
            or manifest.get('version') != FORMAT_VERSION:
        raise BackupError('this is not an SPN VPN Bot backup of a known format')
    return manifest


def lines_of(stream, name):
    """Yield the lines of a member, refusing one longer than MAX_LINE_BYTES before it is held whole."""
    number = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise BackupError(f'{name} line {number} is longer than {MAX_LINE_BYTES} bytes')
        yield line


def check_fits(manifest):
    """Refuse a backup whose tables this version of the bot does not have."""
    current = schema_version()
    if manifest['schema_version'] > current:
        raise RestoreRefused(f'the backup has schema version {manifest["schema_version"]}, newer than this '
                             f'database\'s {current}: update the bot first, then restore')
    unknown = set(manifest['tables']) - {model._meta.table_name for model in models.MODELS}
    if unknown:
        raise RestoreRefused(f'the backup has tables this bot does not know: {", ".join(sorted(unknown))}')


def data_models():
    """Return the models holding data, parents first; SchemaVersion describes this database's own tables."""
    return [model for model in models.MODELS if model is not models.SchemaVersion]


def has_data():
    """Tell whether any data table holds a row."""
    return any(model.select().exists() for model in data_models())


def current_version():
    """Return the schema version this bot's models describe."""
    return max((version for version, _ in models.MIGRATIONS), default=0)


def upgrade_record(model, record, carried):
    """Bring a row of an older backup to this schema, in place.

    Schema 50 moved each user's panel columns into a PanelClient row of the one panel, 'main'.
    """
    if model is models.User and 'panel_dirty' in record:
        old = {name: record.pop(name, None) for name in LEGACY_PANEL_COLUMNS}
        if record.get('expires_at') is not None:
            fields = models.PanelClient._meta.columns
            carried.append({'user': record['id'], 'panel': 'main', 'dirty': bool(old['panel_dirty']),
                            'pushed_expiry': None if old['panel_dirty'] else decode(
                                models.User.expires_at, record['expires_at']),
                            'uuid': old['panel_uuid'], 'failures': old['panel_failures'] or 0,
                            'retry_at': decode(fields['retry_at'], old['panel_retry_at']),
                            'refused': False, 'alerted': bool(old['panel_alerted'])})
    return record


def load_table(archive, members, model, expected, carried=None):
    """Insert one table's rows from the archive in batches; return the count.

    A row pointing at a later row of its own table (a referrer with a higher id) is inserted
    without that link first and linked once all rows are in.
    """
    columns = model._meta.columns
    key = model._meta.primary_key
    self_links = [field for field in model._meta.refs if field.rel_model is model]
    name = f'{model._meta.table_name}.jsonl'
    batch, pending_links, count, fields = [], [], 0, None
    for line in lines_of(open_member(archive, members, name), name):
        if count + len(batch) >= expected:  # more rows than the manifest says: stop reading now
            raise BackupError(f'{model._meta.table_name} has more rows than the manifest says ({expected})')
        record = upgrade_record(model, json.loads(line), carried if carried is not None else [])
        row = {columns[name]: decode(columns[name], value) for name, value in record.items()}
        for field in self_links:
            if row.get(field) is not None and row[field] >= row[key]:
                pending_links.append((row[key], field, row[field]))
                row[field] = None
        fields = fields or list(row)
        batch.append(tuple(row[field] for field in fields))
        if len(batch) >= batch_rows(fields):
            model.insert_many(batch, fields=fields).execute()
            count, batch = count + len(batch), []
    if batch:
        model.insert_many(batch, fields=fields).execute()
        count += len(batch)
    for row_id, field, target in pending_links:
        model.update({field: target}).where(key == row_id).execute()
    if count != expected:
        raise BackupError(f'{model._meta.table_name} has {count} rows, the manifest says {expected}')
    return count


def batch_rows(fields):
    """Return how many rows of this many columns one INSERT may carry."""
    return max(1, min(BATCH_ROWS, MAX_PARAMETERS // len(fields)))


def reset_sequences():
    """Move each PostgreSQL id sequence past the restored ids, so new rows get fresh ones."""
    if models.is_sqlite():
        return  # SQLite picks max(id) + 1 by itself
    for model in data_models():
        key = model._meta.primary_key
        table = model._meta.table_name
        models.db.execute_sql(
            f'SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE(MAX("{key.column_name}"), 1), '
            f'MAX("{key.column_name}") IS NOT NULL) FROM "{table}"',
            (f'"{table}"', key.column_name))


def recover_invoices(cryptopay):
    """Re-create the payment rows of invoices Crypto Pay has and the database lacks; return {status: rows}.

    A backup predates the invoices created after it, so after a restore a buyer paying one of those
    would get nothing. Crypto Pay is asked for every active and paid invoice of this app (getInvoices
    by status, in pages); each carrying our payload (user:<telegram id>:days:<days>) and missing here
    becomes a pending payment, which the poller then settles (paid) or expires, exactly once as ever.
    A buyer whose user row is newer than the backup gets a bare row, filled in at their next /start.

    :raise CryptoPayError: Crypto Pay could not be asked; rows re-created before the failure stay.
    """
    recovered = {'active': 0, 'paid': 0}
    for status in recovered:
        offset = 0
        while True:
            page = cryptopay.get_invoices_by_status(status, offset=offset, count=PAGE)
            for invoice in page:
                recovered[status] += recover_invoice(invoice)
            if len(page) < PAGE:
                break
            offset += len(page)
    return recovered


def recover_invoice(invoice):
    """Insert one invoice as a pending payment if it is ours and missing; return 1 if inserted, else 0."""
    match = PAYLOAD.fullmatch(str(invoice.get('payload') or ''))
    if match is None or models.Payment.select().where(
            models.Payment.invoice_id == invoice['invoice_id']).exists():
        return 0
    telegram_id, days = int(match[1]), int(match[2])
    with models.transaction():
        user = models.User.get_or_none(models.User.telegram_id == telegram_id)
        if user is None:
            user = models.User.create(telegram_id=telegram_id, panel_email=f'spn-{telegram_id}')
        created = parse_time(invoice['created_at']).replace(tzinfo=None) if invoice.get('created_at') else None
        inserted = (models.Payment.insert(
            invoice_id=invoice['invoice_id'], user=user, plan_days=days, amount=parse_amount(invoice['amount']),
            currency=invoice.get('fiat') or invoice.get('asset'), status=models.PENDING,
            pay_url=invoice.get('bot_invoice_url') or '', created_at=created or models.utcnow())
            .on_conflict_ignore().execute())
    if inserted:
        log.info('invoice recovered after a restore user=%s invoice=%s status=%s', telegram_id,
                 invoice['invoice_id'], invoice.get('status'))
    return 1 if inserted else 0


def recover_command(settings):
    """Ask Crypto Pay for invoices the database lacks and re-create them; print one line; return the exit code."""
    from cryptobot import CryptoPayClient
    with CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url) as cryptopay:
        try:
            recovered = recover_invoices(cryptopay)
        except CryptoPayError as exc:
            print(f'error: could not ask Crypto Pay for invoices newer than the backup ({exc}); run '
                  '`python backup.py recover` once it answers, before buyers pay them', file=sys.stderr)
            return 1
    print(f'recovered {recovered["paid"]} paid and {recovered["active"]} open invoices created after the backup '
          '(the bot settles the paid ones when it runs)')
    return 0


def restore_command(settings, path, force):
    """Run `python bot.py restore FILE [--force]`, then recover newer invoices; print a line each.

    Return the exit code: 1 if the restore failed, or if Crypto Pay could not be asked afterwards.
    """
    if not Path(path).is_file():
        print(f'error: no backup file at {path}', file=sys.stderr)
        return 1
    models.connect_database(settings.database_url, settings.db_pool_size)
    try:
        models.create_schema()
        counts = restore(path, force)
    except BackupError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    except DatabaseError as exc:
        print(f'error: restore failed, nothing was changed: {exc}', file=sys.stderr)
        return 1
    else:
        print(f'restored {sum(counts.values())} rows into {len(counts)} tables from {Path(path).name}')
        return recover_command(settings)
    finally:
        models.db.close()


def backup_command(settings):
    """Run `python backup.py make`: back up now, prune old backups, print the new file's path."""
    models.connect_database(settings.database_url, settings.db_pool_size)
    try:
        models.create_schema()
        path = make_backup(settings.backup_dir)
        prune_backups(settings.backup_dir, settings.backup_keep_days)
    except (DatabaseError, OSError) as exc:
        print(f'error: backup failed: {exc}', file=sys.stderr)
        return 1
    finally:
        models.db.close()
    print(path)
    return 0


if __name__ == '__main__':
    import config
    if sys.argv[1:] not in (['make'], ['recover']):
        print('usage: python backup.py make | recover', file=sys.stderr)
        sys.exit(2)
    try:
        loaded = config.load()
    except config.SettingError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] == 'make':
        sys.exit(backup_command(loaded))
    models.connect_database(loaded.database_url, loaded.db_pool_size)
    try:
        models.create_schema()
        sys.exit(recover_command(loaded))
    finally:
        models.db.close()
