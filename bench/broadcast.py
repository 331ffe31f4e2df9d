"""/broadcast through the real bot: the sustained send rate, its peak in any one second, and lost messages.

    .venv/bin/python bench/broadcast.py                       # 3,000 users, both databases
    .venv/bin/python bench/broadcast.py --db sqlite --users 1000 --flood-every 0 --latency 0.05

The admin sends /broadcast to bot.py; the fake Bot API process answers 429 (retry_after 1) to any
send past 30 in a second, as Telegram does, and in the second scenario also forces a 429
(retry_after --flood-retry-after) on every --flood-every-th send. A message is lost when a chat
that should get it never gets a 200. 50,000 users take 50,000 / rate seconds: the figure for them
is extrapolated from the measured rate (the pacing does not depend on the number of users).
"""
import argparse
import collections
import tempfile
import time
from pathlib import Path

import common
from common import fake_get, fake_post

ADMIN = {'id': common.ADMIN_ID, 'first_name': 'Boss', 'username': 'boss', 'language_code': 'en'}


def window_peak(times, width=1.0):
    """Return the most events inside any window of `width` seconds."""
    peak, start = 0, 0
    for end in range(len(times)):
        while times[end] - times[start] > width:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


def scenario(url, panel, cryptopay, tmp, args, label, flood_every):
    expected = {common.USER_BASE + i for i in range(args.users) if not i % 50 == 49}  # seeded blocked: skipped
    tg, tg_url = common.start_telegram_server('--add-users', args.users, '--max-sends', 30, '--latency', args.latency,
                                              '--flood-every', flood_every,
                                              '--flood-retry-after', args.flood_retry_after)
    env = common.bot_env(url, panel, cryptopay, tg_url, Path(tmp) / 'backups')
    bot = None
    try:
        bot = common.start_bot(env, Path(tmp) / f'bot-broadcast-{flood_every}.log', tg_url)
        fake_post(tg_url, '/_bench/send', {'user': ADMIN, 'text': '/broadcast Hello from the benchmark'})
        began = time.monotonic()
        last, last_change = -1, time.monotonic()
        while time.monotonic() - began < args.timeout:
            sent = fake_get(tg_url, '/_bench/stats')['sends']
            if sent != last:
                last, last_change = sent, time.monotonic()
            elif time.monotonic() - last_change > 15:  # nothing for 15 s: finished (or stuck)
                break
            time.sleep(1)
        results = fake_get(tg_url, '/_bench/results', timeout=120)
    finally:
        output = bot.stop() if bot else ''
        tg.stop()
    sends = sorted(results['sends'])
    ok = [t for t, chat, status in sends if status == 200]
    delivered = {chat for t, chat, status in sends if status == 200}
    throttled = sum(1 for _, _, status in sends if status == 429)
    lost = len(expected - delivered)
    duplicates = len(ok) - len(delivered)
    span = ok[-1] - ok[0] if len(ok) > 1 else 0
    rate = (len(ok) - 1) / span if span else 0
    per_ten = collections.Counter(int((t - ok[0]) // 10) for t in ok)
    steady = [n / 10 for k, n in sorted(per_ten.items())[1:-1]]
    finished = 'Broadcast finished' in output or 'broadcast finished' in output
    print(f'  {label:28} {len(delivered)}/{len(expected)} delivered, lost {lost}, duplicates {duplicates}, '
          f'429 answers {throttled}; {rate:.2f} messages/s sustained over {span:.0f} s '
          f'(10 s windows {min(steady, default=0):.1f}..{max(steady, default=0):.1f}); '
          f'peak {window_peak(ok)} sends in any 1 s (all attempts: {window_peak([t for t, _, _ in sends])}); '
          f'50,000 users would take {50000 / rate / 60:.0f} min' + ('' if finished else ' [no "finished" log line]'),
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='all', choices=['all', 'sqlite', 'postgresql'])
    parser.add_argument('--users', type=int, default=3000)
    parser.add_argument('--flood-every', type=int, default=300, help='the second scenario: a 429 every Nth send')
    parser.add_argument('--flood-retry-after', type=int, default=2)
    parser.add_argument('--latency', type=float, default=0.0, help='seconds added to every Bot API call')
    parser.add_argument('--timeout', type=float, default=1200)
    args = parser.parse_args()
    print(f'# broadcast: {common.machine_line()}; {args.users} users; {args.latency * 1000:.0f} ms added to every '
          'Bot API call')
    with tempfile.TemporaryDirectory(prefix='spn-bench-') as tmp, common.databases(args.db, tmp) as dbs:
        panel, cryptopay = common.start_fakes()
        for kind, make_url, pg in dbs:
            print(f'\n## {kind}')
            url = make_url('bench_broadcast')
            common.bind(url)
            common.seed(args.users)
            scenario(url, panel, cryptopay, tmp, args, "Telegram's 30/s limit", 0)
            if args.flood_every:
                scenario(url, panel, cryptopay, tmp, args,
                         f'+ 429 every {args.flood_every}th send', args.flood_every)
        panel.stop()
        cryptopay.stop()


if __name__ == '__main__':
    main()
