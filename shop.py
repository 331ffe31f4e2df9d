"""The shop's business operations, called by the Telegram handlers and the jobs; no Telegram here.

Money rules: an invoice is settled by one guarded UPDATE (pending -> paid) whose row count decides
who credits it; days only move through models.grant_days; the panel is derived from the ledger.
"""
import logging
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from peewee import IntegrityError, fn

import metrics
import models
from cryptobot import parse_amount, parse_time
from models import (EXPIRED, PAID, PENDING, Gift, Grant, InvoiceMismatch, PanelClient, Payment, PromoAttempt,
                    PromoCode, Redemption, Referral, User, grant_days, transaction, utcnow)
from panels import single as single_panel
from provisioning import Provisioning
from xui import XuiError

log = logging.getLogger('shop')

RUSSIAN_REGION = {'ru', 'uk', 'be', 'kk', 'ky', 'uz', 'tg', 'tk', 'hy', 'az', 'ka'}
PROMO_PATTERN = re.compile(r'^[A-Za-z0-9]{4,32}$')  # what a buyer may type (older codes have 4 characters)
NEW_PROMO_PATTERN = re.compile(r'^[A-Za-z0-9]{6,32}$')  # what an admin may create: too many to guess
PROMO_FAILURES_ALLOWED = 5  # failed promo attempts per buyer within PROMO_LOCKOUT
PROMO_LOCKOUT = timedelta(minutes=10)
MAX_PENDING_INVOICES = 3  # unpaid, unexpired invoices per buyer
FRESH_MARGIN = timedelta(minutes=2)  # an invoice this close to its expiry is not offered again
TELEGRAM_ID_PATTERN = re.compile(r'^-?[0-9]{1,18}$')  # fits a 64-bit column; '²'.isdigit() is True, this is not
NOTIFY_LEASE = timedelta(minutes=2)  # a sender that crashed mid-send is replaced after this

# The users whose invoice is being created in this process right now (one creation per buyer at a time).
_CREATING = set()
_CREATING_LOCK = threading.Lock()


class TooManyInvoices(Exception):
    """The buyer already has MAX_PENDING_INVOICES unpaid invoices that can still be paid."""


class InvoiceInProgress(Exception):
    """Another press of the same buyer is creating an invoice right now."""


def invoice_payload(telegram_id, days):
    """Return the payload we write into a buyer's invoice; Crypto Pay returns it unchanged."""
    return f'user:{telegram_id}:days:{days}'


def invoice_mismatch(payment, telegram_id, invoice):
    """Say how Crypto Pay's invoice differs from our payment row: '' when it is the one we created.

    Compared: invoice_id, currency_type and fiat, amount (as Decimal: "100" == "100.00") and our payload.
    """
    expected = (('invoice_id', payment.invoice_id), ('currency_type', 'fiat'), ('fiat', payment.currency),
                ('amount', payment.amount), ('payload', invoice_payload(telegram_id, payment.plan_days)))
    problems = []
    for field, ours in expected:
        theirs = invoice.get(field)
        if field == 'amount':
            try:
                same = parse_amount(theirs) == ours
            except ValueError:
                same = False
        elif field == 'invoice_id':
            same = type(theirs) is int and theirs == ours
        else:
            same = theirs == ours
        if not same:
            problems.append(f'{field} {str(theirs)[:64]!r} (ours {ours})')
    return '; '.join(problems)


def language_for(language_code):
    """Pick 'ru' for Russian-region Telegram language codes, 'en' otherwise."""
    base = (language_code or '').split('-')[0].lower()
    return 'ru' if base in RUSSIAN_REGION else 'en'


def without_nul(text):
    """Drop U+0000, which PostgreSQL text cannot hold (Telegram lets users type it)."""
    return text.replace('\x00', '') if text else text


@dataclass
class CheckResult:
    """What a Check press (or the poller) found: status is paid, pending, expired or not_found."""
    status: str  # also 'mismatch': Crypto Pay says paid, but not about the invoice we created
    payment: Payment = None
    provisioned: bool = False


class Shop:
    """The shop, bound to its settings and its two outside services."""

    def __init__(self, settings, panels, cryptopay):
        """panels: the Panels (panels.connect), or one XuiClient for a shop with one panel.

        The handlers and the jobs each get a Shop: the handlers' clients try each call once with short
        timeouts (a button must be answered within ~15 s), the jobs' retry with backoff (bot.build_shop)."""
        self.settings = settings
        self.panels = tuple(panels) if isinstance(panels, (list, tuple)) else (single_panel(panels),)
        self.enabled_panels = tuple(panel for panel in self.panels if panel.enabled)
        models.use_panels(panel.name for panel in self.enabled_panels)
        self.cryptopay = cryptopay
        self.provisioning = Provisioning(self.panels)

    @property
    def panel(self):
        """The first enabled panel's client (traffic look-ups, the one-panel link)."""
        return self.enabled_panels[0].client

    # Users

    def register(self, telegram_id, username, first_name, language_code, invite_code=None):
        """Return (user, created); record the inviter only for a brand-new user, never self-referral."""
        username, first_name, invite_code = (without_nul(text) for text in (username, first_name, invite_code))
        user = models.user_by_telegram_id(telegram_id)
        language = language_for(language_code)
        if user is not None:
            changes = {field: value for field, value in
                       (('username', username), ('first_name', first_name or ''), ('language', language))
                       if getattr(user, field) != value}
            if changes or user.blocked:
                User.update(blocked=False, **changes).where(User.id == user.id).execute()
                user = User.get_by_id(user.id)
            return user, False
        inviter = None
        if invite_code:
            inviter = User.get_or_none(User.invite_code == invite_code.strip().lower()[:16])
        try:
            with transaction():
                user = User.create(telegram_id=telegram_id, username=username, first_name=first_name or '',
                                   language=language, referrer=inviter, panel_email=f'spn-{telegram_id}',
                                   link_base=self.link_base)
                if inviter is not None:
                    Referral.create(invited=user, inviter=inviter)
        except IntegrityError:  # the same user's /start raced on another thread
            return User.get(User.telegram_id == telegram_id), False
        log.info('user registered user=%s referrer=%s', telegram_id, inviter and inviter.telegram_id)
        return user, True

    def get_user(self, telegram_id):
        """Return the user with this Telegram id, or None."""
        return models.user_by_telegram_id(telegram_id)

    def set_awaiting(self, user, what):
        """Remember (or with None, forget) which text input the user is expected to send next."""
        if user.awaiting != what:  # most presses change nothing: spare the write (and SQLite's write lock)
            User.update(awaiting=what).where(User.id == user.id).execute()
            user.awaiting = what

    @property
    def link_base(self):
        """Return what a buyer's link is made of, before their subId."""
        public_url = getattr(self.settings, 'public_url', '')
        return f'{public_url}/sub/' if public_url else self.panel.subscription_link('')

    def subscription_link(self, user):
        """Return the buyer's one link: ours ({PUBLIC_URL}/sub/{subId}) when set, else the panel's."""
        public_url = getattr(self.settings, 'public_url', '')
        if public_url:
            return f'{public_url}/sub/{user.panel_sub_id}'
        return self.panel.subscription_link(user.panel_sub_id)

    # Buying

    def create_invoice(self, user, plan_days, now=None):
        """Return the buyer's invoice for a plan: their pending one if it can still be paid, else a new one.

        :raise CryptoPayError: Crypto Pay is down or refused; nothing is recorded.
        :raise KeyError: no such plan.
        :raise TooManyInvoices: the buyer has MAX_PENDING_INVOICES other unpaid invoices.
        :raise InvoiceInProgress: another press of this buyer is creating one right now.
        """
        plan = self.settings.plan(plan_days)
        if plan is None:
            raise KeyError(plan_days)
        with _CREATING_LOCK:
            if user.id in _CREATING:
                raise InvoiceInProgress(user.telegram_id)
            _CREATING.add(user.id)
        try:
            now = now or utcnow()
            lifetime = timedelta(seconds=self.settings.invoice_expires_seconds)
            fresh_after = now - lifetime + min(FRESH_MARGIN, lifetime / 2)
            pending = list(Payment.select().where(Payment.user == user.id, Payment.status == PENDING,
                                                  Payment.provider == models.CRYPTOPAY,  # Stars: stars.py
                                                  Payment.created_at > fresh_after).order_by(Payment.id.desc()))
            for payment in pending:
                if (payment.plan_days, payment.amount, payment.currency) == \
                        (plan.days, plan.price, self.settings.currency):
                    log.info('invoice reused user=%s invoice=%s days=%s', user.telegram_id, payment.invoice_id,
                             plan.days)
                    return payment
            if len(pending) >= MAX_PENDING_INVOICES:
                raise TooManyInvoices(user.telegram_id)
            invoice = self.cryptopay.create_invoice(
                amount=plan.price, fiat=self.settings.currency, description=f'VPN {plan.days} days',
                payload=invoice_payload(user.telegram_id, plan.days),
                expires_in=self.settings.invoice_expires_seconds)
            payment = Payment.create(invoice_id=invoice['invoice_id'], user=user, plan_days=plan.days,
                                     amount=plan.price, currency=self.settings.currency,
                                     pay_url=invoice['bot_invoice_url'], created_at=now)
        finally:
            with _CREATING_LOCK:
                _CREATING.discard(user.id)
        log.info('invoice created user=%s invoice=%s days=%s', user.telegram_id, payment.invoice_id, plan.days)
        return payment

    def attach_message(self, payment, chat_id, message_id):
        """Remember which message shows the Pay button, so the poller can edit it."""
        Payment.update(chat_id=chat_id, message_id=message_id).where(Payment.id == payment.id).execute()

    def check_payment(self, telegram_id, invoice_id):
        """Handle a Check press: look the invoice up by id AND owner, settle it if paid, provision.

        :raise CryptoPayError: the invoice is pending here and Crypto Pay cannot be asked now.
        """
        payment = (Payment.select().join(User)
                   .where(Payment.invoice_id == invoice_id, User.telegram_id == telegram_id).get_or_none())
        if payment is None:
            return CheckResult('not_found')
        if payment.status != PAID:
            invoices = self.cryptopay.get_invoices([payment.invoice_id])
            ours = [invoice for invoice in invoices if invoice.get('invoice_id') == payment.invoice_id]
            # an answer about another invoice is judged as ours, so it is caught as a mismatch
            if self.apply_invoice_state(payment, (ours or invoices or [None])[0], telegram_id=telegram_id):
                metrics.settled('button')
            payment = Payment.get_by_id(payment.id)
        if payment.status == PENDING and InvoiceMismatch.select().where(InvoiceMismatch.payment == payment).exists():
            return CheckResult('mismatch', payment)
        if payment.status != PAID:
            return CheckResult(payment.status, payment)
        provisioned = self.provision(payment.user_id)
        if provisioned:
            self.mark_notified(payment)
        return CheckResult(PAID, Payment.get_by_id(payment.id), provisioned)

    def apply_invoice_state(self, payment, invoice, now=None, telegram_id=None):
        """Bring a payment in line with Crypto Pay's invoice (None = the invoice is gone); return True if settled now.

        A 'paid' invoice settles only when it matches the payment row (invoice_mismatch); otherwise the
        mismatch is recorded and logged once, for the admins to be told (alert_mismatches).
        """
        if invoice is None or invoice.get('status') == 'expired' and invoice.get('invoice_id') == payment.invoice_id:
            self.expire_payment(payment.invoice_id)
            return False
        if invoice.get('status') == 'paid':
            if telegram_id is None:
                telegram_id = User.select(User.telegram_id).where(User.id == payment.user_id).scalar()
            problem = invoice_mismatch(payment, telegram_id, invoice)
            if problem:
                self.record_mismatch(payment, problem, now)
                return False
            paid_at = parse_time(invoice['paid_at']).replace(tzinfo=None) if invoice.get('paid_at') else None
            return self.settle(payment.invoice_id, paid_at=paid_at, now=now)
        return False

    def settle(self, invoice_id, paid_at=None, now=None):
        """Mark a paid invoice paid and grant its days, exactly once whoever calls; return True if this call did."""
        with transaction():
            settled = (Payment.update(status=PAID, paid_at=paid_at or now or utcnow())
                       .where(Payment.invoice_id == invoice_id, Payment.status.in_([PENDING, EXPIRED]))
                       .execute())
            if not settled:
                return False
            payment = Payment.get(Payment.invoice_id == invoice_id)
            grant_days(payment.user_id, payment.plan_days, 'payment', invoice_id, now=now)
            self.reward_referral(payment.user_id, now)
        log.info('payment settled user_id=%s invoice=%s days=%s', payment.user_id, invoice_id, payment.plan_days)
        return True

    def record_mismatch(self, payment, problem, now=None):
        """Remember (once) that Crypto Pay called a payment paid with an invoice that is not ours; log it once."""
        try:
            with transaction():
                InvoiceMismatch.create(payment=payment.id, detail=problem, created_at=now or utcnow())
        except IntegrityError:
            return False
        log.error('invoice does not match its payment, nothing settled: invoice=%s user_id=%s: %s',
                  payment.invoice_id, payment.user_id, problem)
        return True

    def claim_mismatch_alerts(self, now=None):
        """Take the mismatches the admins have not been told about yet; each is returned to one caller once."""
        now = now or utcnow()
        claimed = []
        for mismatch in InvoiceMismatch.select().where(InvoiceMismatch.alerted_at.is_null()).limit(100):
            if InvoiceMismatch.update(alerted_at=now).where(InvoiceMismatch.id == mismatch.id,
                                                            InvoiceMismatch.alerted_at.is_null()).execute():
                claimed.append(mismatch)
        return claimed

    def reward_referral(self, invited_id, now):
        """Give the inviter their bonus once, at the invited user's first payment (inside settle's transaction)."""
        rewarded = (Referral.update(rewarded_at=now or utcnow())
                    .where(Referral.invited == invited_id, Referral.rewarded_at.is_null()).execute())
        if rewarded:
            referral = Referral.get(Referral.invited == invited_id)
            grant_days(referral.inviter_id, self.settings.referral_bonus_days, 'referral', invited_id, now=now)
            log.info('referral rewarded inviter_id=%s invited_id=%s', referral.inviter_id, invited_id)

    def expire_payment(self, invoice_id):
        """Mark a pending invoice expired; return True if this call did."""
        return bool(Payment.update(status=EXPIRED)
                    .where(Payment.invoice_id == invoice_id, Payment.status == PENDING).execute())

    # The panels

    def provision(self, user_id, now=None):
        """Push the buyer's days to every enabled panel (Provisioning.provision); True when the link works."""
        return self.provisioning.provision(user_id, now)

    def provision_on(self, panel, user_id, now=None):
        """Push the buyer's days to one panel (Provisioning.provision_on); True once it matches the ledger."""
        return self.provisioning.provision_on(panel, user_id, now)

    def panel_report(self, probe=False):
        """Describe every configured panel for /panels (Provisioning.report)."""
        return self.provisioning.report(probe)

    def claim_notification(self, payment, now=None):
        """Take the right to tell the buyer about a payment; expires after NOTIFY_LEASE if unconfirmed."""
        now = now or utcnow()
        return bool(Payment.update(notify_claimed_at=now)
                    .where(Payment.id == payment.id, Payment.notified_at.is_null(),
                           Payment.notify_claimed_at.is_null() | (Payment.notify_claimed_at < now - NOTIFY_LEASE))
                    .execute())

    def mark_notified(self, payment, now=None):
        """Record that the buyer has their link for this payment."""
        now = now or utcnow()
        Payment.update(notified_at=now, notify_claimed_at=now).where(
            Payment.id == payment.id, Payment.notified_at.is_null()).execute()

    def release_notification(self, payment):
        """Give up a claim whose message could not be sent, so the next run retries it."""
        Payment.update(notify_claimed_at=None).where(Payment.id == payment.id, Payment.notified_at.is_null()).execute()

    def traffic(self, user):
        """Return the buyer's traffic summed over the enabled panels that answer, or None if none has any."""
        rows = []
        for panel in self.enabled_panels:
            try:
                row = panel.client.get_traffic(user.panel_email)
            except XuiError as exc:
                log.warning('traffic lookup failed user=%s panel=%s: %s', user.telegram_id, panel.name, exc)
                continue
            if row is not None:
                rows.append(row)
        if not rows:
            return None
        return {'up': sum(row['up'] for row in rows), 'down': sum(row['down'] for row in rows),
                'total': rows[0]['total'], 'expiry': rows[0]['expiry'],
                'enable': any(row['enable'] for row in rows)}

    # Gifts, promo codes, referrals

    def claim_gift(self, user, kind='trial', now=None):
        """Grant the one-time channel gift; return False if this Telegram id ever had it."""
        try:
            with transaction():
                Gift.create(telegram_id=user.telegram_id, kind=kind)
                grant_days(user.id, self.settings.trial_days, 'gift', f'{user.telegram_id}:{kind}', now=now)
        except IntegrityError:
            return False
        log.info('gift granted user=%s kind=%s', user.telegram_id, kind)
        return True

    def redeem_promo(self, user, text, now=None):
        """Redeem a promo code; return one of ok, invalid, unknown, expired, used_up, already, locked (and the code).

        Every attempt is counted per buyer in the database before the code is looked at; one that gives
        no days stays counted, and past PROMO_FAILURES_ALLOWED within PROMO_LOCKOUT the answer is 'locked'.
        """
        stamp, now = now, now or utcnow()
        window = now - PROMO_LOCKOUT
        with transaction():  # one buyer's attempts are counted one at a time, so threads cannot race past
            models.locked_expiry(user.id)  # the buyer's row lock (the expiry is not needed here)
            PromoAttempt.delete().where(PromoAttempt.user == user.id, PromoAttempt.created_at <= window).execute()
            tried = PromoAttempt.select().where(PromoAttempt.user == user.id).count()
            if tried >= PROMO_FAILURES_ALLOWED:
                locked_out = True
            else:
                locked_out = False
                attempt = PromoAttempt.create(user=user.id, created_at=now)
        if locked_out:
            log.warning('promo attempt refused, locked out user=%s', user.telegram_id)
            return 'locked', None
        outcome, promo = self._redeem(user, text, now, stamp)
        if outcome == 'ok':
            attempt.delete_instance()
        return outcome, promo

    def promo_lock_minutes(self, user, now=None):
        """Return the whole minutes until the buyer may try a promo code again (0 when they may now)."""
        now = now or utcnow()
        recent = list(PromoAttempt.select(PromoAttempt.created_at)
                      .where(PromoAttempt.user == user.id, PromoAttempt.created_at > now - PROMO_LOCKOUT)
                      .order_by(PromoAttempt.created_at.desc()).limit(PROMO_FAILURES_ALLOWED))
        if len(recent) < PROMO_FAILURES_ALLOWED:
            return 0
        free_at = recent[-1].created_at + PROMO_LOCKOUT
        return max(1, -(-(free_at - now) // timedelta(minutes=1)))

    def _redeem(self, user, text, now, stamp):
        code = (text or '').strip().upper()
        if not PROMO_PATTERN.match(code):
            return 'invalid', None
        promo = models.prepared_first(lambda c: PromoCode.select().where(PromoCode.code == c), code)
        if promo is None:
            return 'unknown', None
        if promo.expires_at is not None and promo.expires_at <= now:
            return 'expired', promo
        if models.prepared_first(lambda p, u: Redemption.select(Redemption.id).where(
                Redemption.promo == p, Redemption.user == u), promo.id, user.id) is not None:
            return 'already', promo
        try:
            with transaction():
                taken = (PromoCode.update(used=PromoCode.used + 1)
                         .where(PromoCode.id == promo.id, PromoCode.used < PromoCode.max_uses).execute())
                if not taken:
                    return 'used_up', promo
                redemption = Redemption.create(promo=promo, user=user, created_at=now)
                grant_days(user.id, promo.days, 'promo', redemption.id, now=stamp)
        except IntegrityError:  # the same user redeemed it on another thread just now
            return 'already', promo
        log.info('promo redeemed user=%s code=%s days=%s', user.telegram_id, code, promo.days)
        return 'ok', promo

    def referral_counts(self, user):
        """Return (joined, paid) counts of the people this user invited."""
        rows = models.prepared(lambda inviter: Referral.select(
            fn.COUNT(Referral.id), fn.COUNT(Referral.rewarded_at)).where(Referral.inviter == inviter), user.id)
        joined, paid = next(iter(rows.tuples()))
        return joined, paid

    # Admin

    def create_promo(self, admin_id, days, uses, code=None, expires_at=None):
        """Create a promo code (a readable random one if none given).

        :raise ValueError: the code is not 6-32 ASCII letters and digits (shorter ones can be guessed).
        :raise IntegrityError: the code exists.
        """
        code = (code or models.random_code(8)).upper()
        if not NEW_PROMO_PATTERN.match(code):
            raise ValueError(f'a promo code is 6-32 letters and digits, got {len(code)} characters')
        promo = PromoCode.create(code=code, days=days, max_uses=uses, expires_at=expires_at, created_by=admin_id)
        log.info('promo created admin=%s code=%s days=%s uses=%s', admin_id, code, days, uses)
        return promo

    def admin_give(self, admin_id, user, days, reference):
        """Grant days by hand; reference makes the grant unique (e.g. the admin's message id)."""
        expiry = grant_days(user.id, days, 'admin', f'{admin_id}:{reference}', granted_by=admin_id)
        log.info('admin grant admin=%s user=%s days=%s', admin_id, user.telegram_id, days)
        return expiry

    def find_user(self, query):
        """Find a user by Telegram id or @username (case-insensitive); None if absent."""
        query = without_nul(query or '').strip()
        if TELEGRAM_ID_PATTERN.match(query):
            return User.get_or_none(User.telegram_id == int(query))
        name = query.lstrip('@').lower()
        return User.select().where(fn.LOWER(User.username) == name).first() if name else None

    def stats(self, now=None):
        """Return the shop's figures for /stats as a dict."""
        now = now or utcnow()
        day, week, month = now - timedelta(days=1), now - timedelta(days=7), now - timedelta(days=30)
        paid = Payment.select().where(Payment.status == PAID)

        def revenue(since=None):
            # summed in whole cents: SQLite keeps the amounts as floats, and a float sum drifts (370.40000000000003)
            query = paid if since is None else paid.where(Payment.paid_at >= since)
            cents = query.select(fn.COALESCE(fn.SUM(fn.ROUND(Payment.amount * 100)), 0)).scalar()
            return Decimal(int(cents)).scaleb(-2)

        return {
            'users': User.select().count(),
            'new_today': User.select().where(User.created_at >= day).count(),
            'new_week': User.select().where(User.created_at >= week).count(),
            'active': User.select().where(User.expires_at > now).count(),
            'trials': Gift.select().count(),
            'paid_today': paid.where(Payment.paid_at >= day).count(),
            'paid_month': paid.where(Payment.paid_at >= month).count(),
            'paid_total': paid.count(),
            'revenue_today': revenue(day), 'revenue_month': revenue(month), 'revenue_total': revenue(),
            'pending': Payment.select().where(Payment.status == PENDING).count(),
            'redemptions': Redemption.select().count(),
            'referrals': Referral.select().count(),
            'referrals_paid': Referral.select().where(Referral.rewarded_at.is_null(False)).count(),
            'grants_admin': Grant.select().where(Grant.reason == 'admin').count(),
            'panel_clients': {panel.name: PanelClient.select().where(PanelClient.panel == panel.name).count()
                              for panel in self.panels},
            'currency': self.settings.currency,
        }
