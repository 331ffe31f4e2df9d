"""Send telebot's Bot API requests over urllib3: one kept-alive connection per thread and host.

    apihelper.CUSTOM_REQUEST_SENDER = RequestSender()

telebot calls the sender as it would call requests (``sender(method, url, params=, files=,
timeout=(connect s, read s), proxies=)``) and reads ``status_code``, ``reason``, ``text`` and
``json()`` of what it returns (telebot/apihelper.py, _make_request and _check_result). So every
outcome reaches the bot as with telebot's default sender: a Bot API error is an
ApiTelegramException (error_code, description, result_json['parameters']['retry_after']),
a non-JSON reply an ApiHTTPException, and transport trouble the requests exception the default
raises (requests/adapters.py, HTTPAdapter.send): ConnectionError, ConnectTimeout, ReadTimeout,
SSLError, ProxyError. Unlike requests it sends the parameters as a form body (multipart when
there are files) instead of re-encoding them into the query string, looks the proxy up once
instead of on every call, and keeps no per-call session state.

The pools, proxies and TLS are httppool's: verified against the system store (OpenSSL's default
paths, so SSL_CERT_FILE and SSL_CERT_DIR apply) plus a bundle named in REQUESTS_CA_BUNDLE; a
certificate that does not verify is an SSLError, never a fallback.
"""
import json
from urllib.parse import urlencode

import requests.exceptions as rex
import urllib3
from urllib3 import exceptions as u3

import httppool


class Response:
    """The parts of a requests.Response that telebot reads: status_code, reason, text, json()."""

    __slots__ = ('status_code', 'reason', 'content', 'url')

    def __init__(self, status_code, reason, content, url):
        self.status_code = status_code
        self.reason = reason
        self.content = content  # bytes
        self.url = url

    @property
    def text(self):
        return self.content.decode('utf-8', 'replace')

    def json(self):
        return json.loads(self.content)

    def __repr__(self):
        return f'<Response [{self.status_code}]>'


def form_fields(params):
    """Return params as (name, str value) pairs, dropping None values and repeating lists, as requests does."""
    fields = []
    for name, value in (params or {}).items():
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else (value,)
        for item in values:
            if item is not None:
                fields.append((name, item.decode() if isinstance(item, bytes) else str(item)))
    return fields


def file_fields(files):
    """Return telebot's files as urllib3 multipart fields (name, (filename, bytes[, content type])).

    A value is bytes, a file object or a (filename, bytes or file[, content type]) tuple; a file
    without a name is sent under its field name, as requests does.
    """
    fields = []
    for name, value in files.items():
        content_type = None
        if isinstance(value, (tuple, list)):
            filename, data = value[0], value[1]
            if len(value) > 2:
                content_type = value[2]
        else:
            data = value
            filename = getattr(value, 'name', None)
            filename = filename.rsplit('/', 1)[-1] if isinstance(filename, str) and filename[:1] != '<' else name
        if hasattr(data, 'read'):
            data = data.read()
        if isinstance(data, str):
            data = data.encode()
        fields.append((name, (filename or name, data, content_type) if content_type else (filename or name, data)))
    return fields


class RequestSender(httppool.Pools):
    """A callable for apihelper.CUSTOM_REQUEST_SENDER.

    HTTP(S)_PROXY / ALL_PROXY / NO_PROXY are read from the environment once, here, as requests reads them.
    Thread-safe: each thread has its own pool manager, so calls never wait on each other.
    """

    def __call__(self, method, url, params=None, files=None, timeout=None, proxies=None):
        """Send one Bot API call; return a Response. Raises the requests exception telebot's default would."""
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        fields = form_fields(params)
        if files:
            body, content_type = urllib3.encode_multipart_formdata(fields + file_fields(files))
        else:
            body, content_type = urlencode(fields).encode(), 'application/x-www-form-urlencoded'
        try:
            manager = self.for_url(url, proxies)
        except httppool.UnsupportedProxy as exc:
            raise rex.InvalidSchema(str(exc)) from exc
        try:
            reply = manager.request('POST', url, body=body, headers={'Content-Type': content_type},
                                    timeout=urllib3.Timeout(connect=connect, read=read), retries=False,
                                    redirect=False, preload_content=False)
        except Exception as exc:
            raise _as_requests_error(exc) from exc
        try:
            content = reply.read()
        except u3.ProtocolError as exc:
            raise rex.ChunkedEncodingError(exc) from exc
        except u3.DecodeError as exc:
            raise rex.ContentDecodingError(exc) from exc
        except u3.ReadTimeoutError as exc:  # requests' iter_content says ConnectionError here
            raise rex.ConnectionError(exc) from exc
        except u3.SSLError as exc:
            raise rex.SSLError(exc) from exc
        finally:
            reply.release_conn()
        return Response(reply.status, reply.reason, content, url)


def _as_requests_error(exc):
    """Map a urllib3 error to the requests exception requests' HTTPAdapter.send raises for it."""
    if isinstance(exc, u3.ProxyError):
        return rex.ProxyError(exc)
    if isinstance(exc, u3.SSLError):
        return rex.SSLError(exc)
    if isinstance(exc, u3.ConnectTimeoutError) and not isinstance(exc, u3.NewConnectionError):
        return rex.ConnectTimeout(exc)
    if isinstance(exc, u3.ReadTimeoutError):
        return rex.ReadTimeout(exc)
    if isinstance(exc, (u3.ProtocolError, u3.NewConnectionError, u3.ClosedPoolError, u3.HTTPError, OSError)):
        return rex.ConnectionError(exc)
    return exc
