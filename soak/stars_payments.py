"""Soak scenarios of issue 14: Telegram Stars charges delivered twice, dropped, cut by kill -9, refunded twice,
renewed monthly, each audited charge by charge. See soak/http_side.py for the shape of a scenario.
"""
import time

import models
from models import PAID, PENDING, REFUNDED, Grant, Payment, User
from several_panels import on_panel
from test_e2e import ADMIN, ask, person
from test_faults import Outcome, link_messages, panel_ms, wait_until
from test_stars import STARS_PLANS, stars_invoice


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
