"""Loopback fake of the Crypto Pay API: real HTTP on 127.0.0.1, the real envelope, the documented quirks.

Faithful to ../shared/reference/cryptopay-api.md: /api/<method> paths, the Crypto-Pay-API-Token header,
parameters from a query string, a JSON body or a form body, HTTP status == error.code, 404 without an
envelope for a wrong path, 405 METHOD_NOT_FOUND, 500 APP_ERROR for accepted_assets sent as a JSON array.
Error names the reference does not confirm are marked "unverified" where they are raised.

Test knobs: pay/expire/delete change invoices as the service would; fail_next, rate_limit_next,
hang_next and garbage_next script the next replies in order; refuse/accept close and reopen the port;
forge makes getInvoices answer about one invoice with another invoice or changed fields, as a wrong or
hostile server at CRYPTOPAY_URL could.
"""
import hashlib
import hmac
import json
import secrets
import string
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import requests

DEFAULT_TOKEN = '12345:AAfakeCryptoPayTestToken0123456789'

# accepted assets (aiosend's enum); JET exists on the testnet only
ASSETS = ('USDT', 'TON', 'SOL', 'GRAM', 'NOT', 'HMSTR', 'CATI', 'MY', 'DOGS', 'BTC', 'LTC', 'ETH', 'BNB',
          'TRX', 'USDC', 'SEND', 'PEPE', 'WIF', 'BONK', 'MAJOR', 'TRUMP', 'MELANIA')
FIATS = ('USD', 'EUR', 'RUB', 'BYN', 'UAH', 'GBP', 'CNY', 'KZT', 'UZS', 'GEL', 'TRY', 'AMD', 'THB', 'INR',
         'BRL', 'IDR', 'AZN', 'AED', 'PLN', 'ILS', 'KGS', 'TJS')
PAID_BTN_NAMES = ('viewItem', 'openChannel', 'openBot', 'callback')
# made-up but plausible rates, used only to fill the paid_* fields
USD_PRICE = {'USDT': Decimal('1'), 'USDC': Decimal('1'), 'TON': Decimal('5.2'), 'BTC': Decimal('60000'),
             'ETH': Decimal('3000'), 'LTC': Decimal('80'), 'BNB': Decimal('550'), 'TRX': Decimal('0.12'),
             'SOL': Decimal('150')}
FIAT_PER_USD = {'USD': Decimal('1'), 'RUB': Decimal('90'), 'EUR': Decimal('0.92'), 'UAH': Decimal('41')}
FEE_RATE = Decimal('0.03')
UNIMPLEMENTED = ('getBalance', 'getExchangeRates', 'getCurrencies', 'getStats', 'transfer', 'getTransfers',
                 'createCheck', 'getChecks', 'deleteCheck')
EIGHT_PLACES = Decimal('0.00000001')


class ApiError(Exception):
    """An error the API reports in its envelope."""

    def __init__(self, code, name):
        super().__init__(code, name)
        self.code = code
        self.name = name


def iso(moment):
    """Format a time like the API: milliseconds and Z."""
    return moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.') + f'{moment.microsecond // 1000:03d}Z'


def plain(value):
    """Format a Decimal as the API's decimal string."""
    return format(value, 'f')


class FakeCryptoPay:
    """Serve the Crypto Pay API on 127.0.0.1 from a daemon thread; use as a context manager."""

    def __init__(self, token=DEFAULT_TOKEN, testnet=False, name='SPN test app', now=None):
        self.token = token
        self.testnet = testnet
        self.name = name
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.calls = []  # (method, params) for every request to /api/<method>, faults included
        self.invoices = {}  # invoice_id -> Invoice, as the API would return it
        self.port = 0
        self._lock = threading.Lock()
        self._faults = []  # scripted replies for the next requests, in order
        self._forged = {}  # invoice_id -> (id of the invoice answered instead, fields changed in the answer)
        self._hidden = set()  # invoice ids getInvoices leaves out of its answers (hide())
        self._wake = threading.Event()  # cuts hangs short on stop()
        self._next_id = 1
        self._next_update = 1
        self.webhook_url = ''  # set by deliver_webhooks(): pay() POSTs invoice_paid there
        self.webhook_attempts, self.webhook_pause = 17, 0.2
        self.webhook_posts = []  # (invoice_id, HTTP status) of every webhook POST
        self._server = None
        self._thread = None

    @property
    def url(self):
        """Base URL to give the client (the host, without /api)."""
        return f'http://127.0.0.1:{self.port}'

    @property
    def bot(self):
        """The payment bot's username on this network."""
        return 'CryptoTestnetBot' if self.testnet else 'CryptoBot'

    def start(self):
        """Start serving on a free port."""
        self._wake.clear()
        self._listen(0)
        return self

    def stop(self):
        """Stop serving and wake any hanging reply."""
        self._wake.set()
        if self._server is not None:
            self.refuse()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def refuse(self):
        """Close the listening socket so new connections are refused."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None

    def accept(self):
        """Listen again on the same port after refuse()."""
        self._listen(self.port)

    def _listen(self, port):
        server = _Server(('127.0.0.1', port), _Handler)
        server.block_on_close = False  # a hanging reply must not block stop()
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        # a short poll interval keeps stop() and refuse() quick
        self._thread = threading.Thread(target=server.serve_forever, args=(0.01,), name='fake-cryptopay',
                                        daemon=True)
        self._thread.start()

    # scripted faults: each applies to one request, in the order scheduled

    def fail_next(self, n=1, status=500, name=None):
        """Answer the next n requests with status and the API's error envelope."""
        name = name or {500: 'INTERNAL_SERVER_ERROR', 503: 'SERVICE_UNAVAILABLE'}.get(status, 'APP_ERROR')
        self._add_faults(n, ('fail', status, name))

    def rate_limit_next(self, n=1, retry_after=1):
        """Answer the next n requests with 429 and a Retry-After header (the 429 shape is unverified)."""
        self._add_faults(n, ('rate_limit', retry_after))

    def hang_next(self, n=1, seconds=5):
        """Carry out the next n requests but hold each reply back for seconds."""
        self._add_faults(n, ('hang', seconds))

    def garbage_next(self, n=1):
        """Answer the next n requests with 200 and a body that is not JSON."""
        self._add_faults(n, ('garbage',))

    def _add_faults(self, n, fault):
        with self._lock:
            self._faults.extend([fault] * n)

    # invoice knobs: what the buyer or time does on the service's side

    def pay(self, invoice_id, asset='USDT', comment=None, anonymous=False):
        """Mark an active invoice paid in asset, filling the paid_* fields as the service does."""
        with self._lock:
            self._expire_due()
            invoice = self.invoices[invoice_id]
            if invoice['status'] != 'active':
                raise ValueError(f'invoice {invoice_id} is {invoice["status"]}, only active ones can be paid')
            accepted = invoice['accepted_assets'] if invoice['currency_type'] == 'fiat' else [invoice['asset']]
            if asset not in accepted:
                raise ValueError(f'invoice {invoice_id} does not accept {asset}')
            usd_price = USD_PRICE.get(asset, Decimal('1'))
            amount = Decimal(invoice['amount'])
            if invoice['currency_type'] == 'fiat':
                fiat_rate = usd_price * FIAT_PER_USD.get(invoice['fiat'], Decimal('1'))
                paid_amount = (amount / fiat_rate).quantize(EIGHT_PLACES)
                invoice.update(paid_asset=asset, paid_amount=plain(paid_amount), paid_fiat_rate=plain(fiat_rate))
            else:
                paid_amount = amount
            fee = (paid_amount * FEE_RATE).quantize(EIGHT_PLACES)
            invoice.update(status='paid', paid_at=iso(self.now()), paid_anonymously=anonymous,
                           paid_usd_rate=plain(usd_price), fee_asset=asset, fee_amount=plain(fee),
                           fee_in_usd=plain((fee * usd_price).quantize(EIGHT_PLACES)))
            if comment is not None:
                invoice['comment'] = comment
            paid = dict(invoice)
        if self.webhook_url:
            threading.Thread(target=self._deliver, args=(invoice_id,), daemon=True, name='fake-cryptopay-webhook').start()
        return paid

    def expire(self, invoice_id):
        """Mark an active invoice expired, as its deadline passing would."""
        with self._lock:
            invoice = self.invoices[invoice_id]
            if invoice['status'] != 'active':
                raise ValueError(f'invoice {invoice_id} is {invoice["status"]}, only active ones expire')
            invoice['status'] = 'expired'

    def forge(self, invoice_id, as_invoice=None, **fields):
        """Answer getInvoices about invoice_id with invoice as_invoice and/or with fields changed (None drops one).

        Called with no changes, it answers truthfully again.
        """
        with self._lock:
            if as_invoice is None and not fields:
                self._forged.pop(invoice_id, None)
            else:
                self._forged[invoice_id] = (as_invoice if as_invoice is not None else invoice_id, fields)

    def hide(self, invoice_id, hidden=True):
        """Leave invoice_id out of getInvoices answers (a partial answer) until hide(invoice_id, False)."""
        with self._lock:
            (self._hidden.add if hidden else self._hidden.discard)(invoice_id)

    def _answer_about(self, invoice):
        forged = self._forged.get(invoice['invoice_id'])
        if forged is None:
            return invoice
        other, fields = forged
        answer = dict(self.invoices[other])
        for name, value in fields.items():
            if value is None:
                answer.pop(name, None)
            else:
                answer[name] = value
        return answer

    def delete(self, invoice_id):
        """Delete an invoice, as the app owner can in @CryptoBot."""
        with self._lock:
            del self.invoices[invoice_id]

    def webhook_body(self, invoice_id):
        """Return (raw body, crypto-pay-api-signature) of the invoice_paid Update for a paid invoice."""
        with self._lock:
            invoice = dict(self.invoices[invoice_id])
            if invoice['status'] != 'paid':
                raise ValueError(f'invoice {invoice_id} is {invoice["status"]}; only invoice_paid is delivered')
            update_id = self._next_update
            self._next_update += 1
        # only the webhook copy carries the deprecated fee and usd_rate
        invoice.update(fee=invoice['fee_amount'], usd_rate=invoice['paid_usd_rate'])
        update = {'update_id': update_id, 'update_type': 'invoice_paid', 'request_date': iso(self.now()),
                  'payload': invoice}
        raw = json.dumps(update, separators=(',', ':')).encode()
        key = hashlib.sha256(self.token.encode()).digest()
        return raw, hmac.new(key, raw, hashlib.sha256).hexdigest()

    def post_webhook(self, url, invoice_id, timeout=10):
        """POST the signed invoice_paid Update of a paid invoice to url, as Crypto Pay does; return the status.

        Crypto Pay signs the exact bytes it sends (crypto-pay-api-signature header) and retries
        anything but a 2xx; the caller decides whether to retry.
        """
        raw, signature = self.webhook_body(invoice_id)
        reply = requests.post(url, data=raw, timeout=timeout,
                              headers={'Content-Type': 'application/json', 'crypto-pay-api-signature': signature})
        with self._lock:
            self.webhook_posts.append((invoice_id, reply.status_code))
        return reply.status_code

    def deliver_webhooks(self, url, attempts=17, pause=0.2):
        """From now on, pay() also POSTs the webhook to url on a thread, retried up to attempts times."""
        self.webhook_url, self.webhook_attempts, self.webhook_pause = url, attempts, pause

    def _deliver(self, invoice_id):
        for _ in range(self.webhook_attempts):
            try:
                if 200 <= self.post_webhook(self.webhook_url, invoice_id) < 300:
                    return
            except requests.RequestException:
                pass
            self._wake.wait(self.webhook_pause)

    # the HTTP side

    def handle(self, path, token, params):
        """Answer one request; return (status, headers, body bytes, seconds to hold the reply)."""
        if not path.startswith('/api/') or '/' in path[len('/api/'):]:
            return 404, {'Content-Type': 'text/html'}, b'<html><body><h1>404 Not Found</h1></body></html>', 0
        method = path[len('/api/'):]
        with self._lock:
            self.calls.append((method, params))
            fault = self._faults.pop(0) if self._faults else ('none',)
        if fault[0] == 'garbage':
            return 200, {'Content-Type': 'text/html'}, b'<html>502 Bad Gateway</html>', 0
        if fault[0] == 'fail':
            return self._envelope(ApiError(fault[1], fault[2])) + (0,)
        if fault[0] == 'rate_limit':
            status, headers, body = self._envelope(ApiError(429, 'TOO_MANY_REQUESTS'))
            return status, {**headers, 'Retry-After': str(fault[1])}, body, 0
        status, headers, body = self._api(method, token, params)
        return status, headers, body, fault[1] if fault[0] == 'hang' else 0

    def wait(self, seconds):
        """Sleep up to seconds, or less if the fake is stopping."""
        self._wake.wait(seconds)

    def _api(self, method, token, params):
        methods = {'getMe': self._get_me, 'createInvoice': self._create_invoice,
                   'getInvoices': self._get_invoices, 'deleteInvoice': self._delete_invoice}
        try:
            # the token is checked before the method name; the real order is unverified
            if token != self.token:
                raise ApiError(401, 'UNAUTHORIZED')
            if method in UNIMPLEMENTED:
                return 501, {'Content-Type': 'text/plain'}, f'fake_cryptopay does not implement {method}'.encode()
            if method not in methods:
                raise ApiError(405, 'METHOD_NOT_FOUND')
            with self._lock:
                self._expire_due()
                result = methods[method](params)
                body = json.dumps({'ok': True, 'result': result}).encode()
            return 200, {'Content-Type': 'application/json'}, body
        except ApiError as error:
            return self._envelope(error)

    @staticmethod
    def _envelope(error):
        body = json.dumps({'ok': False, 'error': {'code': error.code, 'name': error.name}}).encode()
        return error.code, {'Content-Type': 'application/json'}, body

    def _expire_due(self):
        now = self.now()
        for invoice in self.invoices.values():
            deadline = invoice.get('expiration_date')
            if invoice['status'] == 'active' and deadline and datetime.fromisoformat(deadline) <= now:
                invoice['status'] = 'expired'

    def _get_me(self, params):
        app_id = self.token.split(':')[0]
        return {'app_id': int(app_id) if app_id.isdigit() else 1, 'name': self.name,
                'payment_processing_bot_username': self.bot}

    def _create_invoice(self, p):
        currency_type = p.get('currency_type', 'crypto')
        assets = ASSETS + ('JET',) if self.testnet else ASSETS
        invoice = {'invoice_id': self._next_id, 'hash': 'IV' + _random_text(10), 'currency_type': currency_type}
        if currency_type == 'fiat':
            if p.get('fiat') not in FIATS:
                raise ApiError(400, 'FIAT_INVALID')  # unverified name
            accepted = p.get('accepted_assets', ','.join(assets))
            if not isinstance(accepted, str):
                raise ApiError(500, 'APP_ERROR')  # a JSON array, as seen on testnet (reference S5 PR #18)
            accepted = [asset.strip() for asset in accepted.split(',')]
            if any(asset not in assets for asset in accepted):
                raise ApiError(400, 'UNSUPPORTED_ASSET')
            invoice.update(fiat=p['fiat'], accepted_assets=accepted)
        elif currency_type == 'crypto':
            if p.get('asset') not in assets:
                raise ApiError(400, 'UNSUPPORTED_ASSET')
            invoice['asset'] = p['asset']
        else:
            raise ApiError(400, 'CURRENCY_TYPE_INVALID')  # unverified name
        amount = _decimal(p.get('amount'))
        if amount is None or amount <= 0:
            raise ApiError(400, 'AMOUNT_INVALID')  # unverified name for invoices
        expires_in = None
        if 'expires_in' in p:
            expires_in = _integer(p['expires_in'])
            if expires_in is None or not 1 <= expires_in <= 2678400:
                raise ApiError(400, 'EXPIRES_IN_INVALID')
        if 'paid_btn_name' in p:
            if not p.get('paid_btn_url'):
                raise ApiError(400, 'PAID_BTN_URL_REQUIRED')
            if p['paid_btn_name'] not in PAID_BTN_NAMES:
                raise ApiError(400, 'PAID_BTN_NAME_INVALID')  # unverified name
            if not str(p['paid_btn_url']).startswith(('http://', 'https://')):
                raise ApiError(400, 'PAID_BTN_URL_INVALID')  # unverified name
        for field, limit in (('description', 1024), ('hidden_message', 2048), ('payload', 4096)):
            if len(str(p.get(field, ''))) > limit:
                raise ApiError(400, f'{field.upper()}_TOO_LONG')  # unverified names
        now = self.now()
        code = invoice['hash']
        web = 'https://testnet-app.send.tg/invoices/' if self.testnet else 'https://app.cr.bot/invoices/'
        invoice.update(
            amount=plain(amount), status='active',
            bot_invoice_url=f'https://t.me/{self.bot}?start={code}',
            mini_app_invoice_url=f'https://t.me/{self.bot}/app?startapp=invoice-{code}&mode=compact',
            web_app_invoice_url=web + code,
            pay_url=f'https://t.me/{self.bot}?start={code}',  # deprecated, still returned
            created_at=iso(now),
            allow_comments=_boolean(p.get('allow_comments', True)),
            allow_anonymous=_boolean(p.get('allow_anonymous', True)),
        )
        for field in ('description', 'hidden_message', 'payload', 'paid_btn_name', 'paid_btn_url', 'swap_to'):
            if field in p:
                invoice[field] = str(p[field])
        if expires_in is not None:
            invoice['expiration_date'] = iso(now + timedelta(seconds=expires_in))
        self.invoices[invoice['invoice_id']] = invoice
        self._next_id += 1
        return invoice

    def _get_invoices(self, p):
        found = list(self.invoices.values())
        if 'invoice_ids' in p:
            if not isinstance(p['invoice_ids'], str):
                raise ApiError(500, 'APP_ERROR')  # by analogy with accepted_assets (unverified)
            try:
                wanted = {int(part) for part in p['invoice_ids'].split(',') if part.strip()}
            except ValueError:
                raise ApiError(400, 'INVOICE_IDS_INVALID') from None  # unverified name
            found = [invoice for invoice in found if invoice['invoice_id'] in wanted]
        offset, count = _integer(p.get('offset', 0)), _integer(p.get('count', 100))
        if offset is None or count is None:
            raise ApiError(400, 'COUNT_INVALID')  # unverified name
        if offset < 0 or count < 0:
            raise ApiError(500, 'INTERNAL_SERVER_ERROR')  # negative offset/count gave 500 on testnet
        if not 1 <= count <= 1000:
            raise ApiError(400, 'COUNT_INVALID')  # unverified name
        status = p.get('status')
        if status is not None and status not in ('active', 'paid'):
            raise ApiError(400, 'STATUS_INVALID')  # the docs allow only active|paid; name unverified
        for field in ('status', 'asset', 'fiat'):
            if p.get(field) is not None:
                found = [invoice for invoice in found if invoice.get(field) == p[field]]
        # newest first; the real order is undocumented, and this is not the order ids were asked in
        found.sort(key=lambda invoice: invoice['invoice_id'], reverse=True)
        return {'items': [self._answer_about(invoice) for invoice in found[offset:offset + count]
                          if invoice['invoice_id'] not in self._hidden]}

    def _delete_invoice(self, p):
        invoice_id = _integer(p.get('invoice_id'))
        if invoice_id not in self.invoices:
            raise ApiError(400, 'INVOICE_NOT_FOUND')  # unverified name
        del self.invoices[invoice_id]
        return True


class _Server(ThreadingHTTPServer):
    # a loaded machine may not run the accept loop for a while: queue a burst (50 buyers at once)
    # instead of dropping SYNs past socketserver's default of 5 (a 1 s retransmission, a ConnectTimeout)
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # an idle client must not pin a server thread forever

    def do_GET(self):
        self._serve(dict(parse_qsl(urlsplit(self.path).query)))

    def do_POST(self):
        params = dict(parse_qsl(urlsplit(self.path).query))
        raw = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        kind = (self.headers.get('Content-Type') or '').split(';')[0].strip().lower()
        if kind == 'application/json' and raw:
            try:
                body = json.loads(raw, parse_float=Decimal)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                self._reply(*FakeCryptoPay._envelope(ApiError(400, 'BAD_REQUEST')))  # unverified name
                return
            params.update(body)
        elif kind == 'application/x-www-form-urlencoded':
            params.update(parse_qsl(raw.decode()))
        self._serve(params)

    def _serve(self, params):
        fake = self.server.fake
        token = self.headers.get('Crypto-Pay-API-Token')
        status, headers, body, hold = fake.handle(urlsplit(self.path).path, token, params)
        if hold:
            fake.wait(hold)
        self._reply(status, headers, body)

    def _reply(self, status, headers, body):
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (e.g. its read timeout ran out)

    def log_message(self, format, *args):
        pass


def _random_text(length):
    return ''.join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))


def _decimal(value):
    """Return value as a Decimal, or None; numbers may arrive as JSON numbers or strings."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _integer(value):
    """Return value as an int, or None; the API takes "1800" as well as 1800."""
    number = _decimal(value)
    if number is None or number != number.to_integral_value():
        return None
    return int(number)


def _boolean(value):
    """Return a boolean parameter, which a query string spells "true"/"false"."""
    return value if isinstance(value, bool) else str(value).lower() == 'true'
