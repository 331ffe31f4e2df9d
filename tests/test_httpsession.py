"""httpsession.Session: requests' behaviour with the environment read once per host."""
import http.server
import threading

import pytest

import httpsession


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 200 with the request line it got: a proxy sees 'GET http://host/path', a server 'GET /path'."""

    def do_GET(self):
        body = self.requestline.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_port}'
    httpd.shutdown()
    httpd.server_close()


def test_a_proxy_from_the_environment_is_used_and_no_proxy_is_honoured(server, monkeypatch):
    monkeypatch.setenv('HTTP_PROXY', server)  # the recorder plays the proxy
    monkeypatch.setenv('NO_PROXY', 'localhost')
    session = httpsession.Session()
    through_proxy = session.get('http://panel.example:2053/path', timeout=5).text
    assert through_proxy == 'GET http://panel.example:2053/path HTTP/1.1'
    monkeypatch.setenv('NO_PROXY', '127.0.0.1')
    direct = httpsession.Session().get(f'{server}/path', timeout=5).text
    assert direct == 'GET /path HTTP/1.1'


def test_the_environment_is_read_once_per_host(server, monkeypatch):
    monkeypatch.delenv('HTTP_PROXY', raising=False)
    monkeypatch.delenv('http_proxy', raising=False)
    session = httpsession.Session()
    assert session.get(f'{server}/a', timeout=5).text == 'GET /a HTTP/1.1'
    monkeypatch.setenv('HTTP_PROXY', 'http://127.0.0.1:9')  # set after start: a running bot does not see it
    monkeypatch.setenv('NO_PROXY', '')
    assert session.get(f'{server}/b', timeout=5).text == 'GET /b HTTP/1.1'
    with pytest.raises(Exception):  # a new session reads the environment again: the dead proxy refuses
        httpsession.Session().get(f'{server}/c', timeout=5)
