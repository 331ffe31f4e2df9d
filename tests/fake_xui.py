"""A loopback fake of a 3x-ui panel that speaks its HTTP API, quirks included (shared/reference/xui-api.md).

Flavours:
- generation='legacy', csrf=False: v2.8.4 - v2.9.4 (version 2.9.4). Clients under panel/api/inbounds/*, settings as JSON
  strings, 404 with an empty body for unauthenticated API calls, no csrf-token route.
  redirect_unauthenticated=True gives the <= v2.8.3 answer instead (401 JSON for XHR, else 307).
- generation='legacy', csrf=True: v3.0.0 - v3.0.1 (version 3.0.1). Adds the CSRF handshake, the Bearer API token and the
  login rate limit.
- generation='v3': v3.1+. Clients under panel/api/clients/*, the legacy client routes gone (404 even
  when logged in), settings as objects, 401 for unauthenticated XHR calls. `version` picks the release
  (default 3.6.0; see VERSIONS): its Client struct, which every body is decoded into the way Go's
  encoding/json does (fake_xui_types.py), its ClientRecord shape (wireguard fields and the comma-separated
  string allowedIPs from 3.4.2, secret/adTag from 3.5.0), and its error texts and quirks (an update that
  omits the key mints a new one before 3.3.1, "Obtain (record not found)" only in 3.6.0, ...).
  Legacy panels decode the clients inside `settings` with errors ignored (zero values) and store the
  JSON as sent; so does this fake.
- two_factor=True: the admin has two-factor login on; logging in without the code fails with the panel's
  own words, and POST getTwoFactorEnable (public; CSRF on v3.0+) says so.

Knobs for tests (each applies to API calls only; most take a `route` prefix such as
'POST panel/api/clients/add'): fail_next, hang_next, hold_next, drop_next, garbage_next, success_false_next,
redirect_next; also expire_sessions, cookie_max_age (the session cookie's Max-Age: a client's cookie jar
drops it after that), refuse/accept, disable, set_generation. State: clients (our inbound's entries by
email, as stored), traffic (rows by email), records (v3, as stored: allowedIPs a comma-separated string,
reverse a dict or None; every field of the newest shape, shown per version), inbounds, hits (requests per
'METHOD path-below-base').
"""
import base64
import contextlib
import http.cookies
import json
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from fake_xui_types import (INBOUND, LOGIN_FORM, client_struct, create_payload_struct, decode, json_kind, parse,
                            record_fields, unmarshal, version_tuple)

COOKIE = '3x-ui'
KEY_FIELDS = {'vless': 'id', 'vmess': 'id', 'trojan': 'password', 'shadowsocks': 'email',
              'hysteria': 'auth', 'hysteria2': 'auth'}
VERSIONS = ('2.9.4', '3.0.1', '3.1.0', '3.2.8', '3.3.0', '3.3.1', '3.4.2', '3.5.0', '3.6.0')
NEWEST = '3.6.0'
BAD_CHARS = re.compile(r'[/\\ \x00-\x1f\x7f]')
LOGIN_OK = 'You have successfully logged into your account.'
LOGIN_BAD = 'Invalid username or password or two-factor code.'
BIND_PREFIX = 'Inbound has been successfully updated. '
LOGIN_PAGE = b'<!DOCTYPE html><html><head><title>Login</title></head><body>3x-ui</body></html>'
SS_METHOD = '2022-blake3-aes-256-gcm'
TWO_FACTOR_CODE = '284913'  # the one code a two_factor fake takes (a real panel checks a TOTP)


def now_ms():
    return int(time.time() * 1000)


def as_int(value):
    """Read an int field the way typed Go decoding leaves it (a string tgId is dropped)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def as_str(value):
    return value if isinstance(value, str) else ''


def allowed_ips_text(value):
    """Store allowedIPs as ClientRecord does: Client's []string joined with commas."""
    return ','.join(value) if isinstance(value, list) else as_str(value)


def mint_key(protocol, settings):
    """Mint a key for a new client as v3.1+ does when the request has none."""
    if KEY_FIELDS.get(protocol) == 'id':
        return {'id': str(uuid.uuid4())}
    if protocol == 'shadowsocks' and settings.get('method', '').startswith('2022-'):
        size = 16 if '128' in settings['method'] else 32
        return {'password': base64.b64encode(secrets.token_bytes(size)).decode()}
    return {'auth' if protocol.startswith('hysteria') else 'password': secrets.token_hex(16)}


class Hold:
    """One API call held back by FakePanel.hold_next."""

    def __init__(self, route):
        self.route = route
        self.arrived = threading.Event()
        self.released = threading.Event()

    def release(self):
        self.released.set()


@dataclass
class Reply:
    status: int
    body: object = None          # dict/list -> JSON, bytes -> as is, None -> empty
    cookie: str = ''
    location: str = ''
    delay: float = 0
    drop: bool = False           # close the connection without answering


def ok(obj=None, msg=''):
    return Reply(200, {'success': True, 'msg': msg, 'obj': obj})


def fail(msg):
    return Reply(200, {'success': False, 'msg': msg, 'obj': None})


class _Server(ThreadingHTTPServer):
    # a loaded machine may not run the accept loop for a while: queue a burst of connections
    # instead of dropping SYNs past socketserver's default of 5 (a 1 s retransmission each)
    request_queue_size = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = set()  # kept-alive client sockets, closed when the panel stops or refuses
        self.connections_lock = threading.Lock()

    def handle_error(self, request, client_address):
        # a client refusing the throwaway certificate (tls=) is what that test wants, not news
        if not isinstance(sys.exc_info()[1], ssl.SSLError):
            super().handle_error(request, client_address)

    def close_connections(self):
        """Cut every open connection, as a stopped panel process does."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FakePanel:
    """A 3x-ui panel on 127.0.0.1 with one inbound for the bot and one more holding another client."""

    def __init__(self, generation='legacy', csrf=None, base_path='/', username='admin', password='admin-pass',
                 api_token=None, protocol='vless', inbound_id=1, other_inbound_id=2,
                 other_email='Taken@example.com', traffic_unknown_null=None, keeps_key_on_update=None,
                 redirect_unauthenticated=False, cookie_max_age=21600, version=None, two_factor=False, tls=None):
        if generation not in ('legacy', 'v3'):
            raise ValueError(generation)
        self.generation = generation
        self.csrf = generation == 'v3' if csrf is None else csrf
        if generation == 'v3' and not self.csrf:
            raise ValueError('v3 panels always have CSRF')
        self.version = version or self._default_version(generation, self.csrf)
        if version_tuple(self.version) >= (3, 1) and generation != 'v3' or (
                generation == 'v3' and version_tuple(self.version) < (3, 1)):
            raise ValueError(f'version {self.version} is not of the {generation} generation')
        self.base_path = '/' + base_path.strip('/') + '/' if base_path.strip('/') else '/'
        self.username, self.password, self.api_token = username, password, api_token
        self.two_factor = two_factor
        self.protocol, self.inbound_id = protocol, inbound_id
        self._traffic_unknown_null = traffic_unknown_null
        self._keeps_key_on_update = keeps_key_on_update
        self.redirect_unauthenticated = redirect_unauthenticated
        self.cookie_max_age = cookie_max_age
        self.tls = tls  # an ssl server context (fake_telegram.throwaway_tls): serve HTTPS, as a panel with a certificate
        self.inbounds = {}
        self.records = {}   # v3: email -> ClientRecord
        self.links = {}     # v3: email -> ids of the inbounds the client is attached to
        self.traffic = {}   # email -> traffic row
        self.hits = Counter()
        self._sessions = {}
        self._failures = {}
        self._blocked_until = {}
        self._knobs = []
        self._holds = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server = self._thread = None
        self.port = None
        self._add_inbound(inbound_id, protocol)
        if other_inbound_id:
            self._add_inbound(other_inbound_id, protocol)
            entry = {**mint_key(protocol, self.inbounds[other_inbound_id]['settings']), 'flow': '',
                     'email': other_email, 'limitIp': 0, 'totalGB': 0, 'expiryTime': 0, 'enable': True,
                     'tgId': 0, 'subId': 'othersubscription', 'comment': '', 'reset': 0,
                     'created_at': now_ms(), 'updated_at': now_ms()}
            if protocol == 'shadowsocks':
                entry.setdefault('password', secrets.token_hex(16))
            self.inbounds[other_inbound_id]['settings']['clients'].append(entry)
            self._new_traffic(entry, other_inbound_id)
        if generation == 'v3':
            self._build_records()

    # life cycle

    @property
    def url(self):
        scheme = 'https' if self.tls else 'http'
        return f'{scheme}://127.0.0.1:{self.port}{self.base_path.rstrip("/")}'

    def start(self):
        self._stopping.clear()
        self._listen(0)
        return self

    def stop(self):
        self._stopping.set()
        self._close()

    def refuse(self):
        """Close the listening socket: connections are refused until accept()."""
        self._close()

    def accept(self):
        """Listen again on the same port."""
        self._listen(self.port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _listen(self, port):
        server = _Server(('127.0.0.1', port), handler_for(self))
        if self.tls is not None:  # the handshake runs in the request's thread
            server.socket = self.tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.01}, daemon=True)
        self._thread.start()

    def _close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._thread.join()
            self._server = None

    # test knobs and state

    def fail_next(self, n=1, status=500, route=None, msg=None):
        """Answer the next n API calls with this status: an empty body, or an envelope with msg."""
        self._knobs.append({'kind': 'fail', 'n': n, 'status': status, 'route': route, 'msg': msg})

    def hang_next(self, n=1, seconds=1.0, route=None):
        """Apply the next n API calls but answer them only after `seconds`."""
        self._knobs.append({'kind': 'hang', 'n': n, 'seconds': seconds, 'route': route})

    def hold_next(self, route=None):
        """Hold the next API call before the panel reads it, until the test releases it: a request that
        arrives late (a slow network), so a later request can be applied first. Several holds take the calls in
        turn. :return: a Hold; `hold.arrived` is set when the call reached the panel, `hold.release()` lets it in.
        """
        hold = Hold(route)
        with self._lock:
            self._holds.append(hold)
        return hold

    def garbage_next(self, n=1, route=None):
        """Answer the next n API calls with 200 and an HTML page."""
        self._knobs.append({'kind': 'garbage', 'n': n, 'route': route})

    def success_false_next(self, n=1, msg='Something went wrong (boom\n)', route=None):
        self._knobs.append({'kind': 'refuse', 'n': n, 'msg': msg, 'route': route})

    def drop_next(self, n=1, route=None):
        """Apply the next n API calls but close the connection instead of answering (a restart mid-call)."""
        self._knobs.append({'kind': 'drop', 'n': n, 'route': route})

    def redirect_next(self, n=1):
        """Answer the next n API calls with 307 to the login page, as <= v2.8.3 does without a session."""
        self._knobs.append({'kind': 'redirect', 'n': n, 'route': None})

    def expire_sessions(self):
        """Invalidate every session cookie, as a restart with a new secret or a password change does."""
        with self._lock:
            self._sessions.clear()

    def disable(self, email):
        """Disable a client as the panel's depletion/expiry job does (settings, record and traffic row)."""
        with self._lock:
            for inbound in self.inbounds.values():
                for entry in inbound['settings']['clients']:
                    if entry.get('email') == email:
                        entry['enable'] = False
            if email in self.records:
                self.records[email]['enable'] = False
            if email in self.traffic:
                self.traffic[email]['enable'] = False

    def set_generation(self, generation, csrf=True, version=None):
        """Upgrade to v3.1+ or downgrade to legacy (v3.0.x when csrf), keeping clients and sessions."""
        with self._lock:
            if generation == 'v3':
                self.csrf = True
                self.generation, self.version = generation, version or NEWEST
                self._build_records()
            else:
                self.csrf = csrf
                self.records.clear()
                self.links.clear()
                self.generation, self.version = generation, version or self._default_version(generation, csrf)

    @staticmethod
    def _default_version(generation, csrf):
        if generation == 'v3':
            return NEWEST
        return '3.0.1' if csrf else '2.9.4'

    def since(self, version):
        """Tell whether the panel's version is this one or later."""
        return version_tuple(self.version) >= version_tuple(version)

    @property
    def traffic_unknown_null(self):
        """Whether traffic for an unknown email is success:true, obj:null (v3.2.8+; <= v2.8.0 too)."""
        if self._traffic_unknown_null is not None:
            return self._traffic_unknown_null
        return self.generation == 'v3' and self.since('3.2.8')

    @traffic_unknown_null.setter
    def traffic_unknown_null(self, value):
        self._traffic_unknown_null = value

    @property
    def keeps_key_on_update(self):
        """Whether an update that omits the key keeps it (v3.3.1+) rather than minting a new one."""
        if self._keeps_key_on_update is not None:
            return self._keeps_key_on_update
        return self.since('3.3.1')

    @keeps_key_on_update.setter
    def keeps_key_on_update(self, value):
        self._keeps_key_on_update = value

    @property
    def client_type(self):
        return client_struct(self.version)

    def count(self, prefix):
        """Count requests whose 'METHOD path-below-base' starts with prefix."""
        with self._lock:
            return sum(n for key, n in self.hits.items() if key.startswith(prefix))

    @property
    def clients(self):
        """Our inbound's clients as stored in its settings, by email."""
        with self._lock:
            return {c['email']: c for c in self.inbounds[self.inbound_id]['settings']['clients'] if 'email' in c}

    # model

    def _add_inbound(self, inbound_id, protocol):
        settings = {'clients': [], 'decryption': 'none', 'fallbacks': []}
        if protocol == 'shadowsocks':
            settings = {'method': SS_METHOD, 'password': base64.b64encode(secrets.token_bytes(32)).decode(),
                        'network': 'tcp,udp', 'clients': []}
        self.inbounds[inbound_id] = {
            'id': inbound_id, 'up': 0, 'down': 0, 'total': 0, 'remark': f'inbound {inbound_id}', 'enable': True,
            'expiryTime': 0, 'listen': '', 'port': 40000 + inbound_id, 'protocol': protocol, 'settings': settings,
            'streamSettings': {'network': 'tcp', 'security': 'reality'}, 'tag': f'inbound-{40000 + inbound_id}',
            'sniffing': {'enabled': False}}

    def _new_traffic(self, client, inbound_id):
        self.traffic[client['email']] = {
            'id': len(self.traffic) + 1, 'inboundId': inbound_id, 'enable': client.get('enable') is True,
            'email': client['email'], 'up': 0, 'down': 0, 'expiryTime': as_int(client.get('expiryTime')),
            'total': as_int(client.get('totalGB')), 'reset': as_int(client.get('reset')), 'lastOnline': 0}

    def _update_traffic(self, old_email, client):
        row = self.traffic.pop(old_email, None) or {'id': len(self.traffic) + 1, 'up': 0, 'down': 0, 'lastOnline': 0}
        row.update(email=client['email'], enable=client.get('enable') is True,
                   total=as_int(client.get('totalGB')), expiryTime=as_int(client.get('expiryTime')),
                   reset=as_int(client.get('reset')))
        self.traffic[client['email']] = row

    def _entries(self):
        for inbound_id, inbound in self.inbounds.items():
            for entry in inbound['settings']['clients']:
                yield inbound_id, entry

    def _email_clash(self, email, owner=None):
        """Tell whether another client already has this email, compared case-insensitively panel-wide."""
        return any(str(e.get('email', '')).lower() == email.lower() and e.get('email') != owner
                   for _, e in self._entries())

    def _build_records(self):
        for inbound_id, entry in self._entries():
            email = entry.get('email')
            if email and email not in self.records:
                self.records[email] = self._record(entry, len(self.records) + 1, entry.get('created_at', now_ms()))
            if email:
                self.links.setdefault(email, set()).add(inbound_id)

    @staticmethod
    def _record(client, record_id, created):
        """Build a ClientRecord as stored (Client.ToRecord) from a client object; what was not sent is zero.

        It holds every field of the newest shape; _record_json shows those of the panel's version.
        """
        reverse = client.get('reverse')
        tag = reverse.get('tag') if isinstance(reverse, dict) else None
        return {'id': record_id, 'email': as_str(client.get('email')), 'subId': as_str(client.get('subId')),
                'uuid': as_str(client.get('id')), 'password': as_str(client.get('password')),
                'auth': as_str(client.get('auth')), 'flow': as_str(client.get('flow')),
                'security': as_str(client.get('security')), 'privateKey': as_str(client.get('privateKey')),
                'publicKey': as_str(client.get('publicKey')),
                'allowedIPs': allowed_ips_text(client.get('allowedIPs')),
                'preSharedKey': as_str(client.get('preSharedKey')), 'keepAlive': as_int(client.get('keepAlive')),
                'secret': as_str(client.get('secret')), 'adTag': as_str(client.get('adTag')),
                'limitIp': as_int(client.get('limitIp')), 'totalGB': as_int(client.get('totalGB')),
                'expiryTime': as_int(client.get('expiryTime')), 'enable': client.get('enable') is True,
                'tgId': as_int(client.get('tgId')), 'group': as_str(client.get('group')),
                'comment': as_str(client.get('comment')), 'reset': as_int(client.get('reset')),
                'createdAt': created, 'updatedAt': now_ms(),
                'reverse': {'tag': tag} if isinstance(tag, str) and tag.strip() else None}

    def _record_json(self, record):
        """Show a stored record the way this version's ClientRecord.MarshalJSON does."""
        return {key: record.get(key) for key in record_fields(self.version)}

    @staticmethod
    def _entry(record, protocol):
        """Write a record into an inbound's settings the way v3.1+ does (Client's JSON, omitempty fields)."""
        entry = {'email': record['email'], 'flow': record['flow'], 'limitIp': record['limitIp'],
                 'totalGB': record['totalGB'], 'expiryTime': record['expiryTime'], 'enable': record['enable'],
                 'tgId': record['tgId'], 'subId': record['subId'], 'comment': record['comment'],
                 'reset': record['reset'], 'created_at': record['createdAt'], 'updated_at': record['updatedAt']}
        for key in ('security', 'group', 'privateKey', 'publicKey', 'preSharedKey', 'keepAlive', 'secret', 'adTag',
                    'reverse'):
            if record.get(key):
                entry[key] = record[key]
        if record.get('allowedIPs'):
            entry['allowedIPs'] = record['allowedIPs'].split(',')
        if KEY_FIELDS.get(protocol) == 'id':
            entry['id'] = record['uuid']
        elif protocol.startswith('hysteria'):
            entry['auth'] = record['auth']
        else:
            entry['password'] = record['password']
        return entry

    def _inbound_json(self, inbound, stats):
        data = dict(inbound)
        if self.generation == 'legacy':
            for key in ('settings', 'streamSettings', 'sniffing'):
                data[key] = json.dumps(inbound[key], indent=2)
        else:
            data = json.loads(json.dumps(data))
        data['clientStats'] = [dict(r) for r in self.traffic.values() if r.get('inboundId') == inbound['id']] \
            if stats else None
        return data

    # HTTP

    def _serve(self, handler):
        length = int(handler.headers.get('Content-Length') or 0)
        body = handler.rfile.read(length) if length else b''
        hold = self._hold_for(handler.command, handler.path)
        if hold is not None:
            hold.arrived.set()
            while not hold.released.wait(0.05) and not self._stopping.is_set():
                pass  # a test that fails before releasing it stops the fake, which lets it go
        with self._lock:
            reply = self._answer(handler.command, handler.path, handler.headers, body)
        if reply.delay:
            self._stopping.wait(reply.delay)
        if reply.drop:
            handler.close_connection = True
            return
        if isinstance(reply.body, bytes):
            data, ctype = reply.body, 'text/html; charset=utf-8'
        elif reply.body is None:
            data, ctype = b'', ''
        else:
            data, ctype = json.dumps(reply.body).encode(), 'application/json; charset=utf-8'
        try:
            handler.send_response(reply.status)
            if ctype:
                handler.send_header('Content-Type', ctype)
            if reply.cookie:
                handler.send_header('Set-Cookie', reply.cookie)
            if reply.location:
                handler.send_header('Location', reply.location)
            handler.send_header('Content-Length', str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up waiting

    def _hold_for(self, method, raw_path):
        rel = urlsplit(raw_path).path[len(self.base_path):]
        with self._lock:
            for hold in self._holds:
                if rel.startswith('panel/api/') and (hold.route is None or f'{method} {rel}'.startswith(hold.route)):
                    self._holds.remove(hold)
                    return hold
        return None

    def _answer(self, method, raw_path, headers, body):
        path = urlsplit(raw_path).path
        if not path.startswith(self.base_path):
            return Reply(404)
        rel = path[len(self.base_path):]
        self.hits[f'{method} {rel}'] += 1
        session = self._session_of(headers)
        if rel == '' and method == 'GET':
            return Reply(200, LOGIN_PAGE)
        if rel == 'csrf-token' and method == 'GET' and self.csrf:
            return self._csrf_token(session)
        if rel == 'login' and method == 'POST':
            return self._login(headers, body, session)
        if rel == 'getTwoFactorEnable' and method == 'POST':
            return self._two_factor_enable(headers, session)
        if rel.startswith('panel/api/'):
            return self._api(method, rel, headers, body, session)
        return Reply(404)

    def _session_of(self, headers):
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(headers.get('Cookie', ''))
        except http.cookies.CookieError:
            return None
        sid = jar[COOKIE].value if COOKIE in jar else None
        return self._sessions.get(sid)

    def _new_session(self, csrf, user):
        sid = secrets.token_urlsafe(24)
        self._sessions[sid] = {'id': sid, 'csrf': csrf, 'user': user}
        return (f'{COOKIE}={sid}; Path={self.base_path}; Max-Age={self.cookie_max_age}; HttpOnly; '
                f'SameSite=Lax')

    def _csrf_token(self, session):
        if session is not None:
            return Reply(200, {'success': True, 'obj': session['csrf']})
        token = secrets.token_urlsafe(24)
        cookie = self._new_session(token, None)
        return Reply(200, {'success': True, 'obj': token}, cookie=cookie)

    def _login(self, headers, body, session):
        json_body = 'application/json' in headers.get('Content-Type', '')
        form = {} if json_body else {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if self.csrf:  # the CSRF middleware runs before the handler binds anything
            sent = headers.get('X-CSRF-Token') or form.get('_csrf')
            if session is None or not sent or sent != session['csrf']:
                return Reply(403)
        if json_body:  # LoginForm: username, password, twoFactorCode, all strings
            form, problem = unmarshal(body, LOGIN_FORM)
            form = form or {}  # null decodes into the zero LoginForm
            if problem:
                return fail('The Input data format is invalid.' if self.generation == 'legacy'
                            else 'The input data format is invalid.')
        username, password = str(form.get('username') or ''), str(form.get('password') or '')
        if not username:
            return fail('Username is required')
        if not password:
            return fail('Password is required')
        now = time.monotonic()
        limited = self.csrf  # the login limiter came with v3.0.0, like CSRF
        if limited and self._blocked_until.get(username, 0) > now:
            return fail(LOGIN_BAD)
        code = str(form.get('twoFactorCode') or '')
        if (username, password) != (self.username, self.password) or (self.two_factor and code != TWO_FACTOR_CODE):
            if limited:
                recent = [t for t in self._failures.get(username, []) if now - t < 300] + [now]
                self._failures[username] = recent
                if len(recent) >= 5:
                    self._blocked_until[username] = now + 900
            return fail(LOGIN_BAD)
        self._failures.pop(username, None)
        if session is not None:
            self._sessions.pop(session['id'], None)
        cookie = self._new_session(session['csrf'] if session else None, username)
        return Reply(200, ok(msg=LOGIN_OK if self.generation == 'v3' else ' ' + LOGIN_OK).body, cookie=cookie)

    def _two_factor_enable(self, headers, session):
        """Say whether two-factor login is on: public, but behind the CSRF check on v3.0+."""
        if self.csrf and (session is None or not session['csrf'] or headers.get('X-CSRF-Token') != session['csrf']):
            return Reply(403)
        return ok(self.two_factor)

    def _routes(self):
        common = [('GET', r'inbounds/list', self._inbounds_list),
                  ('GET', r'inbounds/get/([^/]+)', self._inbound_get)]
        if self.generation == 'legacy':
            return common + [
                ('GET', r'inbounds/getClientTraffics/([^/]+)', self._legacy_traffic),
                ('POST', r'inbounds/addClient', self._legacy_add),
                ('POST', r'inbounds/updateClient/([^/]+)', self._legacy_update),
                ('POST', r'inbounds/([^/]+)/delClient/([^/]+)', self._legacy_delete)]
        return common + [
            ('GET', r'clients/list', self._v3_list),
            ('GET', r'clients/get/([^/]+)', self._v3_get),
            ('GET', r'clients/traffic/([^/]+)', self._v3_traffic),
            ('POST', r'clients/add', self._v3_add),
            ('POST', r'clients/update/([^/]+)', self._v3_update),
            ('POST', r'clients/del/([^/]+)', self._v3_delete)]

    def _knob(self, method, rel):
        for knob in self._knobs:
            if knob['n'] > 0 and (knob['route'] is None or f'{method} {rel}'.startswith(knob['route'])):
                knob['n'] -= 1
                return knob
        return None

    def _api(self, method, rel, headers, body, session):
        knob = self._knob(method, rel)
        if knob and knob['kind'] == 'fail':
            return Reply(knob['status'], knob['msg'] and {'success': False, 'msg': knob['msg'], 'obj': None})
        if knob and knob['kind'] == 'garbage':
            return Reply(200, LOGIN_PAGE)
        if knob and knob['kind'] == 'refuse':
            return fail(knob['msg'])
        if knob and knob['kind'] == 'redirect':
            return Reply(307, location=self.base_path)
        route = rel[len('panel/api/'):]
        for verb, pattern, action in self._routes():
            match = re.fullmatch(pattern, route)
            if match and verb == method:
                break
        else:
            return Reply(404)  # gin's NoRoute answers before the auth middleware runs
        bearer = headers.get('Authorization', '')
        by_token = bool(self.api_token) and self.csrf and bearer == f'Bearer {self.api_token}'
        if not by_token and not (session and session['user']):
            return self._unauthenticated(headers)
        if method == 'POST' and not by_token and self.csrf and (
                not session['csrf'] or headers.get('X-CSRF-Token') != session['csrf']):
            return Reply(403)
        reply = action(*[unquote(g) for g in match.groups()], body=body, headers=headers)
        if knob and knob['kind'] == 'hang':
            reply.delay = knob['seconds']
        reply.drop = bool(knob and knob['kind'] == 'drop')
        return reply

    def _unauthenticated(self, headers):
        xhr = headers.get('X-Requested-With') == 'XMLHttpRequest'
        if self.redirect_unauthenticated:
            if xhr:
                return Reply(401, {'success': False, 'msg': 'Your session has expired, please log in again',
                                   'obj': None})
            return Reply(307, location=self.base_path)
        return Reply(401 if self.generation == 'v3' and xhr else 404)

    # routes of both generations

    def _inbounds_list(self, body, headers):
        return ok([self._inbound_json(i, stats=True) for i in self.inbounds.values()])

    def _inbound_get(self, inbound_id, body, headers):
        if not inbound_id.isdigit():
            return fail(f'Obtain (strconv.Atoi: parsing "{inbound_id}": invalid syntax)')
        inbound = self.inbounds.get(int(inbound_id))
        if inbound is None:
            return fail('Obtain (record not found)')
        return ok(self._inbound_json(inbound, stats=False))

    # legacy routes (panel/api/inbounds/*)

    def _bind_inbound(self, headers, body):
        """Bind a body like c.ShouldBind(&model.Inbound): JSON or form; return (data, error reply).

        A bind error is answered with the success-sounding prefix the handler uses for it.
        """
        if 'application/json' in headers.get('Content-Type', ''):
            data, problem = parse(body)
            if problem is None:
                typed, problem = decode(data, INBOUND)
            if problem:
                return None, fail(f'{BIND_PREFIX}({problem})')
            return typed, None
        data = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if 'id' in data:
            if not data['id'].isdigit():
                return None, fail(BIND_PREFIX + f'(strconv.ParseInt: parsing "{data["id"]}": invalid syntax)')
            data['id'] = int(data['id'])
        return data, None

    def _typed(self, entry):
        """Decode one settings entry into Client as GetClients does: type errors ignored, zero values kept."""
        return decode(entry, self.client_type)[0] or self.client_type.zero()

    def _legacy_clients(self, headers, body):
        """Return (inbound, clients as sent, the same typed) or (None, error reply, None)."""
        data, error = self._bind_inbound(headers, body)
        if error:
            return None, error, None
        inbound = self.inbounds.get(data.get('id') or 0)
        if inbound is None:
            return None, fail('Something went wrong (record not found)'), None
        settings, problem = parse(data.get('settings') or '')
        if problem:
            problem = 'unexpected end of JSON input' if problem in ('EOF', 'unexpected EOF') else problem
            return None, fail(f'Something went wrong ({problem})'), None
        if not isinstance(settings, dict):
            return None, fail(f'Something went wrong (json: cannot unmarshal {json_kind(settings)} into Go value '
                              'of type map[string]interface {})'), None
        if not isinstance(settings.get('clients'), list):
            return None, Reply(500), None  # the Go type assertion panics; gin's recovery answers 500
        clients = settings['clients']
        return inbound, clients, [self._typed(client) for client in clients]

    def _legacy_add(self, body, headers):
        inbound, clients, typed = self._legacy_clients(headers, body)
        if inbound is None:
            return clients
        seen = set()
        for client in typed:
            email = client['email']
            if email and (self._email_clash(email) or email.lower() in seen):
                return fail(f'Something went wrong (Duplicate email: {email}\n)')
            seen.add(email.lower())
        field = KEY_FIELDS[inbound['protocol']]
        if any(not client[field] for client in typed):
            return fail('Something went wrong (empty client ID\n)')
        for client, view in zip(clients, typed):
            # the panel stores the JSON it was sent, whatever the typed view made of it
            stored = {**client, 'created_at': client.get('created_at', now_ms()), 'updated_at': now_ms()} \
                if isinstance(client, dict) else client
            inbound['settings']['clients'].append(stored)
            if view['email']:
                self._new_traffic(view, inbound['id'])
        return ok(msg='Inbound client(s) have been added.')

    def _legacy_update(self, client_id, body, headers):
        inbound, clients, typed = self._legacy_clients(headers, body)
        if inbound is None:
            return clients
        if not clients:
            return Reply(500)  # clients[0] panics
        field, stored = KEY_FIELDS[inbound['protocol']], inbound['settings']['clients']
        index = next((i for i, c in enumerate(stored) if self._typed(c)[field] == client_id), None)
        new, view = clients[0], typed[0]
        if index is None or not view[field]:
            return fail('Something went wrong (empty client ID\n)')
        old = self._typed(stored[index])
        if view['email'] and view['email'] != old['email'] and self._email_clash(view['email'], owner=old['email']):
            return fail(f'Something went wrong (Duplicate email: {view["email"]}\n)')
        # the new object replaces the old one whole: what was not sent is gone
        if isinstance(new, dict):
            new = {**new, 'created_at': stored[index].get('created_at', now_ms()), 'updated_at': now_ms()}
        stored[index] = new
        if view['email']:
            self._update_traffic(old['email'], view)
        return ok(msg='Inbound client has been updated.')

    def _legacy_delete(self, inbound_id, client_id, body, headers):
        inbound = self.inbounds.get(int(inbound_id)) if inbound_id.isdigit() else None
        if inbound is None:
            return fail('Something went wrong (record not found)')
        field, stored = KEY_FIELDS[inbound['protocol']], inbound['settings']['clients']
        client = next((c for c in stored if self._typed(c)[field] == client_id), None)
        if client is None:
            return fail(f'Something went wrong (Client Not Found In Inbound For ID: {client_id}\n)')
        if len(stored) == 1:
            return fail('Something went wrong (no client remained in Inbound\n)')
        stored.remove(client)
        self.traffic.pop(client.get('email'), None)
        return ok(msg='Inbound client has been deleted.')

    def _legacy_traffic(self, email, body, headers):
        row = self.traffic.get(email)
        if row is None:
            if self.traffic_unknown_null:
                return ok(None)
            return fail(f'Error getting traffics. (Inbound Not Found For Email: {email}\n)')
        entry = next((e for _, e in self._entries() if e.get('email') == email), {})
        return ok({**row, 'uuid': entry.get('id', ''), 'subId': entry.get('subId', '')})

    # v3.1+ routes (panel/api/clients/*)

    def _bind_json(self, body, kind):
        """Bind like ShouldBindJSON: the body decoded as JSON into `kind` whatever the Content-Type.

        :returns: (typed value, None) or (None, the error reply)
        """
        typed, problem = unmarshal(body, kind)
        if problem:
            return None, fail(f'Something went wrong ({problem})')
        return typed, None

    def _check_names(self, email, sub_id):
        if not self.since('3.2.5'):
            return None
        for name, value in (('email', email), ('subId', sub_id)):
            if value and BAD_CHARS.search(value):
                return fail(f'Something went wrong (client {name} contains an invalid character: {value}\n)')
        return None

    def _v3_add(self, body, headers):
        payload, error = self._bind_json(body, create_payload_struct(self.version))
        if error:
            return error
        client = payload['client'] or self.client_type.zero()
        email, sub_id = client['email'].strip(), client['subId']
        if not email:
            return fail('Something went wrong (client email is required\n)')
        error = self._check_names(email, sub_id)
        if error:
            return error
        inbound_ids = payload['inboundIds']
        if not inbound_ids:
            return fail('Something went wrong (at least one inbound is required\n)')
        record = self.records.get(email)
        if record is not None and sub_id != record['subId']:
            return fail(f'Something went wrong (email already in use: {email}\n)')
        if self.since('3.2.5') and sub_id and any(r['subId'] == sub_id and r['email'] != email
                                                  for r in self.records.values()):
            return fail(f'Something went wrong (subId already in use: {sub_id}\n)')
        for inbound_id in inbound_ids:
            inbound = self.inbounds.get(inbound_id)
            if inbound is None:
                return fail('Something went wrong (record not found)')
            if inbound_id in self.links.get(email, ()):
                continue
            if self._email_clash(email, owner=email):
                return fail(f'Something went wrong (Duplicate email: {email}\n)')
            if record is None:
                keyed = dict(client)
                if not any(keyed.get(f) for f in ('id', 'password', 'auth')):
                    keyed.update(mint_key(inbound['protocol'], inbound['settings']))
                keyed.update(email=email, subId=sub_id or str(uuid.uuid4()), enable=True)
                record = self._record(keyed, max([r['id'] for r in self.records.values()], default=0) + 1, now_ms())
                self.records[email] = record
            inbound['settings']['clients'].append(self._entry(record, inbound['protocol']))
            self.links.setdefault(email, set()).add(inbound_id)
            if email not in self.traffic:
                self._new_traffic(self._entry(record, inbound['protocol']), inbound_id)
        return ok(msg='Inbound client(s) have been added.')

    def _v3_update(self, email, body, headers):
        client, error = self._bind_json(body, self.client_type)
        if error:
            return error
        record = self.records.get(email)
        if record is None:
            return fail('Something went wrong (record not found)')
        new_email = client['email']
        if not new_email.strip():
            return fail('Something went wrong (client email is required\n)')
        error = self._check_names(new_email, client['subId'])
        if error:
            return error
        sub_id = client['subId'] or record['subId']
        if new_email != email and (new_email in self.records or self._email_clash(new_email, owner=email)):
            return fail(f'Something went wrong (Duplicate email: {new_email}\n)')
        if self.since('3.2.5') and sub_id != record['subId'] and any(
                r['subId'] == sub_id and r['email'] != email for r in self.records.values()):
            return fail(f'Something went wrong (Duplicate subId: {sub_id}\n)')
        keyed = {**client, 'email': new_email, 'subId': sub_id}
        for field, current in (('id', record['uuid']), ('password', record['password']), ('auth', record['auth'])):
            if not keyed.get(field) and current:
                # v3.1.0 - v3.3.0 mint a new key when the update leaves it out
                keyed[field] = current if self.keeps_key_on_update else (
                    str(uuid.uuid4()) if field == 'id' else secrets.token_hex(16))
        new = self._record(keyed, record['id'], record['createdAt'])
        del self.records[email]
        self.records[new_email] = new
        self.links[new_email] = self.links.pop(email)
        for inbound_id in self.links[new_email]:
            inbound = self.inbounds[inbound_id]
            clients = inbound['settings']['clients']
            for i, entry in enumerate(clients):
                if entry.get('email') == email:
                    clients[i] = self._entry(new, inbound['protocol'])
        self._update_traffic(email, new)
        return ok(msg='Inbound client has been updated.')

    def _v3_delete(self, email, body, headers):
        if email not in self.records:
            if not self.since('3.2.0'):
                return fail('Something went wrong (record not found)')
            return fail(f'Something went wrong (client "{email}" not found in any inbound or client record\n)')
        for inbound in self.inbounds.values():
            inbound['settings']['clients'] = [c for c in inbound['settings']['clients'] if c.get('email') != email]
        del self.records[email]
        self.links.pop(email, None)
        self.traffic.pop(email, None)
        return ok(msg='Inbound client has been deleted.')

    def _v3_get(self, email, body, headers):
        record = self.records.get(email)
        if record is None:
            # v3.1 - v3.5 ask for the missing i18n key "get": an empty prefix
            return fail('Obtain (record not found)' if self.since('3.6.0') else ' (record not found)')
        found = {'client': self._record_json(record), 'inboundIds': sorted(self.links.get(email, ()))}
        if self.since('3.4.0'):
            found['externalLinks'] = []
        if self.since('3.3.1'):
            row = self.traffic.get(email) or {}
            found['usedTraffic'] = row.get('up', 0) + row.get('down', 0)
        return ok(found)

    def _v3_traffic(self, email, body, headers):
        row = self.traffic.get(email)
        if row is None:
            if self.traffic_unknown_null:
                return ok(None)
            return fail(f'Error getting traffic. (Inbound Not Found For Email: {email}\n)')
        record = self.records.get(email, {})
        return ok({**row, 'uuid': record.get('uuid', ''), 'subId': record.get('subId', '')})

    def _v3_list(self, body, headers):
        result = []
        for record in sorted(self.records.values(), key=lambda r: r['id']):
            item = {**self._record_json(record), 'inboundIds': sorted(self.links.get(record['email'], ())) or None}
            if record['email'] in self.traffic:
                item['traffic'] = {**self.traffic[record['email']], 'uuid': '', 'subId': ''}
            result.append(item)
        return ok(result)


def handler_for(panel):
    """Make a request handler class bound to one FakePanel."""
    class Handler(BaseHTTPRequestHandler):
        # Go's net/http keeps connections alive (HTTP/1.1; every answer has a Content-Length) and its TCP
        # connections have Nagle's algorithm off (net.TCPConn's default): no 40 ms wait for a delayed ACK
        protocol_version = 'HTTP/1.1'
        disable_nagle_algorithm = True

        def setup(self):
            super().setup()
            with self.server.connections_lock:
                self.server.connections.add(self.connection)

        def finish(self):
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)
            super().finish()

        def do_GET(self):
            panel._serve(self)

        do_POST = do_PUT = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def running_panel(**kwargs):
    """Run a FakePanel for the duration of a with block."""
    with FakePanel(**kwargs) as panel:
        yield panel
