"""The bot's HTTP side: one WSGI app (Telegram and Crypto Pay webhooks, /healthz, /metrics) served by waitress.

    server = web.start(settings, shop, shop_bot)    # in bot.py's run(), before the jobs start
    return web.receive_updates(bot, settings, server)   # webhook or long polling until SIGTERM

Nothing here ever answers with a token, a password or a stack trace: errors are short fixed texts.
"""
import errno
import hmac
import json
import logging
import sys
import threading
import time

import waitress
from waitress import wasyncore
from peewee import InterfaceError, OperationalError
from telebot import util
from telebot.apihelper import ApiTelegramException
from telebot.types import Update

import jobs
import leases
import metrics
import models
import subscription
from cryptobot import CryptoPayClient
from models import Payment, User
from subscription import SubscriptionMerger

log = logging.getLogger('web')

MAX_BODY = 1024 * 1024  # bytes; an Update or a Crypto Pay webhook is a few kB
SECRET_HEADER = 'HTTP_X_TELEGRAM_BOT_API_SECRET_TOKEN'
SIGNATURE_HEADER = 'HTTP_CRYPTO_PAY_API_SIGNATURE'
HTTP_THREADS = 8
LONG_POLL_SECONDS = 25  # Telegram holds getUpdates open this long


class Reply(Exception):
    """Answer the request now with this status and a small JSON body."""

    def __init__(self, status, body):
        super().__init__(status)
        self.status = status
        self.body = body


STATUS_TEXT = {200: '200 OK', 400: '400 Bad Request', 401: '401 Unauthorized', 403: '403 Forbidden',
               404: '404 Not Found', 405: '405 Method Not Allowed', 411: '411 Length Required',
               413: '413 Payload Too Large', 500: '500 Internal Server Error', 503: '503 Service Unavailable'}


class App:
    """The WSGI application. bot is a TeleBot (None: no Telegram webhook); shop and messenger settle payments."""

    def __init__(self, settings, shop, messenger, bot=None, started=None):
        self.settings = settings
        self.shop = shop
        self.messenger = messenger
        self.bot = bot if settings.webhook_url else None
        self.started = started if started is not None else time.monotonic()
        self.routes = {('GET', '/healthz'): self.healthz, ('GET', '/metrics'): self.metrics,
                       ('POST', '/cryptopay'): self.cryptopay, ('POST', '/telegram'): self.telegram}
        self.merger = SubscriptionMerger(settings.panels, settings.shop_name)

    def __call__(self, environ, start_response):
        method, path = environ.get('REQUEST_METHOD', ''), environ.get('PATH_INFO', '')
        handler = self.routes.get((method, path))
        if handler is None and method == 'GET' and path.startswith('/sub/'):
            handler = self.subscription
        content_type, headers = 'application/json', None
        try:
            if handler is None:
                known = any(route_path == path for _, route_path in self.routes)
                raise Reply(405 if known else 404, {'error': 'method not allowed' if known else 'not found'})
            status, body, *headers = handler(environ)
            headers = headers[0] if headers else None
            if isinstance(body, bytes):
                content_type = metrics.CONTENT_TYPE
        except Reply as reply:
            status, body = reply.status, reply.body
        except (OperationalError, InterfaceError) as exc:
            log.error('%s %s: database unavailable: %s', method, path, type(exc).__name__)
            status, body = 503, {'error': 'database unavailable'}
        except Exception:  # noqa: BLE001 — a bug must cost one request, never the server
            log.exception('%s %s failed', method, path)
            status, body = 500, {'error': 'internal error'}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = list(headers or [('Content-Type', content_type)])
        if not any(name == 'Cache-Control' for name, _ in headers):
            headers.append(('Cache-Control', 'no-store'))
        start_response(STATUS_TEXT[status], headers + [('Content-Length', str(len(data)))])
        return [data]

    def subscription(self, environ):
        """GET /sub/{subId}: the buyer's configs merged from every enabled panel, as the panels' own sub servers
        answer (subscription.py); a browser (Accept: text/html) gets the page instead (subpage.py).

        A well-formed subId that is no buyer's goes the same way as a buyer's: every panel's sub server is asked
        (and answers its own 404), cached alike, so neither the answer (the one 404, or 503 when a panel
        failed) nor its time tells whether it exists. A malformed one is a 404 at once: it reveals nothing.
        """
        sub_id = environ['PATH_INFO'][len('/sub/'):]
        if not subscription.is_sub_id(sub_id):
            return subscription.NOT_FOUND[0], subscription.NOT_FOUND[2], subscription.NOT_FOUND[1]
        with models.connection():
            # a hit costs what a miss does: one indexed row as a tuple (get_or_none would format the SQL into
            # DoesNotExist on a miss, and a model row costs more to build than a tuple: ~1 ms and ~0.1 ms)
            found = User.select(User.id, User.expires_at).where(User.panel_sub_id == sub_id).tuples().first()
        if found is None:
            status, headers, body = self.merger.response(sub_id, None, known=False)
            return status, body, headers
        if 'text/html' in environ.get('HTTP_ACCEPT', ''):  # the buyer's own page: not a 404 to look like
            with models.connection():
                user = User.get_by_id(found[0])
            feed = self.merger.feed(sub_id)
            import subpage  # Jinja2 and the page's templates load on the first page asked for (~1.5 MB of RSS)
            page = subpage.render(self.settings.shop_name, self.shop.subscription_link(user), user.expires_at,
                                  feed.upload, feed.download, feed.total, self.settings.timezone,
                                  self.settings.support_contact, environ.get('HTTP_ACCEPT_LANGUAGE'))
            return 200, page, [('Content-Type', 'text/html; charset=utf-8'),
                               ('Cache-Control', 'no-cache, no-store, must-revalidate')]
        status, headers, body = self.merger.response(sub_id, found[1])
        return status, body, headers

    # GET

    def healthz(self, environ):
        """200 {"status": "ok", ...} when the database answers and the payment poll ran lately; 503 naming what is wrong."""
        problems, window = [], 3 * self.settings.payment_poll_seconds
        last_poll = None
        try:
            with models.connection():  # one statement: its answer also says the database is there
                last_poll = leases.last_run('poll_payments')
        except (OperationalError, InterfaceError) as exc:
            log.warning('healthz: database unavailable: %s', type(exc).__name__)
            problems.append('database unavailable')
        age = (models.utcnow() - last_poll).total_seconds() if last_poll else None
        if not problems:
            uptime = time.monotonic() - self.started
            if age is None and uptime > window:
                problems.append(f'payment poll has not run in {int(uptime)} s since start')
            elif age is not None and age > window:
                problems.append(f'payment poll last ran {int(age)} s ago (limit {window} s)')
        body = {'status': 'ok' if not problems else 'fail', 'problems': problems,
                'payment_poll_age_seconds': None if age is None else round(age, 1)}
        return (503 if problems else 200), body

    def metrics(self, environ):
        return 200, metrics.exposition()

    # POST

    def cryptopay(self, environ):
        """Crypto Pay's webhook: verify the signature over the raw body, settle invoice_paid once, 200 after commit."""
        raw = read_body(environ)
        signature = environ.get(SIGNATURE_HEADER, '')
        if not CryptoPayClient.verify_webhook(self.settings.cryptopay_token, raw, signature):
            log.warning('cryptopay webhook: bad or missing signature (%s bytes)', len(raw))
            raise Reply(401, {'error': 'bad signature'})
        update = parse_json(raw)
        if not isinstance(update, dict) or not isinstance(update.get('update_type'), str):
            log.warning('cryptopay webhook: not an Update (%s bytes)', len(raw))
            raise Reply(400, {'error': 'not an update'})
        if update['update_type'] != 'invoice_paid':
            return 200, {'ok': True}  # a kind we do not know yet: nothing to do
        invoice = update.get('payload')
        invoice_id = invoice.get('invoice_id') if isinstance(invoice, dict) else None
        if type(invoice_id) is not int or not isinstance(invoice.get('status'), str):
            log.warning('cryptopay webhook: invoice_paid without an invoice (%s bytes)', len(raw))
            raise Reply(400, {'error': 'no invoice in the update'})
        with models.connection():
            payment = Payment.get_or_none(Payment.invoice_id == invoice_id)
            if payment is None:
                log.info('cryptopay webhook: unknown invoice=%s', invoice_id)
                return 200, {'ok': True}
            settled = jobs.settle_paid(self.shop, self.messenger, payment, invoice, 'webhook')
        log.info('cryptopay webhook invoice=%s settled=%s', invoice_id, settled)
        return 200, {'ok': True}

    def telegram(self, environ):
        """Telegram's webhook: check the secret, hand the Update to the handler threads, answer at once."""
        if self.bot is None:
            raise Reply(404, {'error': 'not found'})
        secret = environ.get(SECRET_HEADER, '')
        if not hmac.compare_digest(secret.encode(errors='replace'), self.settings.webhook_secret.encode()):
            log.warning('telegram webhook: wrong or missing secret token')
            raise Reply(403, {'error': 'forbidden'})
        raw = read_body(environ)
        update = parse_update(raw)
        if update is None:
            log.warning('telegram webhook: body is not an Update (%s bytes)', len(raw))
            raise Reply(400, {'error': 'not an update'})
        self.bot.process_new_updates([update])
        return 200, {'ok': True}


def read_body(environ):
    """Return the request body (bytes); Reply 411/413 when it has no length or is too long."""
    try:
        length = int(environ.get('CONTENT_LENGTH') or 0)
    except ValueError:
        raise Reply(400, {'error': 'bad content length'}) from None
    if length > MAX_BODY:
        raise Reply(413, {'error': 'body too large'})
    return environ['wsgi.input'].read(length) if length > 0 else b''


def parse_json(raw):
    """Return the decoded JSON value of raw bytes, or None if they are not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        return None


def parse_update(raw):
    """Return a telebot Update for a JSON Update body, or None if the body is not one."""
    data = parse_json(raw)
    if not isinstance(data, dict) or type(data.get('update_id')) is not int or data['update_id'] < 0:
        return None
    try:
        return Update.de_json(data)
    except Exception:  # noqa: BLE001 — telebot's decoder raises anything on a wrong shape (KeyError, TypeError, ...)
        return None


def handled_kinds(bot):
    """Return the update kinds bot has handlers for (what setWebhook's allowed_updates should say)."""
    # a kind is handled by its registered handlers, or by the bot's own process_new_<kind> (the Stars
    # pre-checkout answer is taken off the handler threads that way, bot.ShopBot.on_pre_checkout_queries)
    return [kind for kind in util.update_types
            if getattr(bot, f'{kind}_handlers', None) or f'process_new_{kind}' in vars(bot)]


class Server:
    """waitress serving the App on its own thread; stop() lets in-flight requests finish."""

    def __init__(self, app, host, port):
        self.app = app
        self.server = waitress.create_server(app, host=host, port=port, threads=HTTP_THREADS,
                                             max_request_body_size=MAX_BODY, clear_untrusted_proxy_headers=True,
                                             ident='spn', expose_tracebacks=False)
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, name='http', daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self, timeout=10):
        """Stop listening, let requests in progress finish (up to timeout s), then end the thread."""
        server = self.server
        # waitress's loop is not thread-safe: its trigger runs these on the loop's own thread
        server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(server))  # no new connections
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.task_dispatcher.shutdown(timeout=1)
        try:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))  # the loop ends when its map is empty
        except OSError:  # the trigger is closed already: waitress closed the server and its loop is ending
            pass
        self.thread.join(timeout)

    def busy(self):
        """Tell whether a request is queued, running, or has a reply still being written."""
        tasks = self.server.task_dispatcher
        return bool(tasks.active_count or tasks.queue or any(
            channel.requests or channel.total_outbufs_len for channel in list(self.server.active_channels.values())))


def start(settings, shop, shop_bot):
    """Check this process may run, time updates for /metrics, serve the HTTP side; return the Server (or None).

    Exits with one plain line (status 1) when another process holds the SQLite database or the port is taken.
    """
    leases.claim_single_process(settings.database_url)
    metrics.time_updates(shop_bot.bot, handled_kinds(shop_bot.bot))
    if settings.http_port == 0:
        log.info('HTTP side off (HTTP_PORT=0)')
        return None
    app = App(settings, shop, shop_bot.messenger, bot=shop_bot.bot)
    try:
        server = Server(app, settings.http_host, settings.http_port)
    except OSError as exc:
        reason = 'is already in use' if exc.errno == errno.EADDRINUSE else f'cannot be used ({exc.strerror})'
        print(f'error: HTTP_PORT {settings.http_host}:{settings.http_port} {reason}; '
              'choose another HTTP_PORT or HTTP_PORT=0', file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    log.info('HTTP side on http://%s:%s', settings.http_host, server.port)
    return server.start()


class StopOnConflict:
    """telebot exception handler: Telegram's 409 Conflict means another process reads our updates, so stop."""

    def __init__(self, bot, inner):
        self.bot = bot
        self.inner = inner
        self.conflict = False

    def handle(self, exception):
        if isinstance(exception, ApiTelegramException) and exception.error_code == 409:
            self.conflict = True
            self.bot.stop_polling()
            return True
        return self.inner.handle(exception) if self.inner else False


def receive_updates(bot, settings, server):
    """Take updates by webhook (WEBHOOK_URL set) or by long polling until SIGTERM; return the exit code.

    setWebhook and deleteWebhook keep the updates Telegram holds, so switching modes loses none.
    """
    try:
        if settings.webhook_url:
            if server is None:
                print('error: WEBHOOK_URL needs the HTTP side: set HTTP_PORT (not 0)', file=sys.stderr, flush=True)
                return 1
            bot.set_webhook(f'{settings.webhook_url}/telegram', secret_token=settings.webhook_secret,
                            allowed_updates=handled_kinds(bot), drop_pending_updates=False)
            log.info('receiving updates by webhook at %s/telegram', settings.webhook_url)
            threading.Event().wait()  # until SIGTERM raises SystemExit here
        bot.delete_webhook(drop_pending_updates=False)
        guard = StopOnConflict(bot, bot.exception_handler)
        bot.exception_handler = guard
        bot.infinity_polling(timeout=LONG_POLL_SECONDS, long_polling_timeout=LONG_POLL_SECONDS,
                             logger_level=logging.WARNING, allowed_updates=handled_kinds(bot))
        if guard.conflict:
            print("error: another process is taking this bot's updates (Telegram: 409 Conflict); stopping",
                  file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        if server is not None:
            server.stop()
