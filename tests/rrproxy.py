"""A loopback round-robin reverse proxy, like nginx's upstream, for the several-process tests and bench.

Each POST goes to the next backend port; a backend that refuses the connection is skipped
(nginx's proxy_next_upstream error). Run alone: ``python tests/rrproxy.py 8081 8082`` prints its URL.
"""
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


class RoundRobin:
    """Serve on a free 127.0.0.1 port from a daemon thread; url is the base to give Telegram and Crypto Pay."""

    def __init__(self, ports, port=0):
        self.ports = [int(p) for p in ports]
        self.next = 0
        self.lock = threading.Lock()
        self.served = {p: 0 for p in self.ports}
        self.local = threading.local()  # one keep-alive session per proxy thread
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ('host', 'content-length', 'connection')}
                status, data = proxy.forward(self.path, body, headers)
                self.send_response(status)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', port), Handler)
        self.server.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def forward(self, path, body, headers):
        session = getattr(self.local, 'session', None) or requests.Session()
        self.local.session = session
        for _ in range(len(self.ports)):
            with self.lock:
                port = self.ports[self.next % len(self.ports)]
                self.next += 1
            try:
                reply = session.post(f'http://127.0.0.1:{port}{path}', data=body, headers=headers, timeout=30)
            except requests.ConnectionError:  # that backend is down: try the next one
                continue
            with self.lock:
                self.served[port] += 1
            return reply.status_code, reply.content
        return 502, b'no backend'

    def close(self):
        self.server.shutdown()
        self.server.server_close()


if __name__ == '__main__':
    proxy = RoundRobin(sys.argv[1:])
    print(proxy.url, flush=True)
    threading.Event().wait()
