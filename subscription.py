"""The merged subscription feed: a buyer's configs from every enabled panel's subscription server, as one.

Each panel's own subscription server (3x-ui's sub server, `sub_url` + subId) answers with the config lines
of that buyer's client, base64-encoded or plain, and 404 when it has none (internal/sub/controller.go in
MHSanaei/3x-ui). We fetch them all in parallel, leave out a panel that is down, slow or answering garbage,
and answer the way the panels do, so that v2rayNG, Hiddify, Happ, Streisand and V2Box show traffic and
expiry: base64 of the lines, with Subscription-Userinfo (bytes, unix seconds), Profile-Title ("base64:"
prefix), Profile-Update-Interval (hours).
"""
import base64
import binascii
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timezone
from urllib.parse import quote

import requests

import httpsession

log = logging.getLogger(__name__)

# A panel's sub server answers from its own SQLite in milliseconds; one that has not connected within 1 s
# or answered within 1.5 s is left out, so the feed is served within 2 s whatever the panels do.
TIMEOUT = (1.0, 1.5)
DEADLINE = 1.8
CACHE_SECONDS = 60
CACHE_SIZE = 10_000        # feeds with config lines (buyers)
EMPTY_CACHE_SIZE = 10_000  # feeds no panel has a line for (unknown or lapsed subIds), kept apart so that a
                           # flood of made-up subIds cannot push the buyers' feeds out
UPDATE_INTERVAL_HOURS = 12
MAX_BODY = 1 << 20  # bytes: a feed of a few lines is a few KB
SUB_ID = re.compile(r'[A-Za-z0-9_-]{1,64}')
CONFIG_LINE = re.compile(r'[a-z][a-z0-9+.-]*://\S', re.IGNORECASE)
USERINFO_FIELD = re.compile(r'\s*(upload|download|total|expire)\s*=\s*(\d+)\s*')
NOT_FOUND = (404, [('Content-Type', 'text/plain; charset=utf-8')], b'Not Found\n')


class PanelFeedError(Exception):
    """One panel's subscription server could not give a usable answer."""


@dataclass(frozen=True)
class PanelFeed:
    """What one panel's sub server said: its config lines and its traffic counters (bytes)."""
    lines: tuple
    upload: int = 0
    download: int = 0
    total: int = 0


@dataclass(frozen=True)
class Feed:
    """The merged feed of one buyer: config lines of every panel that answered, and their counters summed."""
    lines: tuple
    upload: int
    download: int
    total: int
    panels_answered: int
    panels_failed: int


def decode_lines(raw):
    """Return the config lines of a sub server's body (base64 or plain text).

    :raises PanelFeedError: the body is neither, or holds no config line
    """
    text = raw.strip()
    try:
        decoded = base64.b64decode(text + b'=' * (-len(text) % 4), validate=True).decode('utf-8')
    except (binascii.Error, UnicodeDecodeError, ValueError):
        try:
            decoded = base64.urlsafe_b64decode(text + b'=' * (-len(text) % 4)).decode('utf-8')
            if not CONFIG_LINE.match(decoded.strip()):
                raise ValueError('not a config')
        except (binascii.Error, UnicodeDecodeError, ValueError):
            try:
                decoded = raw.decode('utf-8')
            except UnicodeDecodeError:
                raise PanelFeedError('the body is neither base64 nor UTF-8 text') from None
    lines = tuple(line.strip() for line in decoded.splitlines() if CONFIG_LINE.match(line.strip()))
    if not lines:
        raise PanelFeedError('the body holds no config line')
    return lines


def parse_userinfo(header):
    """Read 'upload=1; download=2; total=3; expire=4' into a dict of ints; unknown or bad parts are skipped."""
    info = {}
    for part in (header or '').split(';'):
        match = USERINFO_FIELD.fullmatch(part)
        if match:
            info[match.group(1)] = int(match.group(2))
    return info


def merge(feeds):
    """Merge the PanelFeeds that answered (None stands for a panel that failed) into one Feed.

    Lines keep panel order, duplicates dropped. The total is 0 (unlimited) when any panel's is.
    """
    answered = [feed for feed in feeds if feed is not None]
    lines = tuple(OrderedDict.fromkeys(line for feed in answered for line in feed.lines))
    totals = [feed.total for feed in answered]
    return Feed(lines=lines, upload=sum(feed.upload for feed in answered),
                download=sum(feed.download for feed in answered),
                total=sum(totals) if totals and all(totals) else 0,
                panels_answered=len(answered), panels_failed=len(feeds) - len(answered))


class SubscriptionMerger:
    """Fetch, merge and briefly cache buyers' feeds from the sub servers of the enabled panels.

    Threads share one merger: one requests.Session for every sub server, one small thread pool.

    Whether a subId is ours is never asked here: a made-up one is fetched from every panel like a buyer's
    (the panels answer their own 404), so the time of the answer does not say whether it exists. Panel load
    stays bounded: a feed (full or empty) is asked at most once per cache_seconds, the pool runs at most
    `workers` fetches at once, and the fetches still queued at the deadline are dropped, not run later.
    """

    def __init__(self, panels, shop_name, timeout=TIMEOUT, deadline=DEADLINE, cache_seconds=CACHE_SECONDS,
                 clock=time.monotonic):
        self.panels = tuple(panel for panel in panels if panel.enabled)
        self.shop_name = shop_name
        self._timeout = timeout
        self._deadline = deadline
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._session = httpsession.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=max(1, len(self.panels)), pool_maxsize=16)
        self._session.mount('http://', adapter)
        self._session.mount('https://', adapter)
        self.workers = max(4, 4 * len(self.panels))
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix='sub')
        self._cache = OrderedDict()        # sub_id -> (fresh until, Feed with lines)
        self._empty_cache = OrderedDict()  # sub_id -> (fresh until, Feed without lines)
        self._lock = threading.Lock()

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()

    def feed(self, sub_id):
        """Return the merged Feed of a subId, from the cache when it is fresh."""
        now = self._clock()
        with self._lock:
            for cache in (self._cache, self._empty_cache):
                cached = cache.get(sub_id)
                if cached and cached[0] > now:
                    cache.move_to_end(sub_id)
                    return cached[1]
        futures = [self._pool.submit(self._fetch, panel, sub_id) for panel in self.panels]
        done, late = wait(futures, timeout=self._deadline)
        for future in late:  # one still queued behind others is dropped: no backlog for the panels
            future.cancel()
        feed = merge([future.result() if future in done else None for future in futures])
        if feed.panels_failed == 0:  # a partial feed is served, not kept: the next call asks again
            cache, size = (self._cache, CACHE_SIZE) if feed.lines else (self._empty_cache, EMPTY_CACHE_SIZE)
            with self._lock:
                cache[sub_id] = (now + self._cache_seconds, feed)
                cache.move_to_end(sub_id)
                while len(cache) > size:
                    cache.popitem(last=False)
        return feed

    def forget(self, sub_id):
        """Drop a cached feed (after the buyer's days or panels changed)."""
        with self._lock:
            self._cache.pop(sub_id, None)
            self._empty_cache.pop(sub_id, None)

    def _fetch(self, panel, sub_id):
        """Return the PanelFeed of one panel, an empty one when it has no such client, None on failure."""
        try:
            return self._ask(panel, sub_id)
        except (requests.RequestException, PanelFeedError) as exc:
            # the URL holds the buyer's subId, a credential: name the panel only
            log.warning('subscription server of panel %s left out: %s', panel.name, _reason(exc))
            return None

    def _ask(self, panel, sub_id):
        response = self._session.get(panel.sub_url + quote(sub_id, safe=''), timeout=self._timeout,
                                     allow_redirects=False, stream=True,
                                     headers={'Accept': 'text/plain', 'User-Agent': 'spn-vpn-bot'})
        with response:
            if response.status_code == 404:
                return PanelFeed(lines=())
            if response.status_code != 200:
                raise PanelFeedError(f'HTTP {response.status_code}')
            raw = response.raw.read(MAX_BODY + 1, decode_content=True)
            if len(raw) > MAX_BODY:
                raise PanelFeedError(f'the body is over {MAX_BODY} bytes')
            info = parse_userinfo(response.headers.get('Subscription-Userinfo'))
        return PanelFeed(lines=decode_lines(raw), upload=info.get('upload', 0),
                         download=info.get('download', 0), total=info.get('total', 0))

    def response(self, sub_id, expires_at, known=True):
        """Answer GET /sub/{subId}: (status, [(header, value)], body bytes).

        :param expires_at: the buyer's expiry (aware or naive-UTC datetime, None for none), from our ledger
        :param known: False for a subId that is no buyer's: it is fetched all the same (the same time as a
            buyer's), and answered as a subId no panel serves: 404, or 503 when a panel failed, never lines
            (a client made on a panel by hand is not ours to serve)
        """
        feed = self.feed(sub_id)
        if not feed.lines or not known:
            if feed.panels_failed:
                return 503, [('Content-Type', 'text/plain; charset=utf-8'), ('Retry-After', '60')], \
                    b'Service Unavailable\n'
            return NOT_FOUND
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=timezone.utc)  # stored naive, in UTC
        expire = int(expires_at.timestamp()) if expires_at else 0
        body = base64.b64encode('\n'.join(feed.lines).encode() + b'\n')
        headers = [
            ('Content-Type', 'text/plain; charset=utf-8'),
            ('Subscription-Userinfo', f'upload={feed.upload}; download={feed.download}; '
                                      f'total={feed.total}; expire={expire}'),
            ('Profile-Title', 'base64:' + base64.b64encode(self.shop_name.encode()).decode()),
            ('Profile-Update-Interval', str(UPDATE_INTERVAL_HOURS)),
            ('Content-Disposition', "attachment; filename*=UTF-8''" + quote(self.shop_name, safe='')),
            ('Cache-Control', 'no-cache, no-store, must-revalidate'),
        ]
        return 200, headers, body


def is_sub_id(text):
    """Say whether text has the form of a subId (so anything else is a 404 without a query)."""
    return bool(SUB_ID.fullmatch(text or ''))


def _reason(exc):
    """Describe a failure without its URL (which holds the subId)."""
    if isinstance(exc, requests.Timeout):
        return 'timed out'
    if isinstance(exc, requests.ConnectionError):
        return 'cannot connect'
    if isinstance(exc, PanelFeedError):
        return str(exc)
    return type(exc).__name__
