"""Update throughput and our own time per update through the real path, on SQLite and PostgreSQL.

    .venv/bin/python bench/throughput.py                       # the curve over WORKER_THREADS, 0 and 50 ms
    .venv/bin/python bench/throughput.py --threads 16 --latency 0 --seconds 30 --profile

bot.py runs as a process against the fake Bot API in another process (bench/tgserver.py, batches
of 100 updates, at most --window unanswered), the fake panel and Crypto Pay in this one, and a
real database holding --users seeded users. Saturated points give updates/s; --paced points feed
single updates at a low rate, so own time (receipt -> last API call, minus the API's added
latency) is the bot's service time without queueing. CPU seconds per process tell what binds.
"""
import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import fake_get, percentile

import models

MIX = 'start:25,menu:40,sub:15,promo:20'
KINDS = ('start', 'menu', 'sub', 'promo')


def summarize(results, warmup):
    """Return throughput and own-time figures from the fake's per-update records."""
    latency = results['latency']
    done = [u for u in results['updates'] if u['done'] is not None and u['delivered'] is not None]
    if not done:
        return {'done': 0}
    ends = sorted(u['done'] for u in done)
    start = ends[0] + warmup
    counted = [t for t in ends if t >= start]
    rate = (len(counted) - 1) / (counted[-1] - counted[0]) if len(counted) > 1 and counted[-1] > counted[0] else 0
    own = collections.defaultdict(list)
    e2e = []
    for u in done:
        ms = (u['done'] - u['delivered'] - u['api']) * 1000
        own[u['kind']].append(ms)
        own['all'].append(ms)
        e2e.append((u['done'] - u['made']) * 1000)
    figures = {'done': len(done), 'made': len(results['updates']), 'rate': rate,
               'errors': sum(u['errors'] for u in results['updates']),
               'calls_per_update': {k: round(sum(u['calls'] + 1 for u in done if u['kind'] == k) /
                                             max(1, len(own[k])), 2) for k in KINDS},
               'e2e_p50': percentile(e2e, 50), 'e2e_p99': percentile(e2e, 99)}
    for kind, values in own.items():
        figures[f'own_{kind}'] = (percentile(values, 50), percentile(values, 99), len(values))
    return figures


def pg_statements(url):
    """Return the total statements PostgreSQL has run on this database (pg_stat_statements)."""
    import psycopg2
    connection = psycopg2.connect(url)
    with connection.cursor() as cursor:
        cursor.execute('SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements s JOIN pg_database d '
                       'ON d.oid = s.dbid WHERE d.datname = current_database()')
        total = cursor.fetchone()[0]
    connection.close()
    return int(total)


def summarize_profile(raw_path, top=25):
    """Print the hottest functions (inclusive and self) from a py-spy raw (collapsed) profile."""
    inclusive, own = collections.Counter(), collections.Counter()
    total = 0
    for line in Path(raw_path).read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        if not count.isdigit():
            continue
        count = int(count)
        total += count
        frames = [frame.split(' (')[0] + ' (' + frame.split(' (')[-1].split(':')[0].split('/')[-1] + ')'
                  if ' (' in frame else frame for frame in stack.split(';')[1:]]
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    lines = [f'  py-spy samples: {total}', '  inclusive (share of samples) / self:']
    for frame, count in inclusive.most_common(top):
        lines.append(f'    {100 * count / total:5.1f}%  {100 * own[frame] / total:5.1f}%  {frame}')
    return '\n'.join(lines)


def run_point(kind, url, pg, panel, cryptopay, tmp, args, threads, latency, run, paced=None):
    """Run one bot process for args.seconds; return its figures."""
    code = f'BENCH{run:04d}'
    with models.db.connection_context():
        models.PromoCode.create(code=code, days=7, max_uses=10 ** 9)
    tg_args = ['--latency', latency, '--mix', args.mix, '--users', args.users, '--offset', run * 5000,
               '--promo', code, '--window', args.window, '--batch', args.batch]
    if paced:
        tg_args += ['--rate', paced[0], '--batch', paced[1]]
    tg, tg_url = common.start_telegram_server(*tg_args)
    env = common.bot_env(url, panel, cryptopay, tg_url, Path(tmp) / 'backups',
                         WORKER_THREADS=threads, DB_POOL_SIZE=threads + 4)
    bot = None
    try:
        bot = common.start_bot(env, Path(tmp) / f'bot-{kind}-{run}.log', tg_url)
        statements_before = pg_statements(url) if pg else 0
        pids = {'bot': [bot.pid], 'fake telegram': [tg.pid], 'driver+panel': [common.os.getpid()],
                'postgres': pg.server_pids() if pg else []}
        cpu_before = {name: common.cpu_seconds(p) for name, p in pids.items()}
        busy_before = common.busy_seconds()
        profile = None
        if args.profile:
            raw = Path(args.profile_dir) / f'profile-{kind}-{threads}-{int(latency * 1000)}{"-gil" if args.gil else ""}.txt'
            raw.parent.mkdir(parents=True, exist_ok=True)
            profile = (subprocess.Popen(['py-spy' if not Path(common.PYTHON).with_name('py-spy').exists()
                                         else str(Path(common.PYTHON).with_name('py-spy')), 'record', '-p',
                                         str(bot.pid), '-d', str(int(max(1, args.seconds - 2))), '-r', '100', '-f',
                                         'raw', '-o', str(raw)] + (['--gil'] if args.gil else []),
                                        stdout=subprocess.DEVNULL, stderr=open(str(raw) + '.err', 'w')), raw)
        started = time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - started
        cpu = {name: common.cpu_seconds(p) - cpu_before[name] for name, p in pids.items()}
        cpu['other processes'] = max(0.0, common.busy_seconds() - busy_before - sum(cpu.values()))
        rss = common.rss_mb(bot.pid)
        results = fake_get(tg_url, '/_bench/results', timeout=60)
        statements = pg_statements(url) - statements_before if pg else None
        if profile:
            profile[0].wait(60)
    finally:
        output = bot.stop() if bot else ''
        tg.stop()
    figures = summarize(results, args.warmup)
    figures.update(threads=threads, latency=latency, wall=wall, rss=rss,
                   cpu={name: round(value / wall * 100) for name, value in cpu.items()},
                   cpu_ms_per_update={name: round(value * 1000 / max(1, figures['done']), 2)
                                      for name, value in cpu.items()},
                   statements_per_update=round(statements / max(1, figures['done']), 1) if statements else None)
    if 'Traceback' in output:
        figures['traceback'] = output[output.index('Traceback'):][:1500]
    if profile and profile[1].exists():
        figures['profile'] = summarize_profile(profile[1], args.top)
    return figures


def show(kind, f):
    if not f.get('done'):
        print(f'  {kind:10} threads={f["threads"]:3} latency={f["latency"] * 1000:3.0f}ms  NOTHING DONE')
        return
    own = '  '.join(f'{k} {f[f"own_{k}"][0]:.1f}/{f[f"own_{k}"][1]:.1f}' for k in ('all',) + KINDS
                    if f'own_{k}' in f)
    cpu = ' '.join(f'{name} {value}%' for name, value in f['cpu'].items())
    print(f'  {kind:10} threads={f["threads"]:3} latency={f["latency"] * 1000:3.0f}ms  '
          f'{f["rate"]:6.1f} updates/s  done {f["done"]}  errors {f["errors"]}  e2e p50/p99 '
          f'{f["e2e_p50"]:.0f}/{f["e2e_p99"]:.0f} ms  RSS {f["rss"]:.0f} MB')
    print(f'             own ms p50/p99: {own}')
    print(f'             CPU (% of one core): {cpu}  | CPU ms/update: '
          + ' '.join(f'{n} {v}' for n, v in f['cpu_ms_per_update'].items())
          + (f'  | SQL statements/update {f["statements_per_update"]}' if f.get('statements_per_update') else ''))
    if 'traceback' in f:
        print('             bot traceback:', f['traceback'][:600])
    if 'profile' in f:
        print(f['profile'])
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='all', choices=['all', 'sqlite', 'postgresql'])
    parser.add_argument('--users', type=int, default=50_000)
    parser.add_argument('--threads', default='1,2,4,8,16,32,64')
    parser.add_argument('--latency', default='0,0.05', help='seconds added to every Bot API call')
    parser.add_argument('--seconds', type=float, default=20, help='length of each saturated point')
    parser.add_argument('--warmup', type=float, default=3, help='seconds of each point not counted')
    parser.add_argument('--window', type=int, default=200)
    parser.add_argument('--batch', type=int, default=100)
    parser.add_argument('--mix', default=MIX)
    parser.add_argument('--paced', default='20:1', help='rate:batch of the own-time runs ("" to skip)')
    parser.add_argument('--paced-threads', type=int, default=16)
    parser.add_argument('--no-curve', action='store_true', help='only the paced own-time runs')
    parser.add_argument('--profile', action='store_true', help='py-spy the bot during each point')
    parser.add_argument('--profile-dir', default='/tmp/spn-bench-profiles', help='where raw py-spy profiles go')
    parser.add_argument('--top', type=int, default=25, help='functions shown from each profile')
    parser.add_argument('--gil', action='store_true', help='with --profile: only samples holding the GIL')
    args = parser.parse_args()
    threads_list = [int(n) for n in args.threads.split(',') if n]
    latencies = [float(n) for n in args.latency.split(',') if n]
    print(f'# throughput: {common.machine_line()}')
    print(f'# mix {args.mix}; {args.users} users seeded; batches of {args.batch}, window {args.window}; '
          f'{args.seconds:.0f} s per point, first {args.warmup:.0f} s not counted')
    print('# own ms = receipt of the getUpdates reply -> arrival of the last API call, minus the time the fake Bot API '
          'took to answer the calls before it (its added latency included); panel calls count as ours')
    with tempfile.TemporaryDirectory(prefix='spn-bench-') as tmp, common.databases(args.db, tmp) as dbs:
        panel, cryptopay = common.start_fakes()
        common.fill_panel(panel, common.active_indexes(args.users))
        run = 0
        for kind, make_url, pg in dbs:
            url = make_url('bench_throughput')
            common.bind(url)
            seconds = common.seed(args.users)
            print(f'\n## {kind}: seeded {args.users} users in {seconds:.1f} s')
            if not args.no_curve:
                for latency in latencies:
                    for threads in threads_list:
                        run += 1
                        show(kind, run_point(kind, url, pg, panel, cryptopay, tmp, args, threads, latency, run))
            if args.paced:
                rate, batch = (float(x) for x in args.paced.split(':'))
                for latency in latencies:
                    run += 1
                    print(f'  paced {rate:.0f} updates/s in batches of {batch:.0f}:')
                    show(kind, run_point(kind, url, pg, panel, cryptopay, tmp, args, args.paced_threads, latency,
                                         run, paced=(rate, int(batch))))
            models.db.close() if not models.db.is_closed() else None
        panel.stop()
        cryptopay.stop()


if __name__ == '__main__':
    main()
