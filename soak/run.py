"""Soak: run every fault scenario N times against the real bot and print the table of docs/dev/RELIABILITY.md.

    .venv/bin/python soak/run.py                       # SQLite, 3 runs of each scenario
    .venv/bin/python soak/run.py --postgres --runs 5   # on a throwaway PostgreSQL, as scripts/test.sh makes
    .venv/bin/python soak/run.py --only kill --runs 10 # the scenarios whose name contains "kill"
    .venv/bin/python soak/run.py --panel-version 3.1.0 # the fake 3x-ui panel in another release's shape

The scenarios are tests/test_faults.py's, in real time where CI uses a simulated clock: bot.py runs as a
process, the fakes break and heal, and the bot recovers on its own schedule (the restarted sender of a
killed link message waits out its 2-minute lease). Lost: paid, but not settled, credited, on the panel
with the ledger's expiry and told to the buyer. Double: days beyond what was paid, or a panel ahead of
the ledger. Recovery: from the end of the fault (for races, from the start) until every buyer had their
link. Progress and failures go to stderr, the markdown table to stdout.

The wave-2 scenarios (webhook mode, several processes, several panels, Telegram Stars) are in soak/http_side.py,
soak/several_panels.py and soak/stars_payments.py;
tests/test_soak.py runs each once at a tiny size in CI. With --postgres a PgBouncer in transaction mode is
started in front of the server for the rows "through PgBouncer" (skipped when pgbouncer is not installed).
"""
import argparse
import contextlib
import functools
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import cryptobot  # noqa: E402
import models  # noqa: E402
import xui  # noqa: E402
from conftest import clear_database  # noqa: E402
from models import PanelClient, User  # noqa: E402
from test_e2e import ask, buy, invoice_id_of, person  # noqa: E402
from fake_xui import NEWEST, VERSIONS  # noqa: E402
from test_faults import (BUSY, CRASH_POINTS, Outcome, audit, crash, crash_during_check_then_press_again,  # noqa: E402
                         database_outage, long_panel_outage, make_rig, panel_outage,
                         panel_session_expiry, postgres_restart, race_checks_in_threads, race_poller_and_presses,
                         race_presses_through_bot, race_two_bots, start_cryptopay_fault, start_panel_fault, told,
                         wait_until)
from test_web import race_webhooks_and_the_poller  # noqa: E402
import http_side  # noqa: E402  (this folder: the scenarios of issue 12)
import several_panels  # noqa: E402  (issue 13)
import stars_payments  # noqa: E402  (issue 14)

FUZZ_PROPERTIES = 5  # the @given tests in tests/test_fuzz.py


def panel_outage_live(rig, fault, seconds=30):
    """bot.py settles a payment while the panel is broken, keeps answering, and finishes once it heals."""
    rig.start_bot(PAYMENT_POLL_SECONDS=1)
    buyer = person(8001)
    invoice = buy(rig.telegram, buyer)
    invoice_id = invoice_id_of(rig.telegram, invoice)
    # bot.py's panel client tries each call 3 times and reads for xui.TIMEOUT[1] seconds
    start_panel_fault(rig.panel, fault, tries=3, hang=xui.TIMEOUT[1] + 5)
    rig.cryptopay.pay(invoice_id)
    wait_until(lambda: PanelClient.select().join(User).where(User.telegram_id == 8001, PanelClient.failures > 0)
               .exists(), 60, 'the panel failing the bot')
    assert 'Hi, Alice' in ask(rig.telegram, buyer, '/start')['text']
    if fault == 'refused':
        time.sleep(seconds)
        rig.panel.accept()
    healed = time.monotonic()
    wait_until(lambda: told(invoice_id), 600, 'the buyer told after the panel healed')
    return audit(rig, [invoice_id], time.monotonic() - healed)


def cryptopay_outage_live(rig, fault, requests):
    """A buyer pays and presses Check while Crypto Pay fails bot.py's next `requests` calls."""
    rig.start_bot(PAYMENT_POLL_SECONDS=1)
    buyer = person(8101)
    invoice = buy(rig.telegram, buyer)
    invoice_id = invoice_id_of(rig.telegram, invoice)
    asked = len(rig.cryptopay.calls)
    start_cryptopay_fault(rig.cryptopay, fault, requests, hang=cryptobot.DEFAULT_TIMEOUT[1] + 2)
    rig.cryptopay.pay(invoice_id)
    update_id = rig.telegram.press(buyer, invoice, f'check:{invoice_id}')
    answer = rig.telegram.wait_for_answer(update_id, timeout=300)['text']
    assert answer is None or BUSY in answer, answer  # settled, or a clear "try again"
    wait_until(lambda: len(rig.cryptopay.calls) >= asked + requests, 600, 'the outage running its course')
    healed = time.monotonic()
    wait_until(lambda: told(invoice_id), 120, 'the buyer told after Crypto Pay healed')
    return audit(rig, [invoice_id], time.monotonic() - healed)


def postgres_restart_noted(rig):
    outcome, answers = postgres_restart(rig)
    outcome.notes = f'{len(answers) - 1} busy answer(s) after the restart'
    return outcome


# (name, scenario(rig) -> Outcome, clock, PostgreSQL only)
SCENARIOS = [
    ('race: 50 Check presses at once, 50 threads with their own Shop', race_checks_in_threads, 's', False),
    ('race: 50 Check presses queued at once to bot.py', race_presses_through_bot, 's', False),
    ('race: 2 pollers and 50 presses at once, 5 invoices', race_poller_and_presses, 's', False),
    ('race: 2 bot.py processes polling 200 paid invoices (50 buyers)', race_two_bots, 's', True),
    ('race: Crypto Pay webhook x17 per invoice at once, poller on, 5 invoices', race_webhooks_and_the_poller, 's',
     False),
    *[(f'kill -9: {label}', functools.partial(crash, point=point, real_lease=True), 's', False)
      for point, label in zip(CRASH_POINTS, (
          'invoice paid, bot.py waiting on Crypto Pay', 'settled, before the panel call',
          'inside the panel write (applied, unanswered)', 'panel answered, before recording it',
          'link claimed, before the message (2 min lease)'))],
    ('kill -9: inside a Check press, buyer presses again', crash_during_check_then_press_again, 's', False),
    ('panel refusing connections for 30 s', functools.partial(panel_outage_live, fault='refused'), 's', False),
    ('panel hanging past the read timeout', functools.partial(panel_outage_live, fault='hang'), 's', False),
    ('panel answering 500', functools.partial(panel_outage_live, fault='http_500'), 's', False),
    ('panel answering success:false', functools.partial(panel_outage_live, fault='success_false'), 's', False),
    ('panel session expiring mid-run', panel_session_expiry, 's', False),
    ('panel refusing connections for 2 min, jobs on a simulated clock',
     functools.partial(panel_outage, fault='refused'), 's simulated', False),
    ('panel refusing connections for 2 min during a renewal, jobs on a simulated clock',
     functools.partial(panel_outage, fault='refused', returning=True), 's simulated', False),
    ('panel down 10 min, jobs on a simulated clock', long_panel_outage, 's simulated', False),
    ('Crypto Pay answering 503', functools.partial(cryptopay_outage_live, fault='http_5xx', requests=8), 's', False),
    ('Crypto Pay answering 429, Retry-After 7 s',
     functools.partial(cryptopay_outage_live, fault='rate_limited', requests=4), 's', False),
    ('Crypto Pay hanging past the read timeout',
     functools.partial(cryptopay_outage_live, fault='hang', requests=4), 's', False),
    ('database unreachable (handlers and poller in-process)', database_outage, 's', False),
    ('PostgreSQL restarted while bot.py serves', postgres_restart_noted, 's', True),
    # wave 2, issue 12: the HTTP side and several processes
    ('webhook mode: 5 buyers, Crypto Pay webhook x17 each, Check presses and the poller at once',
     http_side.webhook_mode_race, 's', False),
    *[(f'{n} bot.py processes {via}, 30 buyers, kill -9 of the job holder halfway',
       functools.partial(http_side.processes_with_a_kill, processes=n, via=via.split()[-1]), 's', True)
      for n in (2, 3) for via in ('direct', 'through PgBouncer')],
    # wave 2, issue 13: one of three panels (legacy, v3.1.0, newest) failing, then back
    *[(f'3 panels, one {label} for 30 s after the links', functools.partial(several_panels.one_panel_failing, fault=fault),
       's', False) for fault, label in (('down', 'refusing connections'), ('hang', 'hanging past the read timeout'),
                                        ('garbage', 'answering an HTML page'),
                                        ('refusing', 'answering success:false'))],
    ('a third panel added mid-run: backfill of 10 paid buyers, 10 more paying', several_panels.panel_added_mid_run, 's',
     False),
    # wave 2, issue 14: Telegram Stars
    ('Stars: successful_payment delivered 3 times, recovery job every second (5 buyers)',
     stars_payments.stars_delivered_again, 's', False),
    ('Stars: successful_payment dropped, recovered by the job (5 buyers)', stars_payments.stars_dropped, 's', False),
    ('Stars: kill -9 between the charge and our commit', stars_payments.stars_kill_before_commit, 's', False),
    ('Stars: each of 3 charges refunded twice', stars_payments.stars_refund_twice, 's', False),
    ('Stars: a monthly subscription renewed 3 times, every other update dropped', stars_payments.stars_monthly, 's', False),
]


def run_scenario(scenario, database_url, panel_version=NEWEST):
    """Run one scenario on an empty database and fresh fakes; a failed assertion is a failed run."""
    clear_database()
    try:
        with tempfile.TemporaryDirectory(prefix='spn-soak-') as scratch, \
                make_rig(database_url, scratch, panel_version) as rig:
            try:
                return scenario(rig), None
            except Exception:  # noqa: BLE001 — reported as a failed run, with the bots' logs
                return None, f'{traceback.format_exc()}\n{rig.output()[-5000:]}'
    finally:
        if hasattr(models.db.obj, 'close_idle'):
            models.db.obj.close_idle()  # leave the server's connections to the next run's bots


def hostile_input(database_url, examples):
    """Run tests/test_fuzz.py with up to `examples` per property; return (updates tried, failed tests)."""
    env = {**os.environ, 'FUZZ_EXAMPLES': str(examples)}
    env.pop('TEST_DATABASE_URL', None)
    if database_url.startswith('postgres'):
        env['TEST_DATABASE_URL'] = database_url
    result = subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_fuzz.py', '-o', 'addopts=', '-q',
                             '-p', 'no:cacheprovider', '--hypothesis-show-statistics'],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    generated = sum(int(n) for n in re.findall(r'(\d+) passing,', result.stdout))
    passed = sum(int(n) for n in re.findall(r'(\d+) passed', result.stdout))
    failed = sum(int(n) for n in re.findall(r'(\d+) (?:failed|error)', result.stdout))
    if result.returncode:
        print(result.stdout[-5000:], file=sys.stderr)
    return generated + passed + failed - FUZZ_PROPERTIES, failed


def row(name, runs, failed, outcomes, clock):
    payments = sum(o.payments for o in outcomes)
    lost, double = sum(o.lost for o in outcomes), sum(o.double for o in outcomes)
    slowest = max(outcomes, key=lambda o: o.recovery, default=Outcome())
    recovery = f'{slowest.recovery:.1f} {clock}' if payments else 'n/a'
    return f'| {name} | {runs} | {failed} | {payments} | {lost} | {double} | {recovery} | {slowest.notes} |'


def code_version():
    """Name the commit the soak runs, and whether the working tree differs from it."""
    describe = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT, capture_output=True, text=True)
    return describe.stdout.strip() or 'unknown (not a git checkout)'


@contextlib.contextmanager
def throwaway_postgres():
    """Run a PostgreSQL server in a temp dir on 127.0.0.1 as an unprivileged user, as scripts/test.sh does."""
    bins = sorted(Path('/usr/lib/postgresql').glob('*/bin'), key=lambda path: int(path.parent.name))
    binary = bins[-1] if bins else Path(shutil.which('pg_ctl') or 'pg_ctl').resolve().parent
    owner = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:  # postgres refuses to run as root
        owner = 'spntest' if 'spntest' in {entry.pw_name for entry in pwd.getpwall()} else 'nobody'

    home = Path(tempfile.mkdtemp(prefix='spn-soak-pg-'))
    os.chmod(home, 0o700)
    if os.geteuid() == 0:
        shutil.chown(home, owner)

    def as_owner(*command):
        prefix = ['runuser', '-u', owner, '--'] if os.geteuid() == 0 else []
        subprocess.run(prefix + [str(binary / command[0]), *command[1:]], cwd=home, check=True,
                       stdout=subprocess.DEVNULL)

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    data = home / 'data'
    try:
        as_owner('initdb', '-D', str(data), '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--no-locale', '--no-sync')
        as_owner('pg_ctl', '-D', str(data), '-l', str(home / 'server.log'), '-w', '-t', '60', '-o',
                 f'-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={home} -c fsync=off '
                 '-c synchronous_commit=off -c full_page_writes=off -c max_connections=300', 'start')
        subprocess.run([str(binary / 'createdb'), '-h', '127.0.0.1', '-p', str(port), '-U', 'postgres', 'spn_soak'],
                       check=True)
        url = f'postgresql://postgres@127.0.0.1:{port}/spn_soak'
        with throwaway_pgbouncer(home, port, owner) as pooled:
            if pooled:
                os.environ['TEST_PGBOUNCER_URL'] = pooled  # the several-process rows read it, as the tests do
            yield url
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            as_owner('pg_ctl', '-D', str(data), '-m', 'immediate', '-w', 'stop')
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def throwaway_pgbouncer(home, server_port, owner):
    """PgBouncer in transaction mode in front of the throwaway server, as scripts/test.sh starts it (Neon's pooled
    endpoint); yield its URL, or None when pgbouncer is not installed."""
    binary = shutil.which('pgbouncer') or ('/usr/sbin/pgbouncer' if os.path.exists('/usr/sbin/pgbouncer') else None)
    if binary is None:
        print('soak: pgbouncer not found; the rows through PgBouncer are skipped', file=sys.stderr)
        yield None
        return
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    folder = home / 'pgbouncer'
    folder.mkdir()
    (folder / 'users.txt').write_text('"postgres" ""\n')
    (folder / 'pgbouncer.ini').write_text('\n'.join([
        '[databases]', f'spn_soak = host=127.0.0.1 port={server_port} dbname=spn_soak', '[pgbouncer]',
        'listen_addr = 127.0.0.1', f'listen_port = {port}', 'unix_socket_dir =', 'auth_type = trust',
        f'auth_file = {folder}/users.txt', 'pool_mode = transaction', 'max_client_conn = 1000',
        'default_pool_size = 20', f'logfile = {folder}/pgbouncer.log', f'pidfile = {folder}/pgbouncer.pid', '']))
    if os.geteuid() == 0:
        for path in (folder, *folder.iterdir()):
            shutil.chown(path, owner)
    prefix = ['runuser', '-u', owner, '--'] if os.geteuid() == 0 else []
    subprocess.run(prefix + [binary, '-d', '-q', str(folder / 'pgbouncer.ini')], check=True)
    try:
        yield f'postgresql://postgres@127.0.0.1:{port}/spn_soak'
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((folder / 'pgbouncer.pid').read_text()), 15)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=3, help='runs of each scenario (default 3)')
    parser.add_argument('--postgres', action='store_true', help='soak a throwaway PostgreSQL instead of SQLite')
    parser.add_argument('--database-url', help='soak this database instead (it is emptied before every run)')
    parser.add_argument('--only', action='append', default=[], help='run the scenarios whose name contains this')
    parser.add_argument('--fuzz-examples', type=int, default=500, help='hypothesis examples per property')
    parser.add_argument('--panel-version', default=NEWEST, choices=[v for v in VERSIONS if v >= '3.1'],
                        help=f'the 3x-ui release whose shapes the fake panel speaks (default {NEWEST})')
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the in-process scenarios' expected warnings; bot.py logs to files
    with contextlib.ExitStack() as stack:
        if args.database_url:
            url = args.database_url
        elif args.postgres:
            url = stack.enter_context(throwaway_postgres())
        else:
            url = f'sqlite:///{stack.enter_context(tempfile.TemporaryDirectory(prefix="spn-soak-"))}/soak.db'
        models.connect_database(url, pool_size=60)
        models.create_schema()
        sqlite = models.is_sqlite()
        lines = [f'Database: {"SQLite" if sqlite else "PostgreSQL"}; 3x-ui panel shape: v{args.panel_version}; '
                 f'code: {code_version()}; {args.runs} run(s) of each scenario.', '',
                 '| Scenario | Runs | Failed runs | Paid | Lost | Double credits | Longest recovery | Notes (that run) |',
                 '|---|---|---|---|---|---|---|---|']
        for name, scenario, clock, postgres_only in SCENARIOS:
            if (args.only and not any(part in name for part in args.only)) or (postgres_only and sqlite):
                continue
            if 'PgBouncer' in name and not os.environ.get('TEST_PGBOUNCER_URL'):
                print(f'skipped {name}: no PgBouncer', file=sys.stderr)
                continue
            outcomes, failed = [], 0
            for number in range(1, args.runs + 1):
                started = time.monotonic()
                outcome, failure = run_scenario(scenario, url, args.panel_version)
                if failure or outcome.problems:
                    failed += 1
                    print(f'FAILED {name} run {number}:\n{failure or outcome.problems}', file=sys.stderr)
                outcomes.append(outcome or Outcome())
                print(f'{name} run {number}: {outcome} in {time.monotonic() - started:.0f} s', file=sys.stderr)
            lines.append(row(name, args.runs, failed, outcomes, clock))
        if not args.only or any(part in 'hostile input' for part in args.only):
            models.db.close()
            updates, failed = hostile_input(url, args.fuzz_examples)
            lines.append(f'| hostile input: {FUZZ_PROPERTIES} hypothesis properties × {args.fuzz_examples} '
                         f'examples, plus fixed cases | {updates} | {failed} | 0 | 0 | 0 | n/a | |')
        print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
