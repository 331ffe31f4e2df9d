"""Outgoing messages against the loopback Bot API: 429s waited out, blocked users marked, broadcasts paced."""
import logging
import time

import pytest
import requests
from peewee import OperationalError
from telebot import apihelper

import models
from conftest import BOT_TOKEN, our_threads, pool_in_use, wait_threads_back
from messenger import BLOCKED, FAILED, SENT, Messenger
from models import User


def users(telegram, count, first_id=5000):
    for telegram_id in range(first_id, first_id + count):
        telegram.add_user({'id': telegram_id, 'first_name': 'U'})
        User.create(telegram_id=telegram_id, panel_email=f'spn-{telegram_id}')
    return list(range(first_id, first_id + count))


def test_send_waits_out_a_429(database, telegram, messenger):
    users(telegram, 1)
    telegram.rate_limit_next(2, retry_after=0)
    assert messenger.send(5000, 'hello') == SENT
    assert [call.status for call in telegram.sent] == [429, 429, 200]


def test_blocked_user_is_marked(database, telegram, messenger):
    users(telegram, 1)
    telegram.block_user(5000)
    assert messenger.send(5000, 'hello') == BLOCKED
    assert User.get().blocked


def test_bad_request_is_a_failure_not_a_crash(database, telegram, messenger):
    users(telegram, 1)
    assert messenger.send(5000, '<b>unclosed') == FAILED
    assert not User.get().blocked


def test_broadcast_reaches_everyone_once_despite_429s(database, telegram, messenger):
    ids = users(telegram, 60)
    telegram.block_user(ids[7])
    User.update(blocked=True).where(User.telegram_id == ids[9]).execute()  # known to have blocked us: skipped
    telegram.rate_limit_next(3, retry_after=1)
    seen = []  # the count at each progress call (the report object itself goes on changing)
    report = messenger.broadcast('News', progress=lambda progress: seen.append(progress.done), rate=200,
                                 progress_every=0)
    assert (report.delivered, report.blocked, report.failed) == (58, 1, 0)
    delivered = sorted(int(call.params['chat_id']) for call in telegram.sent
                       if call.method == 'sendMessage' and call.status == 200)
    assert delivered == sorted(set(ids) - {ids[7], ids[9]})
    # progress_every=0: one call per recipient handed out (59), never counting more than were handed out
    assert len(seen) == 59 and seen == sorted(seen)
    assert all(done <= handed_out for handed_out, done in enumerate(seen, 1))
    assert User.get(User.telegram_id == ids[7]).blocked


def test_broadcast_never_exceeds_its_rate(database, telegram, messenger):
    users(telegram, 90)
    rate = 60
    messenger.broadcast('News', rate=rate)
    times = sorted(call.time for call in telegram.sent if call.method == 'sendMessage')
    assert len(times) == 90
    # in any one-second window at most `rate` sends started (plus the few already handed to senders)
    busiest = max(sum(1 for moment in times if start <= moment < start + 1) for start in times)
    assert busiest <= rate + 4


def test_telegram_unreachable_is_a_failure_not_a_crash(database, telegram, messenger):
    users(telegram, 1)
    telegram.close()
    waits = []  # the clock a Messenger is built with: the waits are recorded, not slept
    patient = Messenger(messenger.bot, sleep=waits.append)
    assert patient.send(5000, 'hello') == FAILED
    # the first failure marks Telegram away (outages.py): no backoff ladder per message while it is away
    assert waits == [1]


# A broadcast whose outside calls fail (issue 9 item 5)

ADMIN = 900
FAULTS = ['drop', 'hang', 'bad_gateway']  # connection error, read timeout, 5xx from Telegram's front end


def start_status(telegram, messenger):
    telegram.add_user({'id': ADMIN, 'first_name': 'Boss'})
    return messenger.bot.send_message(ADMIN, 'Broadcast started…')


def final_status(telegram):
    """The last text the admin has about the broadcast: the edited status message or a newer message."""
    texts = [telegram.get_message(ADMIN, call.result['message_id'])['text'] for call in telegram.sent
             if call.status == 200 and call.method in ('sendMessage', 'editMessageText')
             and str(call.params['chat_id']) == str(ADMIN)]
    return texts[-1]


def test_a_failing_progress_call_stops_nothing_and_leaves_no_sender_behind(database, telegram, messenger):
    """The broadcast of issue 9 item 5: a network error in a progress edit killed the pacing thread and
    left 4 senders waiting forever, each holding a pooled connection."""
    users(telegram, 20)
    before = our_threads()

    def progress(report):
        raise requests.ConnectionError('HTTPSConnectionPool: Max retries exceeded with url: /bot<token>/edit')

    report = messenger.broadcast('News', progress=progress, rate=200, progress_every=0)
    assert (report.delivered, report.failed) == (20, 0)
    assert wait_threads_back(before) == set()
    models.db.close()
    assert pool_in_use() == 0


def test_a_broadcast_whose_database_fails_stops_its_senders_and_says_so(database, telegram, messenger):
    users(telegram, 20)
    before = our_threads()

    def recipients(batch):
        yield 5000
        raise OperationalError('server closed the connection unexpectedly')

    messenger._recipients = recipients
    report = messenger.broadcast('News', rate=200)
    assert report.error == 'OperationalError' and report.delivered == 1
    assert 'stopped early (OperationalError)' in report.text()
    assert wait_threads_back(before) == set()


@pytest.mark.parametrize('fault', FAULTS)
@pytest.mark.parametrize('method', ['sendMessage', 'editMessageText'])
def test_each_failing_telegram_call_ends_the_broadcast_cleanly_and_the_admin_gets_the_counts(
        database, telegram, messenger, monkeypatch, caplog, capfd, method, fault):
    ids = users(telegram, 30)
    status = start_status(telegram, messenger)
    monkeypatch.setattr(apihelper, 'READ_TIMEOUT', 0.5)
    messenger.sleep = lambda seconds: time.sleep(min(seconds, 0.05))
    telegram.break_next(3, fault, method=method, seconds=2)
    before = our_threads()
    with caplog.at_level(logging.INFO):
        report = messenger.run_broadcast('News', ADMIN, status.message_id, rate=200, progress_every=0)
    assert report.done == len(ids) and report.blocked == 0
    assert wait_threads_back(before) == set()
    models.db.close()
    assert pool_in_use() == 0
    final = final_status(telegram)
    assert final == report.text() and f'delivered {report.delivered}' in final
    out, err = capfd.readouterr()
    for secret in (BOT_TOKEN, BOT_TOKEN.split(':')[1]):
        assert secret not in out + err + caplog.text
    assert 'Traceback' not in err
