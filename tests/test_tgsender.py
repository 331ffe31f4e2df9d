"""The urllib3 Bot API sender (tgsender.py) behaves like telebot's default one, over HTTP and over TLS.

Each outcome the bot relies on is produced twice, once through telebot's default (requests)
sender and once through ours, against the fake Bot API or a raw socket server, and compared.
"""
import io
import socket
import ssl
import threading
import time

import pytest
import requests
import telebot
from telebot import apihelper, types
from telebot.apihelper import ApiHTTPException, ApiInvalidJSONException, ApiTelegramException

from fake_telegram import FakeTelegram, throwaway_tls
import tgsender

TOKEN = '123456:TEST-sender-token'
ALICE = {'id': 1001, 'first_name': 'Alice <&>', 'username': 'alice', 'language_code': 'en'}
PNG = (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89'
       b'\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82')
SENDERS = ('default', 'urllib3')


@pytest.fixture(scope='module')
def tls(tmp_path_factory):
    """(server context, CA path) of a throwaway CA made for this module."""
    return throwaway_tls(tmp_path_factory.mktemp('tls'))


@pytest.fixture(autouse=True)
def restore_apihelper(monkeypatch):
    for name in ('API_URL', 'CUSTOM_REQUEST_SENDER', 'CONNECT_TIMEOUT', 'READ_TIMEOUT'):
        monkeypatch.setattr(apihelper, name, getattr(apihelper, name))
    for name in ('SSL_CERT_FILE', 'SSL_CERT_DIR', 'REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE', 'HTTP_PROXY',
                 'HTTPS_PROXY', 'ALL_PROXY', 'NO_PROXY', 'http_proxy', 'https_proxy', 'all_proxy', 'no_proxy'):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=['http', 'https'])
def scheme(request, tls, monkeypatch):
    """Run the test over plain HTTP and over TLS; the TLS client trusts the throwaway CA through the environment."""
    if request.param == 'https':
        monkeypatch.setenv('SSL_CERT_FILE', str(tls[1]))  # OpenSSL's own variable: read by our sender
        monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(tls[1]))  # requests' (certifi) for the default sender
    return request.param


def fake_for(scheme, tls):
    fake = FakeTelegram(token=TOKEN, tls=tls[0] if scheme == 'https' else None)
    fake.add_user(ALICE)
    return fake


def use(kind, url, **timeouts):
    """Point telebot at url with the given sender ('default' or 'urllib3'); return a TeleBot."""
    apihelper.API_URL = url + '/bot{0}/{1}'
    apihelper.CUSTOM_REQUEST_SENDER = tgsender.RequestSender() if kind == 'urllib3' else None
    apihelper.CONNECT_TIMEOUT = timeouts.get('connect', 5)
    apihelper.READ_TIMEOUT = timeouts.get('read', 5)
    return telebot.TeleBot(TOKEN, threaded=False)


def outcome(call):
    """Run call(); return what came back or what was raised, in comparable form."""
    try:
        result = call()
    except ApiTelegramException as exc:
        return ('ApiTelegramException', exc.error_code, exc.description, exc.result_json)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return (type(exc).__name__,)
    return ('ok', result)


# -- what the API receives and returns ----------------------------------------------------------

def conversation(bot):
    """The calls the bot makes (text with HTML and keyboards, photos as bytes, file and file_id, edits)."""
    markup = types.InlineKeyboardMarkup()
    markup.add(types.InlineKeyboardButton('Купить «1»', callback_data='buy'),
               types.InlineKeyboardButton('Site', url='https://example.test/?a=1&b=2'))
    shown = []
    me = bot.get_me()
    shown.append((me.id, me.username))
    message = bot.send_message(ALICE['id'], '<b>Hi</b> &amp; «ё» 🙂 &lt;tag&gt; %20 + =', parse_mode='HTML',
                               reply_markup=markup, disable_web_page_preview=True)
    shown.append((message.message_id, message.text, [e.type for e in message.entities or []]))
    edited = bot.edit_message_text('Edited <i>x</i>', ALICE['id'], message.message_id, parse_mode='HTML',
                                   reply_markup=markup)
    shown.append((edited.message_id, edited.text))
    photo = bot.send_photo(ALICE['id'], PNG, caption='QR «код» & co')
    file_id = photo.photo[-1].file_id
    shown.append((file_id, photo.caption))
    again = bot.send_photo(ALICE['id'], file_id, caption='again')
    shown.append((again.photo[-1].file_id, again.caption))
    named = bot.send_photo(ALICE['id'], ('qr.png', io.BytesIO(PNG)))
    shown.append(named.photo[-1].file_size)
    return shown


def test_calls_reach_the_api_exactly_as_with_the_default_sender(scheme, tls):
    seen = {}
    for kind in SENDERS:
        with fake_for(scheme, tls) as fake:
            returned = conversation(use(kind, fake.url))
            seen[kind] = (returned, [(c.method, c.params, c.files, c.status) for c in fake.sent])
    assert seen['urllib3'] == seen['default']
    returned, calls = seen['urllib3']
    assert [call[0] for call in calls] == ['getMe', 'sendMessage', 'editMessageText', 'sendPhoto', 'sendPhoto',
                                           'sendPhoto']
    assert calls[1][1]['text'] == '<b>Hi</b> &amp; «ё» 🙂 &lt;tag&gt; %20 + ='
    assert calls[1][1]['reply_markup']['inline_keyboard'][0][1]['url'] == 'https://example.test/?a=1&b=2'
    assert calls[3][2] == {'photo': PNG} and calls[4][1]['photo'] == returned[3][0] and calls[5][2] == {'photo': PNG}


# -- Bot API errors -------------------------------------------------------------------------------

def refuse_unknown_chat(bot, fake):
    return lambda: bot.send_message(424242, 'hi')


def flood(bot, fake):
    fake.rate_limit_next(1, retry_after=7)
    return lambda: bot.send_message(ALICE['id'], 'hi')


def blocked(bot, fake):
    fake.block_user(ALICE['id'], announce=False)
    return lambda: bot.send_message(ALICE['id'], 'hi')


def bad_markup(bot, fake):
    return lambda: bot.send_message(ALICE['id'], 'hi', reply_markup='{"inline_keyboard": [[{"text": "x"}]]}')


def wrong_token(bot, fake):
    return lambda: telebot.TeleBot('999:not-this-one', threaded=False).get_me()


@pytest.mark.parametrize('case', [refuse_unknown_chat, flood, blocked, bad_markup, wrong_token],
                         ids=lambda case: case.__name__)
def test_api_errors_match_the_default_sender(scheme, tls, case):
    seen = {}
    for kind in SENDERS:
        with fake_for(scheme, tls) as fake:
            seen[kind] = outcome(case(use(kind, fake.url), fake))
    assert seen['urllib3'] == seen['default']
    assert seen['urllib3'][0] == 'ApiTelegramException', seen
    if case is flood:
        assert seen['urllib3'][1] == 429 and seen['urllib3'][3]['parameters'] == {'retry_after': 7}


# -- transport failures, from a raw socket server ------------------------------------------------

class RawServer:
    """A loopback server that answers each connection with behaviour(socket) (optionally over TLS)."""

    def __init__(self, behaviour, tls_context=None, backlog=16, accept=True):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f'{"https" if tls_context else "http"}://127.0.0.1:{self.port}'
        self.behaviour, self.tls_context = behaviour, tls_context
        self.held = []
        self.done = threading.Event()
        if accept:
            threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        try:
            if self.tls_context:
                conn = self.tls_context.wrap_socket(conn, server_side=True)
                self.held.append(conn)
            request = b''
            while b'\r\n\r\n' not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            self.behaviour(conn)
        except (OSError, ssl.SSLError):
            pass

    def close(self):
        self.done.set()
        for conn in self.held:
            try:
                conn.close()
            except OSError:
                pass
        self.sock.close()


def reply(status_line, body, headers=()):
    def behaviour(conn):
        head = [status_line, f'Content-Length: {len(body)}', *headers, '', '']
        conn.sendall('\r\n'.join(head).encode() + body)
        time.sleep(0.2)
        conn.close()
    return behaviour


def never_answer(conn):
    time.sleep(3)


def hang_up(conn):
    conn.close()


def truncated_body(conn):
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"ok": tr')
    time.sleep(0.1)
    conn.close()


def stall_in_body(conn):
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"ok": tr')
    time.sleep(3)


TRANSPORT_CASES = {
    'bad gateway html': (reply('HTTP/1.1 502 Bad Gateway', b'<html>502 Bad Gateway</html>'), 'ApiHTTPException'),
    'ok but not json': (reply('HTTP/1.1 200 OK', b'<html>maintenance</html>'), 'ApiInvalidJSONException'),
    'read timeout': (never_answer, 'ReadTimeout'),
    'hang up before answering': (hang_up, 'ConnectionError'),
    'body cut short': (truncated_body, 'ChunkedEncodingError'),
    'stall inside the body': (stall_in_body, 'ConnectionError'),
}


@pytest.mark.parametrize('case', list(TRANSPORT_CASES))
def test_transport_failures_raise_what_the_default_raises(scheme, tls, case):
    behaviour, expected = TRANSPORT_CASES[case]
    seen = {}
    for kind in SENDERS:
        server = RawServer(behaviour, tls[0] if scheme == 'https' else None)
        try:
            bot = use(kind, server.url, connect=2, read=0.5)
            seen[kind] = outcome(bot.get_me)
        finally:
            server.close()
    assert seen['urllib3'] == seen['default'] == (expected,)


def test_refused_connection_is_a_connection_error(scheme):
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    seen = {kind: outcome(use(kind, f'{scheme}://127.0.0.1:{port}').get_me) for kind in SENDERS}
    assert seen['urllib3'] == seen['default'] == ('ConnectionError',)


def test_connect_timeout_is_connect_timeout():
    # a listening socket that never accepts, its queue full: the kernel drops further SYNs
    server = RawServer(None, backlog=0, accept=False)
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(('127.0.0.1', server.port))
            fillers.append(filler)
        time.sleep(0.1)
        seen = {kind: outcome(use(kind, server.url, connect=0.5, read=0.5).get_me) for kind in SENDERS}
    finally:
        for filler in fillers:
            filler.close()
        server.close()
    assert seen['urllib3'] == seen['default'] == ('ConnectTimeout',)


# -- TLS -----------------------------------------------------------------------------------------

def test_untrusted_certificate_is_an_ssl_error_and_nothing_is_sent(tls):
    with FakeTelegram(token=TOKEN, tls=tls[0]) as fake:  # SSL_CERT_FILE unset: the throwaway CA is unknown
        bot = use('urllib3', fake.url)
        with pytest.raises(requests.exceptions.SSLError) as caught:
            bot.send_message(ALICE['id'], 'secret text')
        assert 'CERTIFICATE_VERIFY_FAILED' in str(caught.value)
        assert TOKEN not in str(caught.value) and TOKEN.split(':')[1] not in repr(caught.value.args)
        assert not fake.counts  # no call reached the server, and nothing was retried without verification
        assert outcome(use('default', fake.url).get_me) == ('SSLError',)


def test_certificate_for_another_host_is_an_ssl_error(tls, monkeypatch):
    monkeypatch.setenv('SSL_CERT_FILE', str(tls[1]))
    with FakeTelegram(token=TOKEN, tls=tls[0]) as fake:
        bot = use('urllib3', fake.url.replace('127.0.0.1', 'localhost'))  # the certificate names 127.0.0.1 only
        with pytest.raises(requests.exceptions.SSLError, match='match|mismatch'):
            bot.get_me()
        assert not fake.counts


def test_plain_http_to_a_tls_server_is_a_connection_error(tls):
    with FakeTelegram(token=TOKEN, tls=tls[0]) as fake:
        plain = fake.url.replace('https://', 'http://')
        seen = {kind: outcome(use(kind, plain, read=1).get_me) for kind in SENDERS}
    assert seen['urllib3'] == seen['default'] == ('ConnectionError',)


# -- connections, long polls, proxies -------------------------------------------------------------

def count_connections(fake):
    accepted = []
    original = fake._server.get_request

    def get_request():
        accepted.append(1)
        return original()
    fake._server.get_request = get_request
    return accepted


def test_one_kept_alive_connection_per_thread(scheme, tls):
    with fake_for(scheme, tls) as fake:
        accepted = count_connections(fake)
        bot = use('urllib3', fake.url)
        for n in range(10):
            bot.send_message(ALICE['id'], f'main {n}')

        def worker(name):
            for n in range(10):
                bot.send_message(ALICE['id'], f'{name} {n}')
        workers = [threading.Thread(target=worker, args=(f'w{i}',)) for i in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        assert len(fake.sent) == 50
        assert len(accepted) == 5  # the main thread's and one per worker thread


def test_reconnects_after_the_server_closes_an_idle_connection(scheme, tls):
    def answer_then_close(conn):  # as nginx does with an idle keep-alive connection
        body = b'{"ok": true, "result": {"id": 5, "is_bot": true, "first_name": "B", "username": "b_bot"}}'
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n'
                     b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
        time.sleep(0.1)
        conn.close()
    server = RawServer(answer_then_close, tls[0] if scheme == 'https' else None)
    try:
        bot = use('urllib3', server.url)
        assert bot.get_me().id == 5
        time.sleep(0.3)
        assert bot.get_me().id == 5  # the dropped connection is noticed and replaced, not reported
    finally:
        server.close()


def test_long_poll_read_timeout_exceeds_the_poll(scheme, tls):
    with fake_for(scheme, tls) as fake:
        use('urllib3', fake.url, connect=1, read=1)
        started = time.monotonic()
        updates = apihelper.get_updates(TOKEN, long_polling_timeout=2)
        assert updates == [] and time.monotonic() - started >= 1.5  # held open past the 1 s read timeout
        fake.send_text(ALICE, '/start')
        assert apihelper.get_updates(TOKEN, long_polling_timeout=2)[0]['message']['text'] == '/start'


def test_proxy_is_read_once_at_start_and_no_proxy_is_honoured(monkeypatch):
    with FakeTelegram(token=TOKEN) as proxy, FakeTelegram(token=TOKEN) as direct:
        # an HTTP proxy gets the absolute URL; the fake answers it as Telegram would
        monkeypatch.setenv('HTTP_PROXY', proxy.url)
        sender = tgsender.RequestSender()
        monkeypatch.delenv('HTTP_PROXY')
        apihelper.CUSTOM_REQUEST_SENDER = sender
        apihelper.API_URL = 'http://api.telegram.invalid/bot{0}/{1}'
        assert telebot.TeleBot(TOKEN, threaded=False).get_me().id == 123456
        assert proxy.counts['getMe'] == 1

        monkeypatch.setenv('HTTP_PROXY', 'http://127.0.0.1:9')  # nothing listens on the discard port
        monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
        apihelper.CUSTOM_REQUEST_SENDER = tgsender.RequestSender()
        apihelper.API_URL = direct.url + '/bot{0}/{1}'
        assert telebot.TeleBot(TOKEN, threaded=False).get_me().id == 123456
        assert direct.counts['getMe'] == 1


def test_unreachable_proxy_is_a_proxy_error(monkeypatch):
    with FakeTelegram(token=TOKEN) as fake:
        monkeypatch.setenv('HTTP_PROXY', 'http://127.0.0.1:9')
        seen = {kind: outcome(use(kind, fake.url.replace('127.0.0.1', 'api.telegram.invalid')).get_me)
                for kind in SENDERS}
    assert seen['urllib3'] == seen['default'] == ('ProxyError',)
