"""Logging: one line per event on stdout, every secret setting redacted, on every way out.

The way out includes telebot's own logger, an uncaught error in the main thread and a thread that dies.
"""
import logging
import sys
import threading

log = logging.getLogger('bot')


class RedactSecrets(logging.Filter):
    """Replace every secret value in log records with ***, whatever logged it (telebot logs URLs with the token)."""

    def __init__(self, secrets):
        super().__init__()
        self.secrets = [secret for secret in secrets if secret and len(secret) >= 4]

    def filter(self, record):
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            record.msg, record.args = self.redact(message), None
        if record.exc_info:  # a traceback may quote a secret (a URL with the token): redact it too
            trace = logging.Formatter().formatException(record.exc_info)
            record.msg = f'{record.getMessage()}\n{self.redact(trace)}'
            record.args, record.exc_info, record.exc_text = None, None, None
        return True

    def redact(self, text):
        for secret in self.secrets:
            text = text.replace(secret, '***')
        return text


def setup_logging(secrets=()):
    """Log one line per event to stdout (journald adds the time stamps under systemd), secrets redacted.

    Every other way out goes through the same handler: an uncaught error in the main thread or in
    any other thread, and telebot's own logger (which would print to stderr by itself).
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger('TeleBot').handlers[:] = []  # propagate to the redacting handler only
    sys.excepthook = log_uncaught
    threading.excepthook = log_thread_death


def log_uncaught(kind, error, trace):
    """Log an error that ended the program (sys.excepthook), instead of Python's raw traceback on stderr."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    log.critical('stopped by an unexpected %s', kind.__name__, exc_info=(kind, error, trace))


def log_thread_death(args):
    """Log an error that ended a thread (threading.excepthook), redacted like every other line."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else '?'
    log.error('thread %s died', name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def secrets_of(settings):
    """Return every setting value that must never be shown."""
    url = settings.database_url
    password = url.split('://', 1)[-1].split('@', 1)[0].partition(':')[2] if '@' in url else ''
    return [settings.bot_token, settings.xui_password, settings.xui_api_token, settings.cryptopay_token,
            password, settings.bot_token.partition(':')[2]] + [
        secret for panel in settings.panels for secret in panel.secrets]
