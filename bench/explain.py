"""EXPLAIN of the queries the jobs and GET /sub issue on every round, on SQLite and PostgreSQL, at two sizes.

    .venv/bin/python bench/explain.py                          # both databases, 5,000 and 50,000 buyers
    .venv/bin/python bench/explain.py --db sqlite --buyers 5000 50000 --panels 3 --repeat 30

The SQL is the code's own: each job (or the /sub handler) runs against the seeded database with a recorder on
the connection that keeps the statement it issues (peewee's SQL and params) and stops it there, so what is
explained is what the bot sends. Prints, per query, its plan (SQLite: EXPLAIN QUERY PLAN; PostgreSQL:
EXPLAIN ANALYZE) and the median time of running it at each size: a query served by an index costs the same
at 5,000 and 50,000 buyers. "full scans" names a plan step that reads a whole table. Then the time of a
whole round of the two jobs that walk the buyers in passes (passes.py) when there is nothing to do.

SQLite is left without ANALYZE statistics, as the bot leaves it; PostgreSQL is analyzed, as autovacuum
would have done after the seeding. Asserts nothing; tests/test_explain.py checks the plans cheaply.
"""
import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jobs  # noqa: E402
import models  # noqa: E402
import passes  # noqa: E402
import provisioning  # noqa: E402
import web  # noqa: E402
from models import PAID, PENDING, Cursor, PanelClient, Payment, Reminder, User  # noqa: E402
from peewee import fn  # noqa: E402

PANEL_NAMES = ('Germany', 'Finland', 'Japan', 'Poland', 'Turkey')
LINK_BASE = 'https://shop.example.test/sub/'
BIG_TABLES = ('users', 'payments', 'panel_clients', 'reminders', 'grants')


class Captured(Exception):
    """The recorder saw the statement it waited for: (sql, params)."""

    def __init__(self, sql, params):
        super().__init__(sql)
        self.sql, self.params = sql, list(params or ())


@contextmanager
def recording(match):
    """Within: the first statement whose SQL matches `match` (a regex) raises Captured instead of running."""
    database = models.db.obj
    real = database.execute_sql

    def execute_sql(sql, params=None, *args, **kwargs):
        if re.search(match, sql):
            raise Captured(sql, params)
        return real(sql, params, *args, **kwargs)

    database.execute_sql = execute_sql
    try:
        yield
    finally:
        del database.execute_sql


def capture(call, match):
    """Run call() until it issues a statement matching `match`; return that statement as (sql, params)."""
    with models.connection(), recording(match):
        try:  # (a write before the statement, as in Provisioning._push, is in the code's own transaction: rolled back)
            call()
        except Captured as captured:
            return captured.sql, captured.params
    raise AssertionError(f'no statement matching {match!r} was issued')


def bench_shop(panels):
    """A stand-in for the Shop with just what the jobs read: its enabled panels (pushes answer at once)."""
    enabled = [SimpleNamespace(name=name, enabled=True,
                               client=SimpleNamespace(ensure_client=lambda **_: {'uuid': 'bench'}))
               for name in panels]
    return SimpleNamespace(settings=SimpleNamespace(invoice_expires_seconds=3600, timezone='UTC'),
                           enabled_panels=enabled, link_base=LINK_BASE,
                           panel=SimpleNamespace(subscription_link=lambda sub_id: 'https://old.example.test/sub/'))


def key_queries(now, panels=PANEL_NAMES[:3], pushed_user_id=1):
    """Return [(name, sql, params)]: the statements each round of the jobs, a push and GET /sub issue.

    backfill_panels and announce_new_link are caught in the first round of a pass over the buyers (no cursor
    yet), the most a round of theirs reads; an idle round's statement is the newest buyer id."""
    shop = bench_shop(panels)
    panel = shop.enabled_panels[0]
    idle = SimpleNamespace(name='no-such-panel', enabled=True)
    idle_shop = SimpleNamespace(**{**shop.__dict__, 'enabled_panels': [idle]})
    app = SimpleNamespace(merger=None, settings=None, shop=None)
    environ = {'PATH_INFO': '/sub/s000000000000042', 'HTTP_ACCEPT': '*/*'}
    plans = [
        ('poller: pending invoices (poll_payments)',
         lambda: jobs.poll_payments(shop, None, now=now), r'FROM "payments"'),
        ('retry_panel: due pushes of one panel',
         lambda: jobs.retry_panel(shop, panel, now), r'FROM "panel_clients"'),
        ('retry_provisioning: paid, not yet told',
         lambda: jobs.retry_provisioning(idle_shop, None, now=now), r'FROM "payments"'),
        ('alert_stuck: stuck pushes',
         lambda: jobs.alert_stuck(shop, None), r'FROM "panel_clients"'),
        ('backfill_panels: buyers missing on a panel',
         lambda: jobs.backfill_panels(shop, now=now), r'^SELECT .*EXISTS'),
        ('passes: the newest buyer id (an idle round)',
         lambda: jobs.backfill_panels(shop, now=now), r'MAX\('),
        ('send_reminders: due reminders',
         lambda: jobs.send_reminders(shop, None, now=now), r'FROM "users"'),
        ('announce_new_link: buyers with an old link',
         lambda: jobs.announce_new_link(shop, None, now=now), r'^SELECT .*"link_base"'),
        ('push: the buyer\'s row of a panel (Provisioning._push)',
         lambda: provisioning.Provisioning._push(shop, panel, pushed_user_id, now), r'FROM "panel_clients"'),
        ('push: mark the paid payments provisioned',
         lambda: provisioning.Provisioning._push(shop, panel, pushed_user_id, now), r'^UPDATE "payments"'),
        ('GET /sub: the subId lookup',
         lambda: web.App.subscription(app, environ), r'FROM "users"'),
    ]
    return [(name, *capture(call, match)) for name, call, match in plans]


# -- seeding ------------------------------------------------------------------------------------------

def seed(buyers, panels, now, chunk=1000):
    """A shop of `buyers`: 60 % active, 20 % lapsed, 20 % never paid; each paying buyer on every panel.

    50 buyers have a pending invoice and 30 rows per panel are dirty (some failing, some alerted), at any
    size: those come from the last hour's activity, not from the number of buyers. Lapsed buyers got their
    three reminders. Ids are dense from 1.
    """
    started = time.perf_counter()
    with models.connection():
        for begin in range(0, buyers, chunk):
            users, payments, clients, reminders = [], [], [], []
            for i in range(begin, min(begin + chunk, buyers)):
                user_id, kind = i + 1, i % 10
                expires = (now + timedelta(days=1 + (i * 7919) % 365) if kind < 6 else
                           now - timedelta(days=1 + (i * 7919) % 90) if kind < 8 else None)
                users.append({'id': user_id, 'telegram_id': 700_000_000 + i, 'panel_email': f'spn-{i}',
                              'panel_sub_id': f's{i:015d}', 'invite_code': f'i{i:011d}', 'expires_at': expires,
                              'blocked': i % 50 == 49, 'link_base': LINK_BASE, 'created_at': now})
                if expires is not None:
                    payments.append({'invoice_id': 10_000_000 + i, 'user': user_id, 'plan_days': 30,
                                     'amount': '100', 'currency': 'RUB', 'status': PAID, 'pay_url': 'x',
                                     'provider_id': str(10_000_000 + i), 'created_at': now, 'paid_at': now,
                                     'provisioned_at': now, 'notified_at': now})
                    for number, name in enumerate(panels):
                        dirty = i % 997 == number + 1 and i < 30 * 997  # 30 per panel, at any size
                        clients.append({'user': user_id, 'panel': name, 'dirty': dirty, 'pushed_expiry': expires,
                                        'failures': 6 if dirty and i % 3 == 0 else 0,
                                        'retry_at': now + timedelta(seconds=i % 120) if dirty else None,
                                        'alerted': dirty and i % 2 == 0})
                if i % 97 == 3 and i < 50 * 97:  # 50 pending: invoices live an hour, whatever the shop's size
                    payments.append({'invoice_id': 20_000_000 + i, 'user': user_id, 'plan_days': 30,
                                     'amount': '100', 'currency': 'RUB', 'status': PENDING, 'pay_url': 'x',
                                     'provider_id': str(20_000_000 + i), 'created_at': now})
                if 6 <= kind < 8:
                    reminders += [{'user': user_id, 'kind': kind_, 'period_end': expires, 'sent_at': expires}
                                  for kind_ in '310']
            with models.db.atomic():
                for model, rows in ((User, users), (Payment, payments), (PanelClient, clients),
                                    (Reminder, reminders)):
                    for part in range(0, len(rows), 500):
                        model.insert_many(rows[part:part + 500]).execute()
        if not models.is_sqlite():
            models.db.execute_sql("SELECT setval(pg_get_serial_sequence('users', 'id'), (SELECT MAX(id) FROM users))")
            models.db.execute_sql('ANALYZE')  # what autovacuum does after this many rows
    return time.perf_counter() - started


def first_dirty_user(panel):
    with models.connection():
        return (PanelClient.select(PanelClient.user).where(PanelClient.panel == panel, PanelClient.dirty == True)  # noqa: E712
                .order_by(PanelClient.id).scalar())


# -- plans and times ----------------------------------------------------------------------------------

def plan(sql, params):
    """Return the plan lines of one statement (PostgreSQL: run, in a transaction rolled back)."""
    with models.connection():
        if models.is_sqlite():
            rows = models.db.execute_sql('EXPLAIN QUERY PLAN ' + sql, params).fetchall()
            return [row[-1] for row in rows]
        with models.db.atomic() as transaction:
            rows = models.db.execute_sql('EXPLAIN (ANALYZE, BUFFERS) ' + sql, params).fetchall()
            transaction.rollback()
        return [row[0] for row in rows]


def full_scans(sql, lines):
    """Return the plan steps that read a whole big table (without an index, or a whole index in its order)."""
    tables = {alias: table for table, alias in re.findall(r'"(\w+)" AS "(\w+)"', sql)}
    found = []
    for line in lines:
        sqlite = re.match(r'\s*SCAN (\w+)', line)
        if sqlite and tables.get(sqlite.group(1), sqlite.group(1)) in BIG_TABLES:
            found.append(f'{line.strip()} ({tables.get(sqlite.group(1), sqlite.group(1))})')
        if re.search(r'Seq Scan on (%s)\b' % '|'.join(BIG_TABLES), line):
            found.append(line.strip().removeprefix('->').strip())
    # PostgreSQL: an index scan without an Index Cond under it walks the whole index
    for number, line in enumerate(lines):
        node = re.search(r'Index (?:Only )?Scan (?:Backward )?using \w+ on (\w+)', line)
        if not node or node.group(1) not in BIG_TABLES:
            continue
        indent = len(line) - len(line.lstrip())
        details = []
        for below in lines[number + 1:]:
            if '->' in below or len(below) - len(below.lstrip()) <= indent:
                break
            details.append(below)
        if not any('Index Cond' in detail for detail in details):
            found.append(line.strip().removeprefix('->').strip() + ' (no Index Cond: the whole index)')
    return found


def time_of(sql, params, repeat):
    """Median milliseconds of running the statement (writes in a transaction rolled back)."""
    times = []
    with models.connection():
        for _ in range(repeat):
            with models.db.atomic() as transaction:
                begin = time.perf_counter()
                cursor = models.db.execute_sql(sql, params)
                if cursor.description:
                    cursor.fetchall()
                times.append((time.perf_counter() - begin) * 1000)
                transaction.rollback()
    return statistics.median(times)


def idle_rounds(now, panels, repeat):
    """Return {job: median ms of a whole round with nothing to do}: every pass over the buyers has reached the
    newest one, as in a shop whose panels are complete and whose buyers were all told their link."""
    shop = bench_shop(panels)
    names = [passes.cursor_name('backfill', name) for name in panels] + [passes.cursor_name('announce', LINK_BASE)]
    rounds = {'backfill_panels': lambda: jobs.backfill_panels(shop, now=now),
              'announce_new_link': lambda: jobs.announce_new_link(shop, None, now=now)}
    times = {}
    with models.connection():
        newest = User.select(fn.MAX(User.id)).scalar()
        Cursor.delete().where(Cursor.name.in_(names)).execute()
        Cursor.insert_many([{'name': name, 'position': newest, 'updated_at': now} for name in names]).execute()
        for job, call in rounds.items():
            samples = []
            for _ in range(repeat):
                begin = time.perf_counter()
                done = call()
                samples.append((time.perf_counter() - begin) * 1000)
                if sum(done.values()) if isinstance(done, dict) else done:
                    raise RuntimeError(f'{job}: a round that should have had nothing to do did {done}')
            times[job] = statistics.median(samples)
        Cursor.delete().where(Cursor.name.in_(names)).execute()
    return times


def bind(url):
    if models.db.obj is not None:
        if not models.db.is_closed():
            models.db.close()
        if hasattr(models.db.obj, 'close_all'):
            models.db.obj.close_all()
    models.connect_database(url, 4)
    models.create_schema()


def run(kind, fresh, sizes, panels, repeat):
    now = models.utcnow().replace(microsecond=0)
    results, idle = {}, {}
    for buyers in sizes:
        bind(fresh(f'explain_{buyers}'))
        seconds = seed(buyers, panels, now)
        queries = key_queries(now, panels, pushed_user_id=first_dirty_user(panels[0]))
        results[buyers] = [(name, sql, params, plan(sql, params), time_of(sql, params, repeat))
                           for name, sql, params in queries]
        idle[buyers] = idle_rounds(now, panels, repeat)
        print(f'{kind}: seeded {buyers:,} buyers x {len(panels)} panels in {seconds:.1f} s', flush=True)
    small, large = sizes[0], sizes[-1]
    print(f'\n== {kind}: {len(panels)} panels; median of {repeat} runs; load average '
          f'{os.getloadavg()[0]:.1f} ==')
    print(f'{"query":48}' + ''.join(f'{size:>10,}' for size in sizes) + '   ratio  full scans')
    for number, (name, *_rest) in enumerate(results[small]):
        times = [results[size][number][4] for size in sizes]
        scans = full_scans(results[large][number][1], results[large][number][3])
        print(f'{name:48}' + ''.join(f'{ms:8.2f}ms' for ms in times) + f'  {times[-1] / times[0]:5.1f}x  '
              + ('; '.join(scans) if scans else 'none'))
    print(f'\n{"whole round with nothing to do (passes done)":48}' + ''.join(f'{size:>10,}' for size in sizes))
    for job in idle[small]:
        print(f'{job:48}' + ''.join(f'{idle[size][job]:8.2f}ms' for size in sizes))
    print(f'\n-- {kind}: the SQL and its plan at {large:,} buyers --')
    for name, sql, params, lines, _ in results[large]:
        print(f'\n[{name}]\n{sql}\nparams: {params}')
        for line in lines:
            print('    ' + line)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', choices=['sqlite', 'postgresql', 'all'], default='all')
    parser.add_argument('--buyers', type=int, nargs='+', default=[5_000, 50_000])
    parser.add_argument('--panels', type=int, default=3)
    parser.add_argument('--repeat', type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / 'bench'))
    import common  # a throwaway PostgreSQL (and SIGTERM unwinding): only when run as the bench
    panels = PANEL_NAMES[:args.panels]
    print(common.machine_line())
    with tempfile.TemporaryDirectory(prefix='spn-explain-') as tmp, common.databases(args.db, tmp) as found:
        for kind, fresh, _ in found:
            run(kind, fresh, args.buyers, panels, args.repeat)


if __name__ == '__main__':
    main()
