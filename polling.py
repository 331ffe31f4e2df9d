"""The process's link to Telegram: the TeleBot (TELEGRAM_API_URL, timeouts, our sender), a long poll that waits
an outage out, what a failed handler does, and start-up that retries while Telegram cannot be reached.
"""
import logging
import threading
import time

import telebot
from telebot import apihelper
from telebot.apihelper import ApiTelegramException

import tgsender
from outages import Outage, describe, telegram_unreachable

log = logging.getLogger('bot')

# Start-up tries to reach Telegram again after 5 s, 10 s, 20 s ... at most 5 minutes apart.
START_RETRY_FIRST, START_RETRY_MAX = 5, 300
# getMe answers at once when Telegram is up; a hang is reported this soon instead of after READ_TIMEOUT.
START_READ_TIMEOUT = 10


class LogErrors(telebot.ExceptionHandler):
    """Log an unexpected handler error with its traceback and keep polling (telebot would pause or stop).

    A reply lost because Telegram is unreachable is one line for the whole outage, not a traceback each.
    """

    def __init__(self, outage):
        self.outage = outage

    def handle(self, exception):
        if telegram_unreachable(exception):
            self.outage.failed(describe(exception))
        elif isinstance(exception, ApiTelegramException):
            log.warning('telegram refused a call: %s', exception.description)
        else:
            log.error('update failed', exc_info=exception)
        return True


class PollingBot(telebot.TeleBot):
    """A TeleBot whose long poll tells the Telegram Outage how it went and waits an outage out quietly."""

    def __init__(self, *args, outage, **kwargs):
        super().__init__(*args, **kwargs)
        self.outage = outage
        self.stopping = threading.Event()

    def get_updates(self, *args, **kwargs):
        try:
            updates = super().get_updates(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — sorted by telegram_unreachable, the rest re-raised
            if not telegram_unreachable(exc):
                raise
            self.stopping.wait(self.outage.failed(describe(exc)))
            return []
        self.outage.ok()
        return updates

    def stop_polling(self):
        self.stopping.set()
        super().stop_polling()


def make_bot(settings, outage=None):
    """Create the TeleBot, pointed at TELEGRAM_API_URL, with explicit timeouts."""
    apihelper.API_URL = settings.telegram_api_url + '/bot{0}/{1}'
    apihelper.FILE_URL = settings.telegram_api_url + '/file/bot{0}/{1}'
    apihelper.CONNECT_TIMEOUT = 10
    apihelper.READ_TIMEOUT = 30
    apihelper.CUSTOM_REQUEST_SENDER = tgsender.RequestSender()  # urllib3, kept-alive; telebot's errors
    outage = outage or Outage('Telegram', alert_after=settings.outage_alert_minutes * 60, alert_while_down=False)
    return PollingBot(settings.bot_token, threaded=True, num_threads=settings.worker_threads,
                      skip_pending=False, exception_handler=LogErrors(outage), outage=outage)


def start_telegram(bot, shop_bot, settings):
    """Ask Telegram who the bot is and set it up; while Telegram cannot be reached, say so and try again.

    Each failed try is one line naming what could not be reached, never the token; the tries back off
    from START_RETRY_FIRST to START_RETRY_MAX seconds. Return False when Telegram refuses (a wrong token).
    """
    delay = START_RETRY_FIRST
    while True:
        apihelper.READ_TIMEOUT = START_READ_TIMEOUT
        try:
            shop_bot.username = bot.get_me().username
            bot.delete_webhook()
            shop_bot.set_commands()
            return True
        except Exception as exc:  # noqa: BLE001 — sorted below; nothing reaches Python's stderr traceback
            if isinstance(exc, ApiTelegramException) and not telegram_unreachable(exc):
                log.error('Telegram refused to start the bot (check BOT_TOKEN and TELEGRAM_API_URL): %s',
                          exc.description)
                return False
            if not telegram_unreachable(exc):
                raise
            log.error('cannot reach Telegram at %s (%s); trying again in %s s', settings.telegram_api_url,
                      describe(exc), delay)
        finally:
            apihelper.READ_TIMEOUT = 30
        time.sleep(delay)
        delay = min(delay * 2, START_RETRY_MAX)
