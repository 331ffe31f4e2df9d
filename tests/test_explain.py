"""The queries every job round, a push and GET /sub issue are served by an index, on both databases.

The SQL is the code's own (bench/explain.py runs each job with a recorder that keeps its statement). Cheap and
not timed: it reads plans. SQLite: EXPLAIN QUERY PLAN must not SCAN a big table (nor a whole index of one).
PostgreSQL: with sequential scans priced out (enable_seqscan off), the plan must still have no Seq Scan on a
big table, i.e. an index can serve the query. The figures at 5,000 and 50,000 buyers: docs/dev/PERFORMANCE.md.
"""
import re
import sys
from pathlib import Path

import pytest

import models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'bench'))
import explain  # noqa: E402

BUYERS = 300

# Known full scans, each reported with its plan and the index or change it needs (PERFORMANCE.md, "EXPLAIN"):
# strict: once fixed, the mark must go. (backfill_panels and announce_new_link were here until they walked
# the buyers by id in passes, passes.py.)
SCANS_TODAY = {}


def seeded():
    now = models.utcnow().replace(microsecond=0)
    explain.seed(BUYERS, explain.PANEL_NAMES[:3], now)
    return explain.key_queries(now, explain.PANEL_NAMES[:3],
                               pushed_user_id=explain.first_dirty_user(explain.PANEL_NAMES[0]))


NAMES = ['poller: pending invoices (poll_payments)', 'retry_panel: due pushes of one panel',
         'retry_provisioning: paid, not yet told', 'alert_stuck: stuck pushes',
         'backfill_panels: buyers missing on a panel', 'passes: the newest buyer id (an idle round)',
         'send_reminders: due reminders',
         'announce_new_link: buyers with an old link', "push: the buyer's row of a panel (Provisioning._push)",
         'push: mark the paid payments provisioned', 'GET /sub: the subId lookup']


# SQLite (no ANALYZE statistics, as the bot runs it): the index each query must search, and on which terms
SQLITE_INDEX = {
    'poller: pending invoices (poll_payments)': r'SEARCH t1 USING INDEX payment_status_\w+ \(status=\?',
    'retry_panel: due pushes of one panel':
        r'SEARCH t1 USING INDEX panelclient_panel_dirty_retry_at \(panel=\? AND dirty=\?',
    'retry_provisioning: paid, not yet told':
        r'SEARCH t1 USING INDEX payment_status_notified_at \(status=\? AND notified_at=\?\)',
    'alert_stuck: stuck pushes': r'SEARCH t1 USING INDEX panelclient_panel_dirty_retry_at \(panel=\? AND dirty=\?',
    'backfill_panels: buyers missing on a panel': r'SEARCH t1 USING INTEGER PRIMARY KEY \(rowid>\? AND rowid<\?\)',
    'passes: the newest buyer id (an idle round)': r'^SEARCH t1$',
    'announce_new_link: buyers with an old link': r'SEARCH t1 USING INTEGER PRIMARY KEY \(rowid>\? AND rowid<\?\)',
    'send_reminders: due reminders': r'SEARCH t1 USING INDEX user_expires_at \(expires_at>\? AND expires_at<\?\)',
    "push: the buyer's row of a panel (Provisioning._push)":
        r'SEARCH t1 USING INDEX panelclient_user_id_panel \(user_id=\? AND panel=\?\)',
    'push: mark the paid payments provisioned': r'SEARCH payments USING INDEX payment_user_id \(user_id=\?\)',
    'GET /sub: the subId lookup': r'SEARCH t1 USING INDEX user_panel_sub_id \(panel_sub_id=\?\)',
}


def scans_of(sql, params):
    if models.is_sqlite():
        return explain.full_scans(sql, explain.plan(sql, params))
    with models.db.atomic() as transaction:
        models.db.execute_sql('SET LOCAL enable_seqscan = off')
        lines = [row[0] for row in models.db.execute_sql('EXPLAIN ' + sql, params).fetchall()]
        transaction.rollback()
    return explain.full_scans(sql, lines)


def test_the_recorded_queries_are_the_ones_named(database):
    assert [name for name, *_ in seeded()] == NAMES


@pytest.mark.parametrize('name', NAMES)
def test_each_key_query_is_served_by_an_index(database, name, request):
    if name in SCANS_TODAY and models.is_sqlite():
        request.applymarker(pytest.mark.xfail(reason=SCANS_TODAY[name], strict=True))
    sql, params = next((sql, params) for name_, sql, params in seeded() if name_ == name)
    assert scans_of(sql, params) == []
    if models.is_sqlite() and name in SQLITE_INDEX:
        lines = explain.plan(sql, params)
        assert any(re.search(SQLITE_INDEX[name], line) for line in lines), lines
