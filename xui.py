"""Client for the 3x-ui panel: one interface over both of its client APIs.

Panels up to v3.0.x keep clients as entries of an inbound's settings under panel/api/inbounds/*;
v3.1+ manage them under panel/api/clients/*. XuiClient finds out which one it talks to on first
use and again whenever a route it relies on disappears (../shared/reference/xui-api.md).
"""
import base64
import http.cookiejar
import json
import logging
import secrets
import threading
import time
import urllib.request
import uuid
from urllib.parse import quote, urlencode, urlsplit

import urllib3
from urllib3 import exceptions as u3

import httppool
from xui_fields import (LEGACY_FIELDS, as_bytes, client_body, client_view, datetime_to_ms, record_to_client,
                        traffic_view)

log = logging.getLogger(__name__)

# Connect just over 3 s, the TCP retransmit window for a lost SYN; read 10 s: the panel answers in
# milliseconds, but a busy SQLite write on a small VPS can take seconds.
TIMEOUT = (3.05, 10)
# The session cookie's names (`session` before v2.3.8). The panel sets Max-Age to its session lifetime and
# never refreshes it; once the cookie jar drops it, log in again before the next call.
SESSION_COOKIES = ('3x-ui', 'session')
# The field that holds a client's key, per inbound protocol; legacy routes address clients by it.
KEY_FIELDS = {'vless': 'id', 'vmess': 'id', 'trojan': 'password', 'shadowsocks': 'email',
              'hysteria': 'auth', 'hysteria2': 'auth'}
# Asked for during detection; only whether the route exists matters.
PROBE_EMAIL = 'spn-generation-probe'
# Sent with every call; the panel answers a call without X-Requested-With with a redirect to its login page.
HEADERS = {'X-Requested-With': 'XMLHttpRequest', 'Accept': 'application/json, */*',
           'Accept-Encoding': 'gzip, deflate', 'User-Agent': 'spn-vpn-bot'}


class XuiError(Exception):
    """Any failure talking to the 3x-ui panel."""


class XuiLoginError(XuiError):
    """The panel refused the login; the message carries the panel's own words."""


class _NoEnvelope(XuiError):
    """The panel answered without a JSON envelope: not logged in, or no such route."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class _Refused(XuiError):
    """The panel answered success:false."""

    def __init__(self, message, panel_msg):
        super().__init__(message)
        self.panel_msg = panel_msg


class _CannotConnect(XuiError):
    """The request never reached the panel; the cause is the urllib3 error."""


class _CookieSource:
    """What http.cookiejar reads of an answer (its headers' get_all), over urllib3's headers."""

    def __init__(self, headers):
        self._headers = headers

    def info(self):
        return self

    def get_all(self, name, default=None):
        return self._headers.getlist(name) or default


class _RouteMissing(XuiError):
    """A route answered 404 with a fresh session: the panel's API generation is not the one assumed."""


def _panel_msg(payload):
    """Return an envelope's msg in the panel's words, without the line breaks of Go's fmt.Sprintln."""
    return str(payload.get('msg') or '').replace('\n', '').strip()


def _key_field(protocol):
    """Name the client field that is the key on an inbound of this protocol."""
    if protocol not in KEY_FIELDS:
        raise XuiError(f'inbound protocol {protocol!r} is not supported; use vless, vmess, trojan or shadowsocks')
    return KEY_FIELDS[protocol]


def _new_key(protocol, settings):
    """Mint the secret a new client connects with."""
    field = _key_field(protocol)
    if field == 'id':
        return {'id': str(uuid.uuid4())}
    if protocol == 'shadowsocks' and str(settings.get('method', '')).startswith('2022-'):
        # 2022 ciphers need a base64 key of the cipher's size
        size = 16 if '128' in settings['method'] else 32
        return {'password': base64.b64encode(secrets.token_bytes(size)).decode()}
    return {'auth' if field == 'auth' else 'password': uuid.uuid4().hex}


class XuiClient:
    """Manage the clients of one inbound of a 3x-ui panel, whatever its API generation.

    Connection failures and 5xx answers are retried `retries` times with exponential backoff. A read
    timeout is not retried: a POST may have been applied, the caller is waiting, and ensure_client
    converges on the caller's next try. A lost session costs one new login per call, never more.
    Threads share one client: requests run in parallel, while logging in is serialised and done once
    for all the threads that found the session gone.
    """

    def __init__(self, base_url, inbound_id, sub_url, username=None, password=None, api_token=None,
                 timeout=TIMEOUT, retries=2, backoff=0.5, pools=None):
        if not api_token and not (username and password):
            raise XuiError('the panel needs XUI_API_TOKEN or both XUI_USERNAME and XUI_PASSWORD')
        self._base = base_url.strip().rstrip('/') + '/'
        parts = urlsplit(self._base)
        # messages name host and port only: the base path may be the panel's secret
        self._where = f'{parts.hostname}:{parts.port}' if parts.port else str(parts.hostname)
        self.inbound_id = int(inbound_id)
        self._sub_url = sub_url.strip().rstrip('/') + '/'
        self._credentials = {'username': username, 'password': password}
        self._api_token = api_token
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._pools = pools or httppool.shared()  # urllib3 pools: proxies and CAs read once per process
        self._headers = dict(HEADERS)
        if api_token:
            self._headers['Authorization'] = f'Bearer {api_token}'
        self._cookies = http.cookiejar.CookieJar()  # thread-safe; what the panel's Set-Cookie says, expiry included
        self._lock = threading.RLock()  # guards logging in and detection; requests themselves run in parallel
        self._local = threading.local()  # per call: whether it has logged in already
        self._adapter = None
        self._logged_in = False
        self._logins = 0

    @property
    def generation(self):
        """Name the panel's client API: 'legacy' (up to v3.0.x) or 'v3' (v3.1+)."""
        return self._call(lambda api: api.name)

    def ensure_client(self, email, expiry, sub_id, tg_id, total_bytes=0, limit_ip=0):
        """Create or fully update the client so it is enabled until `expiry` (None = never); keep its key.

        :raises XuiError: the panel is unreachable or refused (e.g. the email is taken in another inbound)
        """
        if not email or not sub_id:
            raise ValueError('a panel client needs an email and a sub_id')
        fields = {'email': email, 'enable': True, 'expiryTime': datetime_to_ms(expiry),
                  'totalGB': as_bytes(total_bytes), 'limitIp': int(limit_ip), 'tgId': int(tg_id or 0),
                  'subId': sub_id}
        return self._call(lambda api: api.ensure(fields))

    def get_client(self, email):
        """Return the client of our inbound with this email, or None.  :raises XuiError:"""
        return self._call(lambda api: api.get(email))

    def get_traffic(self, email):
        """Return {'up','down','total','expiry','enable'} for the email, or None if the panel has none.

        :raises XuiError:
        """
        return self._call(lambda api: api.traffic(email))

    def delete_client(self, email):
        """Delete the client of our inbound with this email; do nothing if there is none.  :raises XuiError:"""
        self._call(lambda api: api.delete(email))

    def list_clients(self):
        """Return every client of our inbound.  :raises XuiError:"""
        return self._call(lambda api: api.list())

    def subscription_link(self, sub_id):
        """Return the subscription URL for a subId."""
        return self._sub_url + sub_id

    def two_factor_enabled(self):
        """Ask the panel whether its login needs a two-factor code; None if it cannot say.

        POST {base}getTwoFactorEnable is public (v2.6+) and behind the CSRF check from v3.0; it answers
        {"obj": true|false}. A bot cannot type the code: such a panel needs XUI_API_TOKEN (v3.0+).
        :raises XuiError: the panel is unreachable
        """
        with self._lock:
            headers = {}
            try:
                headers['X-CSRF-Token'] = str(self._exchange('GET', 'csrf-token'))
            except _NoEnvelope as exc:
                if exc.status != 404:  # 404: a v2 panel, which has no CSRF
                    return None
            try:
                return self._exchange('POST', 'getTwoFactorEnable', headers=headers) is True
            except _NoEnvelope:
                return None

    def check(self):
        """Log in and confirm the inbound exists; return {'generation','inbound_id','protocol'}.

        :raises XuiError: with a plain-language reason
        """
        def probe(api):
            protocol, _ = self._inbound()
            _key_field(protocol)
            return {'generation': api.name, 'inbound_id': self.inbound_id, 'protocol': protocol}
        return self._call(probe)

    def _call(self, operation):
        """Run operation(adapter), switching adapters once if the panel's API generation has changed."""
        self._local.login_tried = False
        if self._adapter is None:
            with self._lock:
                if self._adapter is None:
                    self._detect()
        adapter = self._adapter
        try:
            return operation(adapter)
        except _RouteMissing:
            with self._lock:
                if self._adapter is adapter:  # no other thread has re-detected meanwhile
                    self._detect()
            if self._adapter.name == adapter.name:
                raise
            log.warning('3x-ui panel API changed from %s to %s', adapter.name, self._adapter.name)
            return operation(self._adapter)

    def _detect(self):
        """Choose the adapter: the v3.1+ clients route exists (any envelope) or answers 404."""
        try:
            self._api('GET', 'clients/get/' + PROBE_EMAIL)
            found = True
        except _Refused:
            found = True
        except _RouteMissing:
            found = False
        self._adapter = _V3(self) if found else _Legacy(self)
        log.info('3x-ui panel at %s uses the %s client API', self._where, self._adapter.name)

    def _inbound(self):
        """Fetch our inbound; return (protocol, settings), settings parsed from a string on old panels."""
        try:
            inbound = self._api('GET', f'inbounds/get/{self.inbound_id}')
        except _Refused as exc:
            if 'record not found' in exc.panel_msg:  # gorm's own words for a missing row
                raise XuiError(f'the panel has no inbound {self.inbound_id} (check XUI_INBOUND_ID): '
                               f'{exc.panel_msg}') from exc
            raise XuiError(f'the panel refused to show inbound {self.inbound_id}: {exc.panel_msg}') from exc
        settings = (inbound or {}).get('settings')
        if isinstance(settings, str):
            try:
                settings = json.loads(settings or '{}')
            except ValueError as exc:
                raise XuiError(f'inbound {self.inbound_id} has settings that are not JSON') from exc
        if not isinstance(settings, dict):
            raise XuiError(f'inbound {self.inbound_id} came back without settings')
        return inbound.get('protocol'), settings

    def _api(self, method, route, body=None):
        """Call {base}panel/api/{route} and return the envelope's obj, logging in as needed."""
        path = 'panel/api/' + route
        logins = self._logins
        if not self._api_token and not self._session_alive():
            self._login_unless_done(logins)
            logins = self._logins
        try:
            return self._exchange(method, path, body=body)
        except _NoEnvelope as exc:
            if self._api_token or getattr(self._local, 'login_tried', False):
                raise self._lost(exc, method, path) from exc
        # the session is gone (cookie expired, panel restarted, password changed): log in once, retry once
        self._login_unless_done(logins)
        try:
            return self._exchange(method, path, body=body)
        except _NoEnvelope as exc:
            raise self._lost(exc, method, path) from exc

    def _lost(self, exc, method, path):
        """Explain an answer without an envelope that a (fresh) login did not cure."""
        what = f'{method} {path}'
        if exc.status == 404:
            hint = '; the API token may be wrong or the panel older than v3.0' if self._api_token else ''
            return _RouteMissing(f'the panel at {self._where} has no route {what} (HTTP 404){hint}')
        if self._api_token and exc.status in (401, 403):
            return XuiError(f'the panel at {self._where} rejected the API token (HTTP {exc.status})')
        return XuiError(f'the panel at {self._where} answered {what} with HTTP {exc.status} '
                        f'even after logging in again')

    def _session_alive(self):
        """Tell whether we are logged in and the cookie jar still holds the session cookie."""
        if not self._logged_in:
            return False
        self._cookies.clear_expired_cookies()
        return any(cookie.name in SESSION_COOKIES for cookie in self._cookies)

    def _login_unless_done(self, logins_seen):
        """Log in, unless another thread has logged in since this one saw `logins_seen` logins."""
        with self._lock:
            if self._logins == logins_seen or not self._logged_in:
                self._login()
            else:
                self._local.login_tried = True  # that login counts as this call's one

    def _login(self):
        """Log in once: CSRF handshake where the panel has one (v3.x), then POST login."""
        self._local.login_tried = True
        self._logged_in = False
        self._cookies.clear()
        self._headers.pop('X-CSRF-Token', None)
        try:
            token = self._exchange('GET', 'csrf-token')
        except _NoEnvelope as exc:
            if exc.status != 404:  # 404: a v2 panel, which has no CSRF
                raise XuiError(f'the panel at {self._where} answered HTTP {exc.status} to csrf-token; '
                               f'is XUI_URL the panel address, with its secret path?') from exc
        else:
            self._headers['X-CSRF-Token'] = str(token)
        try:
            self._exchange('POST', 'login', form=self._credentials)
        except _Refused as exc:
            # the panel's words: one answer for a wrong user, password or two-factor code, and for a blocked login
            raise XuiLoginError(f'the panel at {self._where} refused the login: {exc.panel_msg} (check XUI_USERNAME '
                                f'and XUI_PASSWORD; a panel with two-factor login needs XUI_API_TOKEN (v3.0+) '
                                f'instead; after 5 failures in 5 minutes it refuses even the right ones for '
                                f'15 minutes)') from exc
        except _NoEnvelope as exc:
            raise XuiError(f'panel login failed: the panel at {self._where} answered HTTP {exc.status}; '
                           f'is XUI_URL the panel address, with its secret path?') from exc
        self._logged_in = True
        self._logins += 1
        log.info('logged in to the 3x-ui panel at %s', self._where)

    def _exchange(self, method, path, body=None, form=None, headers=None):
        """Send one request to {base}{path}, retrying connection failures and 5xx; return the obj.

        `body` is sent as JSON, `form` as a form, `headers` besides ours; cookies are kept as a browser would.

        :raises _NoEnvelope: 3xx, 401, 404, 403 without an envelope, or a 2xx that is not JSON
        :raises _Refused: success:false
        :raises XuiError: anything else
        """
        what, problem = f'{method} {path}', ''
        for attempt in range(self._retries + 1):
            if attempt:
                delay = self._backoff * 2 ** (attempt - 1)
                log.warning('3x-ui %s failed (%s); retry in %.2f s', what, problem, delay)
                time.sleep(delay)
            cause = None
            try:
                status, content = self._send(method, self._base + path, body, form, headers)
            except _CannotConnect as exc:  # also a connect timeout: nothing reached the panel
                problem, cause = 'cannot connect', exc.__cause__
                continue
            except u3.ReadTimeoutError as exc:
                raise XuiError(f'the panel at {self._where} did not answer {what} within '
                               f'{self._timeout[1]} s') from exc
            except (u3.HTTPError, OSError, httppool.UnsupportedProxy) as exc:
                raise XuiError(f'{what} to the panel at {self._where} failed: {type(exc).__name__}') from exc
            try:
                payload = json.loads(content)
            except ValueError:
                payload = None
            envelope = isinstance(payload, dict) and isinstance(payload.get('success'), bool)
            if status >= 500:
                problem = f'HTTP {status}' + (f': {_panel_msg(payload)}' if envelope and payload.get('msg') else '')
                continue
            if 300 <= status < 400 or status in (401, 404) or (status == 403 and not envelope) or (
                    status < 300 and payload is None):
                raise _NoEnvelope(f'the panel at {self._where} answered {what} with HTTP {status} and no '
                                  f'JSON (not logged in, or no such route)', status)
            if not envelope:
                raise XuiError(f'the panel at {self._where} gave an unexpected answer to {what} '
                               f'(HTTP {status})')
            if not payload['success']:
                msg = _panel_msg(payload)
                raise _Refused(f'the panel refused {what}: {msg}', msg)
            return payload.get('obj')
        if cause is not None:
            raise XuiError(f'cannot connect to the panel at {self._where} ({what} failed {self._retries + 1} '
                           f'times; check XUI_URL and that the panel is running)') from cause
        raise XuiError(f'the panel at {self._where} answered {what} with {problem} '
                       f'{self._retries + 1} times')

    def _send(self, method, url, body, form, extra_headers):
        """Send one request over urllib3 with our headers and cookies; return (status, body bytes).

        Keeps the cookies the answer sets. No redirects are followed and nothing is retried here.

        :raises _CannotConnect: the request never reached the panel (refused, connect timeout, reset)
        :raises XuiError: the panel's TLS certificate does not verify
        :raises urllib3.exceptions.ReadTimeoutError: no answer within the read timeout
        :raises urllib3.exceptions.HTTPError: the answer broke off or could not be decoded
        """
        headers = {**self._headers, **(extra_headers or {})}
        if body is not None:
            body, headers['Content-Type'] = json.dumps(body).encode(), 'application/json'
        elif form is not None:
            body, headers['Content-Type'] = urlencode(form).encode(), 'application/x-www-form-urlencoded'
        jar_request = urllib.request.Request(url)
        self._cookies.add_cookie_header(jar_request)
        cookie = jar_request.get_header('Cookie')
        if cookie:
            headers['Cookie'] = cookie
        connect, read = self._timeout
        try:
            reply = self._pools.for_url(url).request(
                method, url, body=body, headers=headers, timeout=urllib3.Timeout(connect=connect, read=read),
                retries=False, redirect=False, preload_content=False)
        except u3.ReadTimeoutError:
            raise
        except u3.SSLError as exc:
            if 'CERTIFICATE_VERIFY_FAILED' not in str(exc):
                raise _CannotConnect() from exc
            raise XuiError(f'the panel at {self._where} has a TLS certificate that does not verify (self-signed, '
                           f'expired or for another name); to trust its CA, name its PEM file in REQUESTS_CA_BUNDLE '
                           f'(added to the system\'s CAs)') from exc
        except (u3.HTTPError, OSError) as exc:  # NewConnectionError, ConnectTimeoutError, ProtocolError, SSLError
            raise _CannotConnect() from exc
        try:
            content = reply.read()
        finally:
            reply.release_conn()
        self._cookies.extract_cookies(_CookieSource(reply.headers), jar_request)
        return reply.status, content


class _Legacy:
    """Clients as entries of the inbound's settings, under panel/api/inbounds/* (panels up to v3.0.x)."""

    name = 'legacy'

    def __init__(self, xui):
        self._xui = xui

    def _find(self, email):
        """Return (protocol, settings, the client with this email or None) of our inbound."""
        protocol, settings = self._xui._inbound()
        clients = settings.get('clients') or []
        return protocol, settings, next((c for c in clients if c.get('email') == email), None)

    def _send(self, route, client):
        """Post one whole client in the body shape addClient and updateClient take."""
        body = {'id': self._xui.inbound_id, 'settings': json.dumps({'clients': [client]})}
        self._xui._api('POST', route, body)

    def ensure(self, fields):
        protocol, settings, client = self._find(fields['email'])
        if client is None:
            new = client_body({**_new_key(protocol, settings), 'flow': '', 'comment': '', 'reset': 0, **fields})
            try:
                self._send('inbounds/addClient', new)
                return client_view(new)
            except _Refused:
                # an earlier try whose answer was lost may have added it
                protocol, settings, client = self._find(fields['email'])
                if client is None:
                    raise
        # updateClient replaces the whole stored client: send every field back, with the same key
        new = {**client_body(client, LEGACY_FIELDS), **fields}
        self._send('inbounds/updateClient/' + quote(str(client.get(_key_field(protocol), '')), safe=''), new)
        return client_view(new)

    def get(self, email):
        client = self._find(email)[2]
        return client_view(client) if client else None

    def traffic(self, email):
        try:
            row = self._xui._api('GET', 'inbounds/getClientTraffics/' + quote(email, safe=''))
        except _Refused:
            # v2.8.1 - v3.0.x answer success:false for an unknown email, others obj:null
            if self.get(email) is None:
                return None
            raise
        return traffic_view(row) if row else None

    def delete(self, email):
        protocol, _, client = self._find(email)
        if client is not None:
            key = quote(str(client.get(_key_field(protocol), '')), safe='')
            self._xui._api('POST', f'inbounds/{self._xui.inbound_id}/delClient/{key}')

    def list(self):
        _, settings = self._xui._inbound()
        return [client_view(c) for c in settings.get('clients') or [] if c.get('email')]


class _V3:
    """Client records under panel/api/clients/* (panels v3.1+)."""

    name = 'v3'

    def __init__(self, xui):
        self._xui = xui

    def _found(self, email):
        """Return the get/:email payload {client, inboundIds} or None when there is no such client."""
        try:
            found = self._xui._api('GET', 'clients/get/' + quote(email, safe=''))
        except _Refused as exc:
            # gorm's own error text, not a translated one
            if 'record not found' in exc.panel_msg:
                return None
            raise
        return found or None

    def _ours(self, found):
        return found is not None and self._xui.inbound_id in (found.get('inboundIds') or [])

    def _stored(self, email):
        found = self._found(email)
        if found is None:
            raise XuiError(f'the panel accepted client {email} but does not return it')
        return client_view(record_to_client(found['client']))

    def ensure(self, fields):
        email = fields['email']
        found = self._found(email)
        if found is None:
            protocol, settings = self._xui._inbound()
            new = client_body({**_new_key(protocol, settings), 'flow': '', 'comment': '', 'reset': 0, **fields})
            # adding it again (a retry after a lost answer) only re-attaches it: no error
            self._xui._api('POST', 'clients/add', {'client': new, 'inboundIds': [self._xui.inbound_id]})
            return self._stored(email)
        if not self._ours(found):
            raise XuiError(f'client {email} already exists on the panel in inbound(s) '
                           f'{found.get("inboundIds") or []}, not in inbound {self._xui.inbound_id}')
        # update replaces the whole client; without its key v3.1 - v3.3.0 would mint a new one. It stores the
        # body as sent and answers obj:null, so what we sent is what the panel holds: no read-back
        client = {**record_to_client(found['client']), **fields}
        self._xui._api('POST', 'clients/update/' + quote(email, safe=''), client)
        return client_view(client)

    def get(self, email):
        found = self._found(email)
        return client_view(record_to_client(found['client'])) if self._ours(found) else None

    def traffic(self, email):
        try:
            row = self._xui._api('GET', 'clients/traffic/' + quote(email, safe=''))
        except _Refused:
            # v3.1.0 - v3.2.7 answer success:false for an unknown email, later ones obj:null
            if self._found(email) is None:
                return None
            raise
        return traffic_view(row) if row else None

    def delete(self, email):
        if self._ours(self._found(email)):
            self._xui._api('POST', 'clients/del/' + quote(email, safe=''))

    def list(self):
        records = self._xui._api('GET', 'clients/list') or []
        return [client_view(record_to_client(r)) for r in records
                if self._xui.inbound_id in (r.get('inboundIds') or [])]
