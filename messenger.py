"""Send messages to users over Telegram: wait out 429s, mark users who blocked the bot, pace broadcasts."""
import logging
import time
from dataclasses import dataclass

from telebot.apihelper import ApiException, ApiTelegramException

from models import User

log = logging.getLogger('messenger')

SENT, BLOCKED, FAILED = 'sent', 'blocked', 'failed'
TELEGRAM_BROADCAST_RATE = 30  # messages per second: Telegram's documented ceiling for bulk sends
BLOCKED_HINTS = ('bot was blocked', 'user is deactivated', 'bot was kicked', 'chat not found')


@dataclass
class BroadcastReport:
    delivered: int = 0
    blocked: int = 0
    failed: int = 0

    @property
    def done(self):
        return self.delivered + self.blocked + self.failed


class Messenger:
    """Wrap a TeleBot's outgoing calls with Telegram's flood and block rules."""

    def __init__(self, bot, attempts=5, max_retry_after=60, sleep=time.sleep, clock=time.monotonic):
        self.bot = bot
        self.attempts = attempts
        self.max_retry_after = max_retry_after
        self.sleep = sleep
        self.clock = clock

    def call(self, chat_id, method, *args, **kwargs):
        """Call a bot method about one chat; return SENT, BLOCKED or FAILED (never raises Telegram errors)."""
        for attempt in range(self.attempts):
            try:
                getattr(self.bot, method)(*args, **kwargs)
                return SENT
            except ApiTelegramException as exc:
                retry_after = (exc.result_json or {}).get('parameters', {}).get('retry_after')
                if exc.error_code == 429 and retry_after is not None:
                    self.sleep(min(float(retry_after), self.max_retry_after))
                    continue
                if exc.error_code == 403 or (exc.error_code == 400 and _says_gone(exc.description)):
                    User.update(blocked=True).where(User.telegram_id == chat_id).execute()
                    log.info('user blocked the bot user=%s', chat_id)
                    return BLOCKED
                log.warning('telegram refused %s user=%s: %s', method, chat_id, exc.description)
                return FAILED
            except ApiException as exc:  # transport trouble: try again shortly
                log.warning('telegram unreachable for %s user=%s (attempt %s): %s',
                            method, chat_id, attempt + 1, type(exc).__name__)
                self.sleep(min(2 ** attempt, 10))
        return FAILED

    def send(self, chat_id, text, reply_markup=None):
        """Send an HTML message to a user."""
        return self.call(chat_id, 'send_message', chat_id, text, parse_mode='HTML', reply_markup=reply_markup,
                         disable_web_page_preview=True)

    def edit(self, chat_id, message_id, text, reply_markup=None):
        """Replace the text of a message the bot sent earlier."""
        return self.call(chat_id, 'edit_message_text', text, chat_id, message_id, parse_mode='HTML',
                         reply_markup=reply_markup, disable_web_page_preview=True)

    def broadcast(self, text, progress=None, rate=TELEGRAM_BROADCAST_RATE, batch=500, progress_every=5.0):
        """Send text to every user who has not blocked the bot, at most `rate` per second.

        :param progress: called with the BroadcastReport every `progress_every` seconds.
        """
        report = BroadcastReport()
        next_send = last_progress = self.clock()
        after_id = 0
        while True:
            rows = list(User.select(User.id, User.telegram_id)
                        .where(User.id > after_id, User.blocked == False)  # noqa: E712 (SQL comparison)
                        .order_by(User.id).limit(batch).tuples())
            if not rows:
                break
            for user_id, telegram_id in rows:
                wait = next_send - self.clock()
                if wait > 0:
                    self.sleep(wait)
                # Pace from the last send, so time lost to a 429 is never made up in a burst.
                next_send = max(next_send, self.clock()) + 1 / rate
                outcome = self.send(telegram_id, text)
                report.delivered += outcome == SENT
                report.blocked += outcome == BLOCKED
                report.failed += outcome == FAILED
                if progress and self.clock() - last_progress >= progress_every:
                    last_progress = self.clock()
                    progress(report)
            after_id = rows[-1][0]
        log.info('broadcast finished delivered=%s blocked=%s failed=%s',
                 report.delivered, report.blocked, report.failed)
        return report


def _says_gone(description):
    return any(hint in (description or '').lower() for hint in BLOCKED_HINTS)
