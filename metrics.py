"""The bot's Prometheus metrics (prometheus_client), served by web.py at GET /metrics.

Counters and histograms are per process (each instance behind nginx is scraped on its own port);
the ledger figures (pending invoices, buyers waiting for the panel) are read from the database at
scrape time, at most once per CACHE_SECONDS, so every instance reports the same shared values.

A scrape costs about 1 ms of CPU, most of it prometheus_client's text generation and waitress
(docs/dev/PERFORMANCE.md); the series are kept few for that: no *_created series, one handling-time
histogram for every kind of update (the count by kind is spn_updates_handled).
"""
import threading
import time

from peewee import fn
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from telebot.handler_backends import BaseMiddleware

import models
from models import PENDING, PanelClient, Payment, utcnow

# The *_created series (when each labelled child was made) are for OpenMetrics; the 0.0.4 text format we serve
# would print each as a gauge family of its own: a third of the lines, and of the scrape's CPU, for nothing.
disable_created_metrics()
REGISTRY = CollectorRegistry()
CACHE_SECONDS = 2  # the database and /proc are read at most this often; Prometheus scrapes every 15-60 s

UPDATES = Counter('spn_updates_handled', 'Telegram updates handled, by kind', ['kind'], registry=REGISTRY)
UPDATE_SECONDS = Histogram('spn_update_handling_seconds', 'Time spent handling one Telegram update (s)',
                           buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 10), registry=REGISTRY)
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


class Cached:
    """What read() returns (a list), read at most once per `seconds`; the calls in between get the last list.

    A failed read (e.g. the database is down) is not remembered: that scrape fails, the next one reads again.
    Also a collector itself: Cached(lambda: list(collector.collect())) is that collector, cached.
    """

    def __init__(self, read, seconds=CACHE_SECONDS, clock=time.monotonic):
        self.read = read
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._read_at = None
        self._value = []

    def collect(self):
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.seconds:
                self._value = self.read()
                self._read_at = now
            return list(self._value)

    def forget(self):
        """Make the next call read afresh."""
        with self._lock:
            self._read_at = None


class LedgerCollector:
    """The ledger's gauges: one statement (indexed counts) on the thread's connection, at most once per `seconds`.

    The statement's SQL is built by peewee once (models.prepared): building it cost more CPU than running it.
    The oldest pending invoice's age is counted at each scrape from its (remembered) creation time.
    """

    def __init__(self, seconds=CACHE_SECONDS, clock=time.monotonic):
        self.values = Cached(self.read, seconds, clock)

    def collect(self):
        (count, oldest, waiting), = self.values.collect()
        age = (utcnow() - oldest).total_seconds() if oldest else 0
        return [GaugeMetricFamily('spn_pending_invoices', 'Invoices waiting for payment', value=count),
                GaugeMetricFamily('spn_oldest_pending_invoice_age_seconds', 'Age of the oldest pending invoice (s)',
                                  value=max(age, 0)),
                GaugeMetricFamily('spn_buyers_waiting_for_panel', 'Users whose days are not on the panel yet',
                                  value=waiting)]

    @staticmethod
    def read():
        """Return [(pending invoices, the oldest one's creation time or None, buyers waiting for a panel)]."""
        with models.connection():
            count, oldest, waiting = models.prepared(_ledger_query, True, PENDING).tuples()[0]
        return [(count, Payment.created_at.python_value(oldest), waiting)]  # SQLite hands the time back as text


def _ledger_query(dirty, status):
    waiting = (PanelClient.select(fn.COUNT(fn.DISTINCT(PanelClient.user)))
               .where(PanelClient.dirty == dirty))
    return (Payment.select(fn.COUNT(Payment.id), fn.MIN(Payment.created_at), waiting)
            .where(Payment.status == status))


LEDGER = LedgerCollector()
_process = ProcessCollector(registry=None)
PROCESS = Cached(lambda: list(_process.collect()))  # resident memory, CPU seconds, open files
REGISTRY.register(PROCESS)
REGISTRY.register(LEDGER)


def forget():
    """Make the next scrape read the database and /proc afresh (tests that check a gauge right after a change)."""
    LEDGER.values.forget()
    PROCESS.forget()


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
        UPDATE_SECONDS.observe(time.perf_counter() - data.get('spn_started', time.perf_counter()))


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
