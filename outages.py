"""Notice when an outside service (Telegram, Crypto Pay) goes away and comes back.

One log line when it goes, one when it is back, nothing in between; callers back off by next_delay().
The admins get one alert once it has been away for OUTAGE_ALERT_MINUTES and one "back" message;
take_messages() hands those texts to whoever can send them (the jobs thread).
"""
import functools
import logging
import threading
import time
from datetime import datetime, timezone

import requests
from telebot.apihelper import ApiHTTPException, ApiTelegramException

log = logging.getLogger('outages')


class Outage:
    """The state of one outside service as the bot's own calls see it; shared by every thread.

    :param alert_after: seconds away before the admins are told.
    :param alert_while_down: False for Telegram, where an alert cannot travel while it is away: the
        alert and the "back" news then go out as one message once it answers again.
    """

    def __init__(self, name, alert_after=300.0, alert_while_down=True, first_delay=1.0, max_delay=300.0,
                 clock=time.monotonic, wall_clock=lambda: datetime.now(timezone.utc)):
        self.name = name
        self.alert_after = alert_after
        self.alert_while_down = alert_while_down
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.clock = clock
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._down_since = None  # clock() of the first failure of this outage
        self._down_wall = None
        self._failures = 0
        self._retry_at = 0.0
        self._reason = ''
        self._alerted = False
        self._messages = []

    @property
    def is_down(self):
        return self._down_since is not None

    def failed(self, reason):
        """Record a failed call; return the seconds to wait before the next try (doubling, capped)."""
        with self._lock:
            now = self.clock()
            if self._down_since is None:
                self._down_since, self._down_wall = now, self.wall_clock()
                log.warning('%s unreachable: %s', self.name, reason)
            self._failures += 1
            self._reason = reason
            delay = min(self.first_delay * 2 ** (self._failures - 1), self.max_delay)
            self._retry_at = now + delay
            return delay

    def ok(self):
        """Record an answered call; the first one after failures ends the outage."""
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            away = self.clock() - self._down_since
            log.info('%s is back after %s (%s failed calls)', self.name, duration(away), self._failures)
            if self._alerted:
                self._messages.append(f'✅ {self.name} is back after {duration(away)}.')
            elif not self.alert_while_down and away >= self.alert_after:
                self._messages.append(f'⚠️ {self.name} was unreachable for {duration(away)} (from '
                                      f'{self._down_wall:%H:%M} UTC): {self._reason}. It is back now.')
            self._down_since = self._down_wall = None
            self._failures, self._retry_at, self._reason, self._alerted = 0, 0.0, '', False

    def due(self):
        """Tell whether a call may be tried now: always while up, after next_delay() while down."""
        return self._down_since is None or self.clock() >= self._retry_at

    def take_messages(self):
        """Return (and forget) the admin messages due now: the alert once the outage is long enough, "back"."""
        with self._lock:
            if (self._down_since is not None and self.alert_while_down and not self._alerted
                    and self.clock() - self._down_since >= self.alert_after):
                self._alerted = True
                self._messages.append(
                    f'⚠️ {self.name} has been unreachable for {duration(self.clock() - self._down_since)} '
                    f'(since {self._down_wall:%H:%M} UTC): {self._reason}. I will tell you when it is back.')
            messages, self._messages = self._messages, []
            return messages


def duration(seconds):
    """Say a span of seconds the way an admin reads it: '45 s', '12 min', '3 h 5 min'."""
    seconds = int(seconds)
    if seconds < 60:
        return f'{seconds} s'
    minutes = seconds // 60
    return f'{minutes} min' if minutes < 60 else f'{minutes // 60} h {minutes % 60} min'


def describe(exc):
    """Name a failed call's cause without its URL (a Bot API URL holds the token): 'ConnectTimeout'."""
    if isinstance(exc, ApiTelegramException):
        return f'HTTP {exc.error_code} {exc.description}'
    if isinstance(exc, ApiHTTPException):
        return f'HTTP {exc.result.status_code}'
    cause = exc.args[0] if exc.args and isinstance(exc.args[0], Exception) else None
    # urllib3 wraps the real cause: MaxRetryError(reason=...), ProtocolError('Connection aborted.', cause)
    deeper = getattr(cause, 'reason', None) or (cause.args[-1] if cause is not None and cause.args else None)
    if isinstance(deeper, Exception):
        cause = deeper
    return type(exc).__name__ + (f' ({type(cause).__name__})' if cause is not None else '')


def telegram_unreachable(exc):
    """Tell whether a Bot API call failed because Telegram could not be reached (not because it refused)."""
    if isinstance(exc, ApiTelegramException):
        return exc.error_code >= 500
    return isinstance(exc, (requests.RequestException, ApiHTTPException))


def cryptopay_unreachable(exc):
    """Tell whether a CryptoPayError means Crypto Pay is away or refusing us (not a refused request)."""
    status = getattr(exc, 'status', None)
    return status is None or status >= 500 or status == 401


class Watched:
    """Pass calls through to an outside client, telling an Outage how each call of `methods` went.

    :param errors: the client's exception type; is_outage(error) decides which of them count.
    """

    def __init__(self, client, outage, errors, is_outage, methods):
        self._client = client
        self._outage = outage
        self._errors = errors
        self._is_outage = is_outage
        self._methods = frozenset(methods)

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name not in self._methods:
            return attribute

        @functools.wraps(attribute)
        def call(*args, **kwargs):
            try:
                result = attribute(*args, **kwargs)
            except self._errors as exc:
                if self._is_outage(exc):
                    self._outage.failed(str(exc))
                else:
                    self._outage.ok()  # it answered, if only to say no
                raise
            self._outage.ok()
            return result
        return call
