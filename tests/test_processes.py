"""Several bot processes: job leases, one process per SQLite file, 409 Conflict, and N processes on PostgreSQL."""
import os
import signal
import threading
import time
from datetime import timedelta

import pytest
import requests

import jobs
import leases
import models
import shop
from conftest import PG_URL

PGBOUNCER_URL = os.environ.get('TEST_PGBOUNCER_URL', '')
from models import PAID, Grant, JobLease, Payment, User, utcnow
from test_deploy import source  # noqa: F401 (a fixture)
from rrproxy import RoundRobin
from test_e2e import RunningBot, buy, invoice_id_of, person
from test_web import assert_no_secrets, bot_env, free_port


# leases, in one process with two holders

def test_one_holder_takes_every_job_and_keeps_it_while_renewing(database):
    first = leases.JobLeases(jobs.JOB_NAMES, holder='first')
    second = leases.JobLeases(jobs.JOB_NAMES, holder='second')
    assert first.refresh() == set(jobs.JOB_NAMES)
    assert second.refresh() == set()
    for _ in range(3):
        assert first.refresh() == set(jobs.JOB_NAMES)
        assert second.refresh() == set()
    assert first.owns('poll_payments') and not second.owns('poll_payments')


def test_a_dead_holders_jobs_are_taken_once_its_lease_expires(database):
    now = utcnow()
    dead = leases.JobLeases(jobs.JOB_NAMES, holder='dead')
    alive = leases.JobLeases(jobs.JOB_NAMES, holder='alive')
    dead.refresh(now)
    assert alive.refresh(now + timedelta(seconds=leases.LEASE_SECONDS - 1)) == set()
    # the dead one stopped renewing: one lease length later its jobs move
    assert alive.refresh(now + timedelta(seconds=leases.LEASE_SECONDS + 1)) == set(jobs.JOB_NAMES)
    assert {row.holder for row in JobLease.select()} == {'alive'}
    # coming back (a long pause, not a death) it finds them gone and knows it
    assert dead.refresh(now + timedelta(seconds=leases.LEASE_SECONDS + 2)) == set()
    assert not dead.owns('poll_payments')


def test_a_clean_stop_hands_the_jobs_over_at_once(database):
    first = leases.JobLeases(jobs.JOB_NAMES, holder='first')
    second = leases.JobLeases(jobs.JOB_NAMES, holder='second')
    first.refresh()
    first.release()
    assert not first.owns('poll_payments')
    assert second.refresh() == set(jobs.JOB_NAMES)


def test_a_job_runs_only_where_its_lease_is_held(database):
    runs = []

    def poll_payments():
        runs.append(1)

    owner = leases.JobLeases(['poll_payments'], holder='owner')
    other = leases.JobLeases(['poll_payments'], holder='other')
    owner.refresh()
    other.refresh()
    jobs.guarded(poll_payments, lease=other)()
    assert runs == [] and leases.last_run('poll_payments') is None
    jobs.guarded(poll_payments, lease=owner)()
    assert runs == [1] and leases.last_run('poll_payments') is not None


@pytest.mark.parametrize('via', ['direct', 'pgbouncer'])
def test_racing_holders_never_both_own_a_job(database, via):
    """Eight holders refresh at once, many times: each job has exactly one owner after every round."""
    if via == 'pgbouncer':
        models.connect_database(database_for_bots(via), pool_size=10)
    try:
        race_holders()
    finally:
        models.connect_database(database, pool_size=40)


def race_holders():
    holders = [leases.JobLeases(jobs.JOB_NAMES, holder=f'h{n}') for n in range(8)]
    for round_ in range(5):
        now = utcnow() + timedelta(seconds=round_ * (leases.LEASE_SECONDS + 1))  # every lease expired
        owned, start = {}, threading.Barrier(len(holders))

        def refresh(holder):
            with models.db.connection_context():
                start.wait()
                owned[holder.holder] = holder.refresh(now)

        threads = [threading.Thread(target=refresh, args=(holder,)) for holder in holders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for name in jobs.JOB_NAMES:
            assert sum(name in names for names in owned.values()) == 1, (name, owned)


# real processes

@pytest.fixture
def bots(telegram, panel, cryptopay, database, tmp_path):
    """Start bot.py processes with the test's settings; stop them all and check their logs at the end."""
    running = []

    def start(**overrides):
        bot = RunningBot(bot_env(telegram, panel, cryptopay, database, tmp_path, **overrides),
                         tmp_path / f'bot{len(running)}.log')
        running.append(bot)
        return bot

    yield start
    for bot in running:
        bot.stop()
        output = bot.output()
        assert_no_secrets(output)
        assert 'Traceback' not in output, output


@pytest.mark.skipif(bool(PG_URL), reason='SQLite only')
def test_a_second_process_on_one_sqlite_file_refuses_to_start(bots, telegram):
    first = bots()
    telegram.wait_polling(timeout=20)
    second = bots()
    assert second.process.wait(20) == 1
    assert [line for line in second.output().splitlines() if line.strip()] == [
        'error: another bot process already uses this SQLite database; several processes need PostgreSQL '
        '(DATABASE_URL=postgresql://...)']
    assert first.process.poll() is None


def test_a_second_polling_process_stops_on_409_conflict(bots, telegram, database, tmp_path):
    first = bots()
    telegram.wait_polling(timeout=20)
    # on SQLite the second one gets its own file, or it would refuse to start before polling
    second = bots(**({} if PG_URL else {'DATABASE_URL': f'sqlite:///{tmp_path / "other.db"}'}))
    # one of them is told 409 Conflict and stops with one line; the other keeps polling
    deadline = time.monotonic() + 30
    while first.process.poll() is None and second.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = first if first.process.poll() is not None else second
    survivor = second if stopped is first else first
    assert stopped.process.wait(5) == 1
    assert "error: another process is taking this bot's updates (Telegram: 409 Conflict); stopping" in \
        stopped.output()
    assert survivor.process.poll() is None
    telegram.send_text(person(8001), '/start')
    assert telegram.wait_for_message(8001, contains='SPN', timeout=15)


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def database_for_bots(via):
    """The bots' DATABASE_URL: the test server directly, or through PgBouncer in transaction mode."""
    if not PG_URL:
        pytest.skip('several processes need PostgreSQL')
    if via == 'pgbouncer':
        if not PGBOUNCER_URL:
            pytest.skip('no PgBouncer (scripts/test.sh starts one when pgbouncer is installed)')
        return PGBOUNCER_URL
    return PG_URL


@pytest.mark.parametrize('via', ['direct', 'pgbouncer'])
@pytest.mark.parametrize('processes', [2, 3])
def test_processes_behind_a_proxy_lose_nothing_and_count_nothing_twice(bots, telegram, cryptopay, processes, via):
    database_url = database_for_bots(via)
    buyers_count = int(os.environ.get('PROCESS_TEST_BUYERS', '200'))
    ports = [free_port() for _ in range(processes)]
    proxy = RoundRobin(ports)
    try:
        running = [bots(HTTP_PORT=port, WEBHOOK_URL=proxy.url, PAYMENT_POLL_SECONDS=2, DATABASE_URL=database_url)
                   for port in ports]
        telegram.wait_webhook(timeout=30)
        for port in ports:
            assert wait_until(lambda: _healthy(port), 30), port
        cryptopay.deliver_webhooks(proxy.url + '/cryptopay')
        buyers = [person(20000 + n, name=f'Buyer{n}') for n in range(buyers_count)]
        invoices = {}

        def shop_for(buyer):
            invoices[buyer['id']] = invoice_id_of(telegram, buy(telegram, buyer))

        threads = [threading.Thread(target=shop_for, args=(buyer,)) for buyer in buyers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(invoices) == buyers_count
        # every job has one owner: exactly one process took them
        assert sum('jobs taken' in bot.output() for bot in running) == 1, [bot.output() for bot in running]
        victim = next(bot for bot in running if 'jobs taken' in bot.output())
        for n, buyer in enumerate(buyers):
            cryptopay.pay(invoices[buyer['id']])
            if n == buyers_count // 2:
                victim.process.send_signal(signal.SIGKILL)  # mid-run: its jobs and requests are cut off
        deadline = time.monotonic() + 60
        late = [buyer['id'] for buyer in buyers
                if not _has_link(telegram, buyer['id'], timeout=max(deadline - time.monotonic(), 0.1))]
        # a link whose send the kill cut off (claimed, never confirmed) goes out once its claim lapses
        deadline = time.monotonic() + shop.NOTIFY_LEASE.total_seconds() + 2 * 20  # two retry_provisioning rounds
        lost = [telegram_id for telegram_id in late
                if not _has_link(telegram, telegram_id, timeout=max(deadline - time.monotonic(), 1))]
        assert not lost, [(p.user.telegram_id, p.status, p.provisioned_at, p.notify_claimed_at, p.notified_at)
                          for p in Payment.select().join(User).where(User.telegram_id.in_(lost))]
        assert all(proxy.served[port] for port in ports), proxy.served  # updates were spread
        for buyer in buyers:
            invoice_id = invoices[buyer['id']]
            assert Payment.get(Payment.invoice_id == invoice_id).status == PAID
            assert Grant.select().where(Grant.reason == 'payment', Grant.reference == str(invoice_id)).count() == 1
            user = User.get(User.telegram_id == buyer['id'])
            assert Grant.select().where(Grant.user == user.id).count() == 1
        # the killed process's jobs moved to one live process within a lease (plus a renewal)
        holders = {row.holder for row in JobLease.select()}
        assert wait_until(lambda: all(f':{victim.process.pid}:' not in row.holder for row in JobLease.select()),
                          leases.LEASE_SECONDS + 2 * leases.RENEW_SECONDS), holders
        assert len({row.holder for row in JobLease.select()}) == 1
        assert sum('jobs taken' in bot.output() for bot in running if bot is not victim) == 1
        # and the payment poll runs again there within one round
        before = leases.last_run('poll_payments')
        assert wait_until(lambda: leases.last_run('poll_payments') != before, 3 * 2 + leases.LEASE_SECONDS)
    finally:
        proxy.close()


def _has_link(telegram, telegram_id, timeout):
    try:
        return bool(telegram.wait_for_message(telegram_id, contains='vpn.example.test', timeout=timeout))
    except AssertionError:
        return False


def _healthy(port):
    try:
        return requests.get(f'http://127.0.0.1:{port}/healthz', timeout=2).status_code == 200
    except requests.RequestException:
        return False


# the systemd template and deploy.sh

def test_deploy_installs_one_template_instance_per_port(source, tmp_path):
    if os.geteuid() != 0:
        pytest.skip('deploy.sh runs as root')
    from test_deploy import calls, make_stubs, run
    stubs = make_stubs(tmp_path / 'stubs')
    app = tmp_path / 'srv' / 'shop'
    (tmp_path / 'systemd').mkdir()
    env = {'APP_DIR': str(app), 'SYSTEMD_DIR': str(tmp_path / 'systemd'), 'INSTANCES': '8081 8082'}
    done = run(source / 'deploy.sh', stubs, env)
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / 'systemd' / 'vpn-bot@.service').read_text()
    assert f'ExecStart=/usr/bin/env HTTP_PORT=%i {app}/.venv/bin/python bot.py' in unit
    assert f'ReadWritePaths={app}/data {app}/backups' in unit and '/opt/vpn-bot/' not in unit
    assert not (tmp_path / 'systemd' / 'vpn-bot.service').exists()
    assert [line for line in calls(stubs) if line.startswith('systemctl')] == [
        'systemctl daemon-reload', 'systemctl disable vpn-bot', 'systemctl enable vpn-bot@8081',
        'systemctl enable vpn-bot@8082']
    bad = run(source / 'deploy.sh', stubs, {**env, 'INSTANCES': '8081 80'})
    assert bad.returncode == 1 and 'INSTANCES: 80 is not a port 1024-65535' in bad.stderr


@pytest.mark.parametrize('via', ['direct', 'pgbouncer'])
def test_processes_starting_at_once_on_an_empty_database_all_come_up(bots, telegram, database, via):
    """Found by bench/webhook.py: two processes creating the tables at once, one died of a duplicate pg_type."""
    database_url = database_for_bots(via)
    models.db.drop_tables(models.MODELS, cascade=True)
    ports = [free_port() for _ in range(3)]
    # webhook mode: polling processes would stop each other with 409 Conflict
    running = [bots(HTTP_PORT=port, DATABASE_URL=database_url, WEBHOOK_URL='http://127.0.0.1:9') for port in ports]
    for port, bot in zip(ports, running):
        assert wait_until(lambda: _healthy(port) or bot.process.poll() is not None, 30)
        assert bot.process.poll() is None, bot.output()
    assert models.SchemaVersion.table_exists() and User.select().count() == 0
