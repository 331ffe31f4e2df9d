"""Telegram Stars, our second payment provider: invoices, pre-checkout answers, settlement, recovery, refunds.

Money rules, as for Crypto Pay (shop.py): a Stars payment is a Payment row (provider 'stars', currency XTR,
amount in whole Stars) named by its invoice payload 'stars:<row id>'. Each Telegram charge
(telegram_payment_charge_id, Telegram's StarTransaction.id) is credited once: the charge id is the row's
provider_id, unique per provider, and its days are a Grant ('payment', 'stars:<row id>'). A refund is a Grant
('refund', same reference) of the negative days. Days and the referral bonus go through models.grant_days and
Shop.reward_referral, the panel through Shop.provision, the link through jobs.deliver_link.
An unpaid invoice expires after INVOICE_EXPIRES_SECONDS, as a Crypto Pay invoice does: its pre-checkout is
refused and the job marks it expired; a charge for it that Telegram took anyway is still credited once.
Outside facts: https://core.telegram.org/bots/api#payments and /bots/payments-stars.
"""
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from peewee import IntegrityError, fn
from telebot.apihelper import ApiException, ApiTelegramException
from telebot.types import LabeledPrice

import models
from markup import html
from models import EXPIRED, PAID, PENDING, REFUNDED, STARS, Cursor, Grant, Payment, User, grant_days, transaction, utcnow
from texts import plain, plan_name, t

log = logging.getLogger('stars')

XTR = 'XTR'
PAYLOAD_PATTERN = re.compile(r'^stars:([0-9]{1,18})$')
SUBSCRIPTION_PERIOD = 2592000  # 30 days in seconds: the only subscription period Telegram allows
FRESH_MARGIN = timedelta(minutes=2)  # an invoice this close to its expiry is not offered again (shop.py's)
PAGE = 100  # getStarTransactions returns at most 100 per call
OVERLAP = 20  # transactions re-read each round, in case Telegram's list shifted (settling is idempotent)


class StarsError(Exception):
    """Telegram refused a Stars call or could not be reached; the message says why."""


@dataclass
class Settlement:
    """What a charge did: outcome is settled, duplicate or foreign (a payload we never issued, or not matching)."""
    outcome: str
    payment: Payment = None
    detail: str = ''


@dataclass
class RefundResult:
    """What /refund did: refunded, already, crypto, unknown or refused (detail: Telegram's reason)."""
    outcome: str
    payment: Payment = None
    detail: str = ''


def payload_of(payment):
    """Return the invoice payload naming a Stars payment row (1-128 bytes, as Telegram requires)."""
    return f'stars:{payment.id}'


def payment_of(payload):
    """Return the Stars payment a payload names, or None (malformed, never issued, or not a Stars row)."""
    match = PAYLOAD_PATTERN.match(payload or '')
    if not match:
        return None
    return Payment.get_or_none(Payment.id == int(match[1]), Payment.provider == STARS)


class Stars:
    """Telegram Stars payments for a Shop, over a TeleBot (the Bot API's payment methods)."""

    def __init__(self, shop, bot):
        self.shop = shop
        self.bot = bot
        self.settings = shop.settings

    # Buying

    def offer(self, user, days, now=None):
        """Return the buyer's pending Stars payment for a plan: their unpaid one at today's price, else a new one.

        :raise KeyError: the plan has no Stars price.
        """
        price = self.settings.stars_plan(days)
        if price is None:
            raise KeyError(days)
        now = now or utcnow()
        lifetime = self.lifetime()
        fresh_after = now - lifetime + min(FRESH_MARGIN, lifetime / 2)  # not one about to expire
        pending = (Payment.select().where(Payment.user == user.id, Payment.provider == STARS,
                                          Payment.status == PENDING, Payment.plan_days == days,
                                          Payment.amount == price, Payment.created_at > fresh_after)
                   .order_by(Payment.id.desc()).first())
        if pending is not None:
            return pending
        payment = Payment.create(user=user.id, plan_days=days, amount=price, currency=XTR, provider=STARS,
                                 pay_url='', created_at=now)
        log.info('stars invoice created user=%s payment=%s days=%s stars=%s', user.telegram_id, payment.id, days,
                 price)
        return payment

    def send_invoice(self, user, payment, chat_id):
        """Send the Stars invoice message (sendInvoice, currency XTR, empty provider token); return the Message.

        :raise ApiTelegramException: Telegram refused it.
        """
        lang = user.language
        title = plain(lang, 'stars_title', plan=plan_name(lang, payment.plan_days))[:32]
        description = plain(lang, 'stars_description', plan=plan_name(lang, payment.plan_days))[:255]
        return self.bot.send_invoice(chat_id, title, description, payload_of(payment), provider_token='',
                                     currency=XTR, prices=[LabeledPrice(title, int(payment.amount))])

    def lifetime(self):
        """How long an unpaid invoice can be paid: INVOICE_EXPIRES_SECONDS, as for Crypto Pay (a timedelta)."""
        return timedelta(seconds=self.settings.invoice_expires_seconds)

    def pre_checkout(self, telegram_id, currency, total_amount, payload, now=None):
        """Judge a pre_checkout_query: None when it may be paid, else the text key of the reason to refuse."""
        payment = payment_of(payload)
        if payment is None:
            return 'stars_refuse_unknown'
        owner = User.select(User.telegram_id).where(User.id == payment.user_id).scalar()
        if owner != telegram_id:
            return 'stars_refuse_not_yours'
        if currency != XTR or total_amount != int(payment.amount):
            return 'stars_refuse_amount'
        if payment.status == EXPIRED or payment.status == PENDING and \
                payment.created_at <= (now or utcnow()) - self.lifetime():
            return 'stars_refuse_expired'
        if payment.status != PENDING:
            return 'stars_refuse_paid' if payment.status == PAID else 'stars_refuse_closed'
        return None

    def expire_unpaid(self, now=None):
        """Mark every pending Stars payment older than its lifetime expired; return how many this call marked.

        Settlement takes an expired payment too (settle), so a charge Telegram made anyway is never lost.
        """
        before = (now or utcnow()) - self.lifetime()
        expired = (Payment.update(status=EXPIRED)
                   .where(Payment.provider == STARS, Payment.status == PENDING, Payment.created_at <= before)
                   .execute())
        if expired:
            log.info('stars invoices expired: %s', expired)
        return expired

    def recurring(self, days):
        """Tell whether this plan is sold as a monthly Stars subscription (STARS_RECURRING=1, the 30-day plan)."""
        return self.settings.stars_recurring and days * 86400 == SUBSCRIPTION_PERIOD

    def subscription_link(self, user, payment):
        """Return the invoice link of a monthly Stars subscription (createInvoiceLink, subscription_period 30 days).

        :raise ApiTelegramException: Telegram refused it.
        """
        if payment.pay_url:
            return payment.pay_url
        lang = user.language
        title = plain(lang, 'stars_title', plan=plan_name(lang, payment.plan_days))[:32]
        description = plain(lang, 'stars_description', plan=plan_name(lang, payment.plan_days))[:255]
        link = self.bot.create_invoice_link(title, description, payload_of(payment), provider_token='',
                                            currency=XTR, prices=[LabeledPrice(title, int(payment.amount))],
                                            subscription_period=SUBSCRIPTION_PERIOD)
        Payment.update(pay_url=link).where(Payment.id == payment.id).execute()
        return link

    def subscription(self, user, now=None):
        """Return the buyer's running Stars subscription (its first payment's row), or None."""
        return models.prepared_first(lambda user_id, provider, moment: (
            Payment.select().where(Payment.user == user_id, Payment.provider == provider,
                                   Payment.subscription_until > moment).order_by(Payment.id.desc())),
            user.id, STARS, now or utcnow())

    def set_renewal(self, user, canceled, now=None):
        """Cancel (or resume) the renewal of the buyer's subscription (editUserStarSubscription); return the row.

        :raise StarsError: no running subscription, or Telegram refused (its reason).
        """
        root = self.subscription(user, now)
        if root is None:
            raise StarsError('no running subscription')
        try:
            self.bot.edit_user_star_subscription(user.telegram_id, root.provider_id, canceled)
        except ApiTelegramException as exc:
            if 'SUBSCRIPTION_NOT_MODIFIED' not in (exc.description or ''):
                raise StarsError(exc.description or str(exc)) from None
        except ApiException as exc:
            raise StarsError(f'Telegram did not answer ({type(exc).__name__})') from None
        Payment.update(renewal_canceled=canceled).where(Payment.id == root.id).execute()
        log.info('stars renewal %s user=%s charge=%s', 'canceled' if canceled else 'resumed', user.telegram_id,
                 root.provider_id)
        return Payment.get_by_id(root.id)

    # Settlement

    def settle(self, telegram_id, payload, charge_id, currency, total_amount, paid_at=None, now=None,
               subscription_until=None):
        """Credit one Telegram charge exactly once, whoever calls (the update, a re-delivery, the job).

        The payment row is locked first, so concurrent callers with the same charge queue up and all but one
        find it recorded. A charge for a row already paid by another charge (a subscription's renewal, a
        reused invoice link) gets a row of its own: money taken is never left without its days.
        """
        payment = payment_of(payload)
        if payment is None:
            return Settlement('foreign', detail=f'payload {payload!r} was never issued')
        charge_id = str(charge_id)
        with transaction():
            payment = models.locked(Payment.select().where(Payment.id == payment.id)).get()
            owner = User.get_by_id(payment.user_id)
            if owner.telegram_id != telegram_id or currency != XTR or total_amount != int(payment.amount):
                return Settlement('foreign', payment, f'paid by {telegram_id} {total_amount} {currency}, issued to '
                                                      f'{owner.telegram_id} for {int(payment.amount)} {XTR}')
            known = Payment.get_or_none(Payment.provider == STARS, Payment.provider_id == charge_id)
            if known is not None:
                return Settlement('duplicate', known)
            stamp = paid_at or now or utcnow()
            taken = (Payment.update(status=PAID, provider_id=charge_id, paid_at=stamp)
                     .where(Payment.id == payment.id, Payment.status.in_([PENDING, EXPIRED]),
                            Payment.provider_id.is_null()).execute())
            if not taken:
                payment = Payment.create(user=payment.user_id, plan_days=payment.plan_days, amount=payment.amount,
                                         currency=XTR, provider=STARS, provider_id=charge_id, pay_url='',
                                         status=PAID, paid_at=stamp, created_at=stamp)
            grant_days(payment.user_id, payment.plan_days, 'payment', payload_of(payment), now=now)
            self.shop.reward_referral(payment.user_id, now)
            if subscription_until is not None:  # a subscription's payment: its first row knows until when
                root = Payment.get_by_id(payment_of(payload).id)
                if root.subscription_until is None or root.subscription_until < subscription_until:
                    Payment.update(subscription_until=subscription_until).where(Payment.id == root.id).execute()
        log.info('stars payment settled user=%s payment=%s charge=%s days=%s', telegram_id, payment.id, charge_id,
                 payment.plan_days)
        return Settlement('settled', Payment.get_by_id(payment.id))

    def deliver(self, payment, messenger, now=None):
        """Push a settled payment's days to the panel and send the buyer the link (once; the jobs retry).

        :return: True when a panel has the days (the link was sent now, or its send failed and the jobs send
            it); False when no panel took them yet: the buyer is told to wait, retry_provisioning goes on.
        """
        import jobs  # jobs imports this module for its recovery job
        if not self.shop.provision(payment.user_id, now=now):
            return False
        jobs.deliver_link(self.shop, messenger, Payment.get_by_id(payment.id), now)
        return True

    # The safety net

    def sync_transactions(self, messenger, now=None):
        """Read getStarTransactions from where the last run stopped; settle every incoming payment of ours.

        Transactions are listed oldest first and paged by offset; the cursor (models.Cursor 'stars') counts
        those read. A payload we never issued is reported to the admins and never credited; a refund made but
        not recorded here (a crash after Telegram's answer) is recorded. Return the number settled now.
        :raise ApiException: Telegram could not be asked; the cursor stays where it was.
        """
        cursor, _ = Cursor.get_or_create(name='stars')
        offset = max(cursor.position - OVERLAP, 0)
        settled, foreign = 0, []
        while True:
            page = self.bot.get_star_transactions(offset=offset, limit=PAGE).transactions
            for item in page:
                outcome = self._apply(item, messenger, now)
                settled += outcome == 'settled'
                if outcome == 'foreign' and offset >= cursor.position:
                    foreign.append(item)
            offset += len(page)
            if offset > cursor.position:
                Cursor.update(position=offset, updated_at=utcnow()).where(Cursor.name == 'stars').execute()
                cursor.position = offset
            if len(page) < PAGE:
                break
        if foreign:
            self._report(messenger, foreign)
        return settled

    def _apply(self, item, messenger, now):
        source, receiver = item.source, item.receiver
        if source is not None and getattr(source, 'type', None) == 'user' and \
                getattr(source, 'transaction_type', 'invoice_payment') in (None, 'invoice_payment'):
            paid_at = datetime.fromtimestamp(item.date, timezone.utc).replace(tzinfo=None)
            period = getattr(source, 'subscription_period', None)
            until = paid_at + timedelta(seconds=period) if period else None
            result = self.settle(source.user.id, source.invoice_payload, item.id, XTR, item.amount,
                                 paid_at=paid_at, now=now, subscription_until=until)
            if result.outcome == 'settled':
                self.deliver(result.payment, messenger, now)
            elif result.outcome == 'foreign':
                log.error('stars transaction not ours, not credited: charge=%s user=%s: %s', item.id,
                          source.user.id, result.detail)
            return result.outcome
        if receiver is not None and getattr(receiver, 'type', None) == 'user':
            payment = Payment.get_or_none(Payment.provider == STARS, Payment.provider_id == str(item.id))
            if payment is not None and self.record_refund(payment, now):
                log.warning('stars refund found by the job and recorded charge=%s', item.id)
                return 'refunded'
        return 'other'

    def _report(self, messenger, items):
        lines = []
        for item in items[:20]:
            source = item.source
            lines.append(f'<code>{html(str(item.id))}</code> from <code>{source.user.id}</code>: {item.amount} ⭐, '
                         f'payload <code>{html(str(source.invoice_payload))[:200]}</code>')
        for admin_id in self.settings.admin_ids:
            admin = User.get_or_none(User.telegram_id == admin_id)
            lang = admin.language if admin else 'en'
            messenger.send(admin_id, t(lang, 'stars_foreign', count=len(items)) + '\n' + '\n'.join(lines))

    # Refunds

    def refund(self, charge_id, now=None):
        """Refund a Stars charge (refundStarPayment) and take its days back, once; see RefundResult."""
        charge_id = (charge_id or '').strip()
        payment = Payment.get_or_none(Payment.provider == STARS, Payment.provider_id == charge_id)
        if payment is None:
            crypto = Payment.get_or_none(Payment.provider != STARS, Payment.provider_id == charge_id)
            return RefundResult('crypto' if crypto else 'unknown', crypto)
        if payment.status == REFUNDED:
            return RefundResult('already', payment)
        telegram_id = User.select(User.telegram_id).where(User.id == payment.user_id).scalar()
        try:
            self.bot.refund_star_payment(telegram_id, charge_id)
        except ApiTelegramException as exc:
            # Telegram says the buyer has the Stars back already: the days must go too
            if 'CHARGE_ALREADY_REFUNDED' not in (exc.description or ''):
                return RefundResult('refused', payment, exc.description or str(exc))
        except ApiException as exc:
            return RefundResult('refused', payment, f'Telegram did not answer ({type(exc).__name__})')
        if not self.record_refund(payment, now):
            return RefundResult('already', payment)
        self.shop.provision(payment.user_id, now=now)
        log.info('stars payment refunded user=%s payment=%s charge=%s', telegram_id, payment.id, charge_id)
        return RefundResult('refunded', Payment.get_by_id(payment.id))

    def record_refund(self, payment, now=None):
        """Mark a paid Stars payment refunded and take its days back in the ledger; return True if this call did."""
        try:
            with transaction():
                done = (Payment.update(status=REFUNDED).where(Payment.id == payment.id, Payment.status == PAID)
                        .execute())
                if not done:
                    return False
                grant_days(payment.user_id, -payment.plan_days, 'refund', payload_of(payment), now=now)
        except IntegrityError:
            return False
        return True

    # Figures

    @staticmethod
    def revenue(since=None):
        """Return {currency: (paid count, sum)} of paid payments (refunded ones left out), e.g. XTR in Stars."""
        query = Payment.select(Payment.currency, fn.COUNT(Payment.id), fn.SUM(Payment.amount)).where(
            Payment.status == PAID)
        if since is not None:
            query = query.where(Payment.paid_at >= since)
        return {currency: (count, Decimal(int(total)) if currency == XTR
                           else Decimal(str(total)).quantize(Decimal('0.01')))
                for currency, count, total in query.group_by(Payment.currency).tuples()}
