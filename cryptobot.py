"""Crypto Pay (@CryptoBot) API client: create fiat invoices, read their status in batches, verify webhooks.

Every call is a POST with a JSON body to {CRYPTOPAY_URL}/api/{method}. The API answers
{"ok": true, "result": ...} or {"ok": false, "error": {"code", "name"}} with the HTTP status equal
to error.code, so error bodies are read on non-2xx replies too.
"""
import hashlib
import hmac
import logging
import math
import time
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import NewConnectionError

import httpsession

log = logging.getLogger(__name__)

MAINNET_URL = 'https://pay.crypt.bot'
TESTNET_BOT = 'CryptoTestnetBot'
MAX_EXPIRES_IN = 2678400  # 31 days, the API's upper bound for expires_in
MAX_IDS_PER_CALL = 1000  # getInvoices accepts count 1..1000
MAX_DESCRIPTION = 1024
MAX_PAYLOAD = 4096

# connect 3.05 s: just over 3 s, the first TCP SYN retransmission, as requests' docs advise.
# read 10 s: the API answers in well under a second; a buyer waiting on "creating invoice"
# is better served by a clear error and a retry button than by a longer silence.
DEFAULT_TIMEOUT = (3.05, 10)


class CryptoPayError(Exception):
    """Report a failed Crypto Pay call; the message never contains the token.

    .status is the HTTP status (None when no reply came), .name the API's error name
    (e.g. UNAUTHORIZED) or a tag: TIMEOUT, CONNECTION, BAD_JSON, HTTP_ERROR.
    """

    def __init__(self, message, status=None, name=None, retry_after=None, sent=True):
        super().__init__(message)
        self.status = status
        self.name = name
        self.retry_after = retry_after  # seconds, from a 429's Retry-After header
        self.sent = sent  # False only when the request surely never reached the server


class CryptoPayClient:
    """Talk to one Crypto Pay app over one requests.Session, shared by the bot's threads.

    Retries, at most `retries` times with exponential backoff: 429 (waiting Retry-After, capped
    by max_retry_after), 5xx and connection failures. Other 4xx are never retried. createInvoice
    and deleteInvoice are not retried once the request may have reached the server (read timeout,
    dropped connection, gateway 502/504): the first attempt may have succeeded, and a blind retry
    would create a duplicate invoice.
    """

    def __init__(self, token, base_url=MAINNET_URL, timeout=DEFAULT_TIMEOUT, retries=3, backoff=0.5,
                 max_retry_after=30, sleep=time.sleep):
        if not token:
            raise ValueError('Crypto Pay token is empty: set CRYPTOPAY_TOKEN')
        if urlsplit(base_url).scheme not in ('http', 'https'):
            raise ValueError(f'CRYPTOPAY_URL must start with https:// (got {base_url!r})')
        self.base_url = base_url.rstrip('/')
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        self._bot_username = None
        self._session = httpsession.Session()
        self._session.headers['Crypto-Pay-API-Token'] = token

    def __repr__(self):
        return f'CryptoPayClient({self.base_url!r})'

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Close the HTTP session."""
        self._session.close()

    @property
    def is_testnet(self):
        """Say whether this app lives on the testnet (certain once get_me has run)."""
        if self._bot_username is not None:
            return self._bot_username == TESTNET_BOT
        return 'testnet' in (urlsplit(self.base_url).hostname or '')

    def get_me(self):
        """Return the app's {app_id, name, payment_processing_bot_username}.

        :raises CryptoPayError: on any failure, e.g. status 401 for a wrong or other-network token.
        """
        me = self._call('getMe')
        if not isinstance(me, dict):
            raise CryptoPayError('Crypto Pay getMe: result is not an object', status=200, name='BAD_JSON')
        self._bot_username = me.get('payment_processing_bot_username')
        return me

    def create_invoice(self, amount, fiat, description, payload, expires_in,
                       accepted_assets=('USDT', 'TON', 'BTC')):
        """Create a fiat invoice payable in accepted_assets and return the Invoice.

        :raises ValueError: for arguments the API would refuse (checked before any request).
        :raises CryptoPayError: on failure; name TIMEOUT means the invoice may exist anyway.
        """
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) \
                or not 1 <= expires_in <= MAX_EXPIRES_IN:
            raise ValueError(f'expires_in must be an int in 1..{MAX_EXPIRES_IN} seconds, got {expires_in!r}')
        if len(description) > MAX_DESCRIPTION:
            raise ValueError(f'description is longer than {MAX_DESCRIPTION} characters')
        payload = str(payload)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f'payload is longer than {MAX_PAYLOAD} characters')
        if isinstance(accepted_assets, str):
            accepted_assets = accepted_assets.split(',')
        assets = ','.join(asset.strip().upper() for asset in accepted_assets if asset.strip())
        if not assets:
            raise ValueError('accepted_assets is empty')
        params = {
            'currency_type': 'fiat',
            'fiat': fiat.upper(),
            'amount': _amount_text(amount),
            # a comma-separated string: a JSON array here makes the API fail with 500 APP_ERROR
            'accepted_assets': assets,
            'description': description,
            'payload': payload,
            'expires_in': expires_in,
        }
        return self._call('createInvoice', params, idempotent=False)

    def get_invoices(self, invoice_ids):
        """Return the invoices with these ids; ids the API omits were deleted (or are not ours).

        :raises CryptoPayError: on failure of any batch.
        """
        ids = list(dict.fromkeys(int(invoice_id) for invoice_id in invoice_ids))
        items = []
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            batch = ids[start:start + MAX_IDS_PER_CALL]
            # always send count: the default of 100 could silently cut a batch short
            params = {'invoice_ids': ','.join(map(str, batch)), 'count': len(batch)}
            result = self._call('getInvoices', params)
            if not isinstance(result, dict) or not isinstance(result.get('items'), list):
                raise CryptoPayError('Crypto Pay getInvoices: result has no items list', status=200, name='BAD_JSON')
            items.extend(result['items'])
        return items

    def get_invoices_by_status(self, status, offset=0, count=MAX_IDS_PER_CALL):
        """Return one page of this app's invoices in status 'active' or 'paid' (the only filters the API has).

        The API's order is undocumented (newest first as seen); page with offset until a page comes
        back shorter than count.

        :raises ValueError: for a status the API cannot filter by (e.g. 'expired').
        :raises CryptoPayError: on failure.
        """
        if status not in ('active', 'paid'):
            raise ValueError(f'getInvoices filters only by active or paid, not {status!r}')
        if not 1 <= count <= MAX_IDS_PER_CALL or offset < 0:
            raise ValueError(f'count must be 1..{MAX_IDS_PER_CALL} and offset >= 0')
        result = self._call('getInvoices', {'status': status, 'offset': offset, 'count': count})
        if not isinstance(result, dict) or not isinstance(result.get('items'), list):
            raise CryptoPayError('Crypto Pay getInvoices: result has no items list', status=200, name='BAD_JSON')
        return result['items']

    def delete_invoice(self, invoice_id):
        """Delete an invoice and return True when the API confirms it.

        :raises CryptoPayError: on failure, e.g. status 400 for an unknown id.
        """
        return self._call('deleteInvoice', {'invoice_id': int(invoice_id)}, idempotent=False) is True

    @staticmethod
    def verify_webhook(token, raw_body, signature):
        """Return True if signature (the crypto-pay-api-signature header) signs raw_body for this token."""
        if not token or not signature or not isinstance(signature, str) \
                or not isinstance(raw_body, (bytes, bytearray)):
            return False
        key = hashlib.sha256(token.encode()).digest()
        expected = hmac.new(key, bytes(raw_body), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), signature.strip().lower().encode(errors='replace'))

    def _call(self, method, params=None, idempotent=True):
        """Call one API method, retrying what is safe to retry, and return its result."""
        for attempt in range(self.retries + 1):
            try:
                return self._send(method, params or {})
            except CryptoPayError as error:
                delay = self._retry_delay(error, attempt, idempotent)
                if delay is None:
                    raise
                log.warning('%s; retry %d/%d in %.2f s', error, attempt + 1, self.retries, delay)
                self._sleep(delay)

    def _retry_delay(self, error, attempt, idempotent):
        """Return the seconds to wait before retrying after error, or None to give up."""
        if attempt >= self.retries:
            return None
        backoff = self.backoff * 2 ** attempt
        if error.status == 429:
            return backoff if error.retry_after is None else min(error.retry_after, self.max_retry_after)
        if error.status is not None:
            if error.status < 500:
                return None
            # a gateway error may hide a call the API did carry out
            if not idempotent and error.status in (502, 504):
                return None
            return backoff
        return backoff if idempotent or not error.sent else None

    def _send(self, method, params):
        """POST one call and return its result; turn every failure into CryptoPayError."""
        url = f'{self.base_url}/api/{method}'
        try:
            response = self._session.post(url, json=params, timeout=self.timeout)
        except requests.ConnectTimeout as exc:
            raise CryptoPayError(f'Crypto Pay {method}: cannot connect to {self.base_url} (timed out)',
                                 name='CONNECTION', sent=False) from exc
        except requests.Timeout as exc:
            raise CryptoPayError(f'Crypto Pay {method}: no reply from {self.base_url} in time',
                                 name='TIMEOUT') from exc
        except requests.RequestException as exc:
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], Exception) else exc
            reason = getattr(inner, 'reason', None)  # set when urllib3 gave up connecting
            cause = type(reason or inner).__name__
            raise CryptoPayError(f'Crypto Pay {method}: cannot connect to {self.base_url} ({cause})',
                                 name='CONNECTION', sent=not isinstance(reason, NewConnectionError)) from exc

        status = response.status_code
        try:
            body = response.json()
        except ValueError as exc:
            raise _unexpected_reply(method, response) from exc
        if not isinstance(body, dict):
            raise _unexpected_reply(method, response)
        if body.get('ok') is True and 'result' in body and response.ok:
            return body['result']
        error = body.get('error')
        if not isinstance(error, dict):
            raise _unexpected_reply(method, response)
        name = str(error.get('name') or 'UNKNOWN')
        if status == 401:
            message = (f'Crypto Pay rejected the token (HTTP 401 {name}): check CRYPTOPAY_TOKEN, and that it '
                       f'comes from the network CRYPTOPAY_URL points at ({self.base_url}); testnet tokens '
                       f'(@CryptoTestnetBot) only work on https://testnet-pay.crypt.bot, mainnet tokens (@CryptoBot) '
                       f'on {MAINNET_URL}')
        else:
            message = f'Crypto Pay {method} failed: HTTP {status} {name}'
        retry_after = _seconds(response.headers.get('Retry-After')) if status == 429 else None
        raise CryptoPayError(message, status=status, name=name, retry_after=retry_after)


def _unexpected_reply(method, response):
    """Build the error for a reply that is not the API's JSON envelope."""
    status = response.status_code
    kind = response.headers.get('Content-Type', 'no content type')
    if status == 404:
        return CryptoPayError(f'Crypto Pay {method}: HTTP 404 at {response.url}; CRYPTOPAY_URL must be the bare '
                              f'host, e.g. {MAINNET_URL} (the client adds /api/<method> itself)',
                              status=404, name='HTTP_ERROR')
    if response.ok:
        return CryptoPayError(f'Crypto Pay {method}: HTTP {status} reply is not the API\'s JSON ({kind})',
                              status=status, name='BAD_JSON')
    return CryptoPayError(f'Crypto Pay {method}: HTTP {status} without the API\'s error body ({kind})',
                          status=status, name='HTTP_ERROR')


def _seconds(value):
    """Return a Retry-After value in seconds, or None if it is not a number of seconds."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _amount_text(amount):
    """Return amount as the plain decimal string the API expects; refuse floats."""
    if isinstance(amount, (float, bool)):
        raise TypeError(f'amount must be a Decimal or a string, not {type(amount).__name__}')
    value = parse_amount(amount)
    if value <= 0:
        raise ValueError(f'amount must be positive, got {amount!r}')
    return format(value, 'f')


def parse_amount(text):
    """Parse an API amount such as "125.50" into a Decimal."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation as exc:
        raise ValueError(f'not an amount: {text!r}') from exc
    if not value.is_finite():
        raise ValueError(f'not an amount: {text!r}')
    return value


def parse_time(text):
    """Parse an API time such as "2025-02-08T12:11:01.341Z" into an aware UTC datetime."""
    if not isinstance(text, str):
        raise ValueError(f'not an ISO 8601 time: {text!r}')
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)
