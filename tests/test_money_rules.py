"""The money rules, one test each, written to kill the mutants of the money paths (scripts/mutate.sh).

Each test drives the shop and the jobs through their public functions, against the real database and the
loopback fakes, and pins the exact days, rows and answers a rule promises: a rule that only holds "roughly"
lets a mutant through.
"""
from datetime import datetime, timedelta

import pytest
from peewee import IntegrityError

import jobs
import models
from models import EXPIRED, PAID, PENDING, Gift, Grant, Payment, PromoCode, Redemption, Referral, User

NOW = datetime(2026, 11, 26, 12, 0, 0)
DAY = timedelta(days=1)


def customer(shop, telegram=None, telegram_id=1001, lang='en', invite_code=None):
    if telegram is not None:
        telegram.add_user({'id': telegram_id, 'first_name': 'Anna', 'language_code': lang})
    user, _ = shop.register(telegram_id, f'u{telegram_id}', 'Anna', lang, invite_code=invite_code)
    return user


def fresh(user):
    return User.get_by_id(user.id)


def grants(reason=None):
    query = Grant.select().order_by(Grant.id)
    return list(query if reason is None else query.where(Grant.reason == reason))


# Settlement

def test_a_paid_invoice_we_had_marked_expired_settles_once(shop, cryptopay):
    """Crypto Pay still took the money (or our clock ran ahead): the buyer must be credited, once."""
    user = customer(shop)
    payment = shop.create_invoice(user, 30)
    assert shop.expire_payment(payment.invoice_id)  # e.g. the poller saw it missing from an answer
    assert Payment.get_by_id(payment.id).status == EXPIRED
    cryptopay.pay(payment.invoice_id)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.status == PAID and result.provisioned
    again = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert again.status == PAID
    assert [(g.reason, g.reference, g.days) for g in grants()] == [('payment', str(payment.invoice_id), 30)]
    assert shop.settle(payment.invoice_id) is False  # a late poller or a second press credits nothing
    assert len(grants()) == 1
