"""A 3x-ui subscription server on 127.0.0.1, serving the clients of a FakePanel.

Like the real one (internal/sub/controller.go in MHSanaei/3x-ui, `subs`): GET {path}{subId} answers 200
with the config lines of every enabled client with that subId, base64-encoded (subEncrypt on, the default)
or plain, with Subscription-Userinfo `upload=…; download=…; total=…; expire=…` (bytes, unix seconds) and
Profile-Update-Interval; a subId with no enabled client gets 404 with an empty body.
"""
import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeSubServer:
    """The sub server of one FakePanel; knobs make it down, slow or answer garbage."""

    def __init__(self, panel, host='vpn.example.test', path='/sub/', encrypt=True, remark='fake'):
        self.panel = panel
        self.host, self.path, self.encrypt, self.remark = host, path, encrypt, remark
        self.mode = 'ok'          # ok | garbage | hang | error
        self.hang_seconds = 5.0
        self.requests = 0
        self.asked = []           # the subIds asked for, in order
        self._server = self._thread = None
        self.port = None
        self._lock = threading.Lock()

    @property
    def url(self):
        """The base a subId is appended to (a panel's sub_url)."""
        return f'http://127.0.0.1:{self.port}{self.path}'

    def start(self, port=0):
        server = ThreadingHTTPServer(('127.0.0.1', port), _handler_for(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.01},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Close the socket: connections are refused until start(port=self.port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def lines_of(self, sub_id):
        """Return the config lines the panel would serve for sub_id, and the traffic counters."""
        lines, up, down, total, expire = [], 0, 0, 0, 0
        for email, client in sorted(self.panel.clients.items()):
            if client.get('subId') != sub_id or client.get('enable') is not True:
                continue
            key = client.get('id') or client.get('password') or client.get('auth')
            lines.append(f'vless://{key}@{self.host}:443?type=tcp&security=reality#{self.remark}-{email}')
            row = self.panel.traffic.get(email) or {}
            up += int(row.get('up') or 0)
            down += int(row.get('down') or 0)
            total = int(client.get('totalGB') or 0)
            expire = int(client.get('expiryTime') or 0) // 1000
        return lines, (up, down, total, expire)

    def _answer(self, raw_path):
        with self._lock:
            self.requests += 1
        if not raw_path.startswith(self.path):
            return 404, {}, b''
        if self.mode == 'hang':
            time.sleep(self.hang_seconds)
        if self.mode == 'error':
            return 500, {}, b''
        if self.mode == 'garbage':
            return 200, {'Content-Type': 'text/html'}, b'<html><body>502 Bad Gateway</body></html>\xff\xfe'
        sub_id = unquote(raw_path[len(self.path):])
        with self._lock:
            self.asked.append(sub_id)
        lines, (up, down, total, expire) = self.lines_of(sub_id)
        if not lines:
            return 404, {}, b''
        body = ''.join(line + '\n' for line in lines).encode()
        if self.encrypt:
            body = base64.b64encode(body)
        headers = {'Subscription-Userinfo': f'upload={up}; download={down}; total={total}; expire={expire}',
                   'Profile-Update-Interval': '12', 'Content-Type': 'text/plain; charset=utf-8'}
        return 200, headers, body


def _handler_for(fake):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def do_GET(self):
            status, headers, body = fake._answer(self.path.split('?')[0])
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    return Handler
