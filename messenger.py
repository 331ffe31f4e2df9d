"""Send messages to users over Telegram: wait out 429s, mark users who blocked the bot, pace broadcasts."""
import logging
import queue
import threading
import time
from dataclasses import dataclass

import requests
from telebot.apihelper import ApiException, ApiTelegramException

import metrics
import models
from models import User
from markup import clip_html
from outages import Outage, describe

log = logging.getLogger('messenger')

SENT, BLOCKED, FAILED = 'sent', 'blocked', 'failed'
TELEGRAM_BROADCAST_RATE = 29  # messages per second: just under Telegram's ceiling of 30 for bulk sends
BLOCKED_HINTS = ('bot was blocked', 'user is deactivated', 'bot was kicked', 'chat not found')


@dataclass
class BroadcastReport:
    delivered: int = 0
    blocked: int = 0
    failed: int = 0
    error: str = ''  # why the broadcast stopped early ('' when it reached everyone)

    @property
    def done(self):
        return self.delivered + self.blocked + self.failed

    def text(self):
        """Say the final counts the way the admin reads them."""
        counts = f'delivered {self.delivered}, blocked {self.blocked}, failed {self.failed}'
        if self.error:
            return f'Broadcast stopped early ({self.error}): {counts}.'
        return f'Broadcast finished: {counts}.'


class Messenger:
    """Wrap a TeleBot's outgoing calls with Telegram's flood and block rules."""

    def __init__(self, bot, attempts=5, max_retry_after=60, sleep=time.sleep, clock=time.monotonic, outage=None):
        self.bot = bot
        # Telegram's reachability: while it is away, one try per message and no log line per message
        self.outage = outage or Outage('Telegram', alert_while_down=False)
        self.attempts = attempts
        self.max_retry_after = max_retry_after
        self.sleep = sleep
        self.clock = clock
        self.paused_until = 0.0  # after a 429, no broadcast send starts before this (clock time)

    def call(self, chat_id, method, *args, **kwargs):
        """Call a bot method about one chat; return SENT, BLOCKED or FAILED (never raises Telegram errors)."""
        for attempt in range(self.attempts):
            try:
                getattr(self.bot, method)(*args, **kwargs)
                self.outage.ok()
                return SENT
            except ApiTelegramException as exc:
                retry_after = (exc.result_json or {}).get('parameters', {}).get('retry_after')
                if exc.error_code == 429 and retry_after is not None:
                    wait = min(float(retry_after), self.max_retry_after)
                    self.paused_until = max(self.paused_until, self.clock() + wait)
                    self.sleep(wait)
                    continue
                if exc.error_code == 403 or (exc.error_code == 400 and _says_gone(exc.description)):
                    User.update(blocked=True).where(User.telegram_id == chat_id).execute()
                    log.info('user blocked the bot user=%s', chat_id)
                    return BLOCKED
                log.warning('telegram refused %s user=%s: %s', method, chat_id, exc.description)
                metrics.SEND_FAILURES.inc()
                return FAILED
            except (ApiException, requests.RequestException) as exc:  # transport trouble: try again shortly
                was_down = self.outage.is_down
                self.outage.failed(describe(exc))  # logs the first failure of an outage, once
                if was_down:
                    return FAILED  # known to be away: the caller's next run tries again
                self.sleep(min(2 ** attempt, 10))
        metrics.SEND_FAILURES.inc()
        return FAILED

    def send(self, chat_id, text, reply_markup=None):
        """Send a Telegram HTML message to a user, cut to Telegram's limit if it is longer."""
        return self.call(chat_id, 'send_message', chat_id, clip_html(text), parse_mode='HTML', reply_markup=reply_markup,
                         disable_web_page_preview=True)

    def edit(self, chat_id, message_id, text, reply_markup=None):
        """Replace the text of a message the bot sent earlier."""
        return self.call(chat_id, 'edit_message_text', clip_html(text), chat_id, message_id, parse_mode='HTML',
                         reply_markup=reply_markup, disable_web_page_preview=True)

    def broadcast(self, text, progress=None, rate=TELEGRAM_BROADCAST_RATE, senders=4, batch=500,
                  progress_every=5.0):
        """Send text to every user who has not blocked the bot, at most `rate` per second; return the report.

        A few sender threads keep the rate up when each call takes a while (a VPS far from Telegram);
        this thread paces them, and pauses them all when Telegram answers 429. Whatever fails (the
        database, a progress call), the senders are stopped and joined, their connections returned,
        and the report says how far it got (report.error).

        :param progress: called with the BroadcastReport every `progress_every` seconds; its errors
            are logged and never stop the broadcast.
        """
        report = BroadcastReport()
        counting = threading.Lock()
        chats = queue.Queue(maxsize=senders)

        def count(outcome):
            with counting:
                report.delivered += outcome == SENT
                report.blocked += outcome == BLOCKED
                report.failed += outcome == FAILED

        def sender():
            ended = False
            try:
                with models.db.connection_context():  # marking blocked users needs this thread's connection
                    while (telegram_id := chats.get()) is not None:
                        try:
                            outcome = self.send(telegram_id, text)
                        except Exception:  # noqa: BLE001 — one bad send must not strand the queue
                            log.exception('broadcast send failed user=%s', telegram_id)
                            outcome = FAILED
                        count(outcome)
                    ended = True
            except Exception:  # noqa: BLE001 — e.g. no database connection: count the rest as failed
                log.exception('broadcast sender stopped')
            while not ended:  # keep taking ids until the end mark, so the pacing thread's put() never blocks
                if chats.get() is None:
                    break
                count(FAILED)

        threads = [threading.Thread(target=sender, name=f'broadcast-{n}', daemon=True) for n in range(senders)]
        for thread in threads:
            thread.start()
        try:
            next_send = last_progress = self.clock()
            for telegram_id in self._recipients(batch):
                # Pace from the last send, so time lost to a 429 is never made up in a burst.
                next_send = max(next_send, self.paused_until, self.clock())
                wait = next_send - self.clock()
                if wait > 0:
                    self.sleep(wait)
                next_send += 1 / rate
                chats.put(telegram_id)
                if progress and self.clock() - last_progress >= progress_every:
                    last_progress = self.clock()
                    try:
                        progress(report)
                    except Exception as exc:  # noqa: BLE001 — progress is a courtesy
                        log.warning('broadcast progress not shown: %s', describe(exc))
        except Exception as exc:  # noqa: BLE001 — e.g. the database went away mid-way
            log.exception('broadcast stopped early')
            report.error = type(exc).__name__
        finally:
            for _ in threads:
                chats.put(None)
            for thread in threads:
                thread.join()
        log.info('broadcast finished delivered=%s blocked=%s failed=%s%s', report.delivered, report.blocked,
                 report.failed, f' error={report.error}' if report.error else '')
        return report

    def run_broadcast(self, text, chat_id, message_id, progress_text=None, final_text=None, **options):
        """Broadcast text, keeping the admin's status message (chat_id, message_id) up to date; return the report.

        Meant as a thread's whole body: it never raises, and it always ends by putting the final
        counts (and why it stopped early, if it did) in the status message, or in a new message when
        that cannot be edited. Progress edits are tried once each: a lost one is no loss.

        :param progress_text, final_text: turn a BroadcastReport into the admin's Telegram HTML
            (default: BroadcastReport.text() in English).
        """
        progress_text = progress_text or (lambda report: f'Broadcast: delivered {report.delivered}, '
                                                         f'blocked {report.blocked}, failed {report.failed}…')
        final_text = final_text or BroadcastReport.text

        def progress(report):
            self.bot.edit_message_text(clip_html(progress_text(report)), chat_id, message_id, parse_mode='HTML')

        report = BroadcastReport(error='it could not start')
        try:
            with models.db.connection_context():
                report = self.broadcast(text, progress, **options)
        except Exception as exc:  # noqa: BLE001 — the admin hears about it below, the log has the rest
            log.exception('broadcast failed')
            report.error = type(exc).__name__
        finally:
            final = final_text(report)
            if self.edit(chat_id, message_id, final) != SENT:
                self.send(chat_id, final)
        return report

    def _recipients(self, batch):
        """Yield the Telegram ids of users who have not blocked the bot, a batch of rows at a time."""
        after_id = 0
        while True:
            rows = list(User.select(User.id, User.telegram_id)
                        .where(User.id > after_id, User.blocked == False)  # noqa: E712 (SQL comparison)
                        .order_by(User.id).limit(batch).tuples())
            yield from (telegram_id for _, telegram_id in rows)
            if len(rows) < batch:
                return
            after_id = rows[-1][0]


def _says_gone(description):
    return any(hint in (description or '').lower() for hint in BLOCKED_HINTS)
