"""Scheduled jobs (payment poller, provisioning retry, reminders, backups, reconciliation) and their thread.

Each job is a plain function that tests call directly with a chosen `now`.
"""
import inspect
import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from html import escape

import schedule
from peewee import IntegrityError, fn

import backup
import keyboards
import models
import stars
from cryptobot import CryptoPayError
from models import CRYPTOPAY, PAID, PENDING, Grant, Payment, Reminder, User, utcnow
from shop import invoice_payload
from texts import show_date, t
from xui import XuiError

log = logging.getLogger('jobs')

POLL_BATCH = 1000  # getInvoices takes at most 1000 ids per call
MISSING_GRACE = timedelta(minutes=10)  # Crypto Pay's clock and ours may differ a little
ALERT_AFTER_FAILURES = 5  # failed pushes before the admins hear of a stuck user (a timeout may pass)
ALERT_AFTER_REFUSALS = 2  # ... when the panel itself refused (e.g. "Duplicate email"): it will not pass
LOG_REPEAT_EVERY = 20  # a job failing again and again logs one line per this many failed runs
REMINDERS = (  # kind, expiring no later than now + this, and later than now + the next step
    ('3', timedelta(days=3), timedelta(days=1)),
    ('1', timedelta(days=1), timedelta(0)),
    ('0', timedelta(0), -timedelta(days=2)),
)


def poll_payments(shop, messenger, now=None, counts=None):
    """Ask Crypto Pay about every pending invoice, in batches; settle the paid, expire the dead.

    :param counts: a dict that gets the running counts (settled, expired), read if the run fails.
    """
    now = now or utcnow()
    counts = counts if counts is not None else {}
    counts.update(settled=0, expired=0)
    # An invoice missing from an answer counts as gone only once it could no longer be paid anyway,
    # so a partial answer never expires a payable invoice.
    missing_before = now - timedelta(seconds=shop.settings.invoice_expires_seconds) - MISSING_GRACE
    after_id, settled = 0, 0
    while True:
        batch = list(Payment.select().where(Payment.status == PENDING, Payment.provider == CRYPTOPAY,
                                            Payment.id > after_id)
                     .order_by(Payment.id).limit(POLL_BATCH))
        if not batch:
            break
        after_id = batch[-1].id
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
                if shop.apply_invoice_state(payment, invoice, now=now):
                    settled += 1
                    counts['settled'] = settled
                    shop.provision(payment.user_id, now=now)
                    deliver_link(shop, messenger, Payment.get_by_id(payment.id), now)
            elif invoice is not None and invoice.get('status') == 'expired' or (
                    invoice is None and payment.created_at <= missing_before):
                if shop.expire_payment(payment.invoice_id):
                    counts['expired'] += 1
                    tell_expired(messenger, payment)
    alert_mismatches(shop, messenger)
    return settled


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


def sync_stars(shop, messenger, now=None):
    """The Stars safety net: settle every Stars payment whose update never reached us (stars.sync_transactions)."""
    return stars.Stars(shop, messenger.bot).sync_transactions(messenger, now)


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
    """Push every user whose panel update is due, tell waiting buyers, alert admins once about stuck ones."""
    now = now or utcnow()
    counts = counts if counts is not None else {}
    counts.update(pushed=0, delivered=0)
    due = (User.select(User.id).where(User.panel_dirty == True,  # noqa: E712 (SQL comparison)
                                      User.panel_retry_at.is_null() | (User.panel_retry_at <= now))
           .order_by(User.panel_retry_at.asc(nulls='first')).limit(500))
    for user in due:
        if not shop.provision(user.id, now=now):
            break  # the panel is down: one failed call per run is enough to know it
        counts['pushed'] += 1
    waiting = Payment.select().where(Payment.status == PAID, Payment.notified_at.is_null(),
                                     Payment.provisioned_at.is_null(False))
    for payment in waiting:
        counts['delivered'] += deliver_link(shop, messenger, payment, now)
    delivered = counts['delivered']
    alert_stuck(shop, messenger)
    return delivered


def alert_stuck(shop, messenger):
    """Tell the admins once about users whose panel push keeps failing, with the panel's own reason.

    A refusal by the panel ("Duplicate email", a bad inbound) does not pass by itself and needs an
    admin, so it is reported after ALERT_AFTER_REFUSALS tries; a timeout or a refused connection after
    ALERT_AFTER_FAILURES. The reasons are those seen by this process (shop.panel_errors).
    """
    candidates = User.select().where(User.panel_dirty == True, User.panel_alerted == False,  # noqa: E712
                                     User.panel_failures >= min(ALERT_AFTER_FAILURES, ALERT_AFTER_REFUSALS))
    stuck = []
    for user in candidates:
        error = shop.panel_errors.get(user.id)
        refused = getattr(error, 'panel_msg', None) is not None
        if user.panel_failures >= (ALERT_AFTER_REFUSALS if refused else ALERT_AFTER_FAILURES):
            stuck.append((user, error, refused))
    if not stuck:
        return
    User.update(panel_alerted=True).where(User.id.in_([user.id for user, _, _ in stuck])).execute()
    lines = []
    for user, error, refused in stuck[:20]:
        if refused:
            lines.append(f'• {user.telegram_id}: the panel says "{error.panel_msg}". This will not pass by '
                         'itself: fix the client on the panel (or remove it), then /sync.')
        else:
            reason = str(error) if error is not None else 'no answer (the reason was seen by another process)'
            lines.append(f'• {user.telegram_id}: {reason}. It is retried until the panel answers.')
    more = f'\n…and {len(stuck) - 20} more.' if len(stuck) > 20 else ''
    text = (f'⚠️ The panel has refused updates for {len(stuck)} user(s). Their days are safe in the '
            'database.\n' + '\n'.join(lines) + more)
    tell_admins(shop.settings, messenger, text)


def tell_admins(settings, messenger, text):
    """Send a plain-text notice to every admin (escaped: it may quote the panel, Crypto Pay or an error)."""
    for admin_id in settings.admin_ids:
        messenger.send(admin_id, escape(text, quote=False))


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
        """The admins' report as Telegram HTML (panel emails and errors escaped by t())."""
        if self.error:
            return t(lang, 'adm_sync_failed', error=self.error)

        def few(items):
            shown = ', '.join(str(item) for item in items[:10]) + (' …' if len(items) > 10 else '')
            return f'{len(items)} {shown}'.rstrip()
        return t(lang, 'adm_sync', checked=self.checked, fixed=self.fixed, failed=self.failed,
                 missing=few(self.missing), wrong_expiry=few(self.wrong_expiry), disabled=few(self.disabled),
                 ahead=few(self.ahead), unknown=few(self.unknown))


def reconcile(shop, now=None):
    """Compare every active user's panel client with the ledger and repair only towards the ledger."""
    now = now or utcnow()
    report = ReconcileReport()
    try:
        clients = {client['email'].lower(): client for client in shop.panel.list_clients()}
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
        User.update(panel_dirty=True).where(User.id == user.id).execute()
        if shop.provision(user.id, now=now):
            report.fixed += 1
        else:
            report.failed += 1
    ours = {email.lower() for (email,) in User.select(User.panel_email).tuples()}
    report.unknown = sorted(email for email in clients if email not in ours)
    log.info('reconcile checked=%s fixed=%s failed=%s unknown=%s', report.checked, report.fixed,
             report.failed, len(report.unknown))
    return report


def report_reconcile(shop, messenger, now=None):
    """Run the reconciliation and send its report to the admins."""
    report = reconcile(shop, now)
    for admin_id in shop.settings.admin_ids:
        admin = User.get_or_none(User.telegram_id == admin_id)
        messenger.send(admin_id, report.text(admin.language if admin else 'en'))
    return report


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

    def __init__(self, job, settings=None, messenger=None, needs=None, every_failure=False, redact=str):
        self.job = job
        self.__name__ = job.__name__
        self.settings = settings
        self.messenger = messenger
        self.needs = needs
        self.every_failure = every_failure
        self.redact = redact
        self.failures = 0
        self.takes_counts = 'counts' in inspect.signature(job).parameters

    def __call__(self, *args, **kwargs):
        if self.needs is not None and not self.needs.due():
            return None
        counts = {}
        if self.takes_counts:
            kwargs['counts'] = counts
        try:
            with models.db.connection_context():
                result = self.job(*args, **kwargs)
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
            tell_admins(self.settings, self.messenger, self.redact(text))


def guarded(job, **options):
    """Return the job wrapped by Guarded (see there)."""
    return Guarded(job, **options)


def reason_of(exc):
    """Say why a job failed in one short line: an OSError's own words, otherwise the error's type."""
    if isinstance(exc, OSError) and exc.strerror:
        return f'{type(exc).__name__}: {exc.strerror}' + (f' ({exc.filename})' if exc.filename else '')
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''
    return f'{type(exc).__name__}: {first_line}' if first_line else type(exc).__name__


def build_scheduler(shop, messenger, settings, outages=(), redact=str):
    """Return a Scheduler with every job registered.

    :param outages: the Outages of Telegram and Crypto Pay, whose news the admins get.
    """
    cryptopay = next((outage for outage in outages if outage.name == 'Crypto Pay'), None)
    told = dict(settings=settings, messenger=messenger, redact=redact)
    scheduler = schedule.Scheduler()
    scheduler.every(settings.payment_poll_seconds).seconds.do(
        guarded(poll_payments, needs=cryptopay, **told), shop, messenger)
    scheduler.every(20).seconds.do(guarded(retry_provisioning, **told), shop, messenger)
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
    """Start the jobs thread; return the Event that stops it."""
    scheduler = build_scheduler(shop, messenger, settings, outages, redact)
    stop = stop or threading.Event()

    def loop():
        while not stop.is_set():
            scheduler.run_pending()
            stop.wait(min(1.0, max(scheduler.idle_seconds or 1.0, 0.05)))

    threading.Thread(target=loop, name='jobs', daemon=True).start()
    return stop
