"""urllib3 connection pools for the outside services: proxies read once, TLS verified, kept-alive per thread.

Both the Bot API sender (tgsender.py) and the 3x-ui panel client (xui.py) send through a Pools: a
pool manager per thread and proxy, so calls never wait on each other's connections, and the
environment's proxy settings (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, as requests reads them) looked up
once at start instead of on every call as requests does.
"""
import os
import ssl
import threading
import urllib.request
from urllib.parse import unquote, urlsplit

import urllib3
from requests.utils import should_bypass_proxies


class UnsupportedProxy(ValueError):
    """The environment names a proxy scheme urllib3 cannot speak (SOCKS)."""


def tls_context():
    """Return a client SSLContext that verifies against the system store (or SSL_CERT_FILE / SSL_CERT_DIR).

    Where OpenSSL found no CA bundle file, certifi's (the one requests uses) is added; a bundle named in
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (what the panel client on requests trusted) is added too. Always
    verified, never insecure.
    """
    context = ssl.create_default_context()
    if not context.cert_store_stats().get('x509_ca'):
        import certifi
        context.load_verify_locations(certifi.where())
    defaults = ssl.get_default_verify_paths()
    loaded = {os.path.realpath(path) for path in (defaults.cafile, defaults.capath) if path}
    for name in ('REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE'):
        bundle = os.environ.get(name)
        if bundle and os.path.realpath(bundle) not in loaded:  # the system's own bundle is loaded already
            loaded.add(os.path.realpath(bundle))
            if os.path.isdir(bundle):
                context.load_verify_locations(capath=bundle)
            else:
                context.load_verify_locations(cafile=bundle)
    return context


def hide_userinfo(url):
    """Return url without the user:password@ part (for messages)."""
    parts = urlsplit(url)
    return url.replace(parts.netloc, parts.hostname or '') if '@' in parts.netloc else url


def proxy_credentials(proxy):
    """Return the Proxy-Authorization header for a proxy URL with user:password@ (as requests sends it), or None."""
    parts = urlsplit(proxy)
    if not parts.username:
        return None
    return urllib3.make_headers(proxy_basic_auth=f'{unquote(parts.username)}:{unquote(parts.password or "")}')


class Pools:
    """urllib3 pool managers, one per thread and proxy; the environment's proxies read once, here.

    Thread-safe: each thread has its own managers, so calls never wait on each other.
    """

    def __init__(self, connections_per_host=1):  # a thread makes one call at a time
        self.proxies = {key: value for key, value in urllib.request.getproxies_environment().items() if value}
        self.connections_per_host = connections_per_host
        self.ssl_context = tls_context()
        self.local = threading.local()
        self.bypass = {}  # scheme://host:port -> True when NO_PROXY covers it
        self.bypass_lock = threading.Lock()

    def proxy_for(self, url, proxies=None):
        """Return the proxy URL for url (None for a direct connection): explicit proxies first, then the environment.

        NO_PROXY is matched as requests matches it (requests.utils.should_bypass_proxies: names, suffixes,
        host:port and IPv4 ranges such as 10.0.0.0/8), once per scheme, host and port.
        """
        parts = urlsplit(url)
        if proxies:
            return proxies.get(parts.scheme) or proxies.get('all')
        if not self.proxies:
            return None
        origin = f'{parts.scheme}://{parts.netloc.rpartition("@")[2]}'
        if origin not in self.bypass:
            with self.bypass_lock:  # requests sets no_proxy in os.environ for the look-up: one at a time
                self.bypass[origin] = bool(self.proxies.get('no')) and should_bypass_proxies(
                    origin, self.proxies['no'])
        if self.bypass[origin]:
            return None
        return self.proxies.get(parts.scheme) or self.proxies.get('all')

    def manager(self, proxy):
        """Return this thread's pool manager for proxy (None: direct).  :raises UnsupportedProxy: a SOCKS proxy"""
        managers = getattr(self.local, 'managers', None)
        if managers is None:
            managers = self.local.managers = {}
        manager = managers.get(proxy)
        if manager is None:
            options = dict(num_pools=4, maxsize=self.connections_per_host, block=False, retries=False,
                           ssl_context=self.ssl_context)
            if proxy is None:
                manager = urllib3.PoolManager(**options)
            elif proxy.lower().startswith('socks'):
                raise UnsupportedProxy(f'SOCKS proxies are not supported: {hide_userinfo(proxy)}')
            else:
                manager = urllib3.ProxyManager(proxy, proxy_headers=proxy_credentials(proxy), **options)
            managers[proxy] = manager
        return manager

    def for_url(self, url, proxies=None):
        """Return this thread's pool manager for url, through its proxy if one applies."""
        return self.manager(self.proxy_for(url, proxies))


_shared = None
_shared_lock = threading.Lock()


def shared():
    """Return the process's one Pools for the panels (made on first use, so the environment is read then)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Pools()
        return _shared
