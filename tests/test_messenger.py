"""Outgoing messages against the loopback Bot API: 429s waited out, blocked users marked, broadcasts paced."""
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
    assert waits == [1, 2, 4, 8, 10]  # one backoff after each of the 5 attempts, capped at 10 s
