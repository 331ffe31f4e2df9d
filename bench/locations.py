"""Several panels: the merged /sub feed (cold and cached) and the backfill of a newly added panel.

    .venv/bin/python bench/locations.py                  # both parts
    .venv/bin/python bench/locations.py --sub-only --requests 2000

Prints figures; asserts nothing. The panels are the loopback fakes of the tests (3x-ui over HTTP on
127.0.0.1, each with its subscription server); the database is SQLite in a temp dir.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import jobs  # noqa: E402
import models  # noqa: E402
import panels  # noqa: E402
from fake_subserver import FakeSubServer  # noqa: E402
from fake_xui import FakePanel  # noqa: E402
from panels import PanelConfig  # noqa: E402
from shop import Shop  # noqa: E402
from subscription import SubscriptionMerger  # noqa: E402
from xui import XuiClient  # noqa: E402

USER, PASSWORD = 'admin', 'bench-pw'


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def start_panels(count):
    started = []
    for number in range(count):
        fake = FakePanel(generation='v3' if number % 2 else 'legacy', username=USER, password=PASSWORD).start()
        sub = FakeSubServer(fake, host=f'node{number}.example.test').start()
        started.append((fake, sub))
    return started


def bench_sub(requests_count, panel_count):
    """Time merger.response for one buyer on every panel: cold (no cache) and cached."""
    started = start_panels(panel_count)
    sub_id = 'benchsubscription'
    expiry = datetime.utcnow() + timedelta(days=30)
    for fake, sub in started:
        XuiClient(fake.url, fake.inbound_id, sub.url, username=USER, password=PASSWORD).ensure_client(
            'spn-1', expiry, sub_id, 1)
    configs = [PanelConfig(name=f'p{n}', url='http://127.0.0.1:1', inbound_id=1, sub_url=sub.url,
                           username='u', password='p') for n, (_, sub) in enumerate(started)]
    figures = {}
    for label, cache_seconds in (('cold', 0), ('cached', 3600)):
        merger = SubscriptionMerger(configs, 'Bench VPN', cache_seconds=cache_seconds)
        merger.response(sub_id, expiry)  # warm the connections
        times = []
        for _ in range(requests_count):
            begin = time.perf_counter()
            status, _, _ = merger.response(sub_id, expiry)
            times.append((time.perf_counter() - begin) * 1000)
            assert status == 200
        merger.close()
        figures[label] = times
    for fake, sub in started:
        sub.stop()
        fake.stop()
    load = os.getloadavg()[0]
    for label, times in figures.items():
        print(f'/sub feed, {panel_count} panels, {label:6}: p50 {statistics.median(times):7.2f} ms  '
              f'p99 {percentile(times, 0.99):7.2f} ms  max {max(times):7.2f} ms  ({len(times)} requests, '
              f'load average {load:.1f})')


def bench_backfill(buyers, seconds):
    """Add a panel to a shop of `buyers` active buyers and run the backfill and push jobs as the scheduler would."""
    workdir = tempfile.mkdtemp(prefix='spn-bench-')
    models.connect_database(f'sqlite:///{workdir}/bench.db')
    models.create_schema()
    now = datetime.utcnow()
    with models.db.atomic():
        rows = [{'telegram_id': 10_000 + n, 'panel_email': f'spn-{10_000 + n}', 'panel_sub_id': f's{n:015d}',
                 'invite_code': f'i{n:011d}', 'expires_at': now + timedelta(days=30)} for n in range(buyers)]
        for start in range(0, len(rows), 500):
            models.User.insert_many(rows[start:start + 500]).execute()
    fake = FakePanel(generation='v3', username=USER, password=PASSWORD).start()
    config = PanelConfig(name='New', url=fake.url, inbound_id=fake.inbound_id, sub_url='https://new.example.test/sub/',
                         username=USER, password=PASSWORD)

    class Settings:  # the shop reads only these here
        public_url = 'https://shop.example.test'
        admin_ids = ()

    shop = Shop(Settings(), panels.connect([config], lambda c: XuiClient(c.url, c.inbound_id, c.sub_url,
                                                                          username=USER, password=PASSWORD)), None)
    begin = time.monotonic()
    rounds = 0
    requests_before = sum(fake.hits.values())
    # the scheduler runs both jobs every 20 s; here a round starts as soon as the last one ends, so the
    # figure is the ceiling of the pace, and the scheduled pace is BACKFILL_PER_ROUND per 20 s
    while time.monotonic() - begin < seconds:
        jobs.backfill_panels(shop, now=now)
        jobs.retry_panel(shop, shop.enabled_panels[0], datetime.utcnow())
        rounds += 1
        if models.PanelClient.select().where(models.PanelClient.dirty == False).count() >= buyers:  # noqa: E712
            break
    elapsed = time.monotonic() - begin
    pushed = models.PanelClient.select().where(models.PanelClient.dirty == False).count()  # noqa: E712
    requests = sum(fake.hits.values()) - requests_before
    fake.stop()
    print(f'backfill: {pushed} of {buyers} buyers onto a new panel in {rounds} rounds, {elapsed:.1f} s back to back: '
          f'{pushed / elapsed:.0f} buyers/s, {requests / elapsed:.0f} panel requests/s '
          f'({requests / max(pushed, 1):.1f} per buyer); scheduled: {jobs.BACKFILL_PER_ROUND} per 20 s round = '
          f'{jobs.BACKFILL_PER_ROUND / 20:.0f} buyers/s, {jobs.BACKFILL_PER_ROUND / 20 * requests / max(pushed, 1):.0f} '
          f'panel requests/s; load average {os.getloadavg()[0]:.1f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--requests', type=int, default=1000)
    parser.add_argument('--panels', type=int, default=3)
    parser.add_argument('--buyers', type=int, default=2000)
    parser.add_argument('--seconds', type=float, default=120)
    parser.add_argument('--sub-only', action='store_true')
    args = parser.parse_args()
    bench_sub(args.requests, args.panels)
    if not args.sub_only:
        bench_backfill(args.buyers, args.seconds)


if __name__ == '__main__':
    main()
