"""Scheduled jobs (payment poller, provisioning retry, reminders, backups, reconciliation) and their thread.

Each job is a plain function that tests call directly with a chosen `now`.
"""
import contextlib
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from html import escape
import schedule

from peewee import IntegrityError, fn

import backup
import keyboards
import leases
import metrics
import models
import passes
import stars
from cryptobot import CryptoPayError
from models import CRYPTOPAY, EXPIRED, PAID, PENDING, Grant, PanelClient, Payment, Reminder, User, utcnow
from shop import invoice_payload
from texts import show_date, t
from xui import XuiError

log = logging.getLogger('jobs')

POLL_BATCH = 1000  # getInvoices takes at most 1000 ids per call
MISSING_GRACE = timedelta(minutes=10)  # Crypto Pay's clock and ours may differ a little
# An invoice we marked expired (missing from an answer, our clock ahead) may still be paid at Crypto Pay: the
# poller asks about it until this long after Crypto Pay's own expiry (INVOICE_EXPIRES_SECONDS), then never again.
RECHECK_EXPIRED_FOR = timedelta(hours=24)
ALERT_AFTER_FAILURES = 5  # failed pushes before the admins hear of a stuck client (a timeout may pass)
ALERT_AFTER_REFUSALS = 2  # ... when the panel itself refused (e.g. "Duplicate email"): it will not pass
LOG_REPEAT_EVERY = 20  # a job failing again and again logs one line per this many failed runs
PUSH_BATCH = 200  # clients pushed per panel per run (every 20 s)
ANNOUNCE_PER_ROUND = 100  # buyers told about their new link per run (every minute), through the paced messenger
BACKFILL_PER_ROUND = 100  # buyers put onto a newly added panel per run: 5 a second, the panel is not flooded
REMINDERS = (  # kind, expiring no later than now + this, and later than now + the next step
    ('3', timedelta(days=3), timedelta(days=1)),
    ('1', timedelta(days=1), timedelta(0)),
    ('0', timedelta(0), -timedelta(days=2)),
)


def poll_payments(shop, messenger, now=None, counts=None):
    """Ask Crypto Pay about every pending invoice, in batches; settle the paid, expire the dead.

    Invoices we marked expired are asked about too until RECHECK_EXPIRED_FOR after Crypto Pay's own expiry,
    so one paid after all (Crypto Pay still took it, our clock ran ahead) is credited without a Check press.

    :param counts: a dict that gets the running counts (settled, expired), read if the run fails.
    """
    now = now or utcnow()
    counts = counts if counts is not None else {}
    counts.update(settled=0, expired=0)
    # An invoice missing from an answer counts as gone only once it could no longer be paid anyway,
    # so a partial answer never expires a payable invoice.
    lifetime = timedelta(seconds=shop.settings.invoice_expires_seconds)
    missing_before = now - lifetime - MISSING_GRACE
    # the invoices we gave up on that Crypto Pay may still take money for (a bounded window: the
    # (status, created_at) index finds them), then the pending ones (so those expired by this run wait for the next)
    unpaid = ((Payment.status == EXPIRED) & (Payment.created_at > now - lifetime - RECHECK_EXPIRED_FOR),
              Payment.status == PENDING)
    for which in unpaid:
        after_id = 0
        while batch := list(Payment.select().where(which, Payment.provider == CRYPTOPAY, Payment.id > after_id)
                            .order_by(Payment.id).limit(POLL_BATCH)):
            after_id = batch[-1].id
            judge_batch(shop, messenger, batch, missing_before, now, counts)
    alert_mismatches(shop, messenger)
    return counts['settled']


def judge_batch(shop, messenger, batch, missing_before, now, counts):
    """Ask Crypto Pay about one batch of payments (one getInvoices call); settle the paid, expire the gone."""
    asked = {payment.invoice_id for payment in batch}
    answer = shop.cryptopay.get_invoices(sorted(asked))
    invoices = {invoice.get('invoice_id'): invoice for invoice in answer}
    # a paid invoice we did not ask for that carries one of our payloads is judged as that payment's answer
    strangers = {invoice.get('payload'): invoice for invoice in answer
                 if invoice.get('invoice_id') not in asked and invoice.get('status') == 'paid'}
    for payment in batch:
        invoice = invoices.get(payment.invoice_id)
        if invoice is None and strangers:
            invoice = strangers.get(invoice_payload(payment.user.telegram_id, payment.plan_days))
        if invoice is not None and invoice.get('status') == 'paid':
            if settle_paid(shop, messenger, payment, invoice, 'poller', now):
                counts['settled'] += 1
        elif invoice is not None and invoice.get('status') == 'expired' or (
                invoice is None and payment.created_at <= missing_before):
            if shop.expire_payment(payment.invoice_id):  # False for one expired already: told once
                counts['expired'] += 1
                tell_expired(messenger, payment)


def alert_mismatches(shop, messenger, now=None):
    """Tell the admins, once each, about 'paid' answers that did not match the invoice we created."""
    alerts = shop.claim_mismatch_alerts(now)
    for mismatch in alerts:
        payment = mismatch.payment
        text = t('en', 'adm_invoice_mismatch', invoice=payment.invoice_id, user=payment.user.telegram_id,
                 days=payment.plan_days, amount=payment.amount, currency=payment.currency, detail=mismatch.detail)
        for admin_id in shop.settings.admin_ids:
            messenger.send(admin_id, text)
    return len(alerts)


def settle_paid(shop, messenger, payment, invoice, path, now=None):
    """Settle a payment whose Crypto Pay invoice says paid, push the days to the panel, send the link.

    The one path of the poller and the Crypto Pay webhook (the Check button settles through the same
    shop.apply_invoice_state): whoever comes first credits it; the others change nothing.
    :param path: 'poller' or 'webhook', for the metrics. :return: True if this call settled it.
    """
    if not shop.apply_invoice_state(payment, invoice, now=now):
        return False
    metrics.settled(path)
    shop.provision(payment.user_id, now=now)
    deliver_link(shop, messenger, Payment.get_by_id(payment.id), now)
    return True


def sync_stars(shop, messenger, now=None):
    """The Stars safety net: settle every Stars payment whose update never reached us (stars.sync_transactions),
    then expire the unpaid invoices past their lifetime. Return the number settled."""
    provider = stars.Stars(shop, messenger.bot)
    settled = provider.sync_transactions(messenger, now)
    provider.expire_unpaid(now)
    return settled


def tell_expired(messenger, payment):
    """Turn the Pay message of an expired invoice into a notice, so its Pay button is gone."""
    if payment.chat_id and payment.message_id:
        lang = payment.user.language
        messenger.edit(payment.chat_id, payment.message_id, t(lang, 'invoice_expired'), keyboards.renew(lang))
    log.info('invoice expired user_id=%s invoice=%s', payment.user_id, payment.invoice_id)


def deliver_link(shop, messenger, payment, now=None):
    """Send the buyer their link for a paid, provisioned payment, once (a crashed send is retried)."""
    if payment.status != PAID or payment.provisioned_at is None or payment.notified_at is not None:
        return False
    if not shop.claim_notification(payment, now):
        return False
    user = User.get_by_id(payment.user_id)
    text = t(user.language, 'link_ready', expiry=show_date(user.expires_at, shop.settings.timezone),
             link=shop.subscription_link(user))
    outcome = messenger.send(user.telegram_id, text, keyboards.back_to_menu(user.language))
    if outcome == 'failed':
        shop.release_notification(payment)
        return False
    shop.mark_notified(payment, now)
    log.info('link delivered user=%s invoice=%s', user.telegram_id, payment.invoice_id)
    return True


def retry_provisioning(shop, messenger, now=None, counts=None):
    """Push every client whose panel update is due, each panel on its own thread; tell waiting buyers;
    alert the admins once per stuck client, naming the panel and its reason."""
    now = now or utcnow()
    counts = counts if counts is not None else {}
    counts.update(pushed=0, delivered=0)
    panels = shop.enabled_panels
    if len(panels) == 1:
        counts['pushed'] += retry_panel(shop, panels[0], now)
    else:  # a panel that is down or slow delays only its own copies
        with ThreadPoolExecutor(max_workers=len(panels), thread_name_prefix='panel-retry') as pool:
            counts['pushed'] += sum(pool.map(lambda panel: retry_panel(shop, panel, now, own_connection=True),
                                             panels))
    # (paid and not yet told: the index on (status, notified_at) finds them; "provisioned" is left to
    # deliver_link, because SQLite would rather walk (status, provisioned_at) over every paid payment)
    waiting = Payment.select().where(Payment.status == PAID, Payment.notified_at.is_null())
    for payment in waiting:
        counts['delivered'] += deliver_link(shop, messenger, payment, now)
    delivered = counts['delivered']
    alert_stuck(shop, messenger)
    return delivered


def retry_panel(shop, panel, now, own_connection=False):
    """Push the due clients of one panel, oldest first; stop at its first failure (it is down)."""
    with models.connection() if own_connection else contextlib.nullcontext():
        due = (PanelClient.select(PanelClient.user)
               .where(PanelClient.panel == panel.name, PanelClient.dirty == True,  # noqa: E712
                      PanelClient.retry_at.is_null() | (PanelClient.retry_at <= now))
               .order_by(PanelClient.retry_at.asc(nulls='first'), PanelClient.id).limit(PUSH_BATCH))
        pushed = 0
        for row in list(due):
            if not shop.provision_on(panel, row.user_id, now=now):
                break  # one failed call per run is enough to know the panel is down
            pushed += 1
        return pushed


def alert_stuck(shop, messenger):
    """Tell the admins once about clients whose panel push keeps failing, naming the panel and its reason.

    A refusal by the panel ("Duplicate email", a bad inbound) does not pass by itself and needs an
    admin, so it is reported after ALERT_AFTER_REFUSALS tries; a timeout or a refused connection after
    ALERT_AFTER_FAILURES.
    """
    # per enabled panel (only those are pushed), so the index on (panel, dirty, ...) finds the dirty rows
    names = [panel.name for panel in shop.enabled_panels]
    stuck = list(PanelClient.select(PanelClient, User.telegram_id).join(User)
                 .where(PanelClient.panel.in_(names), PanelClient.dirty == True,  # noqa: E712
                        PanelClient.alerted == False,  # noqa: E712
                        ((PanelClient.refused == True) & (PanelClient.failures >= ALERT_AFTER_REFUSALS))  # noqa: E712
                        | (PanelClient.failures >= ALERT_AFTER_FAILURES))
                 .order_by(PanelClient.panel, PanelClient.id).limit(1000))
    if not stuck:
        return
    PanelClient.update(alerted=True).where(PanelClient.id.in_([row.id for row in stuck])).execute()
    several = len(shop.enabled_panels) > 1
    lines = []
    for row in stuck[:20]:
        where = f' on {row.panel}' if several else ''
        if row.refused:
            lines.append(f'• {row.user.telegram_id}{where}: the panel says "{row.last_error}". This will not pass '
                         'by itself: fix the client on the panel (or remove it), then /sync.')
        else:
            lines.append(f'• {row.user.telegram_id}{where}: {row.last_error or "no answer"}. It is retried until '
                         'the panel answers.')
    more = f'\n…and {len(stuck) - 20} more.' if len(stuck) > 20 else ''
    who = 'Panel ' + ', '.join(sorted({row.panel for row in stuck})) if several else 'The panel'
    text = (f'⚠️ {who} has refused updates for {len(stuck)} user(s). Their days are safe in the database.\n'
            + '\n'.join(lines) + more)
    tell_admins(shop.settings, messenger, text)


def tell_admins(settings, messenger, text):
    """Send a plain-text notice to every admin (escaped: it may quote the panel, Crypto Pay or an error)."""
    for admin_id in settings.admin_ids:
        messenger.send(admin_id, escape(text, quote=False))


def announce_new_link(shop, messenger, now=None, per_round=ANNOUNCE_PER_ROUND):
    """Tell each active buyer their new link once, after the link's base changed (one panel → several).

    A buyer with no recorded base was given the first panel's own link (wave 1). The buyers are walked by id
    in a pass per link base (passes.py): once every buyer was looked at, a round reads only its cursor and
    the newest id (a buyer registers with the current base), and the pass is run again hourly.
    :return: messages sent
    """
    now = now or utcnow()
    current = shop.link_base
    name = passes.cursor_name('announce', current)
    walk = passes.next_range(name, now)
    if walk is None:
        return 0
    after, upto = walk
    chunk = (User.id > after) & (User.id <= upto)
    if current == shop.panel.subscription_link(''):  # nothing changed for wave-1 buyers: record it without a word
        User.update(link_base=current).where(chunk, User.link_base.is_null()).execute()
    stale = User.link_base.is_null() | (User.link_base != current)
    sent = 0
    due = list(User.select().where(chunk, User.expires_at > now, User.blocked == False, stale)  # noqa: E712
               .order_by(User.id).limit(per_round))
    for user in due:
        claimed = User.update(link_base=current).where(User.id == user.id, stale).execute()
        if claimed:  # another process took it otherwise
            text = t(user.language, 'link_changed', link=shop.subscription_link(user))
            sent += messenger.send(user.telegram_id, text) == 'sent'
    passes.advance(name, after, due[-1].id if len(due) == per_round else upto)
    return sent


def backfill_panels(shop, now=None, per_round=BACKFILL_PER_ROUND):
    """Put every active buyer onto each enabled panel that lacks them, a few per second (a panel just added).

    Only rows are made here (dirty, so retry_provisioning pushes them); a disabled or removed panel is
    never touched. Each panel has a pass over the buyers by id (passes.py, cursor 'backfill:<panel>'): a
    buyer who gets days later is put on every enabled panel by the grant itself (models.mark_dirty), so once
    the pass has reached the newest buyer a round reads only its cursor and the newest id, and the pass is
    run again hourly. :return: {panel name: rows added}
    """
    now = now or utcnow()
    added = {}
    for panel in shop.enabled_panels:
        name = passes.cursor_name('backfill', panel.name)
        walk = passes.next_range(name, now)
        if walk is None:
            added[panel.name] = 0
            continue
        after, upto = walk
        missing = [user_id for (user_id,) in
                   User.select(User.id)
                   .where(User.id > after, User.id <= upto, User.expires_at > now,
                          ~fn.EXISTS(PanelClient.select(PanelClient.id)
                                     .where(PanelClient.user == User.id, PanelClient.panel == panel.name)))
                   .order_by(User.id).limit(per_round).tuples()]
        count = 0
        if missing:
            rows = [{'user': user_id, 'panel': panel.name, 'dirty': True, 'failures': 0, 'refused': False,
                     'alerted': False} for user_id in missing]
            # peewee's execute() gives the last id, not the count
            count = models.db.execute(PanelClient.insert_many(rows).on_conflict_ignore()).rowcount
        reached = missing[-1] if len(missing) == per_round else upto
        passes.advance(name, after, reached)
        if count:
            log.info('backfill panel=%s added=%s reached user id %s of %s', panel.name, count, reached,
                     User.select(fn.MAX(User.id)).scalar())
        added[panel.name] = count
    return added


def send_reminders(shop, messenger, now=None, counts=None):
    """Send each expiry reminder once per subscription period; a renewal moves the period and re-arms them.

    A reminder is sent only when it says something new: not when the latest grant set this expiry already
    within the reminder's reach (a 3-day gift was just granted with its end date; "ends in 3 days" is no news).
    """
    now = now or utcnow()
    counts = counts if counts is not None else {}
    sent = counts['sent'] = 0
    for kind, until, after in REMINDERS:
        already = Reminder.select().where(Reminder.user == User.id, Reminder.kind == kind,
                                          Reminder.period_end == User.expires_at)
        due = (User.select().where(User.expires_at > now + after, User.expires_at <= now + until,
                                   User.blocked == False, ~fn.EXISTS(already))  # noqa: E712
               .limit(1000))
        for user in due:
            try:  # the row marks the reminder done for this period, also when it is not worth sending
                Reminder.create(user=user, kind=kind, period_end=user.expires_at, sent_at=now)
            except IntegrityError:  # another process took it
                continue
            if not news(user, until):
                log.info('reminder %s skipped user=%s: the latest grant just set this expiry', kind, user.telegram_id)
                continue
            text = t(user.language, f'reminder_{kind}', expiry=show_date(user.expires_at, shop.settings.timezone))
            sent += messenger.send(user.telegram_id, text, keyboards.renew(user.language)) == 'sent'
            counts['sent'] = sent
    return sent


def news(user, until):
    """Tell whether a reminder that the expiry is at most `until` away says something the buyer was not told.

    The latest grant told the buyer the new expiry; if that expiry was already within `until` then, no.
    """
    latest = Grant.select().where(Grant.user == user.id).order_by(Grant.id.desc()).first()
    if latest is None or latest.expires_after != user.expires_at:
        return True
    return latest.expires_after - latest.created_at > until


def backup_database(settings, now=None, counts=None):
    """Write today's backup and drop the ones older than BACKUP_KEEP_DAYS."""
    path = backup.make_backup(settings.backup_dir, now=now)
    removed = backup.prune_backups(settings.backup_dir, settings.backup_keep_days, now=now)
    log.info('backup written %s (%s old removed)', path.name, len(removed))
    return path


@dataclass
class ReconcileReport:
    panel: str = ''
    checked: int = 0
    missing: list = field(default_factory=list)
    wrong_expiry: list = field(default_factory=list)
    disabled: list = field(default_factory=list)
    ahead: list = field(default_factory=list)  # panel gives more than the ledger: reported, never cut
    unknown: list = field(default_factory=list)  # panel clients the database does not know
    fixed: int = 0
    failed: int = 0
    error: str = ''

    def text(self, lang='en'):
        """The admins' report as Telegram HTML (panel emails and errors escaped by t()), headed by the
        panel's name when the shop has several."""
        where = f'<b>{escape(self.panel)}</b>\n' if self.panel else ''
        if self.error:
            return where + t(lang, 'adm_sync_failed', error=self.error)

        def few(items):
            shown = ', '.join(str(item) for item in items[:10]) + (' …' if len(items) > 10 else '')
            return f'{len(items)} {shown}'.rstrip()
        return where + t(lang, 'adm_sync', checked=self.checked, fixed=self.fixed, failed=self.failed,
                 missing=few(self.missing), wrong_expiry=few(self.wrong_expiry), disabled=few(self.disabled),
                 ahead=few(self.ahead), unknown=few(self.unknown))


def reconcile(shop, now=None, panel=None):
    """Compare every active user's client on one panel (the first enabled one by default) with the ledger,
    and repair only towards the ledger; return its ReconcileReport."""
    now = now or utcnow()
    panel = panel or shop.enabled_panels[0]
    report = ReconcileReport(panel=panel.name if len(shop.enabled_panels) > 1 else '')
    try:
        clients = {client['email'].lower(): client for client in panel.client.list_clients()}
    except XuiError as exc:
        report.error = str(exc)
        return report
    for user in User.select().where(User.expires_at > now).iterator():
        report.checked += 1
        client = clients.get(user.panel_email.lower())
        if client is None:
            report.missing.append(user.telegram_id)
        elif client['expiry'] is None or abs((client['expiry'].replace(tzinfo=None) - user.expires_at)
                                             .total_seconds()) > 1:
            if client['expiry'] is None or client['expiry'].replace(tzinfo=None) > user.expires_at:
                report.ahead.append(user.telegram_id)
                continue
            report.wrong_expiry.append(user.telegram_id)
        elif not client['enable']:
            report.disabled.append(user.telegram_id)
        else:
            continue
        (PanelClient.insert(user=user.id, panel=panel.name, dirty=True)
         .on_conflict(conflict_target=[PanelClient.user, PanelClient.panel],
                      update={PanelClient.dirty: True, PanelClient.retry_at: None}).execute())
        if shop.provision_on(panel, user.id, now=now):
            report.fixed += 1
        else:
            report.failed += 1
    ours = {email.lower() for (email,) in User.select(User.panel_email).tuples()}
    report.unknown = sorted(email for email in clients if email not in ours)
    log.info('reconcile panel=%s checked=%s fixed=%s failed=%s unknown=%s', panel.name, report.checked,
             report.fixed, report.failed, len(report.unknown))
    return report


def reconcile_all(shop, now=None):
    """Reconcile every enabled panel; return their reports in panel order."""
    return [reconcile(shop, now, panel) for panel in shop.enabled_panels]


def report_reconcile(shop, messenger, now=None):
    """Run the reconciliation of every panel and send its report to the admins."""
    reports = reconcile_all(shop, now)
    for admin_id in shop.settings.admin_ids:
        admin = User.get_or_none(User.telegram_id == admin_id)
        lang = admin.language if admin else 'en'
        messenger.send(admin_id, '\n\n'.join(report.text(lang) for report in reports))
    return reports


def report_outages(shop, messenger, outages):
    """Try Crypto Pay again while it is away (as its backoff allows), and send the admins due outage news."""
    for outage in outages:
        if outage.name == 'Crypto Pay' and outage.is_down and outage.due():
            try:
                shop.cryptopay.get_me()
            except CryptoPayError:
                pass  # the outage has counted it
        for text in outage.take_messages():
            tell_admins(shop.settings, messenger, text)


class Guarded:
    """Run a job with its own database connection, returned whatever happens; the jobs thread never dies.

    A run that fails is logged (with its traceback the first time in a row, then one line per
    LOG_REPEAT_EVERY runs) and the admins are told once per streak, with what the run had done
    (its `counts` dict), and again when the job works; `every_failure` tells them of each failure
    (a daily job). A failure of the outside service in `needs` is that Outage's news, not the job's:
    while the service is away the job waits out the Outage's backoff instead of its schedule.
    """

    def __init__(self, job, settings=None, messenger=None, needs=None, every_failure=False, redact=str, lease=None):
        self.job = job
        self.lease = lease  # leases.JobLeases: the job runs only in the process that holds its lease
        self.__name__ = job.__name__
        self.settings = settings
        self.messenger = messenger
        self.needs = needs
        self.every_failure = every_failure
        self.redact = redact
        self.failures = 0
        self.takes_counts = 'counts' in inspect.signature(job).parameters

    def __call__(self, *args, **kwargs):
        if self.lease is not None and not self.lease.owns(self.__name__):
            return None  # another process runs this job now
        if self.needs is not None and not self.needs.due():
            return None
        counts = {}
        if self.takes_counts:
            kwargs['counts'] = counts
        try:
            with models.db.connection_context():
                result = self.job(*args, **kwargs)
                if self.lease is not None:
                    self.lease.record_run(self.__name__)  # GET /healthz reads the payment poll's
        except (CryptoPayError, XuiError) as exc:
            if self.needs is None or not self.needs.is_down:
                log.warning('job %s: outside service failed: %s', self.__name__, exc)
            return None
        except Exception as exc:  # noqa: BLE001 — a job must never kill the jobs thread; it runs again next time
            self.failed(exc, counts)
            return None
        if self.failures:
            log.info('job %s works again after %s failed run(s)', self.__name__, self.failures)
            self.tell(f'✅ Job {self.__name__} works again after {self.failures} failed run(s).')
            self.failures = 0
        return result

    def failed(self, exc, counts):
        self.failures += 1
        if self.failures == 1:
            log.exception('job %s failed', self.__name__)
        elif self.failures % LOG_REPEAT_EVERY == 0:
            log.error('job %s failed %s times in a row: %s', self.__name__, self.failures, type(exc).__name__)
        if self.failures == 1 or self.every_failure:
            done = ', '.join(f'{name} {value}' for name, value in counts.items()) or 'nothing done'
            self.tell(f'⚠️ Job {self.__name__} failed ({done} before the failure): {reason_of(exc)}. '
                      'It runs again on schedule; the log has the details.')

    def tell(self, text):
        if self.messenger is not None and self.settings is not None:
            try:
                tell_admins(self.settings, self.messenger, self.redact(text))
            except Exception as exc:  # noqa: BLE001 — the database may be down too; the jobs thread must live
                log.warning('job %s: the admins could not be told: %s', self.__name__, type(exc).__name__)


def guarded(job, **options):
    """Return the job wrapped by Guarded (see there)."""
    return Guarded(job, **options)


def reason_of(exc):
    """Say why a job failed in one short line: an OSError's own words, otherwise the error's type."""
    if isinstance(exc, OSError) and exc.strerror:
        return f'{type(exc).__name__}: {exc.strerror}' + (f' ({exc.filename})' if exc.filename else '')
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''
    return f'{type(exc).__name__}: {first_line}' if first_line else type(exc).__name__


JOB_NAMES = ('poll_payments', 'retry_provisioning', 'backfill_panels', 'announce_new_link', 'sync_stars',
             'send_reminders', 'backup_database', 'report_reconcile', 'report_outages')


def build_scheduler(shop, messenger, settings, outages=(), redact=str, lease=None):
    """Return a Scheduler with every job registered (each run only where lease says this process owns it).

    :param outages: the Outages of Telegram and Crypto Pay, whose news the admins get.
    """
    cryptopay = next((outage for outage in outages if outage.name == 'Crypto Pay'), None)
    told = dict(settings=settings, messenger=messenger, redact=redact, lease=lease)
    scheduler = schedule.Scheduler()
    scheduler.every(settings.payment_poll_seconds).seconds.do(
        guarded(poll_payments, needs=cryptopay, **told), shop, messenger)
    scheduler.every(20).seconds.do(guarded(retry_provisioning, **told), shop, messenger)
    scheduler.every(20).seconds.do(guarded(backfill_panels, **told), shop)
    scheduler.every(1).minutes.do(guarded(announce_new_link, **told), shop, messenger)
    if settings.stars_plans:
        scheduler.every(settings.payment_poll_seconds).seconds.do(guarded(sync_stars, **told), shop, messenger)
    scheduler.every(5).minutes.do(guarded(send_reminders, **told), shop, messenger)
    scheduler.every().day.at(settings.backup_time).do(guarded(backup_database, every_failure=True, **told),
                                                      settings)
    scheduler.every().day.at(settings.reconcile_time).do(guarded(report_reconcile, every_failure=True, **told),
                                                         shop, messenger)
    if outages:
        scheduler.every(30).seconds.do(guarded(report_outages, **told), shop, messenger, outages)
    return scheduler


def start(shop, messenger, settings, stop=None, outages=(), redact=str):
    """Start the jobs thread and the thread that keeps this process's job leases; return the Event that stops them."""
    stop = stop or threading.Event()
    lease = leases.JobLeases(JOB_NAMES)
    lease.start(stop)
    scheduler = build_scheduler(shop, messenger, settings, outages, redact, lease)

    def loop():
        while not stop.is_set():
            try:
                scheduler.run_pending()
            except Exception:  # noqa: BLE001 — Guarded catches a job's failures; this is the last net
                log.exception('the jobs loop caught a failure; it carries on')
            stop.wait(min(1.0, max(scheduler.idle_seconds or 1.0, 0.05)))

    threading.Thread(target=loop, name='jobs', daemon=True).start()
    return stop
