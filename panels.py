"""The 3x-ui panels (locations) the shop sells on: PANELS_FILE, or the one panel of the XUI_* settings.

PANELS_FILE is TOML with one [[panels]] table per panel:

    [[panels]]
    name = "Germany"                 # shown to buyers and admins; unique
    url = "https://de.example.com:2053/secret"
    api_token = "..."                # or username + password
    inbound_id = 1
    sub_url = "https://de.example.com:2096/sub/"
    enabled = true                   # optional; a disabled panel is never touched
"""
import os
import stat
import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

KEYS = {'name', 'url', 'username', 'password', 'api_token', 'inbound_id', 'sub_url', 'enabled'}
NAME_MAX = 32


class PanelsFileError(Exception):
    """PANELS_FILE cannot be used; the message names the panel and the key at fault, never a secret."""


@dataclass(frozen=True)
class PanelConfig:
    """One panel: where it is, how to log in, which inbound holds buyers, where its subscriptions are served."""
    name: str
    url: str
    inbound_id: int
    sub_url: str
    username: str = field(default='', repr=False)
    password: str = field(default='', repr=False)
    api_token: str = field(default='', repr=False)
    enabled: bool = True

    @property
    def secrets(self):
        """Return the values that must never reach a log line."""
        return tuple(value for value in (self.password, self.api_token) if value)


@dataclass(frozen=True)
class Panel:
    """A panel at run time: its settings and the XuiClient that talks to it."""
    config: PanelConfig
    client: object

    @property
    def name(self):
        return self.config.name

    @property
    def enabled(self):
        return self.config.enabled


def single(client, name='main'):
    """Wrap one XuiClient as the one enabled panel (the XUI_* settings, and tests)."""
    return Panel(PanelConfig(name=name, url='', inbound_id=client.inbound_id, sub_url=client.subscription_link('')),
                 client)


def connect(configs, client_factory):
    """Return a Panel per config, each with client_factory(config) as its client (made even if disabled)."""
    return tuple(Panel(config, client_factory(config)) for config in configs)


def from_settings(settings):
    """Describe the single panel of the XUI_* settings (used when PANELS_FILE is unset)."""
    return (PanelConfig(name='main', url=settings.xui_url, inbound_id=settings.xui_inbound_id,
                        sub_url=settings.xui_sub_url, username=settings.xui_username,
                        password=settings.xui_password, api_token=settings.xui_api_token),)


def load(path):
    """Read and check PANELS_FILE; return a tuple of PanelConfig in file order.

    :raises PanelsFileError: unreadable file, bad TOML, no panels, a missing, unknown or mistyped key,
        a duplicate name
    """
    try:
        with open(path, 'rb') as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise PanelsFileError(f'PANELS_FILE {path} cannot be read: {exc.strerror}') from None
    except tomllib.TOMLDecodeError as exc:
        raise PanelsFileError(f'PANELS_FILE {path} is not valid TOML: {exc}') from None
    tables = data.get('panels')
    extra = sorted(set(data) - {'panels'})
    if extra:
        raise PanelsFileError(f'PANELS_FILE has unknown top-level key {extra[0]!r}; '
                              f'write each panel as a [[panels]] table')
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise PanelsFileError('PANELS_FILE lists no panels; write one [[panels]] table per panel')
    panels, seen = [], set()
    for number, table in enumerate(tables, start=1):
        panel = _panel(table, number)
        if panel.name.casefold() in seen:
            raise PanelsFileError(f'PANELS_FILE names two panels {panel.name!r}; names must be unique')
        seen.add(panel.name.casefold())
        panels.append(panel)
    return tuple(panels)


def readable_by_others(path):
    """Say whether users other than the owner (and its group) may read the file: it holds passwords."""
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _panel(table, number):
    """Check one [[panels]] table; name it by its name when it has a usable one, else by its number."""
    label = f'panel {number}'
    name = table.get('name')
    if isinstance(name, str) and name.strip():
        label = f'panel {name.strip()!r}'

    def fail(message):
        raise PanelsFileError(f'PANELS_FILE, {label}: {message}')

    unknown = sorted(set(table) - KEYS)
    if unknown:
        fail(f'unknown key {unknown[0]!r} (known: {", ".join(sorted(KEYS))})')
    for key in ('name', 'url', 'inbound_id', 'sub_url'):
        if key not in table:
            fail(f'{key} is missing')
    for key in ('name', 'url', 'sub_url', 'username', 'password', 'api_token'):
        if key in table and not isinstance(table[key], str):
            fail(f'{key} must be a string in quotes')
    name = table['name'].strip()
    if not name or len(name) > NAME_MAX or not name.isprintable():
        fail(f'name must be 1 to {NAME_MAX} printable characters, like "Germany"')
    inbound_id = table['inbound_id']
    if isinstance(inbound_id, bool) or not isinstance(inbound_id, int) or inbound_id <= 0:
        fail('inbound_id must be a whole number above 0, like 1 (the ID column of the panel\'s Inbounds)')
    enabled = table.get('enabled', True)
    if not isinstance(enabled, bool):
        fail('enabled must be true or false (no quotes)')
    for key in ('url', 'sub_url'):
        if not _is_http_url(table[key]):
            fail(f'{key} must be an http(s) URL, like "https://vpn.example.com:2053/secret"')
    username = table.get('username', '').strip()
    password = table.get('password', '')
    api_token = table.get('api_token', '').strip()
    if not api_token and not (username and password):
        fail('needs api_token, or both username and password')
    return PanelConfig(name=name, url=table['url'].strip().rstrip('/'), inbound_id=inbound_id,
                       sub_url=table['sub_url'].strip().rstrip('/') + '/', username=username,
                       password=password, api_token=api_token, enabled=enabled)


def _is_http_url(text):
    parts = urlsplit(text.strip())
    return parts.scheme in ('http', 'https') and bool(parts.hostname)
