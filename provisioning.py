"""Pushing each buyer's ledger expiry to the panels: one push per client at a time, the expiry guard, the
backoff after a failure, and the panels' state for /panels.

The ledger (models.grant_days) is the truth; a PanelClient row per (buyer, enabled panel) says whether that
panel still has to be told (dirty) and what it was last told (pushed_expiry).
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from datetime import timedelta, timezone

from peewee import Case, fn

import metrics
import models
from models import PAID, PanelClient, Payment, User, transaction, utcnow
from xui import XuiError

log = logging.getLogger('provisioning')

PANEL_BACKOFF_CAP = timedelta(minutes=1)  # the link must follow within about a minute of the panel's return
PUSH_GRACE = 1.0  # seconds the other panels' pushes get once one panel has the days (the link is given then)
PUSH_TRIES = 5  # pushes per call while grants keep landing meanwhile; then the retry job carries on

# One push per client (user, panel) at a time in this process, whichever Shop pushes it (two would race to
# create it); pushes from other processes are made safe by the expiry guard in Provisioning._push.
_PROVISION_LOCKS = [threading.Lock() for _ in range(64)]


def as_aware(moment):
    """Turn a stored naive UTC datetime into an aware one (None stays None)."""
    return moment.replace(tzinfo=timezone.utc) if moment else None


def probe_panel(panel):
    """Ask a panel whether it answers: {'reachable', 'generation', 'error'}."""
    try:
        found = panel.client.check()
    except XuiError as exc:
        return {'reachable': False, 'generation': None, 'error': str(exc)}
    return {'reachable': True, 'generation': found['generation'], 'error': None}


class Provisioning:
    """The pushes to a shop's panels (panels.Panel, enabled or not); one per Shop."""

    def __init__(self, panels):
        self.panels = tuple(panels)
        self.enabled_panels = tuple(panel for panel in self.panels if panel.enabled)
        # panels are pushed side by side, so one that hangs delays only its own copy
        self._pushers = ThreadPoolExecutor(max_workers=4 * max(1, len(self.enabled_panels)),
                                           thread_name_prefix='panel-push')

    def provision(self, user_id, now=None):
        """Push the user's ledger expiry to every enabled panel where it is due, side by side.

        :return: True when at least one panel has the buyer's current days (the link works).
        """
        if len(self.enabled_panels) == 1:  # the common shop: no hand-over to another thread
            return self.provision_on(self.enabled_panels[0], user_id, now)
        futures = [self._pushers.submit(self._push_in_own_connection, panel, user_id, now)
                   for panel in self.enabled_panels]
        for future in as_completed(futures):
            if future.result():
                # the link works now; a panel still pushing (down, hanging) finishes in the background and the
                # retry job catches it up. The others get a moment, so a healthy shop is level when we answer.
                wait(futures, timeout=PUSH_GRACE)
                return True
        return False

    def provision_on(self, panel, user_id, now=None):
        """Push the user's ledger expiry to one panel; return True once that panel matches the ledger."""
        lock = _PROVISION_LOCKS[hash((user_id, panel.name)) % len(_PROVISION_LOCKS)]
        with lock:
            return self._push(panel, user_id, now)

    def _push_in_own_connection(self, panel, user_id, now):
        with models.connection():
            return self.provision_on(panel, user_id, now)

    def _push(self, panel, user_id, now):
        """Push once, guarded by the expiry sent: if a grant landed meanwhile, push again, because
        our older value may have reached the panel after the newer one."""
        stale = False
        for _ in range(PUSH_TRIES):
            user = models.prepared_get(lambda uid: User.select().where(User.id == uid), user_id)
            row = models.prepared_first(lambda uid, name: PanelClient.select().where(
                PanelClient.user == uid, PanelClient.panel == name), user_id, panel.name)
            if user.expires_at is None:
                return True  # no days, nothing to push: the panel matches the ledger
            if row is None:
                return False  # days but no row yet: the backfill of a newly added panel makes it
            if not row.dirty and not stale:
                return row.pushed_expiry == user.expires_at
            try:
                client = panel.client.ensure_client(
                    email=user.panel_email, expiry=as_aware(user.expires_at), sub_id=user.panel_sub_id,
                    tg_id=user.telegram_id)
            except XuiError as exc:
                self.record_failure(row, user, panel, exc, now or utcnow())
                return False
            with transaction():
                # grant_days locks the user row too: the expiry compared here is the one committed
                done = models.locked_expiry(user_id) == user.expires_at
                if done:
                    (PanelClient.update(dirty=False, pushed_expiry=user.expires_at, uuid=client.get('uuid'),
                                        failures=0, retry_at=None, last_error=None, alerted=False)
                     .where(PanelClient.id == row.id).execute())
                    (Payment.update(provisioned_at=now or utcnow())
                     .where(Payment.user == user_id, Payment.status == PAID, Payment.provisioned_at.is_null())
                     .execute())
            if done:
                log.info('panel updated user=%s panel=%s expiry=%s', user.telegram_id, panel.name,
                         user.expires_at.isoformat())
                return True
            stale = True
        return False

    def record_failure(self, row, user, panel, error, now):
        """Count a failed push to one panel, keep its reason, schedule the next try (30 s, then every minute).

        A refusal by the panel itself ("Duplicate email") is kept as the panel's own words and marked, as it
        will not pass by itself; anything else (a timeout, a refused connection) is kept as our description.
        """
        delay = min(timedelta(seconds=30 * 2 ** min(row.failures, 10)), PANEL_BACKOFF_CAP)
        panel_msg = getattr(error, 'panel_msg', None)
        (PanelClient.update(failures=PanelClient.failures + 1, retry_at=now + delay, refused=panel_msg is not None,
                            last_error=(panel_msg if panel_msg is not None else str(error))[:500])
         .where(PanelClient.id == row.id).execute())
        metrics.panel_failed(panel)
        log.warning('panel update failed user=%s panel=%s failures=%s: %s', user.telegram_id, panel.name,
                    row.failures + 1, error)

    def report(self, probe=False):
        """Describe every configured panel for /panels.

        :param probe: also ask each enabled panel (side by side) whether it answers and which API it has
        :return: [{'name','enabled','clients','pending','last_error'} (+ 'reachable','generation','error')]
        """
        probes = {panel.name: self._pushers.submit(probe_panel, panel) for panel in self.enabled_panels} if probe \
            else {}
        counts = {name: (total, pending) for name, total, pending in
                  PanelClient.select(PanelClient.panel, fn.COUNT(PanelClient.id),
                                     fn.SUM(Case(None, [(PanelClient.dirty == True, 1)], 0)))  # noqa: E712
                  .group_by(PanelClient.panel).tuples()}
        report = []
        for panel in self.panels:
            total, pending = counts.get(panel.name, (0, 0))
            last = (PanelClient.select(PanelClient.last_error)
                    .where(PanelClient.panel == panel.name, PanelClient.dirty == True,  # noqa: E712
                           PanelClient.last_error.is_null(False))
                    .order_by(PanelClient.retry_at.desc()).first())
            report.append({'name': panel.name, 'enabled': panel.enabled, 'clients': total,
                           'pending': int(pending or 0), 'last_error': last.last_error if last else None})
            if panel.name in probes:
                report[-1].update(probes[panel.name].result())
        return report
