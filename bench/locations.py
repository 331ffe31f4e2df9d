"""Several panels: the merged /sub feed (cold and cached) and the backfill of a newly added panel.

    .venv/bin/python bench/locations.py                  # both parts
    .venv/bin/python bench/locations.py --sub-only --requests 2000

Prints figures; asserts nothing but the status codes. The panels are the loopback fakes of the tests (3x-ui
over HTTP on 127.0.0.1, each with its subscription server); the database is SQLite in a temp dir. /sub is
timed for a buyer's subId and a made-up one side by side (p50/p90/p99, cold and cached): they should match.
"""
import argparse
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import jobs  # noqa: E402
import models  # noqa: E402
import panels  # noqa: E402
import web  # noqa: E402
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


def bench_sub(requests_count, panel_count, buyers=200):
    """Time GET /sub/{subId} through the WSGI app (our database lookup, then the merged fetch) for buyers'
    subIds (known, 200), buyers no panel has a client for (lapsed, 404) and made-up well-formed subIds
    (unknown, 404), cold (no cache) and cached. Lapsed and unknown get the same body: their times must match.

    The kinds take turns in a shuffled order, so a change in the machine's load falls on all alike.
    """
    started = start_panels(panel_count)
    workdir = tempfile.mkdtemp(prefix='spn-bench-sub-')
    models.connect_database(f'sqlite:///{workdir}/sub.db')
    models.create_schema()
    expiry = datetime.utcnow() + timedelta(days=30)
    known = [f'b{n:015d}' for n in range(buyers)]
    lapsed = [f'l{n:015d}' for n in range(buyers)]
    with models.db.atomic():
        models.User.insert_many([{'telegram_id': 10_000 + n, 'panel_email': f'spn-{10_000 + n}',
                                  'panel_sub_id': sub_id, 'invite_code': f'i{n:011d}', 'expires_at': expiry}
                                 for n, sub_id in enumerate(known + lapsed)]).execute()
    for fake, sub in started:
        client = XuiClient(fake.url, fake.inbound_id, sub.url, username=USER, password=PASSWORD)
        for n, sub_id in enumerate(known):
            client.ensure_client(f'spn-{10_000 + n}', expiry, sub_id, 10_000 + n)
    configs = tuple(PanelConfig(name=f'p{n}', url='http://127.0.0.1:1', inbound_id=1, sub_url=sub.url,
                                username='u', password='p') for n, (_, sub) in enumerate(started))
    settings = SimpleNamespace(webhook_url=None, panels=configs, shop_name='Bench VPN')
    app = web.App(settings, shop=None, messenger=None)
    made_up = random.Random(13)
    alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789'

    def unknown_id():  # the form of our subIds (models.User.panel_sub_id), never one of ours
        return ''.join(made_up.choice(alphabet) for _ in range(16))

    def get(sub_id):
        status = []
        begin = time.perf_counter()
        app({'REQUEST_METHOD': 'GET', 'PATH_INFO': f'/sub/{sub_id}', 'HTTP_ACCEPT': '*/*'},
            lambda line, headers: status.append(line))
        return (time.perf_counter() - begin) * 1000, status[0][:3]

    figures, loads = {}, []
    for phase, cache_seconds in (('cold', 0), ('cached', 3600)):
        app.merger.close()
        app.merger = SubscriptionMerger(configs, 'Bench VPN', cache_seconds=cache_seconds)
        unknown = [unknown_id() for _ in range(buyers)]
        for sub_id in known[:8] + lapsed[:8] + unknown[:8]:  # warm the connections (and, cached, fill the caches)
            get(sub_id)
        if phase == 'cached':
            for sub_id in known + lapsed + unknown:
                get(sub_id)
        loads.append(os.getloadavg()[0])
        times = {'known': [], 'lapsed': [], 'unknown': []}
        order = [('known', known), ('lapsed', lapsed), ('unknown', unknown)]
        for number in range(requests_count):
            made_up.shuffle(order)  # no kind always follows another
            for label, ids in order:
                # cold: every request a fetch (no cache); a fresh made-up id each time, as a scan would send
                sub_id = unknown_id() if (phase, label) == ('cold', 'unknown') else ids[number % len(ids)]
                elapsed, status = get(sub_id)
                assert status == ('200' if label == 'known' else '404'), (phase, label, status)
                times[label].append(elapsed)
        loads.append(os.getloadavg()[0])
        figures[phase] = times
    app.merger.close()
    for fake, sub in started:
        sub.stop()
        fake.stop()
    print(f'GET /sub/{{subId}} through the WSGI app, {panel_count} panels, {requests_count} requests each, '
          f'known = a buyer on every panel (200), lapsed = a buyer on none (404), unknown = a made-up subId '
          f'(404); ms; '
          f'load average {min(loads):.1f}-{max(loads):.1f}')
    print(f'{"":8}{"":9}{"p50":>8}{"p90":>8}{"p99":>8}{"max":>8}')
    for phase, times in figures.items():
        for label, values in times.items():
            print(f'{phase:8}{label:9}' + ''.join(f'{figure:8.2f}' for figure in (
                percentile(values, 0.5), percentile(values, 0.9), percentile(values, 0.99), max(values))))


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
