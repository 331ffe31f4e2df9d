"""Cost of the background jobs at shop scale, on SQLite and PostgreSQL side by side.

    .venv/bin/python bench/jobs_cost.py                  # 50,000 users; poller at 0, 1,000, 10,000 pending
    .venv/bin/python bench/jobs_cost.py --db sqlite --users 5000 --pending 0,1000

Prints, per database: the payment poller's Crypto Pay calls per round (counted at the fake) and
its time per round; the SQL the reminder and reconciliation jobs run, each statement's time and
its plan (EXPLAIN QUERY PLAN / EXPLAIN ANALYZE); backup and restore times. The jobs run in this
process, as the jobs thread runs them, against the fake Crypto Pay, panel and Bot API.
"""
import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import common

import backup
import config
import jobs
import models
import telebot
from cryptobot import CryptoPayClient
from fake_telegram import FakeTelegram
from messenger import Messenger
from shop import Shop
from telebot import apihelper
from xui import XuiClient


class SqlRecorder:
    """Record every statement the database runs in this process, with its time (instrumentation only)."""

    def __init__(self):
        self.statements = []
        self._original = None

    def __enter__(self):
        database = models.db.obj
        original = self._original = database.execute_sql

        def execute_sql(sql, params=None, *args, **kwargs):
            started = time.perf_counter()
            cursor = original(sql, params, *args, **kwargs)
            if sql.lstrip().upper().startswith('SELECT'):
                rows = cursor.fetchall()  # time the whole read, as the job iterates it
                cursor = ListCursor(cursor, rows)
            self.statements.append((sql, params, time.perf_counter() - started))
            return cursor

        database.execute_sql = execute_sql
        return self

    def __exit__(self, *exc):
        del models.db.obj.execute_sql

    def selects(self):
        """Return {sql: (count, total seconds, max seconds, first params)} of the SELECTs run."""
        found = {}
        for sql, params, seconds in self.statements:
            if not sql.lstrip().upper().startswith('SELECT'):
                continue
            count, total, longest, first = found.get(sql, (0, 0.0, 0.0, params))
            found[sql] = (count + 1, total + seconds, max(longest, seconds), first)
        return found


class ListCursor:
    """A cursor whose rows were already fetched (so the recorder could time the read)."""

    def __init__(self, cursor, rows):
        self._cursor, self._rows = cursor, list(rows)
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = getattr(cursor, 'lastrowid', None)

    def fetchone(self):
        return self._rows.pop(0) if self._rows else None

    def fetchall(self):
        rows, self._rows = self._rows, []
        return rows

    def fetchmany(self, size=100):
        rows, self._rows = self._rows[:size], self._rows[size:]
        return rows

    def __iter__(self):
        while self._rows:
            yield self._rows.pop(0)

    def close(self):
        self._cursor.close()


def explain(sql, params):
    """Return the database's plan for a statement, one line per step."""
    if models.is_sqlite():
        rows = models.db.execute_sql('EXPLAIN QUERY PLAN ' + sql, params).fetchall()
        return [row[-1] for row in rows]
    rows = models.db.execute_sql('EXPLAIN (ANALYZE, BUFFERS OFF, TIMING OFF, SUMMARY ON) ' + sql, params).fetchall()
    return [row[0] for row in rows]


def timed(function, *args, repeat=3, **kwargs):
    """Run function repeat times; return (median seconds, last result)."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def add_pending(cryptopay, count, user_ids):
    """Create count active invoices at the fake and pending payments for them; return their invoice ids."""
    now = models.utcnow()
    invoices = []
    with cryptopay._lock:
        for n in range(count):
            invoice = cryptopay._create_invoice({'currency_type': 'fiat', 'fiat': 'RUB', 'amount': '100',
                                                 'expires_in': 3600, 'payload': f'bench:{n}'})
            invoices.append(invoice)
    rows = [{'invoice_id': invoice['invoice_id'], 'user': user_ids[n % len(user_ids)], 'plan_days': 30,
             'amount': 100, 'currency': 'RUB', 'status': 'pending', 'pay_url': invoice['bot_invoice_url'],
             'created_at': now - timedelta(minutes=20)} for n, invoice in enumerate(invoices)]
    with models.db.atomic():
        for start in range(0, len(rows), 1000):
            models.Payment.insert_many(rows[start:start + 1000]).execute()
    return [invoice['invoice_id'] for invoice in invoices]


def show_sql(title, recorder, limit_ms):
    selects = recorder.selects()
    print(f'  {title}: {len(recorder.statements)} statements, '
          f'{sum(s for _, _, s in recorder.statements) * 1000:.1f} ms in the database')
    for sql, (count, total, longest, params) in sorted(selects.items(), key=lambda item: -item[1][2])[:4]:
        verdict = 'ok' if longest * 1000 <= limit_ms else f'OVER {limit_ms} ms'
        print(f'    {count} x, longest {longest * 1000:.1f} ms ({verdict}): {sql[:230]}')
        for line in explain(sql, params):
            print(f'        | {line}')


def run(kind, url, pg, args, tmp, panel, cryptopay, telegram):
    common.bind(url)
    seconds = common.seed(args.users)
    print(f'\n## {kind}: {args.users} users seeded in {seconds:.1f} s')
    settings = config.load(common.bot_env(url, panel, cryptopay, telegram.url, Path(tmp) / 'backups'))
    xui = XuiClient(settings.xui_url, settings.xui_inbound_id, settings.xui_sub_url, username=settings.xui_username,
                    password=settings.xui_password)
    shop = Shop(settings, xui, CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url))
    messenger = Messenger(telebot.TeleBot(settings.bot_token, threaded=False))
    with models.db.connection_context():
        user_ids = [user_id for (user_id,) in models.User.select(models.User.id).limit(5000).tuples()]

        # the poller
        print('  payment poller (all invoices still active at Crypto Pay):')
        pending_total = 0
        for pending in args.pending:
            add_pending(cryptopay, pending - pending_total, user_ids)
            pending_total = pending
            calls_before = sum(1 for method, _ in cryptopay.calls if method == 'getInvoices')
            with SqlRecorder() as recorder:
                seconds, _ = timed(jobs.poll_payments, shop, messenger, repeat=args.rounds)
            calls = sum(1 for method, _ in cryptopay.calls if method == 'getInvoices') - calls_before
            print(f'    {pending:6} pending: {calls / args.rounds:.0f} getInvoices calls per round '
                  f'(expected {-(-pending // 1000)}), {seconds * 1000:8.1f} ms per round (median of {args.rounds}), '
                  f'{len(recorder.statements) / args.rounds:.0f} SQL statements per round')
        models.Payment.delete().where(models.Payment.status == 'pending').execute()
        if args.poller_only:
            return

        # reminders: the first run sends what is due, the second finds nothing new
        with SqlRecorder() as recorder:
            started = time.perf_counter()
            sent = jobs.send_reminders(shop, messenger)
            first = time.perf_counter() - started
        with SqlRecorder() as again:
            started = time.perf_counter()
            jobs.send_reminders(shop, messenger)
            second = time.perf_counter() - started
        print(f'  reminders: first run {first * 1000:.0f} ms ({sent} sent to the fake Bot API), '
              f'next run {second * 1000:.1f} ms (nothing due)')
        show_sql('reminder queries, next run', again, 100)

        # reconciliation against a panel holding every active user's client
        started = time.perf_counter()
        clients = xui.list_clients()
        listing = time.perf_counter() - started
        with SqlRecorder() as recorder:
            started = time.perf_counter()
            report = jobs.reconcile(shop)
            total = time.perf_counter() - started
        print(f'  reconciliation: {total * 1000:.0f} ms in all for {report.checked} active users '
              f'({len(clients)} panel clients; listing them alone takes {listing * 1000:.0f} ms), '
              f'{report.fixed} fixed, {len(report.ahead)} ahead')
        show_sql('reconciliation queries', recorder, 100)

    # backup and restore at this size
    with models.db.connection_context():
        counts = {model._meta.table_name: model.select().count() for model in models.MODELS}
    started = time.perf_counter()
    with models.db.connection_context():
        path = backup.make_backup(Path(tmp) / f'backups-{kind}')
    made = time.perf_counter() - started
    restore_url = pg.fresh('bench_restore') if pg else common.fresh_sqlite(tmp, 'bench_restore')
    common.bind(restore_url)
    started = time.perf_counter()
    with models.db.connection_context():
        restored = backup.restore(path)
    took = time.perf_counter() - started
    print(f'  backup: {made:.1f} s, {path.stat().st_size / 1e6:.1f} MB for '
          f'{sum(counts.values())} rows ({counts["users"]} users, {counts["payments"]} payments, '
          f'{counts["grants"]} grants); restore into an empty database: {took:.1f} s '
          f'({sum(restored.values())} rows)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='all', choices=['all', 'sqlite', 'postgresql'])
    parser.add_argument('--users', type=int, default=50_000)
    parser.add_argument('--pending', default='0,1000,10000')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--poller-only', action='store_true', help='skip reminders, reconciliation, backup')
    args = parser.parse_args()
    args.pending = [int(n) for n in args.pending.split(',')]
    print(f'# jobs: {common.machine_line()}')
    with tempfile.TemporaryDirectory(prefix='spn-bench-') as tmp, common.databases(args.db, tmp) as dbs:
        panel, cryptopay = common.start_fakes()
        common.fill_panel(panel, common.active_indexes(args.users))
        telegram = FakeTelegram(token=common.BOT_TOKEN, record=False, history=2)
        for i in range(args.users):
            telegram.add_user({'id': common.USER_BASE + i, 'first_name': f'User {i}'})
        apihelper.API_URL = telegram.url + '/bot{0}/{1}'
        for kind, make_url, pg in dbs:
            run(kind, make_url('bench_jobs'), pg, args, tmp, panel, cryptopay, telegram)
        telegram.close()
        panel.stop()
        cryptopay.stop()


if __name__ == '__main__':
    main()
