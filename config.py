"""Read every setting once, from the environment or .env, and check it."""
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from decouple import AutoConfig

import panels as panels_file_reader
import texts

HERE = Path(__file__).resolve().parent
DEFAULT_PLANS = '30:100,90:270,180:500,365:900'


class SettingError(Exception):
    """A setting is missing or malformed; the message names it, never its value."""


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
    panels_file: str = ''
    public_url: str = ''
    panels: tuple = ()  # PanelConfig of every panel, from PANELS_FILE or the XUI_* settings
    shop_name: str = texts.DEFAULT_SHOP_NAME
    texts: dict = field(default_factory=dict, hash=False, compare=False)  # the operator's TEXTS_FILE

    def plan(self, days):
        """Return the plan of that many days, or None."""
        return next((plan for plan in self.plans if plan.days == days), None)


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


def parse_ids(text):
    """Turn '1, 2,3' into a frozenset of ints."""
    return frozenset(int(part) for part in text.split(',') if part.strip())


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def http_url(text):
    if not text.startswith(('http://', 'https://')):
        raise ValueError(text)
    return text.rstrip('/')


def clock_time(text):
    hours, minutes = text.split(':')
    if not (0 <= int(hours) < 24 and 0 <= int(minutes) < 60) or len(minutes) != 2:
        raise ValueError(text)
    return f'{int(hours):02d}:{minutes}'


def shop_name(text):
    if not 1 <= len(text) <= 64:
        raise ValueError(text)
    return text


def texts_file(text):
    """Read the operator's texts file (a path relative to the bot's folder or absolute); '' means none."""
    if not text:
        return {}
    try:
        return texts.load_overrides(HERE / text)
    except ValueError as exc:
        raise SettingError(f'TEXTS_FILE: {exc}') from None


def load(environ=None):
    """Return the Settings, or raise SettingError naming the first bad one.

    :param environ: a mapping to read instead of the environment and .env.
    """
    if environ is None:
        dotenv = AutoConfig(search_path=str(HERE))
        lookup = lambda name, default: dotenv(name, default=default)
    else:
        lookup = environ.get

    def read(name, cast=str, default=None):
        raw = lookup(name, default)
        if raw is None or raw.strip() == '' and default is None:
            raise SettingError(f'{name} is not set (see .env.example)')
        if raw.strip() == '' and default == '':
            return ''  # optional and unset
        try:
            return cast(raw.strip())
        except (ValueError, InvalidOperation, ZoneInfoNotFoundError):
            raise SettingError(f'{name} is malformed (see .env.example)') from None

    panels_file = read('PANELS_FILE', default='')
    if panels_file:
        panels_file = str((HERE / panels_file).resolve())
    # PANELS_FILE replaces the XUI_* settings
    xui_default = '' if panels_file else None
    currency = read('CURRENCY', str.upper, 'RUB')
    api_token = read('XUI_API_TOKEN', default='')
    # With an API token the panel login is not needed.
    login_default = '' if api_token or panels_file else None
    settings = Settings(
        bot_token=read('BOT_TOKEN'),
        telegram_api_url=read('TELEGRAM_API_URL', http_url, 'https://api.telegram.org'),
        admin_ids=read('ADMIN_IDS', parse_ids, ''),
        database_url=read('DATABASE_URL', default=f'sqlite:///{HERE / "bot.db"}'),
        xui_url=read('XUI_URL', http_url, xui_default),
        xui_username=read('XUI_USERNAME', default=login_default),
        xui_password=read('XUI_PASSWORD', default=login_default),
        xui_api_token=api_token,
        xui_inbound_id=0 if panels_file else read('XUI_INBOUND_ID', positive_int),
        xui_sub_url=read('XUI_SUB_URL', http_url, xui_default),
        cryptopay_token=read('CRYPTOPAY_TOKEN'),
        cryptopay_url=read('CRYPTOPAY_URL', http_url, 'https://pay.crypt.bot'),
        channel_id=read('CHANNEL_ID', default=''),
        channel_url=read('CHANNEL_URL', default=''),
        trial_days=read('TRIAL_DAYS', positive_int, '3'),
        referral_bonus_days=read('REFERRAL_BONUS_DAYS', positive_int, '7'),
        plans=read('PLANS', lambda text: parse_plans(text, currency), DEFAULT_PLANS),
        currency=currency,
        support_contact=read('SUPPORT_CONTACT', default=''),
        backup_dir=read('BACKUP_DIR', lambda text: (HERE / text).resolve(), 'backups'),
        backup_keep_days=read('BACKUP_KEEP_DAYS', positive_int, '30'),
        backup_time=read('BACKUP_TIME', clock_time, '04:00'),
        payment_poll_seconds=read('PAYMENT_POLL_SECONDS', positive_int, '15'),
        invoice_expires_seconds=read('INVOICE_EXPIRES_SECONDS', positive_int, '3600'),
        timezone=read('TIMEZONE', ZoneInfo, 'Europe/Moscow'),
        worker_threads=read('WORKER_THREADS', positive_int, '16'),
        db_pool_size=read('DB_POOL_SIZE', positive_int, '20'),
        panels_file=panels_file,
        public_url=read('PUBLIC_URL', http_url, ''),
        shop_name=read('SHOP_NAME', shop_name, texts.DEFAULT_SHOP_NAME),
        texts=texts_file(str(lookup('TEXTS_FILE', '') or '').strip()),
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
