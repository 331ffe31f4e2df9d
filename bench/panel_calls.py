"""CPU the bot spends per 3x-ui panel operation, through xui.XuiClient (the fake panel runs in its own process).

    .venv/bin/python bench/panel_calls.py [--calls 500] [--generation v3|legacy]
    BENCH_ROOT=/tmp/prev .venv/bin/python bench/panel_calls.py     # the same against another checkout

Times, one after the other on one thread, what a buyer's updates make the panel client do: the traffic
look-up of My subscription (get_traffic) and a renewal (ensure_client with a later expiry, as a credited
promo code or a payment pushes it). Prints wall time, this process's CPU and the panel requests per
operation (counted by the fake), so a change of the client's HTTP library or of its calls shows up here.
"""
import argparse
import multiprocessing
import time
from datetime import datetime, timedelta, timezone

import common

from fake_xui import FakePanel
from xui import XuiClient


def serve(generation, conn):
    """Run the fake panel in this (child) process: send its URL, then its request count on each b'count'."""
    panel = FakePanel(generation=generation, username=common.PANEL_USER, password=common.PANEL_PASSWORD).start()
    conn.send(panel.url)
    while conn.recv() == 'count':
        conn.send(sum(panel.hits.values()))
    panel.stop()


def measure(operation, calls):
    """Return (wall ms, CPU ms) per call of operation(i), after 20 calls of warm-up."""
    for i in range(20):
        operation(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(calls):
        operation(20 + i)
    return (time.perf_counter() - wall) / calls * 1000, (time.process_time() - cpu) / calls * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=500)
    parser.add_argument('--generation', choices=['v3', 'legacy'], default='v3')
    args = parser.parse_args()
    print(f'# panel calls: {common.machine_line()}; checkout {common.ROOT}; {args.generation} panel')
    parent, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context('fork').Process(target=serve, args=(args.generation, child_end), daemon=True)
    child.start()

    def panel_requests():
        parent.send('count')
        return parent.recv()
    try:
        url = parent.recv()
        client = XuiClient(url, 1, common.SUB_URL, username=common.PANEL_USER, password=common.PANEL_PASSWORD)
        expiry = datetime(2031, 1, 1, tzinfo=timezone.utc)
        client.ensure_client('bench@spn', expiry, 'benchsub0000001', 1)
        operations = [
            ('get_traffic (My subscription)', lambda i: client.get_traffic('bench@spn')),
            ('ensure_client renewal (a credited code)',
             lambda i: client.ensure_client('bench@spn', expiry + timedelta(days=i + 1), 'benchsub0000001', 1)),
        ]
        for label, operation in operations:
            before = panel_requests()
            wall, cpu = measure(operation, args.calls)
            per = (panel_requests() - before) / (20 + args.calls)
            print(f'  {label:42} {wall:.3f} ms wall, {cpu:.3f} ms CPU, {per:.1f} panel requests per operation')
    finally:
        parent.send('stop')
        child.join(10)

if __name__ == '__main__':
    main()
