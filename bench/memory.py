"""Resident memory of bot.py: after start, and after 50,000 users in the database and 20,000 handled updates.

    .venv/bin/python bench/memory.py                 # both databases, WORKER_THREADS 24 (the default)
    .venv/bin/python bench/memory.py --db sqlite --threads 32 --updates 5000

RSS is VmRSS of the bot process from /proc (peak: VmHWM), read while it runs against the fake
Bot API process (the throughput mix), the fake panel and Crypto Pay, and a real database.
"""
import argparse
import tempfile
import time
from pathlib import Path

import common
from common import fake_get

import models
from throughput import MIX


def status(pid):
    """Return (VmRSS, VmHWM) of pid in MB."""
    values = {}
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        name, _, rest = line.partition(':')
        if name in ('VmRSS', 'VmHWM'):
            values[name] = int(rest.split()[0]) / 1024
    return values['VmRSS'], values['VmHWM']


def run_bot(url, panel, cryptopay, tmp, args, label, updates, users):
    """Start bot.py, feed it `updates` updates, print RSS after start and at the end."""
    code = f'MEM{int(time.time())}'
    with models.db.connection_context():
        models.PromoCode.create(code=code, days=7, max_uses=10 ** 9)
    tg_args = ['--mix', MIX, '--users', users, '--promo', code, '--total', updates] if updates else []
    tg, tg_url = common.start_telegram_server(*tg_args)
    env = common.bot_env(url, panel, cryptopay, tg_url, Path(tmp) / 'backups', WORKER_THREADS=args.threads,
                         DB_POOL_SIZE=args.threads + 4)
    bot = None
    try:
        bot = common.start_bot(env, Path(tmp) / f'bot-mem-{label}.log', tg_url)
        time.sleep(1)
        started_rss = status(bot.pid)[0]
        began = time.monotonic()
        while updates:
            stats = fake_get(tg_url, '/_bench/stats')
            if stats['done'] >= updates or time.monotonic() - began > args.timeout:
                break
            time.sleep(0.5)
        took = time.monotonic() - began
        time.sleep(1)
        rss, peak = status(bot.pid)
        done = fake_get(tg_url, '/_bench/stats')['done'] if updates else 0
    finally:
        if bot:
            bot.stop()
        tg.stop()
    line = f'  {label:34} RSS after start {started_rss:5.1f} MB'
    if updates:
        line += f'; after {done} updates ({took:.0f} s) {rss:5.1f} MB, peak {peak:5.1f} MB'
    print(line, flush=True)
    return started_rss, rss, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='all', choices=['all', 'sqlite', 'postgresql'])
    parser.add_argument('--users', type=int, default=50_000)
    parser.add_argument('--updates', type=int, default=20_000)
    parser.add_argument('--threads', type=int, default=24)
    parser.add_argument('--timeout', type=float, default=900)
    args = parser.parse_args()
    print(f'# memory: {common.machine_line()}; WORKER_THREADS={args.threads}, DB_POOL_SIZE={args.threads + 4}')
    with tempfile.TemporaryDirectory(prefix='spn-bench-') as tmp, common.databases(args.db, tmp) as dbs:
        panel, cryptopay = common.start_fakes()
        common.fill_panel(panel, common.active_indexes(args.users))
        for kind, make_url, pg in dbs:
            print(f'\n## {kind}')
            url = make_url('bench_memory')
            common.bind(url)
            run_bot(url, panel, cryptopay, tmp, args, 'empty database', 0, 0)
            common.seed(args.users)
            run_bot(url, panel, cryptopay, tmp, args, f'{args.users} users', 0, 0)
            run_bot(url, panel, cryptopay, tmp, args, f'{args.users} users, then updates', args.updates, args.users)
            if not models.db.is_closed():
                models.db.close()
        panel.stop()
        cryptopay.stop()


if __name__ == '__main__':
    main()
