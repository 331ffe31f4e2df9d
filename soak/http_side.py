"""Soak scenarios of issue 12: webhook mode, and several bot.py processes on PostgreSQL with kill -9.

Each is a plain function over tests/test_faults.py's Rig: bot.py runs as a process (or several) against the
loopback fakes, a fault is made, and the scenario ends with the money audit and a recovery time.
soak/run.py runs them many times; tests/test_soak.py runs each once at a tiny size. Outcome.notes carries
what a row needs beyond lost/double/recovery (a takeover time, polls per round).
"""
import os
import threading
import time

import requests

import leases
from models import PENDING, JobLease, Payment, User
from rrproxy import RoundRobin
from test_e2e import buy, invoice_id_of, person
from test_faults import Outcome, audit, link_messages, ready_messages, told, wait_until
from test_web import free_port


def healthy(port):
    try:
        return requests.get(f'http://127.0.0.1:{port}/healthz', timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_webhook_bot(rig, log='bot', webhook_url=None, **overrides):
    """Start bot.py serving HTTP on a free port and wait until it is healthy; return (bot, port).

    webhook_url(port) gives WEBHOOK_URL (webhook mode). A port another program took between free_port() and
    the bot's bind (the machine is shared) is given up for another one.
    """
    for _ in range(5):
        port = free_port()
        extra = {'WEBHOOK_URL': webhook_url(port)} if webhook_url else {}
        bot = rig.launch(log=log, HTTP_PORT=port, **extra, **overrides)
        wait_until(lambda: healthy(port) or bot.process.poll() is not None, 60, f'{log} serving /healthz')
        if bot.process.poll() is None:
            return bot, port
        if 'already in use' not in bot.output().splitlines()[-1]:
            break
    raise AssertionError(f'{log} exited with {bot.process.returncode}:\n{bot.output()}')


def shop_in_parallel(telegram, buyers):
    """Each buyer goes Buy → plan at once (updates spread over whatever serves them); return {id: invoice msg}."""
    invoices, errors = {}, []

    def shop_for(buyer):
        try:
            invoices[buyer['id']] = buy(telegram, buyer)
        except Exception as exc:  # noqa: BLE001 — reported below with the buyer
            errors.append(f'buyer {buyer["id"]}: {exc!r}')

    threads = [threading.Thread(target=shop_for, args=(buyer,)) for buyer in buyers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    if errors or len(invoices) != len(buyers):
        raise AssertionError(f'{len(invoices)} of {len(buyers)} buyers got an invoice: {errors[:3]}')
    return invoices


def settle_down(rig, invoice_ids, timeout=60):
    """Wait until every buyer is recorded as told and a message carrying their link went out (a Check press
    records it just before it edits the invoice message): what is still missing then, the audit counts."""
    deadline = time.monotonic() + timeout
    for invoice_id in invoice_ids:
        while not told(invoice_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        payment = Payment.get_or_none(Payment.invoice_id == invoice_id)
        user = payment and User.get_by_id(payment.user_id)
        while user and not link_messages([rig.telegram], user) and time.monotonic() < deadline:
            time.sleep(0.05)


def one_link_each(rig, invoice_ids, outcome):
    """A payment's unprompted "your VPN is ready" message goes out once, whoever settled it."""
    for invoice_id in invoice_ids:
        user = User.get_by_id(Payment.get(Payment.invoice_id == invoice_id).user_id)
        sent = len(ready_messages([rig.telegram], user))
        if sent > 1:
            outcome.problems.append(f'user {user.telegram_id} got the link {sent} times unprompted')


# Issue 12: webhook mode and several processes

def webhook_mode_race(rig, buyers=5, replays=17, presses=3):
    """Webhook mode: every update POSTed to /telegram; each paid invoice's Crypto Pay webhook replayed 17 times
    at once, racing the poller (every second) and the buyer's own Check presses."""
    _, port = start_webhook_bot(rig, webhook_url=lambda port: f'http://127.0.0.1:{port}', PAYMENT_POLL_SECONDS=1)
    rig.telegram.wait_webhook(timeout=30)
    people = [person(2700 + n, name=f'Hook{n}') for n in range(buyers)]
    menus = shop_in_parallel(rig.telegram, people)
    invoice_ids = {buyer['id']: invoice_id_of(rig.telegram, menus[buyer['id']]) for buyer in people}
    for invoice_id in invoice_ids.values():
        rig.cryptopay.pay(invoice_id)
    url = f'http://127.0.0.1:{port}/cryptopay'
    statuses, pressed = [], []
    start = threading.Barrier(buyers * (replays + presses))

    def deliver(invoice_id):
        start.wait()
        statuses.append(rig.cryptopay.post_webhook(url, invoice_id, timeout=60))

    def check(buyer):
        start.wait()
        pressed.append(rig.telegram.press(buyer, menus[buyer['id']], f'check:{invoice_ids[buyer["id"]]}',
                                          strict=False))

    threads = [threading.Thread(target=deliver, args=(invoice_ids[buyer['id']],)) for buyer in people
               for _ in range(replays)]
    threads += [threading.Thread(target=check, args=(buyer,)) for buyer in people for _ in range(presses)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for update_id in pressed:
        rig.telegram.wait_for_answer(update_id, timeout=60)  # every press answered
    settle_down(rig, invoice_ids.values(), 120)
    outcome = audit(rig, list(invoice_ids.values()), time.monotonic() - started)
    one_link_each(rig, invoice_ids.values(), outcome)
    if statuses != [200] * buyers * replays:
        outcome.problems.append(f'webhook replies: {sorted(set(statuses))}, {len(statuses)} of {buyers * replays}')
    outcome.notes = f'{buyers * replays} webhooks, {len(pressed)} presses, {rig.telegram.webhook_delivered} ' \
                    'updates by webhook'
    return outcome


def processes_with_a_kill(rig, processes=2, via='direct', buyers=30, poll_seconds=2):
    """N bot.py processes behind a round-robin proxy in webhook mode on PostgreSQL (directly or through PgBouncer
    in transaction mode); the one holding the jobs is killed -9 halfway through the payments."""
    database_url = rig.database_url
    if via == 'pgbouncer':
        database_url = os.environ.get('TEST_PGBOUNCER_URL') or ''
        if not database_url:
            raise AssertionError('no PgBouncer: set TEST_PGBOUNCER_URL (soak/run.py --postgres starts one)')
    proxy = RoundRobin([])
    try:
        started = [start_webhook_bot(rig, log=f'bot{n}', webhook_url=lambda port: proxy.url,
                                     DATABASE_URL=database_url, PAYMENT_POLL_SECONDS=poll_seconds)
                   for n in range(processes)]
        bots, ports = [bot for bot, _ in started], [port for _, port in started]
        with proxy.lock:
            proxy.ports, proxy.served = ports, {port: 0 for port in ports}
        rig.cryptopay.deliver_webhooks(proxy.url + '/cryptopay')
        people = [person(20000 + n, name=f'Buyer{n}') for n in range(buyers)]
        menus = shop_in_parallel(rig.telegram, people)
        invoice_ids = [invoice_id_of(rig.telegram, menus[buyer['id']]) for buyer in people]
        holders = wait_until(lambda: [bot for bot in bots if 'jobs taken' in bot.output()], 30, 'a job holder')
        outcome = Outcome()
        if len(holders) != 1:
            outcome.problems.append(f'{len(holders)} processes took the jobs')
        victim = holders[0]
        killed = None
        for n, invoice_id in enumerate(invoice_ids):
            rig.cryptopay.pay(invoice_id)
            if n == buyers // 2:
                victim.kill()  # mid-run: its jobs, its webhooks in flight and its sends are cut off
                killed = time.monotonic()
        pid = f':{victim.process.pid}:'
        taken = wait_until(lambda: all(pid not in row.holder for row in JobLease.select()) and time.monotonic(),
                           leases.LEASE_SECONDS * 6, 'the jobs taken over')
        before = leases.last_run('poll_payments')
        polled = wait_until(lambda: leases.last_run('poll_payments') != before and time.monotonic(),
                            leases.LEASE_SECONDS * 6, 'the poller running again')
        settle_down(rig, invoice_ids, 180)
        problems = outcome.problems
        outcome = audit(rig, invoice_ids, time.monotonic() - killed)
        outcome.problems += problems
        one_link_each(rig, invoice_ids, outcome)
        survivors = [bot for bot in bots if bot is not victim]
        if len({row.holder for row in JobLease.select()}) != 1 or \
                sum('jobs taken' in bot.output() for bot in survivors) != 1:
            outcome.problems.append('the jobs are not held by exactly one survivor')
        rounds = polls_per_round(rig, poll_seconds)
        if rounds > 1.5:
            outcome.problems.append(f'the poller ran {rounds:.2f} times per round: more than one process ran it')
        served = [proxy.served[port] for port in ports]
        outcome.notes = (f'jobs taken over {taken - killed:.1f} s after the kill, poller again at '
                         f'{polled - killed:.1f} s; {rounds:.2f} polls per round; updates served {served}')
        return outcome
    finally:
        proxy.close()


def polls_per_round(rig, poll_seconds, window=None):
    """With one invoice pending, count the poller's getInvoices calls per poll round over a window."""
    window = window or 6 * poll_seconds
    buy(rig.telegram, person(29999, name='Sentinel'))
    wait_until(lambda: Payment.select().where(Payment.status == PENDING).exists(), 30, 'a pending invoice')
    time.sleep(poll_seconds * 2)
    asked = sum(method == 'getInvoices' for method, _ in list(rig.cryptopay.calls))
    time.sleep(window)
    asked = sum(method == 'getInvoices' for method, _ in list(rig.cryptopay.calls)) - asked
    return asked / (window / poll_seconds)
