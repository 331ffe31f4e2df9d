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
import bisect
import inspect
import collections
import os
import statistics
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


def time_panel(panel):
    """Record when the fake panel (in this process) serves each request; return the list of (start, end).

    Monotonic seconds, the clock of tgserver.py's records too (one clock per machine), from the parsed request to
    the written answer: the panel's time, which a real panel spends on its own machine.
    """
    served = []
    serve = panel._serve

    def timed(handler):
        start = time.monotonic()
        try:
            serve(handler)
        finally:
            served.append((start, time.monotonic()))

    panel._serve = timed
    return served


def panel_seconds(intervals, starts, update):
    """Return the seconds the panel served requests while the update was being handled (paced: one at a time).

    intervals: the panel's (start, end) sorted by start; starts: their starts. A request is taken to last < 10 s.
    """
    begin, end = update['delivered'], update['done']
    window = intervals[bisect.bisect_left(starts, begin - 10):bisect.bisect_left(starts, end)]
    return sum(max(0.0, min(stop, end) - max(start, begin)) for start, stop in window)


def summarize(results, warmup, served=None):
    """Return throughput and own-time figures from the fake's per-update records.

    served: the panel's (start, end) times (time_panel), for a paced run: own time is then also given without
    the panel's time (own_nopanel_<kind>).
    """
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
    nopanel = collections.defaultdict(list)
    intervals = sorted(served or ())
    starts = [start for start, _ in intervals]
    for u in done:
        ms = (u['done'] - u['delivered'] - u['api']) * 1000
        own[u['kind']].append(ms)
        own['all'].append(ms)
        e2e.append((u['done'] - u['made']) * 1000)
        if served is not None:
            nopanel[u['kind']].append(ms - panel_seconds(intervals, starts, u) * 1000)
    figures = {'done': len(done), 'made': len(results['updates']), 'rate': rate,
               'errors': sum(u['errors'] for u in results['updates']),
               'calls_per_update': {k: round(sum(u['calls'] + 1 for u in done if u['kind'] == k) /
                                             max(1, len(own[k])), 2) for k in KINDS},
               'e2e_p50': percentile(e2e, 50), 'e2e_p99': percentile(e2e, 99)}
    for kind, values in own.items():
        figures[f'own_{kind}'] = (percentile(values, 50), percentile(values, 99), len(values))
    for kind, values in nopanel.items():
        figures[f'own_nopanel_{kind}'] = (percentile(values, 50), percentile(values, 99), len(values))
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


# Run in another checkout (the baseline) with its own models: its schema is not ours (e.g. before migration 50
# moved the panel columns off users), so it gets a database of its own, seeded and given promo codes by its code.
def forget_qr_photos():
    """Every point renders first-time QR codes (comparable repeats): no stored file_id of an earlier point."""
    if hasattr(models.User, 'qr_file_id'):
        models.User.update(qr_file_id=None, qr_link=None).where(models.User.qr_file_id.is_null(False)).execute()


IN_CHECKOUT = '''import sys
root, url, users, code = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path[:0] = [root, root + '/bench']
import common, models
''' + inspect.getsource(forget_qr_photos) + '''
common.bind(url)
if users:
    common.seed(users)
with models.db.connection_context():
    models.PromoCode.create(code=code, days=7, max_uses=10 ** 9)
    forget_qr_photos()
'''


def in_checkout(root, url, users=0, code='BENCHSEED'):
    """Seed (users > 0) and add the promo code `code` to url's database with the models of the checkout root."""
    subprocess.run([common.python_for(root), '-c', IN_CHECKOUT, str(root), url, str(users), code], check=True,
                   cwd=str(root), stdout=subprocess.DEVNULL)


def run_point(kind, url, pg, panel, cryptopay, tmp, args, threads, latency, run, paced=None,
              variant=('ours', common.ROOT, 'bot.py'), tls=False, served=None):
    """Run one bot process (variant: name, checkout, script) for args.seconds; return its figures.

    url is the variant's own database: ours for ours and the ceiling bot, a copy seeded by its own code for
    another checkout.
    """
    code = f'BENCH{run:04d}'
    if Path(variant[1]) != Path(common.ROOT):
        in_checkout(variant[1], url, code=code)
    else:
        with models.db.connection_context():
            models.PromoCode.create(code=code, days=7, max_uses=10 ** 9)
            forget_qr_photos()
    tg_args = ['--latency', latency, '--mix', args.mix, '--users', args.users, '--offset', run * 5000,
               '--promo', code, '--window', args.window, '--batch', args.batch]
    if paced:
        tg_args += ['--rate', paced[0], '--batch', paced[1]]
    tls_env = {}
    if tls:  # a CA made by tgserver.py for this point, trusted by the bot through the environment
        tls_dir = Path(tmp) / f'tls-{run}'
        tls_dir.mkdir()
        tg_args += ['--tls', tls_dir]
        tls_env = {'SSL_CERT_FILE': tls_dir / 'ca.pem', 'REQUESTS_CA_BUNDLE': tls_dir / 'ca.pem'}
        common.os.environ['SSL_CERT_FILE'] = str(tls_dir / 'ca.pem')  # for this driver's fake_get
    tg, tg_url = common.start_telegram_server(*tg_args)
    env = common.bot_env(url, panel, cryptopay, tg_url, Path(tmp) / 'backups',
                         WORKER_THREADS=threads, DB_POOL_SIZE=threads + 4, **tls_env)
    bot = None
    name, root, script = variant
    try:
        bot = common.start_bot(env, Path(tmp) / f'bot-{kind}-{run}-{name}.log', tg_url, root=root, script=script)
        statements_before = pg_statements(url) if pg else 0
        pids = {'bot': [bot.pid], 'fake telegram': [tg.pid], 'driver+panel': [common.os.getpid()],
                'postgres': pg.server_pids() if pg else []}
        cpu_before = {name: common.cpu_seconds(p) for name, p in pids.items()}
        busy_before = common.busy_seconds()
        profile = None
        if args.profile:
            raw = Path(args.profile_dir) / f'profile-{name}-{kind}-{threads}-{int(latency * 1000)}{"-gil" if args.gil else ""}.txt'
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
    figures = summarize(results, args.warmup, served if paced else None)
    figures.update(threads=threads, latency=latency, wall=wall, rss=rss, variant=name, tls=tls,
                   load=common.load_average(),
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
        print(f'  {kind:10} {f["variant"]:8} threads={f["threads"]:3} latency={f["latency"] * 1000:3.0f}ms  NOTHING DONE')
        return
    own = '  '.join(f'{k} {f[f"own_{k}"][0]:.1f}/{f[f"own_{k}"][1]:.1f}' for k in ('all',) + KINDS
                    if f'own_{k}' in f)
    cpu = ' '.join(f'{name} {value}%' for name, value in f['cpu'].items())
    print(f'  {kind:10} {f["variant"]:8} {"TLS " if f["tls"] else ""}threads={f["threads"]:3} '
          f'latency={f["latency"] * 1000:3.0f}ms  load {f["load"]:.1f}  {f["rate"]:6.1f} updates/s  done {f["done"]}  errors {f["errors"]}  e2e p50/p99 '
          f'{f["e2e_p50"]:.0f}/{f["e2e_p99"]:.0f} ms  RSS {f["rss"]:.0f} MB')
    print(f'             own ms p50/p99: {own}')
    if any(f'own_nopanel_{k}' in f for k in KINDS):
        print('             own ms p50/p99 without the panel\'s time: ' + '  '.join(
            f'{k} {f[f"own_nopanel_{k}"][0]:.1f}/{f[f"own_nopanel_{k}"][1]:.1f} (n={f[f"own_nopanel_{k}"][2]})'
            for k in KINDS if f'own_nopanel_{k}' in f))
    print(f'             CPU (% of one core): {cpu}  | CPU ms/update: '
          + ' '.join(f'{n} {v}' for n, v in f['cpu_ms_per_update'].items())
          + (f'  | SQL statements/update {f["statements_per_update"]}' if f.get('statements_per_update') else ''))
    if f.get('calls_per_update'):
        print('             Bot API calls per update: '
              + '  '.join(f'{k} {v}' for k, v in f['calls_per_update'].items()))
    if 'traceback' in f:
        print('             bot traceback:', f['traceback'][:600])
    if 'profile' in f:
        print(f['profile'])
    sys.stdout.flush()


def spread(values, digits=1):
    """min / median / max of values, as text."""
    if not values:
        return '-'
    ordered = sorted(values)
    return '/'.join(f'{v:.{digits}f}' for v in (ordered[0], statistics.median(ordered), ordered[-1]))


def compare(results, paced):
    """Print each variant's figures over the repeats (min/median/max) and ours as a ratio of the others."""
    ours = results.get('ours', [])
    first = ours[0] if ours else next(iter(results.values()))[0]
    print(f'  == {"paced " if paced else ""}{"TLS" if first["tls"] else "plain HTTP"}, threads {first["threads"]}, '
          f'latency {first["latency"] * 1000:.0f} ms; min/median/max of {len(ours)} runs; load average '
          + spread([f['load'] for figures in results.values() for f in figures]))
    for name, figures in results.items():
        line = (f'     {name:8} updates/s {spread([f["rate"] for f in figures])}  bot CPU ms/update '
                f'{spread([f["cpu_ms_per_update"]["bot"] for f in figures], 2)}  RSS MB '
                f'{spread([f["rss"] for f in figures], 0)}')
        if paced:
            line += '  own p99 ms ' + ' '.join(
                f'{k} {spread([f[f"own_{k}"][1] for f in figures if f"own_{k}" in f])}' for k in KINDS)
            line += '  without the panel ' + ' '.join(
                f'{k} {spread([f[f"own_nopanel_{k}"][1] for f in figures if f"own_nopanel_{k}" in f])}'
                for k in KINDS)
        print(line)
    for name in ('baseline', 'ceiling'):
        if name in results and ours and not paced:  # repeat i of ours against repeat i of the other
            pairs = list(zip(ours, results[name]))
            print(f'     ours / {name:8} updates/s {spread([a["rate"] / b["rate"] for a, b in pairs if b["rate"]], 2)}'
                  + (f'  bot CPU per update {spread([a["cpu_ms_per_update"]["bot"] / b["cpu_ms_per_update"]["bot"] for a, b in pairs if b["cpu_ms_per_update"]["bot"]], 2)}'
                     if name == 'baseline' else ''))
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
    parser.add_argument('--baseline', default=os.environ.get('BENCH_BASELINE', ''), metavar='DIR',
                        help='also run bot.py of this checkout (e.g. git worktree add /tmp/baseline 2751ac3), '
                             'interleaved with ours')
    parser.add_argument('--ceiling', action='store_true',
                        help='also run bench/ceiling_bot.py (same calls, no database, no logic), interleaved')
    parser.add_argument('--repeat', type=int, default=1, help='runs of each point per variant (3 for min/median/max)')
    parser.add_argument('--tls', default='off', choices=['off', 'on', 'both'],
                        help='serve the fake Bot API over HTTPS with a throwaway CA the bot trusts')
    args = parser.parse_args()
    threads_list = [int(n) for n in args.threads.split(',') if n]
    latencies = [float(n) for n in args.latency.split(',') if n]
    tls_modes = {'off': [False], 'on': [True], 'both': [False, True]}[args.tls]
    variants = [('ours', common.ROOT, 'bot.py')]
    if args.baseline:
        variants.append(('baseline', Path(args.baseline).resolve(), 'bot.py'))
    if args.ceiling:
        variants.append(('ceiling', common.ROOT, 'bench/ceiling_bot.py'))
    print(f'# throughput: {common.machine_line()}')
    print(f'# command: {" ".join(sys.argv)}')
    print(f'# variants: ' + ', '.join(f'{name} = {root}/{script}' for name, root, script in variants)
          + f'; each point {args.repeat}x per variant, interleaved (the order rotates each repeat)')
    print(f'# mix {args.mix}; {args.users} users seeded; batches of {args.batch}, window {args.window}; '
          f'{args.seconds:.0f} s per point, first {args.warmup:.0f} s not counted')
    print('# own ms = receipt of the getUpdates reply -> arrival of the last API call, minus the time the fake Bot API '
          'took to answer the calls before it (its added latency included); panel calls count as ours (paced runs also '
          'give it without the time the fake panel, in this driver process, spent serving requests meanwhile)')
    with tempfile.TemporaryDirectory(prefix='spn-bench-') as tmp, common.databases(args.db, tmp) as dbs:
        panel, cryptopay = common.start_fakes()
        common.fill_panel(panel, common.active_indexes(args.users))
        served = time_panel(panel)
        run = 0
        for kind, make_url, pg in dbs:
            url = make_url('bench_throughput')
            common.bind(url)
            seconds = common.seed(args.users)
            print(f'\n## {kind}: seeded {args.users} users in {seconds:.1f} s')
            urls = {name: url for name, _, _ in variants}
            for name, root, _ in variants:
                if Path(root) != Path(common.ROOT):
                    urls[name] = make_url(f'bench_throughput_{name}')
                    started = time.perf_counter()
                    in_checkout(root, urls[name], args.users)
                    print(f'## {kind}: {name} seeded {args.users} users into a database of its own schema in '
                          f'{time.perf_counter() - started:.1f} s')
            points = []
            if not args.no_curve:
                points += [(latency, tls, threads, None) for latency in latencies for tls in tls_modes
                           for threads in threads_list]
            if args.paced:
                rate, batch = (float(x) for x in args.paced.split(':'))
                points += [(latency, tls, args.paced_threads, (rate, int(batch))) for latency in latencies
                           for tls in tls_modes]
            for latency, tls, threads, paced in points:
                if paced:
                    print(f'  paced {paced[0]:.0f} updates/s in batches of {paced[1]}:')
                results = collections.defaultdict(list)
                for repeat in range(args.repeat):
                    turn = repeat % len(variants)
                    for variant in variants[turn:] + variants[:turn]:
                        if paced and variant[0] == 'ceiling':
                            continue
                        run += 1
                        figures = run_point(kind, urls[variant[0]], pg, panel, cryptopay, tmp, args, threads, latency, run,
                                            paced=paced, variant=variant, tls=tls, served=served)
                        show(kind, figures)
                        results[variant[0]].append(figures)
                compare(results, paced)
            models.db.close() if not models.db.is_closed() else None
        panel.stop()
        cryptopay.stop()


if __name__ == '__main__':
    main()
