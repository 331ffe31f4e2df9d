"""Read every setting once, from the environment or .env, and check its form.

A bad setting raises SettingError with one line that names it, says what is expected and gives an
example; it never repeats the value (tokens, passwords and the panel's path are secrets).
`python config.py` checks the settings and that none still holds .env.example's placeholder
(scripts/run.sh runs it before the bot): exit 0, or 2 with one line.
"""
import hashlib
import ipaddress
import os
import pwd
import re
import sys
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from decouple import AutoConfig, RepositoryEnv

import panels as panels_file_reader
import texts

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / '.env.example'
DEFAULT_PLANS = '30:100,90:270,180:500,365:900'
# The fiat currencies Crypto Pay's createInvoice takes (/work/shared/reference/cryptopay-api.md, `fiat`).
FIAT_CURRENCIES = ('USD', 'EUR', 'RUB', 'BYN', 'UAH', 'GBP', 'CNY', 'KZT', 'UZS', 'GEL', 'TRY', 'AMD', 'THB',
                   'INR', 'BRL', 'IDR', 'AZN', 'AED', 'PLN', 'ILS', 'KGS', 'TJS')
# Settings whose value in .env.example is a stand-in that must be replaced (or emptied) before use.
PLACEHOLDER_SETTINGS = ('BOT_TOKEN', 'DATABASE_URL', 'XUI_URL', 'XUI_PASSWORD', 'XUI_SUB_URL', 'CRYPTOPAY_TOKEN',
                        'CHANNEL_ID', 'CHANNEL_URL', 'SUPPORT_CONTACT')
# Placeholders that earlier versions of .env.example shipped: .env files copied from them still hold them.
OLD_PLACEHOLDERS = {'ADMIN_IDS': ('111111111,222222222',)}


class SettingError(Exception):
    """A setting is missing or malformed; the message names it, never its value."""


class Invalid(ValueError):
    """Raised by a parser: the message says what is expected (after the setting's name)."""


@dataclass(frozen=True)
class Plan:
    days: int
    price: Decimal


@dataclass(frozen=True)
class Settings:
    bot_token: str
    telegram_api_url: str
    admin_ids: frozenset
    database_url: str
    xui_url: str
    xui_username: str
    xui_password: str
    xui_api_token: str
    xui_inbound_id: int
    xui_sub_url: str
    cryptopay_token: str
    cryptopay_url: str
    channel_id: str
    channel_url: str
    trial_days: int
    referral_bonus_days: int
    plans: tuple
    currency: str
    support_contact: str
    backup_dir: Path
    backup_keep_days: int
    backup_time: str
    payment_poll_seconds: int
    invoice_expires_seconds: int
    timezone: ZoneInfo
    worker_threads: int
    db_pool_size: int
    http_host: str
    http_port: int
    webhook_url: str
    webhook_secret: str
    panels_file: str = ''
    public_url: str = ''
    panels: tuple = ()  # PanelConfig of every panel, from PANELS_FILE or the XUI_* settings
    shop_name: str = texts.DEFAULT_SHOP_NAME
    stars_plans: tuple = ()  # Plans priced in whole Telegram Stars (STARS_PLANS); empty: Stars off
    stars_recurring: bool = False
    texts: dict = field(default_factory=dict, hash=False, compare=False)  # the operator's TEXTS_FILE
    reconcile_time: str = '03:30'
    outage_alert_minutes: int = 5

    def plan(self, days):
        """Return the plan of that many days, or None."""
        return next((plan for plan in self.plans if plan.days == days), None)

    def stars_plan(self, days):
        """Return the price in Stars (an int) of the plan of that many days, or None."""
        return next((plan.price for plan in self.stars_plans if plan.days == days), None)


PLANS_FORMAT = 'PLANS must be days:price pairs, like 30:100,90:270'
# Decimal places of each currency Crypto Pay takes for fiat invoices (ISO 4217 minor units: all 2 today)
MINOR_UNITS = {}
DEFAULT_MINOR_UNITS = 2


def parse_plans(text, currency='RUB'):
    """Turn '30:100,90:270' into a tuple of Plans sorted by length, prices exact in the currency's minor units.

    :raise SettingError: with a message that says what is wrong (no secret is involved).
    """
    places = MINOR_UNITS.get(currency, DEFAULT_MINOR_UNITS)
    plans = {}
    for pair in text.split(','):
        days, sep, price = pair.strip().partition(':')
        if not sep or not days.strip().isdigit() or not re.fullmatch(r'[0-9]+(\.[0-9]+)?', price.strip()):
            raise SettingError(PLANS_FORMAT)
        days, price = int(days), Decimal(price.strip())
        if days <= 0 or price <= 0 or days in plans:
            raise SettingError(PLANS_FORMAT)
        if -price.as_tuple().exponent > places:
            if price != price.quantize(Decimal(1).scaleb(-places)):
                raise SettingError(f'PLANS price {price} has more decimals than {currency} has ({places})')
            price = price.quantize(Decimal(1).scaleb(-places))  # 99.990 is 99.99
        plans[days] = Plan(days, price)
    return tuple(sorted(plans.values(), key=lambda plan: plan.days))


def parse_stars_plans(text):
    """Turn '30:250,90:700' into Plans priced in whole Stars (1..100000 each); '' means Stars off.

    :raise Invalid: saying what is expected.
    """
    if not text:
        return ()
    plans = {}
    for pair in text.split(','):
        days, sep, price = pair.strip().partition(':')
        days, price = days.strip(), price.strip()
        if not (sep and days.isascii() and days.isdigit() and price.isascii() and price.isdigit()
                and 1 <= int(days) <= 3650 and 1 <= int(price) <= 100000 and int(days) not in plans):
            raise Invalid('must be days:stars pairs in whole Stars (1..100000), each length once, like 30:250,90:700')
        plans[int(days)] = Plan(int(days), int(price))
    return tuple(sorted(plans.values(), key=lambda plan: plan.days))


def flag(text):
    if text not in ('0', '1'):
        raise Invalid('must be 0 or 1')
    return text == '1'


def parse_ids(text):
    """Turn '1, 2,3' into a frozenset of Telegram user ids (positive ints)."""
    ids = set()
    for part in text.split(','):
        part = part.strip()
        if not part:
            continue
        if not part.isascii() or not part.isdigit() or not 0 < int(part) < 2 ** 53:
            raise Invalid('must be Telegram user ids separated by commas, like 123456789,987654321 '
                          '(@userinfobot tells you yours)')
        ids.add(int(part))
    return frozenset(ids)


def number(low, high, unit=''):
    """Return a parser of whole numbers from low to high."""
    def parse(text):
        if not re.fullmatch(r'[0-9]{1,12}', text) or not low <= int(text) <= high:
            raise Invalid(f'must be a whole number from {low} to {high}{unit}, like {min(max(low, 30), high)}')
        return int(text)
    return parse


def token(example, where):
    """Return a parser of 'digits:secret' tokens (Telegram's and Crypto Pay's)."""
    def parse(text):
        expected = f'must be the token {where}: digits, a colon, then letters, digits, - and _ (like {example})'
        if re.search(r'\s', text):
            raise Invalid(f'holds a space or a line break; {expected}')
        if re.search('["\'`]', text):
            raise Invalid(f'holds a quote; write it without quotes; {expected}')
        if not re.fullmatch(r'[0-9]{1,20}:[A-Za-z0-9_-]{1,200}', text):
            raise Invalid(expected)
        return text
    return parse


def api_token(text):
    """The panel's API token goes into a header: printable ASCII, no spaces or quotes."""
    if not re.fullmatch(r'[!#-&(-~]{1,500}', text):
        raise Invalid("must be the panel's API token as shown in Settings → Security → API token: "
                      'one word without spaces or quotes')
    return text


def http_url(example):
    """Return a parser of http(s) URLs with a host; the result has no trailing slash."""
    def parse(text):
        expected = f'must be a URL with its scheme, like {example}'
        try:
            parts = urlsplit(text)
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            raise Invalid(expected) from None
        if parts.scheme not in ('http', 'https') or not parts.hostname or not port_ok \
                or not text.isprintable() or re.search(r'\s', text):
            if '://' not in text:
                raise Invalid(f'{expected} (the https:// is missing)')
            raise Invalid(expected)
        return text.rstrip('/')
    return parse


def database_url(text):
    """Accept sqlite:///file, postgres:// and postgresql:// URLs."""
    expected = ('must be sqlite:///bot.db (a file beside the bot; sqlite:////var/lib/bot.db for an absolute path) '
                'or postgresql://user:password@host/dbname')
    scheme, sep, rest = text.partition('://')
    if not sep:
        raise Invalid(f'is not a URL; {expected}')
    if scheme.lower() in ('mysql', 'mariadb', 'mssql', 'oracle', 'mongodb', 'redis'):
        raise Invalid(f'names a {scheme.lower()} database, which the bot does not support; {expected}')
    if not text.isprintable():
        raise Invalid(expected)
    if scheme == 'sqlite':
        if rest in ('', '/') or not rest.startswith('/') or '\x00' in rest:
            raise Invalid(expected)
        return text
    if scheme in ('postgres', 'postgresql'):
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            raise Invalid(f'has a malformed host or port; {expected}') from None
        if not parts.hostname or parts.path.strip('/') == '':
            raise Invalid(f'needs a host and a database name; {expected}')
        return text
    raise Invalid(f'has an unknown scheme; {expected}')


def channel_id(text):
    """Accept @name or -100…; turn a t.me/name link into @name."""
    expected = "must be the channel's @username (like @my_vpn_channel) or its id (like -1001234567890)"
    link = re.fullmatch(r'(?:https?://)?(?:www\.)?(?:t|telegram)\.me/([^/?#]*)/?', text)
    if link:
        if link[1].startswith(('+', 'joinchat')):
            raise Invalid(f"is a private invite link, which the bot cannot check; use the channel's id; {expected}")
        text = '@' + link[1]
    if re.fullmatch(r'@[A-Za-z][A-Za-z0-9_]{3,31}', text) or re.fullmatch(r'-100[0-9]{1,16}', text):
        return text
    raise Invalid(expected)


def fiat_currency(text):
    code = text.upper()
    if code not in FIAT_CURRENCIES:
        raise Invalid(f'must be a fiat currency Crypto Pay accepts, like RUB: one of {", ".join(FIAT_CURRENCIES)}')
    return code


def timezone(text):
    expected = 'must be an IANA time zone name, like Europe/Moscow or UTC'
    if re.fullmatch(r'(?i)(utc|gmt)?\s*[+-]\s*[0-9]{1,2}(:?[0-9]{2})?', text):
        raise Invalid(f'{expected}; for a fixed offset such as UTC+3 name a city in it (Europe/Moscow, '
                      'Asia/Dubai) or use Etc/GMT-3 (its sign is reversed)')
    try:
        return ZoneInfo(text)
    except (ValueError, OSError, ZoneInfoNotFoundError):
        raise Invalid(expected) from None


def port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def webhook_url(text):
    """Accept an https URL, or http only for a loopback host (a self-hosted Bot API server beside the bot)."""
    parts = urlsplit(text)
    if parts.scheme not in ('http', 'https') or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(text)
    if parts.scheme == 'http' and not is_loopback(parts.hostname):
        raise ValueError(text)
    return text.rstrip('/')


def is_loopback(host):
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def webhook_secret(text):
    """Telegram's secret_token: 1-256 characters of A-Z a-z 0-9 _ - (Bot API, setWebhook)."""
    if not re.fullmatch(r'[A-Za-z0-9_-]{1,256}', text):
        raise ValueError(text)
    return text


def derived_secret(bot_token):
    """The default WEBHOOK_SECRET: a stable hash of BOT_TOKEN that does not reveal it."""
    return hashlib.sha256(b'spn-webhook-secret:' + bot_token.encode()).hexdigest()


def clock_time(text):
    match = re.fullmatch(r'([0-9]{1,2}):([0-9]{2})', text)
    if not match or not (0 <= int(match[1]) < 24 and 0 <= int(match[2]) < 60):
        raise Invalid('must be a time of day as HH:MM, like 04:00')
    return f'{int(match[1]):02d}:{match[2]}'


def folder(text):
    if '\x00' in text or not text.isprintable():
        raise Invalid('must be a folder, relative to the bot or absolute, like backups or /var/backups/vpn-bot')
    return (HERE / text).resolve()


def plain_text(text):
    if not text.isprintable():
        raise Invalid('must be one line of text without control characters')
    return text


def source(environ=None):
    """Return lookup(name, default) over environ, or over the environment and .env."""
    if environ is None:
        dotenv = AutoConfig(search_path=str(HERE))
        return lambda name, default: dotenv(name, default=default)
    return environ.get


def shop_name(text):
    if not 1 <= len(text) <= 64:
        raise ValueError(text)
    return text


def file_path(name, text):
    """Return the path a setting names (relative to the bot's folder, or absolute).

    :raises SettingError: the value holds a line break or another control character (no file is named so)
    """
    if not text.isprintable():
        raise SettingError(f'{name} must be a file path on one line, like /opt/vpn-bot/data/{name.lower()}.toml')
    return HERE / text


def texts_file(text):
    """Read the operator's texts file (a path relative to the bot's folder or absolute); '' means none."""
    if not text:
        return {}
    file_path('TEXTS_FILE', text)
    try:
        return texts.load_overrides(HERE / text)
    except ValueError as exc:
        raise SettingError(f'TEXTS_FILE: {exc}') from None


def load(environ=None):
    """Return the Settings, or raise SettingError naming the first bad one.

    :param environ: a mapping to read instead of the environment and .env.
    """
    lookup = source(environ)

    def read(name, cast=plain_text, default=None):
        raw = lookup(name, default)
        if raw is None or raw.strip() == '' and default is None:
            raise SettingError(f'{name} is not set (see .env.example)')
        if raw.strip() == '' and default == '':
            return ''  # optional and unset
        try:
            return cast(str(raw).strip())
        except Invalid as exc:
            raise SettingError(f'{name} {exc}') from None
        except (ValueError, ArithmeticError, InvalidOperation, ZoneInfoNotFoundError):
            raise SettingError(f'{name} is malformed (see .env.example)') from None

    currency = read('CURRENCY', fiat_currency, 'RUB')

    def optional(parse):
        return lambda text: parse(text) if text else ''

    # PANELS_FILE replaces the XUI_* settings
    panels_file = read('PANELS_FILE', optional(lambda text: str(file_path('PANELS_FILE', text).resolve())), '')
    xui_default = '' if panels_file else None
    api_token_value = read('XUI_API_TOKEN', optional(api_token), '')
    # With an API token the panel login is not needed.
    login_default = '' if api_token_value or panels_file else None
    database = read('DATABASE_URL', database_url, f'sqlite:///{HERE / "bot.db"}')
    check_database_file(database)
    bot_token = read('BOT_TOKEN', token('123456789:AAHfake-token_from-BotFather', 'that @BotFather gave you'))
    settings = Settings(
        bot_token=bot_token,
        telegram_api_url=read('TELEGRAM_API_URL', http_url('https://api.telegram.org'), 'https://api.telegram.org'),
        admin_ids=read('ADMIN_IDS', parse_ids, ''),
        database_url=database,
        xui_url=read('XUI_URL', optional(http_url('https://vpn.example.com:2053/secretpath')), xui_default),
        xui_username=read('XUI_USERNAME', default=login_default),
        xui_password=read('XUI_PASSWORD', default=login_default),
        xui_api_token=api_token_value,
        xui_inbound_id=0 if panels_file else read('XUI_INBOUND_ID', number(1, 2 ** 31 - 1)),
        xui_sub_url=read('XUI_SUB_URL', optional(http_url('https://vpn.example.com:2096/sub/')), xui_default),
        cryptopay_token=read('CRYPTOPAY_TOKEN', token('12345:AAzQcZWQqQAbsfgPnOLr4FHC8Doa4L7KryC',
                                                      'from @CryptoBot → Crypto Pay → your app')),
        cryptopay_url=read('CRYPTOPAY_URL', http_url('https://pay.crypt.bot'), 'https://pay.crypt.bot'),
        channel_id=read('CHANNEL_ID', optional(channel_id), ''),
        channel_url=read('CHANNEL_URL', optional(http_url('https://t.me/my_vpn_channel')), ''),
        trial_days=read('TRIAL_DAYS', number(1, 3650, ' days'), '3'),
        referral_bonus_days=read('REFERRAL_BONUS_DAYS', number(1, 3650, ' days'), '7'),
        plans=read('PLANS', lambda text: parse_plans(text, currency), DEFAULT_PLANS),
        currency=currency,
        support_contact=read('SUPPORT_CONTACT', default=''),
        backup_dir=read('BACKUP_DIR', folder, 'backups'),
        backup_keep_days=read('BACKUP_KEEP_DAYS', number(1, 3650, ' days'), '30'),
        backup_time=read('BACKUP_TIME', clock_time, '04:00'),
        payment_poll_seconds=read('PAYMENT_POLL_SECONDS', number(1, 3600, ' seconds'), '15'),
        # Crypto Pay takes expires_in from 1 s to 31 days
        invoice_expires_seconds=read('INVOICE_EXPIRES_SECONDS', number(1, 2678400, ' seconds'), '3600'),
        timezone=read('TIMEZONE', timezone, 'Europe/Moscow'),
        worker_threads=read('WORKER_THREADS', number(1, 256), '24'),
        db_pool_size=read('DB_POOL_SIZE', number(1, 1000), '28'),
        http_host=read('HTTP_HOST', default='127.0.0.1'),
        http_port=read('HTTP_PORT', port, '8080'),
        webhook_url=read('WEBHOOK_URL', webhook_url, '') if lookup('WEBHOOK_URL', '').strip() else '',
        webhook_secret=read('WEBHOOK_SECRET', webhook_secret, '') if lookup('WEBHOOK_SECRET', '').strip()
        else derived_secret(bot_token),
        shop_name=read('SHOP_NAME', shop_name, texts.DEFAULT_SHOP_NAME),
        stars_plans=read('STARS_PLANS', parse_stars_plans, ''),
        stars_recurring=read('STARS_RECURRING', flag, '0'),
        texts=texts_file(str(lookup('TEXTS_FILE', '') or '').strip()),
        panels_file=panels_file,
        public_url=read('PUBLIC_URL', optional(http_url('https://vpn.example.com')), ''),
        reconcile_time=read('RECONCILE_TIME', clock_time, '03:30'),
        outage_alert_minutes=read('OUTAGE_ALERT_MINUTES', number(1, 1440, ' minutes'), '5'),
    )
    return replace(settings, panels=read_panels(settings))


def read_panels(settings):
    """Return the PanelConfigs: PANELS_FILE's, or the one XUI_* panel; several need PUBLIC_URL."""
    if not settings.panels_file:
        return panels_file_reader.from_settings(settings)
    try:
        found = panels_file_reader.load(settings.panels_file)
    except panels_file_reader.PanelsFileError as exc:
        raise SettingError(str(exc)) from None
    enabled = [panel for panel in found if panel.enabled]
    if not enabled:
        raise SettingError('PANELS_FILE has no enabled panel; set enabled = true on at least one')
    if len(enabled) > 1 and not settings.public_url:
        raise SettingError('PUBLIC_URL is not set: with more than one panel buyers get one link, '
                           '{PUBLIC_URL}/sub/{subId}, served by the bot (like https://vpn.example.com)')
    return found


def placeholders(environ=None):
    """Return the names of settings that still hold .env.example's placeholder (or an older example's)."""
    lookup = source(environ)
    example = RepositoryEnv(str(EXAMPLE)).data if EXAMPLE.exists() else {}
    found = []
    for name in PLACEHOLDER_SETTINGS + tuple(OLD_PLACEHOLDERS):
        value = (lookup(name, None) or '').strip()
        stand_ins = {example.get(name, '').strip(), *OLD_PLACEHOLDERS.get(name, ())} - {''}
        if value and value in stand_ins:
            found.append(name)
    return found


def sqlite_path(url):
    """Return the file of a sqlite:/// URL as a Path, or None for other databases and in-memory ones."""
    if not url.startswith('sqlite:///') or url in ('sqlite:///:memory:', 'sqlite:///'):
        return None
    return Path(url[len('sqlite:///'):].split('?', 1)[0])


def owner_name(path):
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f'uid {uid}'


def check_database_file(url):
    """Raise SettingError when this user cannot write the SQLite file of url (or create it in its folder).

    SQLite opens a file it may only read without complaint, and every write then fails; so the bot
    checks first and says whose file it is. A missing folder is left to the database check.
    """
    path = sqlite_path(url)
    if path is None:
        return
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f'uid {os.geteuid()}'
    try:
        for name in ('', '-wal', '-shm', '-journal'):
            part = path.with_name(path.name + name)
            if part.exists() and not os.access(part, os.R_OK | os.W_OK):
                raise SettingError(f'DATABASE_URL: the SQLite file {part} belongs to {owner_name(part)} (mode '
                                   f'{part.stat().st_mode & 0o777:04o}) and this bot runs as {user}, so it cannot '
                                   f'write it; fix: chown {user}: {path}*')
        if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
            raise SettingError(f'DATABASE_URL: the folder {path.parent} belongs to {owner_name(path.parent)} and this '
                               f'bot runs as {user}, so it cannot make its SQLite files there; fix: chown {user}: '
                               f'{path.parent}')
    except OSError:
        return  # a path the system refuses to look at: the database check will say what it is



def main():
    """Check the settings' form and that none is a placeholder; return 0, or 2 after one line."""
    try:
        load()
    except SettingError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    left = placeholders()
    if left:
        print(f'error: fill in .env: {", ".join(left)} still hold{"s" if len(left) == 1 else ""} the example\'s '
              'placeholder (.env.example says where each comes from; empty the optional ones you do not use)',
              file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
