"""Smoke test of soak/run.py's wave-2 scenarios (issues 12-14): each runs once at a tiny size, so CI proves they
still run and still find 0 lost, 0 double. The figures come from soak/run.py at full size (docs/dev/RELIABILITY.md);
nothing here is timed. Scenarios that do not depend on the database run on one of the two suites only, to keep
the cost of this file under about a minute in all.
"""
import os
import sys

import pytest

import models
from conftest import PG_URL, ROOT
from models import Payment, User
from test_faults import rig  # noqa: F401 (a fixture)

sys.path.insert(0, str(ROOT / 'soak'))
import http_side  # noqa: E402
import several_panels  # noqa: E402
import stars_payments  # noqa: E402

ON_SQLITE, ON_POSTGRES = not PG_URL, bool(PG_URL)


def passes(outcome, rig):
    assert outcome.payments > 0
    assert (outcome.lost, outcome.double, outcome.problems) == (0, 0, []), rig.output()[-5000:]
    assert 'Traceback' not in rig.output()


@pytest.mark.skipif(not ON_SQLITE, reason='run on the SQLite suite only (the cost of this file)')
def test_webhook_mode_race(rig):
    passes(http_side.webhook_mode_race(rig, buyers=1, replays=17, presses=2), rig)


@pytest.mark.skipif(not ON_POSTGRES, reason='several processes need PostgreSQL')
def test_two_processes_through_pgbouncer_with_a_kill(rig):
    via = 'pgbouncer' if os.environ.get('TEST_PGBOUNCER_URL') else 'direct'
    passes(http_side.processes_with_a_kill(rig, processes=2, via=via, buyers=4, poll_seconds=1), rig)


@pytest.mark.skipif(not ON_SQLITE, reason='run on the SQLite suite only (the cost of this file)')
def test_one_of_three_panels_answering_garbage(rig):
    outcome = several_panels.one_panel_failing(rig, fault='garbage', buyers=1, seconds=0)
    passes(outcome, rig)
    # the audit sees a panel ahead of the ledger (a double credit there), on any one of the panels
    invoice_id = Payment.get().invoice_id
    rig.panel.clients[User.get().panel_email]['expiryTime'] += 86_400_000
    assert several_panels.audit_panels(rig, [('Japan', rig.panel)], [invoice_id], 0).double == 1


@pytest.mark.skipif(not ON_POSTGRES, reason='run on the PostgreSQL suite only (the cost of this file)')
def test_a_panel_added_mid_run(rig):
    passes(several_panels.panel_added_mid_run(rig, buyers=2), rig)


@pytest.mark.skipif(not ON_SQLITE, reason='run on the SQLite suite only (the cost of this file)')
@pytest.mark.parametrize('scenario', ['stars_delivered_again', 'stars_dropped', 'stars_refund_twice',
                                      'stars_monthly'])
def test_stars(rig, scenario):
    sizes = {'stars_monthly': {'renewals': 2}}
    outcome = getattr(stars_payments, scenario)(rig, **sizes.get(scenario, {'buyers': 1}))
    passes(outcome, rig)
    # the audit sees days beyond what was paid, and a charge with no payment
    models.grant_days(User.get().id, 1, 'admin', 'soak-audit')
    assert stars_payments.stars_audit(rig, 0).double >= 1
    rig.telegram.charges['stx-never-recorded'] = {**next(iter(rig.telegram.charges.values())), 'refunded': False}
    assert stars_payments.stars_audit(rig, 0).lost >= 1


@pytest.mark.skipif(not ON_POSTGRES, reason='run on the PostgreSQL suite only (the cost of this file)')
def test_stars_kill_before_commit(rig):
    passes(stars_payments.stars_kill_before_commit(rig), rig)
