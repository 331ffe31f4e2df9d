"""Backups: every row of every table survives make_backup + restore, on SQLite and PostgreSQL."""
import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

import backup
import models
from conftest import CRYPTOPAY_TOKEN, ROOT, clear_database, settings_env

NOW = datetime(2025, 3, 14, 9, 26, 53, 589793)


def fill_database():
    """Put realistic rows, with unicode, NULLs, big ids and exact decimals, into every data table."""
    alice = models.User.create(telegram_id=7_123_456_789, username='alice', first_name='Алиса 🦊', language='ru',
                               panel_email='u7123456789', created_at=NOW - timedelta(days=40))
    # bob points at a referrer created after him, so restore must link rows of one table both ways
    bob = models.User.create(telegram_id=42, username=None, first_name='Bob "Bobby" O\'Neil', language='en',
                             panel_email='u42', blocked=True, awaiting='promo', created_at=NOW - timedelta(days=5))
    carol = models.User.create(telegram_id=-1001234567890, first_name='', panel_email='u-1001234567890',
                               referrer=alice, created_at=NOW - timedelta(days=1))
    models.User.update(referrer=carol).where(models.User.id == bob.id).execute()

    models.grant_days(alice.id, 30, 'payment', 555001, now=NOW - timedelta(days=39))
    models.grant_days(alice.id, 3, 'gift', 'channel', now=NOW - timedelta(days=38, microseconds=17))
    models.grant_days(carol.id, 7, 'referral', f'invited:{bob.id}', now=NOW)
    models.grant_days(bob.id, 10, 'admin', 'give:1', granted_by=900, now=NOW)
    models.PanelClient.update(dirty=False, pushed_expiry=NOW + timedelta(days=33), failures=0,
                              uuid='0f8fad5b-d9cb-469f-a165-70867728950e').where(
        models.PanelClient.user == alice.id).execute()
    models.PanelClient.update(failures=3, retry_at=NOW + timedelta(minutes=2), alerted=True,
                              last_error='Something went wrong (Duplicate email: u-1001234567890\n) «»').where(
        models.PanelClient.user == carol.id).execute()

    models.Payment.create(invoice_id=555001, user=alice, plan_days=30, amount=Decimal('99.99'), currency='RUB',
                          status=models.PAID, pay_url='https://t.me/CryptoBot?start=IVabc', chat_id=7_123_456_789,
                          message_id=31337, created_at=NOW - timedelta(days=39, seconds=90),
                          paid_at=NOW - timedelta(days=39), provisioned_at=NOW - timedelta(days=39),
                          notified_at=NOW - timedelta(days=39), notify_claimed_at=NOW - timedelta(days=39))
    models.Payment.create(invoice_id=9_007_199_254_740_993, user=bob, plan_days=365,
                          amount=Decimal('9999999999.99'), currency='USD', pay_url='https://t.me/CryptoBot?start=IVx',
                          created_at=NOW)
    models.Payment.create(invoice_id=555003, user=carol, plan_days=90, amount=Decimal('270'), currency='RUB',
                          status=models.EXPIRED, pay_url='https://t.me/CryptoBot?start=IVy', created_at=NOW)

    spring = models.PromoCode.create(code='SPRING25', days=14, max_uses=100, used=2, expires_at=NOW + timedelta(days=9),
                                     created_by=900, created_at=NOW - timedelta(days=2))
    models.PromoCode.create(code='FOREVER', days=1, max_uses=1, created_at=NOW)
    models.Redemption.create(promo=spring, user=alice, created_at=NOW - timedelta(hours=3))
    models.Redemption.create(promo=spring, user=carol, created_at=NOW - timedelta(hours=2))
    models.Referral.create(invited=carol, inviter=alice, created_at=NOW - timedelta(days=1), rewarded_at=NOW)
    models.Referral.create(invited=bob, inviter=carol, created_at=NOW)
    models.Gift.create(telegram_id=7_123_456_789, kind='channel', created_at=NOW - timedelta(days=38))
    models.Gift.create(telegram_id=99, kind='channel', created_at=NOW)  # a gift whose user row is gone
    models.Reminder.create(user=alice, kind='3d', period_end=NOW + timedelta(days=3), sent_at=NOW)
    models.Reminder.create(user=alice, kind='expired', period_end=NOW - timedelta(days=9), sent_at=NOW)
    models.PromoAttempt.create(user=alice, created_at=NOW - timedelta(minutes=3))
    models.InvoiceMismatch.create(payment=models.Payment.get(models.Payment.invoice_id == 555003),
                                  detail="amount '0.01' (ours 270) <b>&", created_at=NOW, alerted_at=None)
    models.JobLease.create(name='poll_payments', holder='host:42:a1b2c3', expires_at=NOW, ran_at=NOW)
    models.Cursor.create(name='stars', position=130, updated_at=NOW)


def every_row():
    """Return every row of every data table, in primary-key order, exactly as read back."""
    return {model._meta.table_name: list(model.select().order_by(model._meta.primary_key).tuples())
            for model in backup.data_models()}


def member(model):
    """Name the archive member that holds a model's table."""
    return f'{model._meta.table_name}.jsonl'


def read_archive(path):
    with tarfile.open(path, 'r:gz') as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def write_archive(path, members):
    with tarfile.open(path, 'w:gz') as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_backup_then_restore_gives_back_every_row_exactly(database, tmp_path):
    fill_database()
    before = every_row()
    assert all(before.values()), 'every data table must hold rows for this test to mean anything'

    path = backup.make_backup(tmp_path / 'backups', now=NOW)
    clear_database()
    counts = backup.restore(path)

    assert every_row() == before
    assert counts == {table: len(rows) for table, rows in before.items()}
    bob = models.User.get(models.User.telegram_id == 42)
    assert bob.referrer.first_name == ''
    assert bob.username is None and bob.blocked is True
    amounts = [payment.amount for payment in models.Payment.select().order_by(models.Payment.id)]
    assert amounts == [Decimal('99.99'), Decimal('9999999999.99'), Decimal('270')]
    assert all(isinstance(amount, Decimal) for amount in amounts)
    assert models.Payment.get(models.Payment.currency == 'USD').invoice_id == 9_007_199_254_740_993
    assert models.User.get(models.User.username == 'alice').first_name == 'Алиса 🦊'


def test_archive_is_named_by_utc_time_and_is_portable_json_lines(database, tmp_path):
    fill_database()
    path = backup.make_backup(tmp_path, now=NOW)

    assert path == tmp_path / 'backup_20250314_092653.tar.gz'
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)  # it holds personal data
    members = read_archive(path)
    manifest = json.loads(members['manifest.json'])
    assert manifest['format'] == 'spn-vpn-bot-backup' and manifest['schema_version'] == max((v for v, _ in models.MIGRATIONS), default=0)
    assert set(manifest['tables']) == {model._meta.table_name for model in models.MODELS}
    for model in models.MODELS:
        lines = members[member(model)].decode().splitlines()
        assert len(lines) == manifest['tables'][model._meta.table_name] == model.select().count()
    payments = [json.loads(line) for line in members[member(models.Payment)].decode().splitlines()]
    assert payments[0]['amount'] == '99.99' and payments[0]['user_id'] == 1
    assert payments[0]['created_at'] == '2025-02-03T09:25:23.589793'
    assert payments[1]['invoice_id'] == 9_007_199_254_740_993 and payments[1]['paid_at'] is None


def test_many_rows_are_streamed_in_batches_and_restored(database, tmp_path):
    count = backup.BATCH_ROWS * 2 + 7
    rows = [{'telegram_id': 10_000 + n, 'first_name': f'user {n}', 'panel_email': f'u{10_000 + n}',
             'invite_code': f'code{n}', 'panel_sub_id': f'sub{n}', 'created_at': NOW} for n in range(count)]
    with models.db.atomic():
        for start in range(0, count, 500):
            models.User.insert_many(rows[start:start + 500]).execute()
    # the first user was invited by the last: a link to a row of a later batch
    ids = [user.id for user in models.User.select(models.User.id).order_by(models.User.id)]
    models.User.update(referrer=ids[-1]).where(models.User.id == ids[0]).execute()
    before = every_row()

    path = backup.make_backup(tmp_path, now=NOW)
    clear_database()
    assert backup.restore(path)[models.User._meta.table_name] == count

    assert every_row() == before


def test_restore_refuses_a_database_that_holds_data(database, tmp_path):
    fill_database()
    path = backup.make_backup(tmp_path, now=NOW)
    models.User.update(first_name='changed since the backup').where(models.User.telegram_id == 42).execute()
    before = every_row()

    with pytest.raises(backup.RestoreRefused, match='--force'):
        backup.restore(path)

    assert every_row() == before


def test_forced_restore_replaces_the_data(database, tmp_path):
    fill_database()
    snapshot = every_row()
    path = backup.make_backup(tmp_path, now=NOW)
    models.User.update(first_name='changed since the backup').where(models.User.telegram_id == 42).execute()
    newcomer = models.User.create(telegram_id=77, panel_email='u77')
    models.grant_days(newcomer.id, 3, 'gift', 'newcomer')

    backup.restore(path, force=True)

    assert every_row() == snapshot


def test_new_rows_after_a_restore_get_fresh_ids(database, tmp_path):
    fill_database()
    path = backup.make_backup(tmp_path, now=NOW)
    top = {model: model.select().order_by(model.id.desc()).get().id for model in (models.User, models.Payment)}
    clear_database()  # on PostgreSQL this also restarts the id sequences at 1
    backup.restore(path)

    user = models.User.create(telegram_id=31337, panel_email='u31337')
    payment = models.Payment.create(invoice_id=1, user=user, plan_days=30, amount=Decimal('100'), currency='RUB',
                                    pay_url='https://t.me/CryptoBot?start=IVz')
    assert user.id > top[models.User] and payment.id > top[models.Payment]


def test_restoring_an_empty_backup_leaves_an_empty_database(database, tmp_path):
    path = backup.make_backup(tmp_path, now=NOW)
    assert backup.restore(path) == {model._meta.table_name: 0 for model in backup.data_models()}
    assert models.User.create(telegram_id=1, panel_email='u1').id == 1


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'no manifest', 'bad line', 'count mismatch'])
def test_a_damaged_archive_is_refused_clearly_and_changes_nothing(database, tmp_path, damage):
    fill_database()
    good = backup.make_backup(tmp_path, now=NOW)
    clear_database()
    bad = tmp_path / 'backup_20250101_000000.tar.gz'
    data = good.read_bytes()
    members = read_archive(good)
    if damage == 'truncated':
        bad.write_bytes(data[:len(data) // 2])
    elif damage == 'garbage':
        bad.write_bytes(b'PK\x03\x04 this is a zip file, not a backup' * 10)
    elif damage == 'empty':
        bad.write_bytes(b'')
    elif damage == 'no manifest':
        del members['manifest.json']
        write_archive(bad, members)
    elif damage == 'bad line':
        members[member(models.Grant)] += b'{"id": 99, "days": \n'
        write_archive(bad, members)
    else:
        manifest = json.loads(members['manifest.json'])
        manifest['tables'][models.Reminder._meta.table_name] += 1
        members['manifest.json'] = json.dumps(manifest).encode()
        write_archive(bad, members)

    with pytest.raises(backup.BackupError, match='backup_20250101_000000.tar.gz is not a readable backup'):
        backup.restore(bad)

    assert not any(every_row().values())  # the rows loaded before the damage were rolled back


def test_a_backup_from_a_newer_schema_is_refused(database, tmp_path):
    members = read_archive(backup.make_backup(tmp_path, now=NOW))
    manifest = json.loads(members['manifest.json'])
    manifest['schema_version'] = 99
    members['manifest.json'] = json.dumps(manifest).encode()
    newer = tmp_path / 'newer.tar.gz'
    write_archive(newer, members)

    with pytest.raises(backup.RestoreRefused, match='update the bot first'):
        backup.restore(newer)


def test_backup_files_appear_whole_and_leave_no_temporary_files(database, tmp_path):
    fill_database()
    folder = tmp_path / 'backups'
    first = backup.make_backup(folder, now=NOW)
    assert sorted(os.listdir(folder)) == [first.name]

    # the final name is taken by a directory: the rename fails and the half-made file must go
    blocked = folder / 'backup_20250314_092654.tar.gz'
    blocked.mkdir()
    (blocked / 'keep').write_text('x')
    with pytest.raises(OSError):
        backup.make_backup(folder, now=NOW + timedelta(seconds=1))
    assert sorted(os.listdir(folder)) == sorted([first.name, blocked.name])

    # a second backup in the same second replaces the first whole
    models.User.update(first_name='later').where(models.User.telegram_id == 42).execute()
    again = backup.make_backup(folder, now=NOW)
    assert again == first
    assert b'later' in read_archive(again)[member(models.User)]
    assert sorted(os.listdir(folder)) == sorted([first.name, blocked.name])


def test_prune_removes_old_backups_but_never_the_newest(tmp_path):
    now = datetime(2025, 6, 30, 4, 0)
    names = ['backup_20250101_040000.tar.gz', 'backup_20250530_040000.tar.gz', 'backup_20250531_040000.tar.gz',
             'backup_20250629_040000.tar.gz', 'backup_20250630_040000.tar.gz']
    for name in names:
        (tmp_path / name).write_bytes(b'x')
    (tmp_path / 'backup_notes.tar.gz').write_bytes(b'not ours')
    (tmp_path / 'other.txt').write_bytes(b'not ours')

    removed = backup.prune_backups(tmp_path, keep_days=30, now=now)

    assert sorted(path.name for path in removed) == names[:2]
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:] + ['backup_notes.tar.gz', 'other.txt'])


def test_prune_keeps_the_newest_backup_however_old(tmp_path):
    for name in ['backup_20240101_040000.tar.gz', 'backup_20240102_040000.tar.gz']:
        (tmp_path / name).write_bytes(b'x')

    removed = backup.prune_backups(tmp_path, keep_days=30, now=datetime(2025, 1, 1))

    assert [path.name for path in removed] == ['backup_20240101_040000.tar.gz']
    assert os.listdir(tmp_path) == ['backup_20240102_040000.tar.gz']


def run_bot(env, *args):
    return subprocess.run([sys.executable, 'bot.py', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_restore_command_line(database, tmp_path, cryptopay):
    fill_database()
    snapshot = every_row()
    path = backup.make_backup(tmp_path, now=NOW)
    models.User.update(first_name='changed since the backup').where(models.User.telegram_id == 42).execute()
    models.db.close()  # let the child process have the database to itself
    # restore never calls the panel: any URL will do; it asks Crypto Pay for newer invoices
    unused = SimpleNamespace(url='http://127.0.0.1:9', inbound_id=1)
    env = {**os.environ, **settings_env(unused, cryptopay, database, BACKUP_DIR=str(tmp_path))}

    refused = run_bot(env, 'restore', str(path))
    assert refused.returncode == 1, refused.stderr
    assert '--force' in refused.stderr
    missing = run_bot(env, 'restore', str(tmp_path / 'nope.tar.gz'))
    assert missing.returncode == 1 and 'no backup file' in missing.stderr
    forced = run_bot(env, 'restore', str(path), '--force')
    assert forced.returncode == 0, forced.stderr
    assert f'from {path.name}' in forced.stdout and 'recovered 0 paid and 0 open invoices' in forced.stdout

    assert every_row() == snapshot


def test_restore_says_how_to_recover_invoices_when_crypto_pay_is_away(database, tmp_path):
    path = backup.make_backup(tmp_path, now=NOW)
    models.db.close()
    unreachable = SimpleNamespace(url='http://127.0.0.1:9', inbound_id=1)
    env = {**os.environ, **settings_env(unreachable, unreachable, database, BACKUP_DIR=str(tmp_path))}
    done = run_bot(env, 'restore', str(path), '--force')
    assert done.returncode == 1 and f'from {path.name}' in done.stdout, done.stderr
    assert done.stderr.startswith('error: could not ask Crypto Pay') and 'python backup.py recover' in done.stderr
    assert CRYPTOPAY_TOKEN not in done.stdout + done.stderr


def test_backup_command_line_makes_a_backup_that_restores(database, tmp_path):
    fill_database()
    snapshot = every_row()
    models.db.close()
    unused = SimpleNamespace(url='http://127.0.0.1:9', inbound_id=1)
    env = {**os.environ, **settings_env(unused, unused, database, BACKUP_DIR=str(tmp_path / 'daily'))}

    made = subprocess.run([sys.executable, 'backup.py', 'make'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)

    assert made.returncode == 0, made.stderr
    [path] = (tmp_path / 'daily').glob('backup_*.tar.gz')
    assert made.stdout.strip() == str(path)
    clear_database()
    backup.restore(path)
    assert every_row() == snapshot


# Crafted archives: refused by streaming with caps, never read whole (issue 9 item 10)

class Spaces(io.RawIOBase):
    """A file of `size` spaces, made as it is read (so the test itself stays small)."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = b' ' * n
        self.left -= n
        return n


def crafted_archive(tmp_path, good, table_member, size):
    """A backup whose table_member is one line of `size` spaces: compresses to about a thousandth of that."""
    members = read_archive(good)
    path = tmp_path / 'backup_20250101_000000.tar.gz'
    with tarfile.open(path, 'w:gz', compresslevel=9) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if name == table_member:
                info.size = size
                archive.addfile(info, io.BufferedReader(Spaces(size), 1 << 20))
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


GROWTH_SCRIPT = '''
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import backup, models
models.connect_database(sys.argv[2])
models.create_schema()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    backup.restore(sys.argv[3], force=True)
    error = None
except backup.BackupError as exc:
    error = str(exc)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({'error': error, 'grown_kb': grown}))
'''


def test_a_crafted_archive_is_refused_without_growing_the_process(database, tmp_path):
    good = backup.make_backup(tmp_path, now=NOW)
    size = 160 << 20  # 160 MB of one "line": the old restore grew by twice that
    crafted = crafted_archive(tmp_path, good, member(models.User), size)
    assert crafted.stat().st_size < 1 << 20
    models.db.close()
    done = subprocess.run([sys.executable, '-c', GROWTH_SCRIPT, str(ROOT), database, str(crafted)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result['grown_kb'] < 32 * 1024, result
    assert result['error'] and 'users.jsonl line 1 is longer than 1048576 bytes' in result['error'], result


def test_a_huge_manifest_is_refused(database, tmp_path):
    good = backup.make_backup(tmp_path, now=NOW)
    crafted = crafted_archive(tmp_path, good, 'manifest.json', 8 << 20)
    with pytest.raises(backup.BackupError, match='the manifest is larger than 1048576 bytes'):
        backup.restore(crafted)


def test_an_archive_of_countless_members_is_refused(database, tmp_path):
    path = tmp_path / 'backup_20250101_000000.tar.gz'
    with tarfile.open(path, 'w:gz') as archive:
        for number in range(5000):
            archive.addfile(tarfile.TarInfo(f'm{number}'), io.BytesIO(b''))
    with pytest.raises(backup.BackupError, match='more than 64 members'):
        backup.restore(path)


def test_rows_past_the_manifests_count_are_refused_before_they_are_read(database, tmp_path):
    fill_database()
    good = backup.make_backup(tmp_path, now=NOW)
    clear_database()
    members = read_archive(good)
    members[member(models.Grant)] += members[member(models.Grant)] * 1000
    bad = tmp_path / 'backup_20250101_000000.tar.gz'
    write_archive(bad, members)
    with pytest.raises(backup.BackupError, match='grants has more rows than the manifest says'):
        backup.restore(bad)
    assert not any(every_row().values())


def test_a_deeply_nested_line_is_a_clear_error(database, tmp_path):
    good = backup.make_backup(tmp_path, now=NOW)
    members = read_archive(good)
    manifest = json.loads(members['manifest.json'])
    manifest['tables']['users'] = 1
    members['manifest.json'] = json.dumps(manifest).encode()
    members[member(models.User)] = b'[' * 200_000 + b'\n'
    bad = tmp_path / 'backup_20250101_000000.tar.gz'
    write_archive(bad, members)
    with pytest.raises(backup.BackupError, match='not a readable backup'):
        backup.restore(bad)


# Invoices created after the backup (issue 9 item 10)

def test_invoices_created_after_the_backup_are_recovered_and_settled_once(shop, cryptopay, telegram, messenger,
                                                                          tmp_path):
    import jobs
    old, _ = shop.register(1001, 'old', 'Old', 'en')
    before = shop.create_invoice(old, 30)  # in the backup
    path = backup.make_backup(tmp_path, now=NOW)
    newcomer, _ = shop.register(1002, 'new', 'New', 'ru')  # registered after the backup
    paid_later = shop.create_invoice(old, 90)
    newcomers = shop.create_invoice(newcomer, 30)
    still_open = shop.create_invoice(old, 180)  # another plan: a pending invoice of the same plan is reused
    cryptopay.pay(paid_later.invoice_id)
    cryptopay.pay(newcomers.invoice_id)
    stranger = cryptopay._create_invoice({'currency_type': 'fiat', 'fiat': 'RUB', 'amount': '5',
                                          'payload': 'someone else'})  # another bot on the same app
    cryptopay.pay(stranger['invoice_id'])
    for n in range(3):  # more than a page would hold at count=1 (the client pages by PAGE)
        cryptopay._create_invoice({'currency_type': 'fiat', 'fiat': 'RUB', 'amount': '5', 'payload': f'x{n}'})
    backup.restore(path, force=True)
    assert not models.Payment.select().where(models.Payment.invoice_id == paid_later.invoice_id).exists()

    monkey_page = backup.PAGE
    backup.PAGE = 2  # page through several pages of the fake
    try:
        recovered = backup.recover_invoices(shop.cryptopay)
        again = backup.recover_invoices(shop.cryptopay)
    finally:
        backup.PAGE = monkey_page
    assert recovered == {'active': 1, 'paid': 2} and again == {'active': 0, 'paid': 0}
    assert models.Payment.get(models.Payment.invoice_id == still_open.invoice_id).status == models.PENDING
    assert models.Payment.get(models.Payment.invoice_id == before.invoice_id).status == models.PENDING
    recreated = models.Payment.get(models.Payment.invoice_id == paid_later.invoice_id)
    assert (recreated.plan_days, recreated.amount, recreated.currency) == (90, Decimal('270'), 'RUB')

    assert jobs.poll_payments(shop, messenger) == 2
    assert jobs.poll_payments(shop, messenger) == 0
    old_user = models.User.get(models.User.telegram_id == 1001)
    new_user = models.User.get(models.User.telegram_id == 1002)
    assert models.Grant.select().where(models.Grant.reason == 'payment').count() == 2
    assert old_user.expires_at is not None and new_user.expires_at is not None
    assert not models.Payment.select().where(models.Payment.invoice_id == stranger['invoice_id']).exists()
