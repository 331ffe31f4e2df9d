"""httppool.Pools: the proxy settings of the environment applied as requests applies them (the panel client
and the Bot API sender went from requests to these pools, so an operator's proxy settings must keep working)."""
import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import httppool

PROXY = 'http://proxy.invalid:3128'


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'NO_PROXY', 'http_proxy', 'https_proxy', 'all_proxy',
                 'no_proxy'):
        monkeypatch.delenv(name, raising=False)


def test_no_proxy_ranges_names_and_ports_bypass_the_proxy_as_with_requests(monkeypatch):
    monkeypatch.setenv('HTTP_PROXY', PROXY)
    monkeypatch.setenv('NO_PROXY', '10.0.0.0/8, 192.168.1.7,.internal.example,panel.example:2053')
    pools = httppool.Pools()
    assert pools.proxy_for('http://10.20.30.40:2053/secret/panel/api/clients/list') is None  # an IPv4 range
    assert pools.proxy_for('http://192.168.1.7/') is None
    assert pools.proxy_for('http://vpn.internal.example:8443/') is None  # a suffix
    assert pools.proxy_for('http://11.0.0.1/') == PROXY
    assert pools.proxy_for('http://example.com/') == PROXY


@pytest.mark.parametrize('first', [2053, 8443])
def test_a_no_proxy_entry_with_a_port_covers_that_port_only_whichever_is_asked_first(monkeypatch, first):
    monkeypatch.setenv('HTTP_PROXY', PROXY)
    monkeypatch.setenv('NO_PROXY', 'panel.example:2053')
    pools = httppool.Pools()
    expected = {2053: None, 8443: PROXY}
    for port in (first, 2053 + 8443 - first):
        assert pools.proxy_for(f'http://panel.example:{port}/') == expected[port]


class _RecordingProxy(BaseHTTPRequestHandler):
    """An HTTP proxy that records the request line and Proxy-Authorization, and answers 200 itself."""

    def do_GET(self):
        self.server.seen.append((self.requestline, self.headers.get('Proxy-Authorization')))
        self.send_response(200)
        self.send_header('Content-Length', '2')
        self.end_headers()
        self.wfile.write(b'ok')

    def log_message(self, *args):
        pass


def test_credentials_in_the_proxy_url_are_sent_as_requests_sends_them(monkeypatch):
    server = ThreadingHTTPServer(('127.0.0.1', 0), _RecordingProxy)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # a password with characters that must be percent-encoded in a URL
        monkeypatch.setenv('HTTP_PROXY', f'http://shop:p%40ss%3Aword@127.0.0.1:{server.server_address[1]}')
        pools = httppool.Pools()
        answer = pools.for_url('http://panel.invalid/x').request('GET', 'http://panel.invalid/x', retries=False)
        assert answer.status == 200
    finally:
        server.shutdown()
        server.server_close()
    assert server.seen == [('GET http://panel.invalid/x HTTP/1.1',
                            'Basic ' + base64.b64encode(b'shop:p@ss:word').decode())]


def test_a_proxy_without_credentials_gets_no_authorization_header():
    assert httppool.proxy_credentials('http://127.0.0.1:3128') is None
