"""The bot's Prometheus metrics (prometheus_client), served by web.py at GET /metrics.

Counters and histograms are per process (each instance behind nginx is scraped on its own port);
the ledger figures (pending invoices, buyers waiting for the panel) are read from the database at
scrape time, so every instance reports the same shared values.
"""
import time

from peewee import fn
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from telebot.handler_backends import BaseMiddleware

import models
from models import PENDING, PanelClient, Payment, utcnow

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # resident memory, CPU seconds, open files

UPDATES = Counter('spn_updates_handled', 'Telegram updates handled, by kind', ['kind'], registry=REGISTRY)
UPDATE_SECONDS = Histogram('spn_update_handling_seconds', 'Time spent handling one Telegram update (s)', ['kind'],
                           buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=REGISTRY)
SETTLED = Counter('spn_payments_settled', 'Payments settled, by provider and path (button, poller, webhook)',
                  ['provider', 'path'], registry=REGISTRY)
PANEL_FAILURES = Counter('spn_panel_failures', 'Failed panel calls, by panel', ['panel'], registry=REGISTRY)
SEND_FAILURES = Counter('spn_telegram_sends_failed', 'Messages to users that Telegram refused or never took',
                        registry=REGISTRY)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what every Prometheus version reads (choose_encoder's default)


def settled(path, provider='cryptopay'):
    """Count one settlement made by path: 'button', 'poller' or 'webhook'."""
    SETTLED.labels(provider=provider, path=path).inc()


def panel_failed(panel):
    """Count one failed panel call; the label is the panel's name, or its host:port."""
    PANEL_FAILURES.labels(panel=getattr(panel, 'name', None) or getattr(panel, '_where', None) or 'panel').inc()


class LedgerCollector:
    """Read the ledger's gauges at scrape time: one statement (indexed counts) on the thread's connection."""

    def collect(self):
        waiting = (PanelClient.select(fn.COUNT(fn.DISTINCT(PanelClient.user)))
                   .where(PanelClient.dirty == True))  # noqa: E712 (SQL comparison)
        with models.connection():
            count, oldest, waiting = (Payment.select(fn.COUNT(Payment.id), fn.MIN(Payment.created_at), waiting)
                                      .where(Payment.status == PENDING).tuples().get())
        oldest = Payment.created_at.python_value(oldest)  # SQLite hands the text back
        yield GaugeMetricFamily('spn_pending_invoices', 'Invoices waiting for payment', value=count)
        age = (utcnow() - oldest).total_seconds() if oldest else 0
        yield GaugeMetricFamily('spn_oldest_pending_invoice_age_seconds', 'Age of the oldest pending invoice (s)',
                                value=max(age, 0))
        yield GaugeMetricFamily('spn_buyers_waiting_for_panel', 'Users whose days are not on the panel yet',
                                value=waiting)


REGISTRY.register(LedgerCollector())


def exposition():
    """Return the text exposition of every metric (bytes); raises the database's error if it is down."""
    return generate_latest(REGISTRY)


class UpdateTimer(BaseMiddleware):
    """A telebot class middleware that counts and times each update on the handler thread that runs it."""

    def __init__(self, kinds):
        super().__init__()
        self.update_types = list(kinds)
        self.update_sensitive = False

    def pre_process(self, message, data):
        data['spn_started'] = time.perf_counter()

    def post_process(self, message, data, exception):
        kind = _kind_of(message)
        UPDATES.labels(kind=kind).inc()
        UPDATE_SECONDS.labels(kind=kind).observe(time.perf_counter() - data.get('spn_started', time.perf_counter()))


def _kind_of(update_part):
    name = type(update_part).__name__  # Message, CallbackQuery, PreCheckoutQuery, ...
    return {'Message': 'message', 'CallbackQuery': 'callback_query',
            'PreCheckoutQuery': 'pre_checkout_query'}.get(name, name.lower())


def time_updates(bot, kinds):
    """Turn on telebot's class middlewares on bot and time every update of these kinds."""
    bot.use_class_middlewares = True
    if bot.middlewares is None:
        bot.middlewares = []
    bot.setup_middleware(UpdateTimer(kinds))
