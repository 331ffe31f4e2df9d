"""Soak scenarios of issue 13: one of three panels of mixed API generations failing, then back; a panel added.

Germany speaks the legacy inbounds API, Finland v3.1.0's clients API and Japan (the rig's own panel) the
newest; the bot reads them from PANELS_FILE. The audit runs against every panel. See soak/http_side.py
for the shape of a scenario.
"""
import time
from contextlib import ExitStack

import xui
from conftest import PANEL_PASSWORD, PANEL_USER
from fake_xui import FakePanel
from models import User
from test_e2e import buy, invoice_id_of, person
from test_faults import Outcome, audit, panel_ms, told, wait_until
from test_locations import panels_toml

LINK_HOST = 'shop.example.test'  # PUBLIC_URL of the several-panel shop: its links are {PUBLIC_URL}/sub/{subId}


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
