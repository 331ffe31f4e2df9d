"""Telegram Stars: buying, pre-checkout, settlement once per charge, the recovery job, refunds, /stats.

Journeys run bot.py as a real process against the loopback Bot API (tests/fake_telegram.py), the panel and
Crypto Pay; the job and the settlement are also called directly with the fakes.
"""
import os
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import telebot
from peewee import fn
from telebot import apihelper

import config
import jobs
import models
import stars
from conftest import BOT_TOKEN, make_shop, settings_env
from messenger import Messenger
from models import EXPIRED, PAID, PENDING, REFUNDED, Grant, Payment, Referral, User
from test_e2e import ADMIN, ask, current, eventually, panel_expiry, person, press, start_bot, text_of

STARS_PLANS = '30:250,7:60'  # 30 days by both methods, 7 days only in Stars; 90 days only in crypto (PLANS)


@pytest.fixture
def stars_env(panel, cryptopay, database):
    return settings_env(panel, cryptopay, database, STARS_PLANS=STARS_PLANS)


@pytest.fixture
def stars_bot(telegram, panel, cryptopay, database, tmp_path, request):
    running = start_bot(telegram, panel, cryptopay, database, tmp_path, STARS_PLANS=STARS_PLANS)
    yield running
    running.stop()
    output = running.output()
    if getattr(request.node, 'rep_call', None) and request.node.rep_call.failed:
        print(output)
    assert BOT_TOKEN not in output and 'Traceback' not in output, output


def in_process(telegram, env):
    """Return a Stars provider and a Messenger in this process, talking to the fake Bot API."""
    apihelper.API_URL = telegram.url + '/bot{0}/{1}'
    bot = telebot.TeleBot(BOT_TOKEN, threaded=False)
    return stars.Stars(make_shop(config.load(env)), bot), Messenger(bot)


@pytest.fixture
def provider(telegram, stars_env):
    return in_process(telegram, stars_env)


def stars_invoice(telegram, user, days=30):
    """Buy → plan → (⭐ Telegram Stars when both methods price it); return the invoice message."""
    menu = ask(telegram, user, '/start')
    press(telegram, user, menu, 'buy')
    press(telegram, user, current(telegram, menu), f'plan:{days}')
    if any(data == f'stars:{days}' for _, data in telegram.buttons(current(telegram, menu))):
        press(telegram, user, current(telegram, menu), f'stars:{days}')
    telegram.wait_for(lambda c: c.method == 'sendInvoice' and c.ok and c.params['chat_id'] == str(user['id']))
    return invoice_message(telegram, user['id'])


def invoice_message(telegram, user_id):
    return next(m for m in reversed(telegram.messages_to(user_id)) if 'invoice' in m)


def payment_grants():
    return list(Grant.select().where(Grant.reason == 'payment'))


# Buying


def test_buyer_chooses_stars_pays_and_gets_days_link_and_referral_bonus(stars_bot, telegram, panel):
    inviter = person(2001, name='Ivan')
    ask(telegram, inviter, '/start')
    code = User.get(User.telegram_id == 2001).invite_code
    buyer = person(2002, lang='ru', name='Olga')
    menu = ask(telegram, buyer, f'/start {code}')
    press(telegram, buyer, menu, 'buy')
    press(telegram, buyer, current(telegram, menu), 'plan:30')
    choice = telegram.buttons(current(telegram, menu))
    assert ('CryptoBot (USDT, TON, BTC)', 'crypto:30') in choice and ('⭐ Telegram Stars', 'stars:30') in choice
    press(telegram, buyer, current(telegram, menu), 'stars:30')
    call = telegram.wait_for(lambda c: c.method == 'sendInvoice' and c.ok)
    assert call.params['currency'] == 'XTR' and call.params.get('provider_token', '') == ''
    invoice = invoice_message(telegram, 2002)
    assert invoice['invoice']['total_amount'] == 250
    payment = Payment.get(Payment.provider == 'stars')
    assert call.params['payload'] == f'stars:{payment.id}' and payment.status == PENDING
    assert (payment.amount, payment.currency, payment.plan_days) == (250, 'XTR', 30)

    query = telegram.pay(buyer, invoice)
    answer = telegram.wait_for_pre_checkout(query)
    assert answer['ok'] and answer['seconds'] < 10
    link = telegram.wait_for_message(2002, contains='/sub/')
    user = User.get(User.telegram_id == 2002)
    assert user.panel_sub_id in text_of(link)
    assert eventually(lambda: Payment.get_by_id(payment.id).status == PAID)
    payment = Payment.get_by_id(payment.id)
    assert payment.provider_id == answer['charge_id']
    assert [grant.days for grant in payment_grants()] == [30]
    assert panel_expiry(panel, user.panel_email) == user.expires_at
    assert Referral.get(Referral.invited == user).rewarded_at is not None
    assert Grant.get(Grant.reason == 'referral').user.telegram_id == 2001
    # the same successful_payment delivered again (Telegram re-sends what the bot did not confirm)
    again = {'message_id': 999, 'from': {'id': 2002, 'is_bot': False, 'first_name': 'Olga'},
             'chat': {'id': 2002, 'type': 'private', 'first_name': 'Olga'}, 'date': int(time.time()),
             'successful_payment': {'currency': 'XTR', 'total_amount': 250, 'invoice_payload': f'stars:{payment.id}',
                                    'telegram_payment_charge_id': answer['charge_id'],
                                    'provider_payment_charge_id': ''}}
    telegram.inject({'message': again})
    telegram.inject({'message': again})
    assert eventually(lambda: telegram.pending_updates() == 0)
    time.sleep(0.5)
    assert [grant.days for grant in payment_grants()] == [30] and Grant.select().count() == 2
    assert len([m for m in telegram.messages_to(2002) if '/sub/' in text_of(m)]) == 1


def test_one_method_skips_the_choice(stars_bot, telegram, cryptopay):
    alice = person(2003)
    menu = ask(telegram, alice, '/start')
    press(telegram, alice, menu, 'buy')
    plans = telegram.buttons(current(telegram, menu))
    assert [data for _, data in plans if data.startswith('plan:')] == ['plan:7', 'plan:30', 'plan:90', 'plan:180',
                                                                         'plan:365']
    press(telegram, alice, current(telegram, menu), 'plan:7')  # only in Stars: the invoice at once
    telegram.wait_for(lambda c: c.method == 'sendInvoice' and c.ok and c.params['payload'].startswith('stars:'))
    assert invoice_message(telegram, 2003)['invoice']['total_amount'] == 60
    press(telegram, alice, current(telegram, menu), 'menu')
    press(telegram, alice, current(telegram, menu), 'buy')
    press(telegram, alice, current(telegram, menu), 'plan:90')  # only in crypto: the Pay button at once
    assert any(data and str(data).startswith('check:') for _, data in telegram.buttons(current(telegram, menu)))


def test_pre_checkout_refuses_what_we_did_not_issue(stars_bot, telegram):
    alice, mallory = person(2004), person(2005, name='Mallory')
    invoice = stars_invoice(telegram, alice)
    payment = Payment.get(Payment.provider == 'stars')
    cases = [
        (mallory, {}, 'not yours'),  # another user pays Alice's forwarded invoice
        (alice, {'payload': 'stars:99999'}, 'not valid'),  # a forged payload
        (alice, {'payload': 'garbage'}, 'not valid'),
        (alice, {'total_amount': 1}, 'price'),  # a wrong amount
    ]
    for user, forged, words in cases:
        answer = telegram.wait_for_pre_checkout(telegram.pay(user, invoice, **forged))
        assert not answer['ok'] and words in answer['error_message'], (forged, answer)
        assert answer['seconds'] < 10
    assert Payment.get_by_id(payment.id).status == PENDING and not telegram.charges
    ok = telegram.wait_for_pre_checkout(telegram.pay(alice, invoice))
    assert ok['ok']
    assert eventually(lambda: Payment.get_by_id(payment.id).status == PAID)
    again = telegram.wait_for_pre_checkout(telegram.pay(alice, invoice))  # paid already: not twice
    assert not again['ok'] and 'already paid' in again['error_message']


def test_pre_checkout_is_answered_while_every_handler_thread_is_busy(telegram, panel, cryptopay, database, tmp_path):
    running = start_bot(telegram, panel, cryptopay, database, tmp_path, STARS_PLANS=STARS_PLANS, WORKER_THREADS=1)
    try:
        alice = person(2006)
        stars_invoice(telegram, alice)
        invoice = invoice_message(telegram, 2006)
        user = person(2007, name='Busy')
        menu = ask(telegram, user, '/start')
        panel.hang_next(3, seconds=3)  # "My subscription" asks the panel: the one handler thread waits 9 s
        for _ in range(3):
            telegram.press(user, menu, 'sub')
        time.sleep(0.5)
        query = telegram.pay(alice, invoice)
        answer = telegram.wait_for_pre_checkout(query, timeout=15)
        assert answer['ok'] and answer['seconds'] < 2, answer
    finally:
        running.stop()


# Settlement exactly once


def charge(telegram, provider, user, days=30, drop=True):
    """Issue a Stars payment through the provider, let the fake charge it; return (payment, charge id)."""
    shop_stars, _ = provider
    telegram.add_user(user)
    customer, _ = shop_stars.shop.register(user['id'], None, user['first_name'], 'en')
    payment = shop_stars.offer(customer, days)
    message = shop_stars.send_invoice(customer, payment, user['id'])
    query = telegram.pay(user, {'chat': {'id': user['id']}, 'message_id': message.message_id}, drop=drop)
    assert shop_stars.pre_checkout(user['id'], 'XTR', int(payment.amount), f'stars:{payment.id}') is None
    shop_stars.bot.answer_pre_checkout_query(query, ok=True)
    return payment, telegram.pre_checkouts[query]['answer']['charge_id']


def test_the_same_successful_payment_twice_and_the_job_credit_once(telegram, provider, panel):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2010))
    args = (2010, f'stars:{payment.id}', charge_id, 'XTR', 250)
    results = []

    def deliver():
        with models.connection():
            results.append(shop_stars.settle(*args).outcome)
    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ['duplicate'] * 3 + ['settled']
    assert shop_stars.sync_transactions(messenger) == 0
    assert shop_stars.settle(*args).outcome == 'duplicate'
    assert len(payment_grants()) == 1 and Payment.get_by_id(payment.id).provider_id == charge_id


def test_a_dropped_update_is_recovered_by_the_job_within_one_round(telegram, provider, panel):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2011), drop=True)
    assert Payment.get_by_id(payment.id).status == PENDING
    assert shop_stars.sync_transactions(messenger) == 1
    stored = Payment.get_by_id(payment.id)
    assert stored.status == PAID and stored.provider_id == charge_id and stored.notified_at is not None
    user = User.get(User.telegram_id == 2011)
    assert panel_expiry(panel, user.panel_email) == user.expires_at
    assert any(user.panel_sub_id in text_of(m) for m in telegram.messages_to(2011))
    reads = telegram.counts['getStarTransactions']
    assert shop_stars.sync_transactions(messenger) == 0 and len(payment_grants()) == 1
    assert telegram.counts['getStarTransactions'] == reads + 1  # one call: only what is new


def test_a_charge_for_a_payment_we_had_expired_is_settled_once_by_the_job(telegram, provider, panel):
    """Telegram charged after we had closed the invoice here (an unpaid-invoice expiry, our clock ahead) and the
    update was lost: the recovery job alone credits it, on its own row, once."""
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2012), drop=True)
    Payment.update(status=EXPIRED).where(Payment.id == payment.id).execute()  # what a local expiry leaves
    assert shop_stars.sync_transactions(messenger) == 1
    assert shop_stars.sync_transactions(messenger) == 0
    stored = Payment.get_by_id(payment.id)
    assert (stored.status, stored.provider_id) == (PAID, charge_id) and stored.notified_at is not None
    assert Payment.select().count() == 1  # no stray row beside the one that was charged
    assert [(g.reference, g.days) for g in payment_grants()] == [(f'stars:{payment.id}', 30)]
    user = User.get(User.telegram_id == 2012)
    assert panel_expiry(panel, user.panel_email) == user.expires_at
    assert sum(user.panel_sub_id in text_of(m) for m in telegram.messages_to(2012)) == 1
    assert shop_stars.settle(2012, f'stars:{payment.id}', charge_id, 'XTR', 250).outcome == 'duplicate'


def test_the_job_pages_through_many_transactions(telegram, provider):
    shop_stars, messenger = provider
    made = [charge(telegram, provider, person(3000 + n))[0] for n in range(130)]
    assert shop_stars.sync_transactions(messenger) == 130
    assert Payment.select().where(Payment.status == PAID).count() == 130 == len(made)
    assert models.Cursor.get(models.Cursor.name == 'stars').position == 130


def test_a_payload_we_never_issued_is_reported_not_credited(telegram, provider):
    shop_stars, messenger = provider
    telegram.add_user(ADMIN)
    stranger = {'id': 2012, 'is_bot': False, 'first_name': 'Eve <&>'}
    for payload in ('stars:424242', 'donation', 'stars:<b>'):
        telegram.star_transactions.append({'id': f'stx-foreign-{payload}', 'amount': 999, 'date': 1, 'source': {
            'type': 'user', 'transaction_type': 'invoice_payment', 'user': stranger, 'invoice_payload': payload}})
    assert shop_stars.sync_transactions(messenger) == 0
    assert Grant.select().count() == 0 and Payment.select().count() == 0
    alerts = [m for m in telegram.messages_to(900) if 'stx-foreign' in text_of(m)]
    assert len(alerts) == 1 and all(p in text_of(alerts[0]) for p in ('donation', '2012', '999'))
    shop_stars.sync_transactions(messenger)
    assert len([m for m in telegram.messages_to(900) if 'stx-foreign' in text_of(m)]) == 1  # told once


# Refunds


def test_refund_takes_the_days_back_once_and_the_panel_follows(stars_bot, telegram, panel, cryptopay):
    alice = person(2020)
    stars_invoice(telegram, alice)
    charge_id = telegram.wait_for_pre_checkout(telegram.pay(alice, invoice_message(telegram, 2020)))['charge_id']
    assert eventually(lambda: Payment.get(Payment.provider == 'stars').status == PAID)
    user = User.get(User.telegram_id == 2020)
    paid_until = user.expires_at
    telegram.add_user(ADMIN)
    reply = text_of(ask(telegram, ADMIN, f'/refund {charge_id}'))
    assert 'Refunded' in reply, reply
    assert telegram.charges[charge_id]['refunded']
    payment = Payment.get(Payment.provider == 'stars')
    assert payment.status == REFUNDED
    reversal = Grant.get(Grant.reason == 'refund')
    assert reversal.days == -30 and reversal.reference == f'stars:{payment.id}'
    user = User.get(User.telegram_id == 2020)
    assert user.expires_at == paid_until - timedelta(days=30)
    assert eventually(lambda: panel_expiry(panel, user.panel_email) == user.expires_at)
    again = text_of(ask(telegram, ADMIN, f'/refund {charge_id}'))
    assert 'already refunded' in again and Grant.select().where(Grant.reason == 'refund').count() == 1
    assert telegram.counts['refundStarPayment'] == 1
    assert 'Usage' in text_of(ask(telegram, ADMIN, '/refund'))
    stats = text_of(ask(telegram, ADMIN, '/stats'))
    assert 'By currency' in stats and '⭐' not in stats.split('By currency')[1]  # refunded: no Stars revenue
    card = text_of(ask(telegram, ADMIN, '/user 2020'))
    assert f'stars {charge_id} 250 XTR refunded' in card, card
    assert 'No Stars payment' in text_of(ask(telegram, ADMIN, '/refund stx-nothing-like-it'))


def test_recording_a_refund_takes_back_that_charges_days_once_at_the_given_time(telegram, provider):
    shop_stars, _ = provider
    now = datetime(2026, 11, 26, 12, 0, 0)
    paid = []
    for telegram_id in (2015, 2016):
        payment, charge_id = charge(telegram, provider, person(telegram_id))
        assert shop_stars.settle(telegram_id, f'stars:{payment.id}', charge_id, 'XTR', 250, now=now).outcome == \
            'settled'
        paid.append(Payment.get_by_id(payment.id))
    first, second = paid
    assert shop_stars.record_refund(first, now=now + timedelta(days=1)) is True
    assert shop_stars.record_refund(Payment.get_by_id(first.id), now=now + timedelta(days=2)) is False
    assert [payment.status for payment in Payment.select().order_by(Payment.id)] == [REFUNDED, PAID]
    assert [(g.user_id, g.days, g.reference, g.created_at) for g in Grant.select().where(Grant.reason == 'refund')] \
        == [(first.user_id, -30, f'stars:{first.id}', now + timedelta(days=1))]
    assert User.get_by_id(first.user_id).expires_at == now  # the 30 days given at `now` are gone again
    assert User.get_by_id(second.user_id).expires_at == now + timedelta(days=30)
    # the ledger already holds this charge's take-back (a backup restored over a later state): never twice
    Grant.create(user=second.user_id, days=-30, reason='refund', reference=f'stars:{second.id}',
                 expires_after=now, created_at=now)
    assert shop_stars.record_refund(second, now=now) is False
    assert Payment.get_by_id(second.id).status == PAID


def test_a_refund_telegram_refuses_changes_nothing_and_says_why(telegram, provider):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2021))
    shop_stars.sync_transactions(messenger)
    del telegram.charges[charge_id]  # Telegram no longer knows the charge
    result = shop_stars.refund(charge_id)
    assert result.outcome == 'refused' and 'CHARGE_NOT_FOUND' in result.detail
    assert Payment.get_by_id(payment.id).status == PAID and not Grant.select().where(Grant.reason == 'refund').exists()


def paid_crypto(shop, cryptopay, telegram_id):
    """Register a buyer and settle a Crypto Pay payment of theirs; return it."""
    user, _ = shop.register(telegram_id, None, 'Cy', 'en')
    payment = shop.create_invoice(user, 30)
    cryptopay.pay(payment.invoice_id)
    shop.settle(payment.invoice_id)
    return payment


def test_crypto_payments_cannot_be_refunded_this_way(telegram, provider, cryptopay):
    shop_stars, _ = provider
    payment = paid_crypto(shop_stars.shop, cryptopay, 2022)
    assert shop_stars.refund(str(payment.invoice_id)).outcome == 'crypto'
    assert Payment.get_by_id(payment.id).status == PAID and telegram.counts['refundStarPayment'] == 0


def test_a_refund_made_but_not_recorded_is_recorded_by_the_job(telegram, provider):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2023))
    shop_stars.sync_transactions(messenger)
    shop_stars.bot.refund_star_payment(2023, charge_id)  # as if we crashed right after Telegram's answer
    shop_stars.sync_transactions(messenger)
    assert Payment.get_by_id(payment.id).status == REFUNDED
    assert Grant.get(Grant.reason == 'refund').days == -30


def test_the_job_records_a_refund_on_the_charge_it_names_only_and_at_its_own_clock(telegram, provider):
    shop_stars, messenger = provider
    now = datetime(2026, 11, 26, 12, 0, 0)
    charges = [charge(telegram, provider, person(telegram_id)) for telegram_id in (2024, 2025, 2026)]
    shop_stars.sync_transactions(messenger)
    # not the first one made, nor the one first by charge id: a lookup that ignored the id would find another
    lowest = min(charge_id for _, charge_id in charges)
    refunded, charge_id = next((payment, charge_id) for payment, charge_id in charges[1:] if charge_id != lowest)
    shop_stars.bot.refund_star_payment(User.get_by_id(refunded.user_id).telegram_id, charge_id)  # then we crashed
    shop_stars.sync_transactions(messenger, now=now)
    assert [Payment.get_by_id(payment.id).status for payment, _ in charges] == \
        [REFUNDED if payment.id == refunded.id else PAID for payment, _ in charges]
    assert [(g.user_id, g.created_at) for g in Grant.select().where(Grant.reason == 'refund')] == \
        [(refunded.user_id, now)]


def test_the_job_never_takes_a_refund_for_a_crypto_payment_with_the_same_id(telegram, provider, cryptopay):
    """A Telegram transaction id with the same text as a Crypto Pay invoice id is not that invoice."""
    shop_stars, messenger = provider
    crypto = paid_crypto(shop_stars.shop, cryptopay, 2028)
    telegram.star_transactions.append({'id': crypto.provider_id, 'amount': 250, 'date': int(time.time()),
                                       'receiver': {'type': 'user', 'transaction_type': 'invoice_payment',
                                                    'user': {'id': 2028, 'is_bot': False, 'first_name': 'Cy'},
                                                    'invoice_payload': 'x'}})
    shop_stars.sync_transactions(messenger)
    assert Payment.get_by_id(crypto.id).status == PAID and not Grant.select().where(Grant.reason == 'refund').exists()


def test_deliver_is_false_while_no_panel_has_the_days_and_sends_no_link(telegram, provider, panel):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2027), drop=True)
    result = shop_stars.settle(2027, f'stars:{payment.id}', charge_id, 'XTR', 250)
    panel.refuse()
    sent = len(telegram.messages_to(2027))
    assert shop_stars.deliver(result.payment, messenger) is False
    assert Payment.get_by_id(payment.id).provisioned_at is None and len(telegram.messages_to(2027)) == sent

# Figures


def test_stats_and_user_show_currencies_providers_and_states(telegram, provider, cryptopay):
    shop_stars, messenger = provider
    shop = shop_stars.shop
    for n in range(2):
        charge(telegram, provider, person(2030 + n))
    shop_stars.sync_transactions(messenger)
    user, _ = shop.register(2040, None, 'Cy', 'en')
    crypto = shop.create_invoice(user, 30)
    cryptopay.pay(crypto.invoice_id)
    shop.settle(crypto.invoice_id)
    figures = shop_stars.revenue()
    assert figures == {'RUB': (1, Decimal('100')), 'XTR': (2, Decimal('500'))}


# The ledger for several providers on a wave-1 database


def test_a_wave1_database_takes_stars_payments_and_refunds(tmp_path):
    import importlib.util
    from pathlib import Path
    from peewee import IntegrityError
    url = f'sqlite:///{tmp_path / "wave1.db"}' if not os.environ.get('TEST_DATABASE_URL') else \
        os.environ['TEST_DATABASE_URL']
    spec = importlib.util.spec_from_file_location('wave1_models', Path(__file__).parent / 'wave1' / 'models.py')
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    drop_all(url)
    old_db = old.connect_database(url, pool_size=2)
    old.create_schema()
    with old.db.connection_context():
        buyer = old.User.create(telegram_id=1, panel_email='spn-1')
        old.grant_days(buyer.id, 30, 'payment', 101)
        old.Payment.create(invoice_id=101, user=buyer, plan_days=30, amount=Decimal('100.50'), currency='RUB',
                           status='paid', pay_url='https://t.me/x')
        before = old.User.get_by_id(buyer.id)
    if hasattr(old_db, 'close_all'):
        old_db.close_all()
    new_db = models.connect_database(url, pool_size=2)
    try:
        with models.db.connection_context():
            models.create_schema()
            assert {40, 41} <= {row.version for row in models.SchemaVersion.select()}
            crypto = Payment.get(Payment.invoice_id == 101)
            assert (crypto.provider, crypto.provider_id, crypto.amount) == ('cryptopay', '101', Decimal('100.50'))
            user = User.get_by_id(buyer.id)
            assert (user.expires_at, user.panel_sub_id) == (before.expires_at, before.panel_sub_id)
            star = Payment.create(user=user, plan_days=30, amount=250, currency='XTR', provider='stars',
                                  provider_id='stx1', pay_url='', status=PAID)
            assert star.invoice_id is None
            with pytest.raises(IntegrityError), models.db.atomic():
                Payment.create(user=user, plan_days=30, amount=250, currency='XTR', provider='stars',
                               provider_id='stx1', pay_url='')
            models.grant_days(user.id, -30, 'refund', f'stars:{star.id}')
            with pytest.raises(IntegrityError), models.db.atomic():
                models.grant_days(user.id, 1, 'bogus', 'x')
            back = before.expires_at - timedelta(days=30)
            assert User.get_by_id(user.id).expires_at == back == models.derive_expiry(user.id)
    finally:
        drop_all(url)
        with models.db.connection_context():
            models.create_schema()
        if hasattr(new_db, 'close_all'):
            new_db.close_all()


def drop_all(url):
    models.connect_database(url, pool_size=2)
    with models.db.connection_context():
        for name in models.db.get_tables():
            models.db.execute_sql(f'DROP TABLE IF EXISTS "{name}"' + ('' if models.is_sqlite() else ' CASCADE'))


def test_kill_9_between_the_charge_and_our_commit_is_recovered_by_the_job(telegram, panel, cryptopay, database,
                                                                             tmp_path):
    running = start_bot(telegram, panel, cryptopay, database, tmp_path, STARS_PLANS=STARS_PLANS)
    alice = person(2050)
    try:
        invoice = stars_invoice(telegram, alice)
        payment = Payment.get(Payment.provider == 'stars')
        with models.transaction():  # hold the payment row: the bot's settlement waits inside its transaction
            models.locked(Payment.select().where(Payment.id == payment.id)).get()
            answer = telegram.wait_for_pre_checkout(telegram.pay(alice, invoice))
            assert answer['ok']
            eventually(lambda: telegram.pending_updates() == 0, timeout=5)  # the bot has taken the update
            time.sleep(1)
            os.kill(running.process.pid, signal.SIGKILL)
            running.process.wait(10)
    finally:
        running.stop()
    assert Payment.get_by_id(payment.id).status == PENDING and not payment_grants()  # charged, not credited
    assert telegram.pending_updates() == 0  # the bot confirmed the update before it died: it never comes again
    (tmp_path / 'again').mkdir()
    restarted = start_bot(telegram, panel, cryptopay, database, tmp_path / 'again', STARS_PLANS=STARS_PLANS)
    try:
        assert eventually(lambda: Payment.get_by_id(payment.id).status == PAID, timeout=20), restarted.output()
        assert Payment.get_by_id(payment.id).provider_id == answer['charge_id']
        telegram.wait_for_message(2050, contains='/sub/', timeout=20)
        assert [grant.days for grant in payment_grants()] == [30]
    finally:
        restarted.stop()


# Monthly subscriptions (STARS_RECURRING=1)


def test_monthly_subscription_renews_three_times_once_each_and_can_be_canceled_and_resumed(
        telegram, panel, cryptopay, database, tmp_path):
    running = start_bot(telegram, panel, cryptopay, database, tmp_path, STARS_PLANS=STARS_PLANS, STARS_RECURRING=1)
    try:
        alice = person(2060)
        menu = ask(telegram, alice, '/start')
        press(telegram, alice, menu, 'buy')
        press(telegram, alice, current(telegram, menu), 'plan:30')
        press(telegram, alice, current(telegram, menu), 'stars:30')
        link = next(url for text, url in telegram.buttons(current(telegram, menu)) if text.startswith('⭐ Subscribe'))
        assert telegram.invoice_links[link]['subscription_period'] == 2592000
        first = telegram.wait_for_pre_checkout(telegram.pay(alice, link))['charge_id']
        telegram.wait_for_message(2060, contains='/sub/')
        root = Payment.get(Payment.provider_id == first)
        assert eventually(lambda: Payment.get_by_id(root.id).subscription_until is not None)
        renewals = [telegram.renew(first), telegram.renew(first, drop=True), telegram.renew(first)]
        assert eventually(lambda: len(payment_grants()) == 4, timeout=20), running.output()
        charges = {p.provider_id for p in Payment.select().where(Payment.provider == 'stars', Payment.status == PAID)}
        assert charges == {first, *renewals}
        user = User.get(User.telegram_id == 2060)
        assert user.expires_at == Grant.select().where(Grant.reason == 'payment').order_by(Grant.id).first() \
            .expires_after + timedelta(days=90)
        time.sleep(1.5)  # the job's next round finds nothing more to credit
        assert len(payment_grants()) == 4

        menu = ask(telegram, alice, '/start', contains='👋')
        press(telegram, alice, menu, 'sub')
        assert 'Renews on' in text_of(current(telegram, menu))
        press(telegram, alice, current(telegram, menu), 'renoff')
        assert telegram.charges[first]['canceled'] and 'Renewal canceled' in text_of(current(telegram, menu)), (text_of(current(telegram, menu)), running.output()[-3000:])
        with pytest.raises(ValueError):
            telegram.renew(first)
        menu = ask(telegram, alice, '/start', contains='👋')
        press(telegram, alice, menu, 'sub')
        press(telegram, alice, current(telegram, menu), 'renon')
        assert not telegram.charges[first]['canceled'] and 'Renews on' in text_of(current(telegram, menu))
        telegram.add_user(ADMIN)
        assert 'renewal on' in text_of(ask(telegram, ADMIN, '/user 2060'))
    finally:
        running.stop()


def test_unpaid_stars_invoices_do_not_count_against_the_crypto_invoice_cap(telegram, provider, cryptopay):
    shop_stars, _ = provider
    user, _ = shop_stars.shop.register(2070, None, 'Cy', 'en')
    for days in (7, 30):
        shop_stars.offer(user, days)
    made = [shop_stars.shop.create_invoice(user, days) for days in (30, 90, 180)]
    assert len({payment.invoice_id for payment in made}) == 3


# Unpaid invoices expire (INVOICE_EXPIRES_SECONDS, as Crypto Pay invoices do); money taken still settles once


def test_an_unpaid_stars_invoice_expires_and_its_pre_checkout_is_refused_with_a_reason(telegram, panel, cryptopay,
                                                                                        database, tmp_path):
    def fresh_id():
        return Payment.select(fn.MAX(Payment.id)).where(Payment.provider == 'stars').scalar()

    running = start_bot(telegram, panel, cryptopay, database, tmp_path, STARS_PLANS=STARS_PLANS,
                        INVOICE_EXPIRES_SECONDS=2)
    try:
        alice = person(2080)
        invoice = stars_invoice(telegram, alice)
        time.sleep(2.5)  # the invoice message stays in the chat; its Pay button must no longer take money
        answer = telegram.wait_for_pre_checkout(telegram.pay(alice, invoice))
        assert not answer['ok'] and 'expired' in answer['error_message'], answer
        assert not telegram.charges and Payment.get(Payment.provider == 'stars').status in (PENDING, EXPIRED)
        assert eventually(lambda: Payment.get(Payment.provider == 'stars').status == EXPIRED)  # the job's round
        menu = ask(telegram, alice, '/start', contains='SPN')  # choosing the plan again gives a new invoice
        press(telegram, alice, menu, 'buy')
        press(telegram, alice, current(telegram, menu), 'plan:30')
        press(telegram, alice, current(telegram, menu), 'stars:30')
        telegram.wait_for(lambda c: c.method == 'sendInvoice' and c.ok and c.params['chat_id'] == '2080'
                          and f'stars:{fresh_id()}' in str(c.params.get('payload')))
        fresh = Payment.select().where(Payment.provider == 'stars').order_by(Payment.id.desc()).first()
        assert fresh.status == PENDING and Payment.select().where(Payment.provider == 'stars').count() == 2
        ok = telegram.wait_for_pre_checkout(telegram.pay(alice, invoice_message(telegram, 2080)))
        assert ok['ok'], ok
        assert eventually(lambda: Payment.get_by_id(fresh.id).status == PAID)
    finally:
        running.stop()


def test_the_job_expires_only_stars_invoices_past_their_lifetime(telegram, provider):
    shop_stars, messenger = provider
    lifetime = timedelta(seconds=shop_stars.settings.invoice_expires_seconds)
    now = models.utcnow()
    user, _ = shop_stars.shop.register(2081, None, 'Ex', 'en')
    old = shop_stars.offer(user, 30, now=now - lifetime - timedelta(seconds=1))
    assert shop_stars.pre_checkout(2081, 'XTR', 250, f'stars:{old.id}', now=now) == 'stars_refuse_expired'
    young = shop_stars.offer(user, 7, now=now - lifetime + timedelta(minutes=5))
    assert shop_stars.offer(user, 30, now=now).id != old.id  # an expired invoice is never offered again
    assert shop_stars.expire_unpaid(now) == 1
    assert Payment.get_by_id(old.id).status == EXPIRED and Payment.get_by_id(young.id).status == PENDING
    assert shop_stars.pre_checkout(2081, 'XTR', 250, f'stars:{old.id}', now=now) == 'stars_refuse_expired'
    assert shop_stars.pre_checkout(2081, 'XTR', 60, f'stars:{young.id}', now=now) is None
    assert shop_stars.expire_unpaid(now) == 0
    jobs.sync_stars(shop_stars.shop, messenger, now=now + lifetime)  # the job's round expires the rest
    assert Payment.get_by_id(young.id).status == EXPIRED


@pytest.mark.parametrize('delivery', ['successful_payment', 'getStarTransactions'])
def test_a_charge_for_an_invoice_that_expired_meanwhile_still_settles_once(telegram, provider, panel, delivery):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2082), drop=True)  # ok'd while it could be paid
    later = models.utcnow() + timedelta(seconds=shop_stars.settings.invoice_expires_seconds + 1)
    assert shop_stars.expire_unpaid(later) == 1  # the job ran before the charge was seen
    assert Payment.get_by_id(payment.id).status == EXPIRED
    if delivery == 'successful_payment':
        assert shop_stars.settle(2082, f'stars:{payment.id}', charge_id, 'XTR', 250).outcome == 'settled'
    assert jobs.sync_stars(shop_stars.shop, messenger, now=later) == (delivery == 'getStarTransactions')
    assert shop_stars.settle(2082, f'stars:{payment.id}', charge_id, 'XTR', 250).outcome == 'duplicate'
    stored = Payment.get_by_id(payment.id)
    assert stored.status == PAID and stored.provider_id == charge_id
    assert len(payment_grants()) == 1 and User.get(User.telegram_id == 2082).expires_at is not None


def test_the_job_stamps_the_panel_push_and_the_link_at_its_own_clock(telegram, provider, panel):
    shop_stars, messenger = provider
    payment, _ = charge(telegram, provider, person(2083), drop=True)
    at = models.utcnow() + timedelta(minutes=7)
    assert shop_stars.sync_transactions(messenger, now=at) == 1
    stored = Payment.get_by_id(payment.id)
    assert (stored.provisioned_at, stored.notified_at) == (at, at)


def test_deliver_says_whether_a_panel_has_the_days_not_whether_the_link_went_out(telegram, provider, panel):
    """The bot tells a buyer to wait for the panel when deliver() is False: not when the panel has the days and
    only the link's message failed (the jobs send it)."""
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2084), drop=True)
    result = shop_stars.settle(2084, f'stars:{payment.id}', charge_id, 'XTR', 250)
    telegram.break_next(20, 'bad_gateway', method='sendMessage')
    assert shop_stars.deliver(result.payment, messenger) is True
    stored = Payment.get_by_id(payment.id)
    assert stored.provisioned_at is not None and stored.notified_at is None  # the link waits for the job


# The recovery job reads each transaction as Telegram lists it (getStarTransactions)

@pytest.fixture
def far_east_clock():
    """Run the test with the process's local time zone at UTC+5: stored times must stay UTC all the same."""
    before = os.environ.get('TZ')
    os.environ['TZ'] = 'Asia/Yekaterinburg'
    time.tzset()
    yield
    if before is None:
        del os.environ['TZ']
    else:
        os.environ['TZ'] = before
    time.tzset()


def test_the_job_credits_at_the_charges_date_and_counts_days_from_its_own_clock(telegram, provider, panel,
                                                                                far_east_clock):
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2085), drop=True)
    charged = datetime.fromtimestamp(telegram.star_transactions[-1]['date'], timezone.utc).replace(tzinfo=None)
    at = models.utcnow().replace(microsecond=0) + timedelta(minutes=7)
    assert shop_stars.sync_transactions(messenger, now=at) == 1
    assert Payment.get_by_id(payment.id).paid_at == charged
    assert User.get(User.telegram_id == 2085).expires_at == at + timedelta(days=30)


def test_a_subscription_charge_found_by_the_job_runs_until_its_period_ends(telegram, stars_env, panel):
    shop_stars, messenger = in_process(telegram, {**stars_env, 'STARS_RECURRING': '1'})
    user = person(2086)
    telegram.add_user(user)
    customer, _ = shop_stars.shop.register(user['id'], None, user['first_name'], 'en')
    payment = shop_stars.offer(customer, 30)
    query = telegram.pay(user, shop_stars.subscription_link(customer, payment), drop=True)
    shop_stars.bot.answer_pre_checkout_query(query, ok=True)
    charged = datetime.fromtimestamp(telegram.star_transactions[-1]['date'], timezone.utc).replace(tzinfo=None)
    assert shop_stars.sync_transactions(messenger) == 1
    assert Payment.get_by_id(payment.id).subscription_until == charged + timedelta(days=30)


def test_the_job_credits_only_a_users_invoice_payments(telegram, provider, panel):
    """Stars that reach the bot another way (a gift bought, paid media, Fragment) are not a plan paid for, even
    with one of our payloads; an invoice payment listed without transaction_type (older Bot API) is."""
    shop_stars, messenger = provider
    payment, charge_id = charge(telegram, provider, person(2087), drop=True)
    paid = telegram.star_transactions.pop()
    buyer, date = paid['source']['user'], paid['date']
    for number, source in enumerate([
            {'type': 'fragment'},
            {'type': 'user', 'transaction_type': 'gift_purchase', 'user': buyer, 'invoice_payload': f'stars:{payment.id}'},
            {'type': 'user', 'transaction_type': 'paid_media_payment', 'user': buyer,
             'invoice_payload': f'stars:{payment.id}'}]):
        telegram.star_transactions.append({'id': f'other{number}', 'amount': 250, 'date': date, 'source': source})
    assert shop_stars.sync_transactions(messenger) == 0
    assert Payment.get_by_id(payment.id).status == PENDING and payment_grants() == []
    del paid['source']['transaction_type']
    telegram.star_transactions.append(paid)
    assert shop_stars.sync_transactions(messenger) == 1
    assert (Payment.get_by_id(payment.id).status, len(payment_grants())) == (PAID, 1)


def test_the_job_reports_only_the_foreign_charges_and_moves_only_its_own_cursor(telegram, provider, panel):
    shop_stars, messenger = provider
    telegram.add_user(ADMIN)
    models.Cursor.create(name='backfill:main', position=7)  # another job's place in its own list
    payment, charge_id = charge(telegram, provider, person(2088), drop=True)
    telegram.star_transactions.append({'id': 'stx-foreign-1', 'amount': 999, 'date': 1, 'source': {
        'type': 'user', 'transaction_type': 'invoice_payment', 'user': {'id': 2089, 'is_bot': False, 'first_name': 'Eve'}, 'invoice_payload': 'donation'}})
    assert shop_stars.sync_transactions(messenger) == 1
    alerts = [text_of(m) for m in telegram.messages_to(900)]
    assert len(alerts) == 1 and 'stx-foreign-1' in alerts[0] and charge_id not in alerts[0]
    assert [(c.name, c.position) for c in models.Cursor.select().order_by(models.Cursor.name)] == \
        [('backfill:main', 7), ('stars', 2)]


# Stars.settle called directly: what each caller (the update, the job) relies on

def offered(provider, telegram_id):
    shop_stars, _ = provider
    customer, _ = shop_stars.shop.register(telegram_id, None, 'Anna', 'en')
    return shop_stars.offer(customer, 30)


@pytest.mark.parametrize('who, currency, amount, wrong', [
    (2090, 'XTR', 249, 'amount'), (2090, 'USD', 250, 'currency'), (2091, 'XTR', 250, 'payer')])
def test_a_charge_that_does_not_match_its_invoice_is_foreign_and_says_why(telegram, provider, who, currency,
                                                                          amount, wrong):
    shop_stars, _ = provider
    payment = offered(provider, 2090)
    result = shop_stars.settle(who, f'stars:{payment.id}', 'stx-mismatch', currency, amount)
    assert (result.outcome, result.payment.id) == ('foreign', payment.id)
    assert result.detail == f'paid by {who} {amount} {currency}, issued to 2090 for 250 XTR'
    assert Payment.get_by_id(payment.id).status == PENDING and payment_grants() == []


def test_a_payload_never_issued_is_foreign_with_the_payload_named(telegram, provider):
    shop_stars, _ = provider
    result = shop_stars.settle(2090, 'stars:999999', 'stx-unknown', 'XTR', 250)
    assert (result.outcome, result.payment, result.detail) == ('foreign', None, "payload 'stars:999999' was never issued")


def test_settle_stamps_the_charge_time_and_a_duplicate_names_the_payment_it_paid(telegram, provider):
    shop_stars, _ = provider
    first, second, third = (offered(provider, 2092 + i) for i in range(3))
    charged, clock = datetime(2026, 11, 1, 9, 30), datetime(2026, 11, 1, 9, 45)
    assert shop_stars.settle(2092, f'stars:{first.id}', 'stx-a', 'XTR', 250, paid_at=charged).outcome == 'settled'
    assert shop_stars.settle(2093, f'stars:{second.id}', 'stx-b', 'XTR', 250, now=clock).outcome == 'settled'
    assert [Payment.get_by_id(p.id).paid_at for p in (first, second)] == [charged, clock]
    assert Payment.get_by_id(third.id).status == PENDING  # only the charged row changed
    again = shop_stars.settle(2092, f'stars:{first.id}', 'stx-a', 'XTR', 250)
    assert (again.outcome, again.payment.id) == ('duplicate', first.id)


def test_a_charge_id_is_unique_per_provider_not_across_providers(telegram, provider, cryptopay):
    """Crypto Pay's invoice ids are stored as provider_id too: a Telegram charge id with the same text is not it."""
    shop_stars, _ = provider
    crypto = shop_stars.shop.create_invoice(shop_stars.shop.get_user(2094) or
                                            shop_stars.shop.register(2094, None, 'Anna', 'en')[0], 30)
    payment = offered(provider, 2095)
    result = shop_stars.settle(2095, f'stars:{payment.id}', crypto.provider_id, 'XTR', 250)
    assert (result.outcome, Payment.get_by_id(payment.id).status) == ('settled', PAID)


def test_a_renewal_charge_gets_a_row_of_its_own_and_the_subscription_only_runs_on(telegram, provider):
    """A monthly subscription charges the paid invoice again: each charge is a row and a grant of its own, the first
    row keeps the latest end, and a charge listed late (the job) never shortens it. The inviter's bonus comes once,
    at the first payment's clock."""
    shop_stars, _ = provider
    inviter, _ = shop_stars.shop.register(2096, None, 'Ivan', 'en')
    buyer, _ = shop_stars.shop.register(2097, None, 'Anna', 'en', invite_code=inviter.invite_code)
    payment = shop_stars.offer(buyer, 30)
    payload, month = f'stars:{payment.id}', timedelta(days=30)
    first, second = datetime(2026, 11, 1, 9, 0), datetime(2026, 12, 1, 9, 0)

    def charged(charge_id, at):
        return shop_stars.settle(2097, payload, charge_id, 'XTR', 250, paid_at=at, now=at, subscription_until=at + month)
    assert charged('stx-first', first).payment.id == payment.id
    assert Payment.get_by_id(payment.id).subscription_until == first + month
    renewal = charged('stx-second', second)
    row = Payment.get_by_id(renewal.payment.id)
    assert renewal.outcome == 'settled' and row.id != payment.id
    assert (row.user_id, row.plan_days, row.amount, row.currency, row.provider, row.provider_id, row.pay_url,
            row.status, row.paid_at, row.created_at, row.subscription_until) == \
        (buyer.id, 30, payment.amount, 'XTR', stars.STARS, 'stx-second', '', PAID, second, second, None)
    assert Payment.get_by_id(payment.id).subscription_until == second + month
    assert charged('stx-listed-late', first).outcome == 'settled'
    assert Payment.get_by_id(payment.id).subscription_until == second + month  # not shortened
    assert [(g.days, g.created_at) for g in payment_grants()] == [(30, first), (30, second), (30, first)]
    bonus = Grant.get(Grant.reason == 'referral')
    assert (bonus.user_id, bonus.created_at) == (inviter.id, first)
