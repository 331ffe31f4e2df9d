"""Soak scenarios of wave 2 (issues 12-14): webhook mode, several processes, per-panel outages, Telegram Stars.

Each is a plain function over tests/test_faults.py's Rig, like the wave-1 scenarios: bot.py runs as a
process (or several) against the loopback fakes, a fault is made, and the scenario ends with an audit
of money (lost, double) and a recovery time. soak/run.py runs them many times; tests/test_soak.py runs
each once at a tiny size so CI proves they still run. Outcome.notes carries the figures a row needs
beyond lost/double/recovery (the link time while a panel is down, a takeover time).
"""
import os
import threading
import time
from contextlib import ExitStack

import requests

import leases
import models
import xui
from conftest import PANEL_PASSWORD, PANEL_USER
from fake_xui import FakePanel
from models import PAID, PENDING, REFUNDED, Grant, JobLease, Payment, User
from rrproxy import RoundRobin
from test_e2e import ADMIN, ask, buy, invoice_id_of, person
from test_faults import Outcome, audit, link_messages, panel_ms, ready_messages, told, wait_until
from test_locations import panels_toml
from test_stars import STARS_PLANS, stars_invoice
from test_web import free_port

LINK_HOST = 'shop.example.test'  # PUBLIC_URL of the several-panel shop: its links are {PUBLIC_URL}/sub/{subId}


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


# Issue 13: per-panel outages, several panels of mixed API generations

def several_panels(rig, stack, count=3):
    """Germany (legacy API), Finland (v3.1.0) and the rig's panel as Japan; the bot's PANELS_FILE names them."""
    fakes = [('Germany', stack.enter_context(FakePanel(generation='legacy', username=PANEL_USER,
                                                        password=PANEL_PASSWORD))),
             ('Finland', stack.enter_context(FakePanel(generation='v3', version='3.1.0', username=PANEL_USER,
                                                        password=PANEL_PASSWORD))),
             ('Japan', rig.panel)][:count]
    return fakes


def panels_settings(rig, fakes):
    path = rig.scratch / 'panels.toml'
    path.write_text(panels_toml(fakes))
    path.chmod(0o600)
    return {'PANELS_FILE': path, 'PUBLIC_URL': f'https://{LINK_HOST}', 'XUI_URL': '', 'XUI_INBOUND_ID': '',
            'XUI_SUB_URL': '', 'XUI_USERNAME': '', 'XUI_PASSWORD': ''}


class OnePanel:
    """What audit() needs of a rig, with one of several panels as its panel."""

    def __init__(self, rig, panel):
        self.panel, self.telegram = panel, rig.telegram


def audit_panels(rig, fakes, invoice_ids, recovery):
    """Audit the ledger and the buyer's link once, and each panel's copy: lost or double on any panel counts."""
    outcome = Outcome(payments=len(invoice_ids), recovery=recovery)
    for name, fake in fakes:
        each = audit(OnePanel(rig, fake), invoice_ids, recovery)
        outcome.lost, outcome.double = max(outcome.lost, each.lost), max(outcome.double, each.double)
        outcome.problems += [f'{name}: {problem}' for problem in each.problems]
    return outcome


def on_panel(fake, telegram_id):
    """Tell whether the panel has the buyer's client with the ledger's expiry."""
    user = User.get_or_none(User.telegram_id == telegram_id)
    client = user and user.expires_at and fake.clients.get(user.panel_email)
    return bool(client) and client['expiryTime'] == panel_ms(user.expires_at)


def heal(fake):
    """End the faults set by the *_next knobs (the fake has no public way: a test never needs one)."""
    fake._knobs.clear()


def start_panel_fault(fake, fault):
    if fault == 'down':
        fake.refuse()
    elif fault == 'hang':
        fake.hang_next(n=10 ** 6, seconds=xui.TIMEOUT[1] + 5)
    elif fault == 'garbage':
        fake.garbage_next(n=10 ** 6)
    elif fault == 'refusing':
        fake.success_false_next(n=10 ** 6, msg='Something went wrong (database is locked\n)')
    else:
        raise ValueError(fault)


def end_panel_fault(fake, fault):
    if fault == 'down':
        fake.accept()
    else:
        heal(fake)


FAULTY = {'down': 'Germany', 'hang': 'Finland', 'garbage': 'Japan', 'refusing': 'Germany'}


def one_panel_failing(rig, fault, buyers=3, seconds=30):
    """Three panels (legacy, v3.1.0, newest); one fails from before the payments until `seconds` after the
    last link: each buyer's link must come from the others at once, and the failing panel catch up."""
    with ExitStack() as stack:
        fakes = several_panels(rig, stack)
        faulty = dict(fakes)[FAULTY[fault]]
        rig.launch(PAYMENT_POLL_SECONDS=1, **panels_settings(rig, fakes)).wait_ready(60)
        people = [person(3100 + n, name=f'Loc{n}') for n in range(buyers)]
        menus = {buyer['id']: buy(rig.telegram, buyer) for buyer in people}
        invoice_ids = [invoice_id_of(rig.telegram, menu) for menu in menus.values()]
        start_panel_fault(faulty, fault)
        paid = time.monotonic()
        for invoice_id in invoice_ids:
            rig.cryptopay.pay(invoice_id)
        for invoice_id in invoice_ids:
            wait_until(lambda: told(invoice_id), 120, 'the link while one panel fails')
        link_after = time.monotonic() - paid
        behind = [buyer['id'] for buyer in people if not on_panel(faulty, buyer['id'])]
        if not behind:
            problem = f'{FAULTY[fault]} was never behind: the {fault} fault did not bite'
        time.sleep(seconds)
        end_panel_fault(faulty, fault)
        healed = time.monotonic()
        wait_until(lambda: all(on_panel(faulty, buyer['id']) for buyer in people), 300,
                   f'{FAULTY[fault]} catching up')
        outcome = audit_panels(rig, fakes, invoice_ids, time.monotonic() - healed)
        if not behind:
            outcome.problems.append(problem)
        outcome.notes = f'{FAULTY[fault]} failing; every link {link_after:.1f} s after paying'
        return outcome


def panel_added_mid_run(rig, buyers=20):
    """Two panels serve; half the buyers pay; the operator adds a third panel and restarts; the rest pay while
    the paced backfill puts every active buyer onto the new panel."""
    with ExitStack() as stack:
        fakes = several_panels(rig, stack)
        bot = rig.launch(PAYMENT_POLL_SECONDS=1, **panels_settings(rig, fakes[:2])).wait_ready(60)
        people = [person(3200 + n, name=f'Add{n}') for n in range(buyers)]
        first, second = people[:buyers // 2], people[buyers // 2:]
        invoice_ids = []
        for group in (first,):
            for buyer in group:
                invoice_ids.append(invoice_id_of(rig.telegram, buy(rig.telegram, buyer)))
                rig.cryptopay.pay(invoice_ids[-1])
        for invoice_id in invoice_ids:
            wait_until(lambda: told(invoice_id), 120, 'the first buyers told')
        bot.stop()
        rig.launch(PAYMENT_POLL_SECONDS=1, **panels_settings(rig, fakes)).wait_ready(60)
        added = time.monotonic()
        for buyer in second:
            invoice_ids.append(invoice_id_of(rig.telegram, buy(rig.telegram, buyer)))
            rig.cryptopay.pay(invoice_ids[-1])
        new = fakes[2][1]
        wait_until(lambda: all(on_panel(new, buyer['id']) for buyer in first), 300, 'the backfill')
        backfilled = time.monotonic() - added
        for invoice_id in invoice_ids:
            wait_until(lambda: told(invoice_id), 120, 'the later buyers told')
        outcome = audit_panels(rig, fakes, invoice_ids, backfilled)
        outcome.notes = f'{len(first)} buyers backfilled onto {fakes[2][0]} in {backfilled:.1f} s'
        return outcome


# Issue 14: Telegram Stars

def stars_audit(rig, recovery, panels=None):
    """Audit every charge the fake Telegram made: one payment row and one grant per charge, one reversal per
    refund, the ledger replayed equal to the expiry, each panel equal to the ledger, and the link told."""
    charges = dict(rig.telegram.charges)
    outcome = Outcome(payments=len(charges), recovery=recovery)
    by_user = {}
    for charge_id, charge in charges.items():
        payment = Payment.get_or_none(Payment.provider == 'stars', Payment.provider_id == charge_id)
        if payment is None:
            outcome.flag('lost', 1, f'charge {charge_id[:12]} of {charge["user"]["id"]} has no payment')
            continue
        grants = list(Grant.select().where(Grant.reference == f'stars:{payment.id}'))
        credits = [grant.days for grant in grants if grant.reason == 'payment']
        reversals = [grant.days for grant in grants if grant.reason == 'refund']
        want = REFUNDED if charge['refunded'] else PAID
        if payment.status != want:
            kind = 'double' if want == REFUNDED else 'lost'
            outcome.flag(kind, 1, f'charge {charge_id[:12]}: {payment.status}, Telegram says {want}')
        if credits != [payment.plan_days]:
            kind = 'double' if len(credits) > 1 else 'lost'
            outcome.flag(kind, 1, f'charge {charge_id[:12]} credited {credits}')
        if len(reversals) != (1 if charge['refunded'] else 0):
            kind = 'lost' if len(reversals) > 1 else 'double'  # two reversals take days the buyer paid for
            outcome.flag(kind, 1, f'charge {charge_id[:12]} reversed {reversals}')
        if payment.notified_at is None:
            outcome.flag('lost', 1, f'charge {charge_id[:12]}: the buyer was never told')
        net = 0 if charge['refunded'] else payment.plan_days
        by_user.setdefault(payment.user_id, []).append(net)
    for user_id, nets in by_user.items():
        user, count = User.get_by_id(user_id), len(nets)
        granted = sum(grant.days for grant in Grant.select().where(Grant.user == user_id))
        if granted != sum(nets):
            kind = 'double' if granted > sum(nets) else 'lost'
            outcome.flag(kind, count, f'user {user.telegram_id}: {granted} days granted for {sum(nets)} paid')
        if models.derive_expiry(user_id) != user.expires_at:
            outcome.flag('double', count, f'user {user.telegram_id}: expiry {user.expires_at}, ledger says '
                                          f'{models.derive_expiry(user_id)}')
        for fake in panels or [rig.panel]:
            client = fake.clients.get(user.panel_email)
            if client is None or client['expiryTime'] != panel_ms(user.expires_at):
                kind = 'double' if client and client['expiryTime'] > panel_ms(user.expires_at) else 'lost'
                outcome.flag(kind, count, f'user {user.telegram_id}: the panel is not level with the ledger')
        if not link_messages([rig.telegram], user):
            outcome.flag('lost', count, f'user {user.telegram_id} never got the link')
    return outcome


def successful_payment(telegram, buyer, charge_id, message_id):
    """The successful_payment message of a charge, as Telegram delivers it (and re-delivers it)."""
    charge = telegram.charges[charge_id]
    return {'message_id': message_id,
            'from': {'id': buyer['id'], 'is_bot': False, 'first_name': buyer['first_name']},
            'chat': {'id': buyer['id'], 'type': 'private', 'first_name': buyer['first_name']},
            'date': int(time.time()),
            'successful_payment': {'currency': 'XTR', 'total_amount': charge['amount'],
                                   'invoice_payload': charge['invoice']['payload'],
                                   'telegram_payment_charge_id': charge_id, 'provider_payment_charge_id': ''}}


def start_stars_bot(rig, **overrides):
    rig.telegram.add_user(ADMIN)
    return rig.launch(STARS_PLANS=STARS_PLANS, PAYMENT_POLL_SECONDS=1, **overrides).wait_ready(60)


def stars_paid(rig, buyers, drop=False):
    """Each buyer chooses Stars and pays; return {buyer id: charge id}, as the pre-checkout answers say."""
    charged = {}
    for buyer in buyers:
        invoice = stars_invoice(rig.telegram, buyer)
        answer = rig.telegram.wait_for_pre_checkout(rig.telegram.pay(buyer, invoice, drop=drop), timeout=60)
        if not answer['ok']:
            raise AssertionError(f'pre-checkout refused: {answer}')
        charged[buyer['id']] = answer['charge_id']
    return charged


def stars_delivered_again(rig, buyers=5, again=2):
    """Each successful_payment delivered `again` more times, while the recovery job (every second) reads
    getStarTransactions: one credit per charge."""
    start_stars_bot(rig)
    people = [person(4100 + n, name=f'Star{n}') for n in range(buyers)]
    started = time.monotonic()
    charged = stars_paid(rig, people)
    for buyer in people:
        for n in range(again):
            message = successful_payment(rig.telegram, buyer, charged[buyer['id']], 900000 + n)
            rig.telegram.inject({'message': message})
    wait_until(lambda: rig.telegram.pending_updates() == 0, 60, 'the bot taking the repeats')
    wait_until(lambda: all(stars_told(charge_id) for charge_id in charged.values()), 120, 'every buyer told')
    time.sleep(2)  # two more rounds of the job find nothing more to credit
    outcome = stars_audit(rig, time.monotonic() - started)
    outcome.notes = f'{buyers * again} repeated updates'
    return outcome


def stars_told(charge_id):
    payment = Payment.get_or_none(Payment.provider == 'stars', Payment.provider_id == charge_id)
    return payment is not None and payment.notified_at is not None


def stars_dropped(rig, buyers=5):
    """The successful_payment update never reaches the bot: the recovery job credits each charge."""
    start_stars_bot(rig)
    people = [person(4200 + n, name=f'Drop{n}') for n in range(buyers)]
    charged = stars_paid(rig, people, drop=True)
    paid = time.monotonic()
    wait_until(lambda: all(stars_told(charge_id) for charge_id in charged.values()), 120, 'every buyer told')
    return stars_audit(rig, time.monotonic() - paid)


def stars_kill_before_commit(rig):
    """kill -9 while the bot settles a successful_payment it has confirmed to Telegram (the payment row is held
    by the soak, so the bot dies inside its transaction): the restarted bot's job credits the charge."""
    bot = start_stars_bot(rig)
    buyer = person(4300, name='Killed')
    invoice = stars_invoice(rig.telegram, buyer)
    payment = Payment.get(Payment.provider == 'stars')
    with models.transaction():  # hold the row: the bot's settlement waits inside its own transaction
        models.locked(Payment.select().where(Payment.id == payment.id)).get()
        answer = rig.telegram.wait_for_pre_checkout(rig.telegram.pay(buyer, invoice), timeout=60)
        wait_until(lambda: rig.telegram.pending_updates() == 0, 30, 'the bot taking the update')
        time.sleep(1)
        bot.kill()
    outcome = Outcome()
    if Payment.get_by_id(payment.id).status != PENDING or rig.telegram.pending_updates():
        outcome.problems.append('the kill did not land between the charge and the commit')
    restarted = time.monotonic()
    start_stars_bot(rig)
    wait_until(lambda: stars_told(answer['charge_id']), 120, 'the buyer told after the restart')
    audited = stars_audit(rig, time.monotonic() - restarted)
    audited.problems += outcome.problems
    return audited


def stars_refund_twice(rig, buyers=3):
    """Buyers pay in Stars; the admin refunds each charge twice: one reversal each, the panel follows."""
    start_stars_bot(rig)
    people = [person(4400 + n, name=f'Back{n}') for n in range(buyers)]
    charged = stars_paid(rig, people)
    wait_until(lambda: all(stars_told(charge_id) for charge_id in charged.values()), 120, 'every buyer told')
    outcome = Outcome()
    started = time.monotonic()
    for charge_id in charged.values():
        first = ask(rig.telegram, ADMIN, f'/refund {charge_id}', contains='efund')['text']
        second = ask(rig.telegram, ADMIN, f'/refund {charge_id}', contains='efund')['text']
        if 'Refunded' not in first or 'already refunded' not in second:
            outcome.problems.append(f'/refund answered {first!r}, then {second!r}')
    for buyer in people:
        wait_until(lambda: on_panel(rig.panel, buyer['id']), 120, 'the panel following the refund')
    audited = stars_audit(rig, time.monotonic() - started)
    audited.problems += outcome.problems
    if rig.telegram.counts['refundStarPayment'] != buyers:
        audited.problems.append(f'refundStarPayment called {rig.telegram.counts["refundStarPayment"]} times')
    return audited


def stars_monthly(rig, renewals=3):
    """A monthly Stars subscription renewed `renewals` times, every other renewal's update dropped."""
    start_stars_bot(rig, STARS_RECURRING=1)
    buyer = person(4500, name='Monthly')
    menu = buy_stars_subscription(rig, buyer)
    first = rig.telegram.wait_for_pre_checkout(rig.telegram.pay(buyer, menu), timeout=60)['charge_id']
    wait_until(lambda: stars_told(first), 60, 'the first month told')
    started = time.monotonic()
    charges = [rig.telegram.renew(first, drop=bool(n % 2)) for n in range(renewals)]
    wait_until(lambda: all(stars_told(charge_id) for charge_id in charges), 120, 'every renewal credited')
    time.sleep(2)
    return stars_audit(rig, time.monotonic() - started)


def buy_stars_subscription(rig, buyer):
    """Buy → 30 days → Stars with STARS_RECURRING=1; return the subscription's invoice link."""
    from test_e2e import current, press
    menu = ask(rig.telegram, buyer, '/start')
    press(rig.telegram, buyer, menu, 'buy')
    press(rig.telegram, buyer, current(rig.telegram, menu), 'plan:30')
    press(rig.telegram, buyer, current(rig.telegram, menu), 'stars:30')
    return next(url for text, url in rig.telegram.buttons(current(rig.telegram, menu)) if text.startswith('⭐'))

