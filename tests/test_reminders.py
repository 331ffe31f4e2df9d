"""Expiry reminders say something new: never the length of a period that the latest grant has just started."""
from datetime import datetime, timedelta

import jobs
import models
from models import Reminder, User

NOW = datetime(2026, 11, 26, 12, 0, 0)


def customer(shop, telegram, telegram_id=1001):
    telegram.add_user({'id': telegram_id, 'first_name': 'Anna', 'language_code': 'en'})
    user, _ = shop.register(telegram_id, f'u{telegram_id}', 'Anna', 'en')
    return user


def reminders_sent(telegram, telegram_id=1001):
    return [message['text'] for message in telegram.messages_to(telegram_id)]


def test_three_day_gift_brings_no_ends_in_three_days(shop, telegram, messenger):
    user = customer(shop, telegram)
    assert shop.claim_gift(user, now=NOW)
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(minutes=5)) == 0
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=1)) == 0
    # "tomorrow" is news two days into a three-day gift, and so is the end
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=2, minutes=5)) == 1
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=3, minutes=5)) == 1
    texts = reminders_sent(telegram)
    assert len(texts) == 2 and 'tomorrow' in texts[0] and 'expired' in texts[1]


def test_one_day_promo_brings_no_ends_tomorrow(shop, telegram, messenger):
    user = customer(shop, telegram)
    shop.create_promo(900, days=1, uses=1, code='ONEDAY')
    assert shop.redeem_promo(user, 'ONEDAY', now=NOW)[0] == 'ok'
    assert jobs.send_reminders(shop, messenger, now=NOW) == 0
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(hours=12)) == 0
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=1, minutes=5)) == 1
    assert ['expired' in text for text in reminders_sent(telegram)] == [True]


def test_grant_that_leaves_three_days_was_news_enough(shop, telegram, messenger):
    """A 1-day promo added with 2 days left: the buyer was just told the new expiry, 3 days away."""
    user = customer(shop, telegram)
    models.grant_days(user.id, 30, 'admin', 'a1', now=NOW - timedelta(days=28))
    models.grant_days(user.id, 1, 'promo', 'p1', now=NOW)
    assert User.get_by_id(user.id).expires_at == NOW + timedelta(days=3)
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(minutes=5)) == 0
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=2, minutes=5)) == 1


def test_long_period_reminds_as_before(shop, telegram, messenger):
    user = customer(shop, telegram)
    models.grant_days(user.id, 30, 'payment', '77', now=NOW)
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=27, minutes=5)) == 1
    assert 'in 3 days' in reminders_sent(telegram)[-1]


def test_renewal_into_a_short_period_moves_the_reminders(shop, telegram, messenger):
    """A 3-day gift taken after a paid month ran out: nothing now, 'tomorrow' later, each once."""
    user = customer(shop, telegram)
    models.grant_days(user.id, 30, 'admin', 'a1', now=NOW - timedelta(days=40))
    assert shop.claim_gift(User.get_by_id(user.id), now=NOW)
    for minutes in (5, 10, 60):
        assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(minutes=minutes)) == 0
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=2, hours=1)) == 1
    assert jobs.send_reminders(shop, messenger, now=NOW + timedelta(days=2, hours=2)) == 0
    assert Reminder.select().where(Reminder.kind == '1').count() == 1
