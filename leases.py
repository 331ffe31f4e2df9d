"""Who runs the scheduled jobs when several bot processes share one database.

Each job has a row in job_leases. A process owns a job while the row names it as holder and
expires_at is in the future; a keeper thread renews its rows every RENEW_SECONDS and takes rows whose
holder stopped renewing (it died) with one guarded UPDATE. Nothing relies on session state (advisory
locks, prepared statements, SET): Neon's pooled endpoint is PgBouncer in transaction mode, where a
session's state can end up on another client. Time comes from this machine's clock (UTC); keep the
machines' clocks in sync (NTP) when processes run on several.

On SQLite only one process may run at all: claim_single_process() holds an exclusive lock on a file
beside the database for the life of the process.
"""
import fcntl
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timedelta

from peewee import InterfaceError, OperationalError

import models
from models import JobLease, utcnow

log = logging.getLogger('leases')

LEASE_SECONDS = 10  # a dead holder's jobs are taken over within this (plus one renewal)
RENEW_SECONDS = 2
NEVER = datetime(1970, 1, 1)

_lock_file = None  # kept open (and so locked) for the life of the process


def claim_single_process(database_url):
    """On SQLite, lock '<database>.lock' or exit 1 with one line when another process holds it."""
    global _lock_file
    if not database_url.startswith('sqlite:'):
        return
    path = database_url.split(':///', 1)[-1].split('?', 1)[0]
    if not path or path == ':memory:':
        return
    lock = open(f'{path}.lock', 'a')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print('error: another bot process already uses this SQLite database; several processes need '
              'PostgreSQL (DATABASE_URL=postgresql://...)', file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    _lock_file = lock


def last_run(name):
    """Return when the named job last ran without an exception (naive UTC), or None (SQL built once: /healthz asks)."""
    row = models.prepared_first(lambda job: JobLease.select(JobLease.ran_at).where(JobLease.name == job), name)
    return row.ran_at if row is not None else None


class JobLeases:
    """This process's leases on the named jobs; owns(name) is what the jobs thread asks before each run."""

    def __init__(self, names, holder=None, ttl=LEASE_SECONDS, clock=utcnow):
        self.names = tuple(names)
        self.holder = holder or f'{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}'
        self.ttl = timedelta(seconds=ttl)
        self.clock = clock
        self._owned = frozenset()
        self._valid_until = 0.0  # monotonic time until which _owned is trustworthy
        self._guard = threading.Lock()
        self._rows_made = False

    def owns(self, name):
        """Tell whether this process may run the job now (False once renewals have failed for too long)."""
        with self._guard:
            return name in self._owned and time.monotonic() < self._valid_until

    def refresh(self, now=None):
        """Renew the leases this process holds and take the expired ones; return the names owned.

        One guarded UPDATE: a row is ours if we hold it already or its holder let it expire.
        """
        now = now or self.clock()
        started = time.monotonic()
        with models.db.connection_context():
            if not self._rows_made:
                JobLease.insert_many([{'name': name} for name in self.names]).on_conflict_ignore().execute()
                self._rows_made = True
            (JobLease.update(holder=self.holder, expires_at=now + self.ttl)
             .where(JobLease.name.in_(self.names),
                    (JobLease.holder == self.holder) | (JobLease.expires_at < now))
             .execute())
            owned = frozenset(name for (name,) in JobLease.select(JobLease.name)
                              .where(JobLease.holder == self.holder, JobLease.name.in_(self.names)).tuples())
        with self._guard:
            taken = owned - self._owned
            lost = self._owned - owned
            self._owned = owned
            # trust the answer for the lease's length, minus a renewal's margin
            self._valid_until = started + self.ttl.total_seconds() - RENEW_SECONDS
        if taken:
            log.info('jobs taken holder=%s: %s', self.holder, ', '.join(sorted(taken)))
        if lost:
            log.warning('jobs lost holder=%s: %s', self.holder, ', '.join(sorted(lost)))
        return owned

    def record_run(self, name, now=None):
        """Record that a job just ran to its end."""
        JobLease.update(ran_at=now or self.clock()).where(JobLease.name == name).execute()

    def release(self):
        """Give every held lease up at once (a clean stop), so another process takes over without waiting."""
        with self._guard:
            self._owned = frozenset()
        with models.db.connection_context():
            JobLease.update(holder='', expires_at=NEVER).where(JobLease.holder == self.holder).execute()

    def start(self, stop):
        """Keep the leases on a daemon thread until the stop Event is set, then release them."""
        def keep():
            while not stop.is_set():
                try:
                    self.refresh()
                except (OperationalError, InterfaceError) as exc:
                    log.warning('job leases not renewed: database unavailable: %s', type(exc).__name__)
                stop.wait(RENEW_SECONDS)
            try:
                self.release()
            except (OperationalError, InterfaceError):
                pass  # they expire by themselves

        try:
            self.refresh()
        except (OperationalError, InterfaceError) as exc:
            log.warning('job leases not taken yet: database unavailable: %s', type(exc).__name__)
        thread = threading.Thread(target=keep, name='leases', daemon=True)
        thread.start()
        return thread
