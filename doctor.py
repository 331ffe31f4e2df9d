"""`python bot.py check`: check every setting and outside service, and say in plain words what to fix.

Prints one line per check (OK, WARN, FAIL or SKIP, its name, what was found), then one fix line per
failure or warning. Every check runs under its own deadline, so the whole run answers within a
minute even when a service hangs. No secret (token, password, the database URL's password) is ever
printed. Run as root, it works as the owner of the bot's data folder, so the files it makes stay the
bot's; files it makes are private (0600).

`python doctor.py --update` is update.sh's gate: only what an update can break (settings, database
and its migrations, Telegram) must pass; the panel, Crypto Pay and the channel are shown as warnings.
"""
import ipaddress
import logging
from datetime import datetime
import os
import pwd
import sys
import tempfile
import threading
from collections import namedtuple
from urllib.parse import urlsplit

import requests
import telebot
from peewee import PeeweeException
from telebot import apihelper
from telebot.apihelper import ApiException, ApiTelegramException

import config
import models
import panels
from cryptobot import CryptoPayClient, CryptoPayError
from xui import XuiClient, XuiError, XuiLoginError

# Seconds each check may take before it counts as failed; they add up to well under a minute.
BUDGETS = {'database': 12, 'backups': 3, 'panel': 12, 'crypto pay': 8, 'telegram': 8, 'channel': 8}
# Connect just over 3 s (the first TCP retransmission), read 5 s: a healthy service answers in
# well under a second, and several calls must fit in one check's budget.
TIMEOUT = (3.05, 5)
# What an update can break: update.sh rolls back when one of these fails, and only then.
UPDATE_GATE = frozenset({'settings', 'database', 'backups', 'telegram'})

Result = namedtuple('Result', 'status name detail fix')


class Failure(Exception):
    """A check failed; detail says what was found, fix what the operator should do."""

    status = 'FAIL'

    def __init__(self, detail, fix):
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


class Warn(Failure):
    """The check passed, but something needs the operator's attention."""

    status = 'WARN'


def main(settings, budgets=BUDGETS, gate=None, placeholders=None):
    """Run every check, print the table and the fixes; return 0 if all passed, else 1.

    :param gate: names of the checks that must pass; the failures of the others are shown as warnings.
    :param placeholders: the settings still holding .env.example's placeholder (default: read them).
    """
    os.umask(0o077)  # the SQLite file and backups hold buyers' subIds: readable by the bot's user only
    if placeholders is None:
        placeholders = config.placeholders()
    working_as = become_owner(settings)
    secrets = secret_values(settings)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the table says it all; the clients' info lines would only clutter it
    try:
        results = run_checks(settings, budgets, placeholders)
    finally:
        root.setLevel(level)
    if gate is not None:
        results = [result._replace(status='WARN', detail=f'(not needed for the update) {result.detail}')
                   if result.status == 'FAIL' and result.name not in gate else result for result in results]
    if working_as:
        print(f'note: running as root: working as {working_as[0]}, the owner of {working_as[1]}, so the files made '
              'now stay the bot\'s\n')
    elif os.geteuid() == 0:
        print('note: running as root, so files made now (SQLite journal, backups) belong to root and the service '
              'cannot write them; run it as the bot\'s user: runuser -u vpnbot -- .venv/bin/python bot.py check\n')
    for result in results:
        print(redact(f'{result.status:<5} {result.name:<11} {result.detail}', secrets))
    failed = [result for result in results if result.status == 'FAIL']
    warned = [result for result in results if result.status == 'WARN']
    if failed or warned:
        print('\nHow to fix:')
        for result in failed + warned:
            print(redact(f'- {result.name}: {"(warning) " if result.status == "WARN" else ""}{result.fix}', secrets))
    also = f' ({len(warned)} warning{"" if len(warned) == 1 else "s"})' if warned else ''
    if failed:
        print(f'\n{len(failed)} of {len(results)} checks failed{also}.')
        return 1
    print(f'\nAll checks passed{also}.')
    return 0


def become_owner(settings):
    """Run as root? Switch to the owner of the bot's data folder; return (user, folder), or None.

    Files the checks make (the SQLite file and its journal, the backup folder) then belong to the
    service's user, as they must: root's files there would stop the bot.
    """
    if os.geteuid() != 0:
        return None
    database = config.sqlite_path(settings.database_url)
    folders = ([database.parent] if database else []) + [settings.backup_dir, settings.backup_dir.parent]
    for folder in folders:
        try:
            info = folder.stat()
        except OSError:
            continue
        if info.st_uid == 0:
            continue
        try:
            name = pwd.getpwuid(info.st_uid).pw_name
            os.initgroups(name, info.st_gid)
        except KeyError:
            name = f'uid {info.st_uid}'
            os.setgroups([])
        # modules the checks import lazily (datetime.strptime's _strptime, psycopg2's parts) come from the
        # interpreter's own folder, which the owner may not be able to read (a Python under /root): load them now
        import _strptime  # noqa: F401
        datetime.strptime('2000', '%Y')
        os.setgid(info.st_gid)
        os.setuid(info.st_uid)
        return name, folder
    return None


def run_checks(settings, budgets, placeholders=()):
    """Run the checks in order; return a Result for each."""
    if placeholders:
        names = ', '.join(placeholders)
        results = [Result('FAIL', 'settings', f'{names} still hold{"s" if len(placeholders) == 1 else ""} the '
                          'example\'s placeholder', f'replace the placeholder of {names} in .env with your own value '
                          '(.env.example says where each comes from), or empty the optional ones')]
    else:
        results = [Result('OK', 'settings', describe_settings(settings), '')]
    if not settings.admin_ids:
        results.append(Result('WARN', 'admins', 'none: ADMIN_IDS is empty, so nobody can use /stats, /give, '
                              '/newcode or /broadcast', 'put your Telegram user id in ADMIN_IDS (@userinfobot '
                              'tells you yours)'))
    results += plain_http(settings)
    for name, check, timeout_fix in [
            ('database', check_database, 'make sure the database server is up and reachable from here'),
            ('backups', check_backups, f'make {settings.backup_dir} writable by the bot user'),
            ('crypto pay', check_cryptopay, 'check CRYPTOPAY_URL and that this server can reach it'),
            ('telegram', check_telegram, 'check TELEGRAM_API_URL and that this server can reach Telegram')]:
        if name == 'crypto pay':  # every panel is checked before Crypto Pay, as one check each
            results.extend(panel_results(settings, budgets))
        results.append(run_one(name, lambda check=check: check(settings), budgets[name], timeout_fix))
    if settings.channel_id:
        if results[-1].status == 'OK':
            results.append(run_one('channel', lambda: check_channel(settings), budgets['channel'],
                                   'check that this server can reach Telegram'))
        else:
            results.append(Result('SKIP', 'channel', 'not checked: the telegram check failed', ''))
    return results


def run_one(name, check, seconds, timeout_fix):
    """Run check() in a thread for at most `seconds`; turn what happened into a Result."""
    outcome = {}

    def target():
        try:
            outcome['result'] = Result('OK', name, check(), '')
        except Failure as failure:
            outcome['result'] = Result(failure.status, name, failure.detail, failure.fix)
        except Exception as exc:  # the doctor must report any surprise, not crash on it
            outcome['result'] = Result('FAIL', name, f'unexpected {type(exc).__name__}: {exc}',
                                       'this looks like a bug; report it with this output')

    thread = threading.Thread(target=target, name=f'check-{name}', daemon=True)
    thread.start()
    thread.join(seconds)
    if 'result' not in outcome:
        return Result('FAIL', name, f'no answer within {seconds:g} s', timeout_fix)
    return outcome['result']


def describe_settings(settings):
    """Say which optional features the settings switch on."""
    admins = len(settings.admin_ids)
    parts = [
        f'gift on ({settings.channel_id}, {settings.trial_days} days)' if settings.channel_id else 'gift off',
        f'{admins} admin{"" if admins == 1 else "s"}' if admins else 'no admins (ADMIN_IDS is empty)',
        f'{len(settings.plans)} plans in {settings.currency}',
        f'referral bonus {settings.referral_bonus_days} days',
        'panel login by API token' if settings.xui_api_token else 'panel login by password',
        f'support {settings.support_contact}' if settings.support_contact else 'no support contact',
    ]
    return ', '.join(parts)


def plain_http(settings):
    """Return a WARN Result for each outside service reached by plain http:// on another machine."""
    results = []
    for name, url, what in [('XUI_URL', settings.xui_url, "the panel's password or API token"),
                            ('CRYPTOPAY_URL', settings.cryptopay_url, 'the Crypto Pay token'),
                            ('TELEGRAM_API_URL', settings.telegram_api_url, 'the bot token')]:
        host = urlsplit(url).hostname or ''
        if url.startswith('http://') and not is_loopback(host):
            results.append(Result('WARN', 'plain http', f'{name} is plain http:// to {host_of(url)}: {what} and '
                                  'buyers\' data cross the network unencrypted', f'use https:// in {name}'))
    return results


def is_loopback(host):
    if host == 'localhost' or host.endswith('.localhost'):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_database(settings):
    """Connect, create or migrate the tables, and try a write that is rolled back."""
    where = describe_database(settings.database_url)
    try:
        config.check_database_file(settings.database_url)
    except config.SettingError as exc:
        detail, _, fix = str(exc).partition('; fix: ')
        raise Failure(detail.removeprefix('DATABASE_URL: '), fix) from exc
    try:
        models.connect_database(settings.database_url, pool_size=2)
        models.create_schema()
        with models.db.connection_context():
            with models.db.atomic() as transaction:
                models.Gift.create(telegram_id=0, kind='doctor-check')
                transaction.rollback()
            users = models.User.select().count()
            applied = {row.version for row in models.SchemaVersion.select()}
    except (PeeweeException, ValueError, OSError) as exc:
        raise Failure(f'{where}: {type(exc).__name__}: {one_line(exc)}', database_fix(settings.database_url)) from exc
    missing = sorted({version for version, _ in models.MIGRATIONS} - applied)
    if missing:
        raise Failure(f'{where}: migrations {missing} are not applied', 'run the bot once, or update.sh, to migrate')
    found = f'{where}, schema version {max(applied, default=0)}, {users} users, write test passed'
    path = config.sqlite_path(settings.database_url)
    if path and path.exists() and path.stat().st_mode & 0o077:
        raise Warn(f'{found}; but others may read the file (mode {path.stat().st_mode & 0o777:04o})',
                       f'chmod 600 {path}: it holds the buyers\' subIds, their VPN credentials')
    return found


def describe_database(url):
    """Name the database without its user or password."""
    if url.startswith('sqlite:'):
        return 'SQLite ' + (url.split(':///', 1)[-1] or url)
    parts = urlsplit(url)
    port = f':{parts.port}' if parts.port else ''
    return f'PostgreSQL {parts.hostname}{port}{parts.path}'


def database_fix(url):
    if url.startswith('sqlite:'):
        return 'make sure the folder of the SQLite file exists and the bot user may write to it (DATABASE_URL)'
    return ('check DATABASE_URL (user, password, host, database name; Neon needs ?sslmode=require) '
            'and that the database server is reachable from here')


def check_backups(settings):
    """Make sure the backup folder exists and takes a file."""
    try:
        settings.backup_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=settings.backup_dir):
            pass
    except OSError as exc:
        raise Failure(f'cannot write to {settings.backup_dir}: {exc.strerror}',
                      f'create {settings.backup_dir} and let the bot user write to it, or set BACKUP_DIR') from exc
    return f'{settings.backup_dir} is writable, keeping {settings.backup_keep_days} days'


def panel_results(settings, budgets):
    """Check every enabled panel (one Result each) and that PANELS_FILE is private."""
    results = []
    if settings.panels_file and panels.readable_by_others(settings.panels_file):
        results.append(Result('FAIL', 'panels file', f'{settings.panels_file} is readable by every user of '
                              'this server, and it holds the panels\' passwords',
                              f'chmod 600 {settings.panels_file} (owned by the bot\'s user)'))
    for panel in settings.panels:
        name = 'panel' if not settings.panels_file else f'panel {panel.name}'
        if not panel.enabled:
            results.append(Result('SKIP', name, 'disabled in PANELS_FILE: never touched', ''))
            continue
        results.append(run_one(name, lambda panel=panel: check_panel(settings, panel), budgets['panel'],
                               'check the panel URL and that the panel is reachable from this server'))
    return results


def check_panel(settings, panel=None):
    """Log in to a 3x-ui panel, find the inbound, and ask its subscription server."""
    panel = panel or settings.panels[0]
    client = XuiClient(panel.url, panel.inbound_id, panel.sub_url,
                       username=panel.username or None, password=panel.password or None,
                       api_token=panel.api_token or None, timeout=TIMEOUT, retries=1, backoff=0.5)
    try:
        found = client.check()
    except XuiLoginError as exc:
        raise Failure(str(exc), login_fix(client)) from exc
    except XuiError as exc:
        raise Failure(str(exc), panel_fix(str(exc), settings)) from exc
    api = 'v3.1+ clients API' if found['generation'] == 'v3' else 'inbounds API (panel up to v3.0)'
    detail = f'{host_of(panel.url)}: {api}, inbound {found["inbound_id"]} ({found["protocol"]})'
    if settings.panels_file:
        detail += '; ' + check_sub_server(panel)
    return detail


def check_sub_server(panel):
    """Ask the panel's subscription server for a subId nobody has: it must answer (404 is the answer)."""
    try:
        response = requests.get(panel.sub_url + 'spn-doctor-probe', timeout=TIMEOUT, allow_redirects=False)
    except requests.RequestException as exc:
        raise Failure(f'its subscription server at {host_of(panel.sub_url)} does not answer '
                      f'({type(exc).__name__})', f'check sub_url of panel {panel.name!r}: the panel\'s Settings → '
                      'Subscription (listen port and URI path), and that it is enabled') from exc
    if response.status_code not in (200, 404):
        raise Failure(f'its subscription server answered HTTP {response.status_code}',
                      f'check sub_url of panel {panel.name!r}: the panel\'s Settings → Subscription')
    return f'subscription server at {host_of(panel.sub_url)} answers'


def login_fix(client):
    """Pick the fix for a refused login: ask the panel whether two-factor login is on (getTwoFactorEnable)."""
    try:
        two_factor = client.two_factor_enabled()
    except XuiError:
        two_factor = None
    if two_factor:
        return ('the panel has two-factor login on, which a bot cannot pass: set XUI_API_TOKEN (panel v3.0+: '
                'Settings → Security → API token) or turn two-factor login off')
    return 'set XUI_USERNAME and XUI_PASSWORD to the login you use on the panel\'s web page'


def panel_fix(message, settings):
    """Pick the fix for a panel failure from what went wrong."""
    if 'API token' in message:
        return ("set XUI_API_TOKEN to the token from the panel's Settings → Security → API token "
                '(or leave it empty and use XUI_USERNAME and XUI_PASSWORD)')
    if 'inbound' in message:
        return f'set XUI_INBOUND_ID to the id of the inbound for buyers (the panel\'s Inbounds list; now {settings.xui_inbound_id})'
    if 'secret path' in message or 'no route' in message:
        return 'set XUI_URL to the address you open the panel at, including its secret path'
    return 'check XUI_URL and that the panel is running and reachable from this server'


def check_cryptopay(settings):
    """Ask Crypto Pay who the app is."""
    with CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, timeout=TIMEOUT, retries=1,
                         backoff=0.5) as client:
        try:
            me = client.get_me()
        except CryptoPayError as exc:
            if exc.status == 401:
                raise Failure('the token was refused (401 UNAUTHORIZED)', cryptopay_token_fix(settings)) from exc
            raise Failure(str(exc), 'check CRYPTOPAY_URL and that this server can reach it') from exc
        network = ('TESTNET: payments are not real' if client.is_testnet
                   else f'mainnet via @{me.get("payment_processing_bot_username")}')
    return f'app "{me.get("name")}" on {network}'


def cryptopay_token_fix(settings):
    if 'testnet' in settings.cryptopay_url:
        return ('set CRYPTOPAY_TOKEN to a testnet token: @CryptoTestnetBot → Crypto Pay → Create App '
                '(a mainnet token does not work on testnet-pay.crypt.bot)')
    return ('set CRYPTOPAY_TOKEN to the token from @CryptoBot → Crypto Pay → Create App; '
            'a testnet token needs CRYPTOPAY_URL=https://testnet-pay.crypt.bot')


def telegram_bot(settings):
    """Return a TeleBot pointed at TELEGRAM_API_URL with the doctor's short timeouts."""
    apihelper.API_URL = settings.telegram_api_url + '/bot{0}/{1}'
    apihelper.CONNECT_TIMEOUT, apihelper.READ_TIMEOUT = TIMEOUT
    return telebot.TeleBot(settings.bot_token, threaded=False)


def check_telegram(settings):
    """Ask Telegram who the bot is."""
    try:
        me = telegram_bot(settings).get_me()
    except ApiTelegramException as exc:
        if exc.error_code == 401:
            raise Failure('the bot token was refused (401 Unauthorized)',
                          'set BOT_TOKEN to the token @BotFather gave you (/mybots → your bot → API Token)') from exc
        raise Failure(f'getMe failed: {exc.error_code} {exc.description}',
                      'check BOT_TOKEN and TELEGRAM_API_URL') from exc
    except (ApiException, requests.RequestException) as exc:
        raise Failure(f'cannot reach {host_of(settings.telegram_api_url)} ({type(exc).__name__})',
                      'check TELEGRAM_API_URL and that this server can reach Telegram') from exc
    return f'bot @{me.username} (id {me.id})'


def check_channel(settings):
    """Make sure the bot can see who joined the gift channel: it must be the channel's admin."""
    bot = telegram_bot(settings)
    channel = settings.channel_id
    admin_fix = (f'make the bot an admin of the channel {channel} (channel → Administrators → Add Admin); '
                 'Telegram shows channel members only to admins')
    try:
        me = bot.get_me()
        chat = bot.get_chat(channel)
    except ApiTelegramException as exc:
        raise Failure(f'cannot see {channel}: {exc.description}',
                      "set CHANNEL_ID to the channel's @username or its -100… id, and add the bot to it "
                      'as an admin; or leave CHANNEL_ID empty to switch the gift off') from exc
    except (ApiException, requests.RequestException) as exc:
        raise Failure(f'cannot reach {host_of(settings.telegram_api_url)} ({type(exc).__name__})',
                      'check that this server can reach Telegram') from exc
    try:
        status = bot.get_chat_member(chat.id, me.id).status
    except ApiTelegramException as exc:
        raise Failure(f'the bot cannot read the members of {channel}: {exc.description}', admin_fix) from exc
    except (ApiException, requests.RequestException) as exc:
        raise Failure(f'cannot reach {host_of(settings.telegram_api_url)} ({type(exc).__name__})',
                      'check that this server can reach Telegram') from exc
    if status != 'administrator':
        raise Failure(f'the bot is "{status}" in {channel}, not an administrator', admin_fix)
    return f'the bot is an admin of "{chat.title}" ({channel}), so the gift can check members'


def host_of(url):
    """Return host[:port] of a URL: its path may be a secret (the panel's web base path)."""
    parts = urlsplit(url)
    return f'{parts.hostname}:{parts.port}' if parts.port else str(parts.hostname)


def one_line(exc):
    return ' '.join(str(exc).split())


def secret_values(settings):
    """Return every setting value that must never be printed."""
    password = urlsplit(settings.database_url).password if '@' in settings.database_url else None
    values = [settings.bot_token, settings.bot_token.partition(':')[2], settings.xui_password,
              settings.xui_api_token, settings.cryptopay_token, password] + [
        secret for panel in settings.panels for secret in panel.secrets]
    return [value for value in values if value and len(value) >= 4]


def redact(text, secrets):
    """Replace every secret in text with ***."""
    for secret in secrets:
        text = text.replace(secret, '***')
    return text


def command_line(argv):
    """`python doctor.py [--update]`: the doctor outside bot.py; --update gates on UPDATE_GATE only."""
    import bot
    try:
        settings = config.load()
    except config.SettingError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    bot.setup_logging(bot.secrets_of(settings))
    return main(settings, gate=UPDATE_GATE if '--update' in argv[1:] else None)


if __name__ == '__main__':
    sys.exit(command_line(sys.argv))
