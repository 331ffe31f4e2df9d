"""A requests.Session that reads the environment once per host instead of on every request."""
import threading
from urllib.parse import urlsplit

import requests


class Session(requests.Session):
    """requests.Session whose environment settings (proxies, NO_PROXY, the CA bundle) are read once per host.

    requests reads them from os.environ on every call (merge_environment_settings: getproxies, proxy_bypass,
    REQUESTS_CA_BUNDLE), about a tenth of the bot's CPU in the panel calls of a busy shop (py-spy profile of
    bench/throughput.py). The environment of a running bot does not change, so the result for a host and the
    same per-call arguments is kept; everything else is requests' own behaviour.
    """

    def __init__(self):
        super().__init__()
        self._environment = {}
        self._environment_lock = threading.Lock()

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, repr(proxies), stream, verify, cert, self.trust_env)
        settings = self._environment.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            with self._environment_lock:
                self._environment[key] = settings
        return {**settings, 'proxies': dict(settings['proxies'])}
