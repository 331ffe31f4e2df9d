"""Shared plumbing for the benchmarks: a throwaway PostgreSQL, seeded databases, the fakes, bot.py as a process.

Nothing here is a test: the scripts in bench/ print figures (see bench/README.md).
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal

from peewee import fn
from pathlib import Path

# BENCH_ROOT runs the same benchmarks against another checkout (e.g. a patched scratch copy)
ROOT = Path(os.environ.get('BENCH_ROOT') or Path(__file__).resolve().parent.parent).resolve()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

import models  # noqa: E402
from fake_cryptopay import FakeCryptoPay  # noqa: E402
from fake_xui import FakePanel  # noqa: E402

PYTHON = str(ROOT / '.venv' / 'bin' / 'python') if (ROOT / '.venv' / 'bin' / 'python').exists() else sys.executable
BOT_TOKEN = '123456:bench-placeholder-token'  # handed to bench/tgserver.py with --token
CRYPTOPAY_TOKEN = '4242:BENCH-crypto-token'
PANEL_USER, PANEL_PASSWORD = 'admin', 'bench-panel-pw'
SUB_URL = 'https://vpn.example.test:2096/sub/'
ADMIN_ID = 900
USER_BASE = 600_000_000  # seeded users have telegram_id USER_BASE + i
INVOICE_BASE = 10_000_000  # seeded paid invoices
PG_OS_USER = 'spntest'
EPOCH = datetime(1970, 1, 1)


# SIGTERM unwinds like Ctrl-C, so the throwaway server, the fakes and bot.py are stopped on the way out
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# -- PostgreSQL -----------------------------------------------------------------------------------

def pg_bin():
    """Return the directory of PostgreSQL's server binaries (pg_ctl, initdb, postgres)."""
    found = shutil.which('pg_ctl')
    if found and shutil.which('initdb'):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(Path('/usr/lib/postgresql').glob('*/bin'), reverse=True):
        if (candidate / 'pg_ctl').exists() and (candidate / 'initdb').exists():
            return candidate
    raise SystemExit('bench: PostgreSQL server binaries not found (apt-get install postgresql-15), '
                     'or run with --db sqlite')


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1, run as an unprivileged user when we are root.

    Settings: synchronous_commit=off (durable to a process crash, like SQLite's WAL with
    synchronous=NORMAL that the bot uses), fsync on; pg_stat_statements loaded to count queries.
    """

    def __init__(self):
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix='spn-bench-pg.'))
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            # postgres refuses to run as root
            if subprocess.run(['id', '-u', PG_OS_USER], capture_output=True).returncode != 0:
                subprocess.run(['useradd', '--system', '--no-create-home', '--shell', '/usr/sbin/nologin',
                                PG_OS_USER], check=False, capture_output=True)
            self.user = PG_OS_USER
            shutil.chown(self.dir, self.user)
        os.chmod(self.dir, 0o700)

    def _as_owner(self, args, **kwargs):
        if self.user:
            args = ['runuser', '-u', self.user, '--'] + args
        return subprocess.run(args, cwd=self.dir, **kwargs)

    def start(self):
        data = self.dir / 'data'
        self._as_owner([str(self.bin / 'initdb'), '-D', str(data), '-A', 'trust', '-U', 'postgres', '-E', 'UTF8',
                        '--no-locale', '--no-sync'], check=True, capture_output=True)
        options = (f'-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} '
                   '-c synchronous_commit=off -c max_connections=300 -c shared_buffers=128MB '
                   '-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all')
        self._as_owner([str(self.bin / 'pg_ctl'), '-D', str(data), '-l', str(self.dir / 'server.log'), '-w',
                        '-t', '60', '-o', options, 'start'], check=True, capture_output=True)
        log(f'bench: PostgreSQL on 127.0.0.1:{self.port}')
        return self

    def stop(self):
        data = self.dir / 'data'
        if (data / 'postmaster.pid').exists():
            self._as_owner([str(self.bin / 'pg_ctl'), '-D', str(data), '-m', 'immediate', '-w', 'stop'],
                           capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def url(self, name):
        return f'postgresql://postgres@127.0.0.1:{self.port}/{name}'

    def fresh(self, name):
        """Create (or re-create) an empty database and return its URL."""
        import psycopg2
        connection = psycopg2.connect(host='127.0.0.1', port=self.port, user='postgres', dbname='postgres')
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE {name}')
        connection.close()
        connection = psycopg2.connect(host='127.0.0.1', port=self.port, user='postgres', dbname=name)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute('CREATE EXTENSION IF NOT EXISTS pg_stat_statements')
        connection.close()
        return self.url(name)

    def server_pids(self):
        """Return the pids of the server and its backends (for CPU accounting)."""
        pid_file = self.dir / 'data' / 'postmaster.pid'
        if not pid_file.exists():
            return []
        root = int(pid_file.read_text().split()[0])
        return [root] + children(root)


@contextmanager
def databases(which, tmp):
    """Yield [(kind, make_url(name))] for the databases asked for ('sqlite', 'postgresql' or 'all')."""
    kinds = ['sqlite', 'postgresql'] if which == 'all' else [which]
    pg = Postgres().start() if 'postgresql' in kinds else None
    try:
        out = []
        for kind in kinds:
            if kind == 'sqlite':
                out.append((kind, lambda name: fresh_sqlite(tmp, name), None))
            else:
                out.append((kind, pg.fresh, pg))
        yield out
    finally:
        if pg:
            pg.stop()


def fresh_sqlite(tmp, name):
    path = Path(tmp) / f'{name}.db'
    for suffix in ('', '-wal', '-shm'):
        Path(f'{path}{suffix}').unlink(missing_ok=True)
    return f'sqlite:///{path}'


def bind(url, pool_size=8):
    """Bind the models in this process to url (closing any earlier database) and create the schema."""
    if models.db.obj is not None:
        if not models.db.is_closed():
            models.db.close()
        if hasattr(models.db.obj, 'close_all'):
            models.db.obj.close_all()
    models.connect_database(url, pool_size)
    models.create_schema()


# -- seeding --------------------------------------------------------------------------------------

def user_class(i):
    """Split seeded users: 40 % active, 20 % expired, 40 % never paid (by i % 10)."""
    r = i % 10
    return 'active' if r < 4 else 'expired' if r < 6 else 'none'


SEED_NOW = models.utcnow().replace(microsecond=0)  # one moment for every seeded database and the panel


def seeded_expiry(i, now=SEED_NOW):
    """Return the expiry seeded for user i (None for those who never paid)."""
    kind = user_class(i)
    if kind == 'active':
        return now + timedelta(days=1 + (i * 7919) % 365, seconds=(i * 104729) % 86400)
    if kind == 'expired':
        return now - timedelta(days=1 + (i * 7919) % 90)
    return None


def seed(users, now=SEED_NOW, chunk=2000):
    """Bulk-insert `users` users with the payments, grants, referrals and reminders such a shop has; return seconds.

    Users i have telegram_id USER_BASE + i; active ones expire 1..365 days ahead, so a few
    hundred are inside each reminder window.
    """
    rng = random.Random(42)
    started = time.perf_counter()
    User, Payment, Grant, Referral = models.User, models.Payment, models.Grant, models.Referral
    with models.db.connection_context():
        base_id = (User.select(fn.MAX(User.id)).scalar() or 0)
        for start in range(0, users, chunk):
            rows, payments, grants, referrals, reminders = [], [], [], [], []
            with models.db.atomic():
                for i in range(start, min(start + chunk, users)):
                    tid = USER_BASE + i
                    expires = seeded_expiry(i, now)
                    user_id = base_id + i + 1
                    referrer = base_id + i if i % 10 == 7 else None  # every 10th user was invited
                    rows.append({
                        'id': user_id, 'telegram_id': tid, 'username': f'user{tid}', 'first_name': f'User {i}',
                        'language': 'ru' if i % 3 else 'en', 'invite_code': f'inv{i:09d}', 'referrer': referrer,
                        'blocked': i % 50 == 49, 'awaiting': None, 'expires_at': expires,
                        'panel_email': f'spn-{tid}', 'panel_sub_id': f'sub{i:013d}', 'created_at': now - timedelta(days=(i * 31) % 365, seconds=rng.randrange(86400))})
                    if expires is not None:
                        invoice = INVOICE_BASE + i
                        paid_at = expires - timedelta(days=30)
                        payments.append({'invoice_id': invoice, 'user': user_id, 'plan_days': 30,
                                         'amount': Decimal('100'), 'currency': 'RUB', 'status': 'paid',
                                         'pay_url': f'https://t.me/CryptoBot?start=IV{invoice}', 'chat_id': tid,
                                         'message_id': 1, 'created_at': paid_at, 'paid_at': paid_at,
                                         'provisioned_at': paid_at, 'notified_at': paid_at,
                                         'notify_claimed_at': paid_at})
                        grants.append({'user': user_id, 'days': 30, 'reason': 'payment', 'reference': str(invoice),
                                       'expires_before': None, 'expires_after': expires, 'created_at': paid_at})
                    if referrer:
                        referrals.append({'invited': user_id, 'inviter': referrer, 'created_at': now})
                    if user_class(i) == 'expired':  # their three reminders went out
                        reminders += [{'user': user_id, 'kind': kind, 'period_end': expires,
                                       'sent_at': expires - timedelta(days=int(kind))} for kind in '310']
                User.insert_many(rows).execute()
                for model, batch in ((Payment, payments), (Grant, grants), (Referral, referrals),
                                     (models.Reminder, reminders)):
                    for part in range(0, len(batch), 1000):
                        model.insert_many(batch[part:part + 1000]).execute()
        if not models.is_sqlite():
            models.db.execute_sql("SELECT setval(pg_get_serial_sequence('users', 'id'), (SELECT MAX(id) FROM users))")
            models.db.execute_sql('ANALYZE')
        else:
            models.db.execute_sql('ANALYZE')
    return time.perf_counter() - started


def active_indexes(users):
    """Return the indexes i of the seeded active users."""
    return [i for i in range(users) if user_class(i) == 'active']


def fill_panel(panel, indexes):
    """Give the fake panel (v3) a client for each seeded user index, as the ledger has it, straight into its state."""
    now_ms = int(time.time() * 1000)
    inbound = panel.inbounds[panel.inbound_id]
    with panel._lock:
        next_id = max([r['id'] for r in panel.records.values()], default=0) + 1
        for n, i in enumerate(indexes):
            tid = USER_BASE + i
            client = {'id': f'00000000-0000-4000-8000-{i:012d}', 'email': f'spn-{tid}', 'subId': f'sub{i:013d}',
                      'enable': True, 'expiryTime': (seeded_expiry(i) - EPOCH) // timedelta(milliseconds=1), 'totalGB': 0, 'limitIp': 0,
                      'tgId': tid, 'flow': '', 'comment': '', 'reset': 0}
            record = panel._record(client, next_id + n, now_ms)
            panel.records[client['email']] = record
            entry = panel._entry(record, inbound['protocol'])
            inbound['settings']['clients'].append(entry)
            panel.links.setdefault(client['email'], set()).add(panel.inbound_id)
            panel._new_traffic(entry, panel.inbound_id)
            panel.traffic[client['email']]['up'] = (i * 7919) % (5 * 1024 ** 3)


def start_fakes():
    """Start the fake panel (v3) and Crypto Pay in this process; return (panel, cryptopay)."""
    panel = FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD).start()
    cryptopay = FakeCryptoPay(token=CRYPTOPAY_TOKEN).start()
    return panel, cryptopay


def bot_env(database_url, panel, cryptopay, telegram_url, backup_dir, **overrides):
    """Return the environment that runs bot.py against the fakes."""
    env = {key: value for key, value in os.environ.items() if key != 'TEST_DATABASE_URL'}
    env.update({
        'BOT_TOKEN': BOT_TOKEN, 'TELEGRAM_API_URL': telegram_url,
        'XUI_URL': panel.url, 'XUI_USERNAME': PANEL_USER, 'XUI_PASSWORD': PANEL_PASSWORD,
        'XUI_INBOUND_ID': str(panel.inbound_id), 'XUI_SUB_URL': SUB_URL,
        'CRYPTOPAY_TOKEN': CRYPTOPAY_TOKEN, 'CRYPTOPAY_URL': cryptopay.url,
        'DATABASE_URL': database_url, 'ADMIN_IDS': str(ADMIN_ID), 'CHANNEL_ID': '@spn_channel',
        'CHANNEL_URL': 'https://t.me/spn_channel', 'TIMEZONE': 'UTC', 'BACKUP_DIR': str(backup_dir),
        'PYTHONUNBUFFERED': '1',
        'HTTP_PORT': str(free_port())})  # the HTTP side runs, as by default, on a port of its own per bot
    env.update({key: str(value) for key, value in overrides.items()})
    return env


# -- processes ------------------------------------------------------------------------------------

class Process:
    """A child process whose stdout's first line is read (the fakes print their URL), output kept in a file."""

    def __init__(self, args, env=None, log_path=None, first_line=False, cwd=ROOT):
        self.log_path = Path(log_path) if log_path else None
        self.first = None
        stdout = subprocess.PIPE if first_line else open(self.log_path, 'w')
        self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT,
                                        text=True)
        if first_line:
            self.first = self.process.stdout.readline().strip()
            if not self.first:
                raise RuntimeError(f'{args[1]} printed nothing: {self.process.stdout.read()}')
            self.rest = []
            threading.Thread(target=lambda: self.rest.extend(self.process.stdout), daemon=True).start()

    @property
    def pid(self):
        return self.process.pid

    def output(self):
        if self.log_path:
            return self.log_path.read_text()
        return ''.join(self.rest)

    def stop(self, timeout=15):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.output()


def start_telegram_server(*args):
    """Run bench/tgserver.py in its own process; return (Process, url)."""
    process = Process([PYTHON, str(Path(__file__).resolve().parent / 'tgserver.py'), '--port', '0', '--token', BOT_TOKEN,
                       *map(str, args)],
                      first_line=True)
    return process, process.first


def fake_get(url, path, timeout=30):
    import requests
    return requests.get(url + path, timeout=timeout, verify=os.environ.get('SSL_CERT_FILE') or True).json()


def fake_post(url, path, body, timeout=30):
    import requests
    return requests.post(url + path, json=body, timeout=timeout, verify=os.environ.get('SSL_CERT_FILE') or True).json()


def python_for(root):
    """Return the Python of a checkout: its own .venv when it has one, else ours."""
    own = Path(root) / '.venv' / 'bin' / 'python'
    return str(own) if own.exists() else PYTHON


def start_bot(env, log_path, telegram_url, timeout=60, root=ROOT, script='bot.py'):
    """Run root/script (bot.py of a checkout, or bench/ceiling_bot.py) with env; wait until it long-polls the fake."""
    path = Path(root) / script if (Path(root) / script).exists() else Path(__file__).resolve().parent.parent / script
    env = {**env, 'BENCH_ROOT': str(root)}
    bot = Process([python_for(root), str(path)], env=env, log_path=log_path, cwd=root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bot.process.poll() is not None:
            raise RuntimeError(f'bot.py exited {bot.process.returncode}:\n{bot.output()[-3000:]}')
        if fake_get(telegram_url, '/_bench/stats').get('polling'):
            return bot
        time.sleep(0.1)
    bot.stop()
    raise RuntimeError(f'bot.py did not poll within {timeout}s:\n{bot.output()[-3000:]}')


# -- /proc accounting -----------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def children(pid):
    """Return every descendant pid of pid."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = Path(f'/proc/{parent}/task/{parent}/children').read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            found.append(kid)
            todo.append(kid)
    return found


def cpu_seconds(pids):
    """Return the user+system CPU seconds used so far by these processes (live ones only)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def busy_seconds():
    """Return the CPU seconds the whole machine has spent busy (all CPUs, from /proc/stat)."""
    fields = [int(x) for x in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def rss_mb(pid):
    """Return the resident set size of pid in MB (VmRSS)."""
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return 0.0


def load_average():
    """Return the 1-minute load average (other developers' work shares this machine)."""
    return os.getloadavg()[0]


def machine_line():
    """Describe the machine for the figures' headers."""
    model = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                  if line.startswith('model name')), 'unknown CPU')
    load = os.getloadavg()[0]
    return f'{os.cpu_count()} CPUs ({model}), load avg {load:.2f}, Python {sys.version.split()[0]}'


def percentile(values, p):
    if not values:
        return float('nan')
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def dump_json(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))
