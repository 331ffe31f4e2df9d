"""Settings: each one checked for its form, with a message that names it, says what is expected and never
echoes the value; `python bot.py` and `python bot.py check` end with that one line, never a traceback."""
import os
import string
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

import admin
import bot
import config
import doctor
from conftest import ROOT

GOOD = {
    'BOT_TOKEN': '123456:TEST-token-not-real', 'XUI_URL': 'https://panel.example.test:2053/secretpath',
    'XUI_USERNAME': 'admin', 'XUI_PASSWORD': 'panel-secret-pw', 'XUI_INBOUND_ID': '1',
    'XUI_SUB_URL': 'https://panel.example.test:2096/sub/', 'CRYPTOPAY_TOKEN': '4242:CRYPTO-test-token',
    'DATABASE_URL': 'sqlite:///spn-config-test.db', 'TIMEZONE': 'UTC',
}

# setting, bad value, words the message must hold (besides the setting's name)
BAD = [
    ('BOT_TOKEN', '123456:TEST token-not-real', ['space', 'like 123456789:']),
    ('BOT_TOKEN', '"123456:TEST-token-not-real', ['quote']),
    ('BOT_TOKEN', '123456TEST-token-not-real', ['digits, a colon', '@BotFather']),
    ('DATABASE_URL', 'bot.db', ['sqlite:///bot.db', 'postgresql://']),
    ('DATABASE_URL', 'mysql://shop:db-secret-pw@127.0.0.1/shop', ['mysql', 'does not support']),
    ('DATABASE_URL', 'postgresql://shop:db-secret-pw@127.0.0.1:99999/shop', ['port']),
    ('CHANNEL_ID', 'my channel', ['@username', '-100']),
    ('CHANNEL_ID', 'https://t.me/+AbCdEf123', ['invite link', 'id']),
    ('CURRENCY', 'RUR', ['Crypto Pay', 'like RUB']),
    ('CURRENCY', 'USDT', ['fiat']),
    ('TIMEZONE', 'UTC+3', ['IANA', 'Etc/GMT-3']),
    ('TIMEZONE', 'Moscow', ['IANA', 'Europe/Moscow']),
    ('XUI_URL', 'panel.example.test:2053/secretpath', ['scheme', 'https://']),
    ('XUI_SUB_URL', 'https://', ['scheme', 'like https://']),
    ('CRYPTOPAY_URL', 'ftp://pay.crypt.bot', ['like https://pay.crypt.bot']),
    ('TRIAL_DAYS', '0', ['from 1 to']),
    ('TRIAL_DAYS', '3 days', ['whole number']),
    ('INVOICE_EXPIRES_SECONDS', '9999999', ['from 1 to 2678400']),
    ('XUI_INBOUND_ID', '-1', ['whole number']),
    ('ADMIN_IDS', '@admin', ['user ids', '@userinfobot']),
    ('BACKUP_TIME', '25:00', ['HH:MM']),
    ('WORKER_THREADS', '100000', ['from 1 to']),
    ('XUI_API_TOKEN', 'two words', ['API token']),
]


def load(**overrides):
    return config.load({**GOOD, **overrides})


@pytest.mark.parametrize('name, value, words', BAD, ids=[f'{name}={value}' for name, value, _ in BAD])
def test_a_bad_value_gets_one_line_naming_the_setting(name, value, words):
    with pytest.raises(config.SettingError) as raised:
        load(**{name: value})

    message = str(raised.value)
    assert message.startswith(name + ' ') and '\n' not in message
    for word in words:
        assert word in message, message
    assert 'db-secret-pw' not in message and 'token-not-real' not in message and 'AbCdEf' not in message
    if name in SECRET_SETTINGS and '://' in value:
        assert value not in message


@pytest.mark.parametrize('value, expected', [
    ('https://t.me/my_vpn_channel', '@my_vpn_channel'), ('t.me/my_vpn_channel/', '@my_vpn_channel'),
    ('@my_vpn_channel', '@my_vpn_channel'), ('-1001234567890', '-1001234567890'),
])
def test_channel_links_become_usernames(value, expected):
    assert load(CHANNEL_ID=value).channel_id == expected


@pytest.mark.parametrize('url', ['postgres://shop:pw@db.example.test/shop', 'postgresql://shop:pw@db.example.test:5432/shop?sslmode=require',
                                 'sqlite:///bot.db', 'sqlite:////var/lib/vpn-bot/bot.db'])
def test_database_urls_we_take(url):
    assert load(DATABASE_URL=url).database_url == url


def test_good_values_keep_their_meaning():
    settings = load(CURRENCY='usd', ADMIN_IDS=' 1, 22 ,', BACKUP_TIME='4:05', XUI_URL='https://p.example.test/x/')
    assert settings.currency == 'USD' and settings.admin_ids == {1, 22} and settings.backup_time == '04:05'
    assert settings.xui_url == 'https://p.example.test/x'


def run_bot(tmp_path, *args, **overrides):
    env = {key: value for key, value in os.environ.items() if key not in config.PLACEHOLDER_SETTINGS}
    env.update({**GOOD, 'DATABASE_URL': f'sqlite:///{tmp_path}/bot.db', 'BACKUP_DIR': str(tmp_path / 'backups'),
                **overrides})
    return subprocess.run([sys.executable, 'bot.py', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize('command', [[], ['check']], ids=['bot.py', 'bot.py check'])
@pytest.mark.parametrize('name, value', [
    ('BOT_TOKEN', '123456:TEST token-not-real'), ('BOT_TOKEN', "123456:'TEST-token-not-real"),
    ('BOT_TOKEN', 'TEST-token-not-real'), ('DATABASE_URL', 'bot.db'),
    ('DATABASE_URL', 'mysql://shop:db-secret-pw@127.0.0.1/shop'), ('TIMEZONE', 'UTC+3'),
])
def test_the_bot_and_the_doctor_end_with_one_line(tmp_path, command, name, value):
    done = run_bot(tmp_path, *command, **{name: value})

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == '' and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f'error: {name} ')
    assert 'token-not-real' not in done.stderr and 'db-secret-pw' not in done.stderr


SETTINGS = sorted(set(GOOD) | {'TELEGRAM_API_URL', 'ADMIN_IDS', 'XUI_API_TOKEN', 'CRYPTOPAY_URL', 'CHANNEL_ID',
                               'CHANNEL_URL', 'TRIAL_DAYS', 'REFERRAL_BONUS_DAYS', 'PLANS', 'CURRENCY',
                               'SUPPORT_CONTACT', 'BACKUP_DIR', 'BACKUP_KEEP_DAYS', 'BACKUP_TIME',
                               'PAYMENT_POLL_SECONDS', 'INVOICE_EXPIRES_SECONDS', 'WORKER_THREADS', 'DB_POOL_SIZE',
                               'SHOP_NAME', 'TEXTS_FILE', 'PANELS_FILE', 'PUBLIC_URL', 'RECONCILE_TIME',
                               'OUTAGE_ALERT_MINUTES', 'STARS_PLANS', 'HTTP_HOST', 'HTTP_PORT', 'WEBHOOK_URL',
                               'WEBHOOK_SECRET', 'STARS_RECURRING'})
SECRET_SETTINGS = {'BOT_TOKEN', 'XUI_PASSWORD', 'XUI_API_TOKEN', 'CRYPTOPAY_TOKEN', 'DATABASE_URL', 'XUI_URL'}
# text an operator's editor or a copy from a web page can put in a value
values = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=string.printable, max_size=60),
    st.sampled_from(['', ' ', '0', '-1', '1e3', '٣', '99999999999999999999', 'https://', 'http://[::1', 'sqlite://',
                     'postgres://', '@', '-100', 't.me/', 'UTC+3', '../../etc/passwd', 'a' * 300, '\x00', '"', "'"]),
)


def test_settings_are_all_fuzzed():
    assert set(SETTINGS) == code_settings()


@hypothesis_settings(max_examples=int(os.environ.get('FUZZ_EXAMPLES', 300)), deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(SETTINGS), value=values)
def test_no_value_of_any_setting_crashes(name, value):
    try:
        settings = load(**{name: value})
    except config.SettingError as exc:
        message = str(exc)
        assert message.startswith((name + ' ', name + ':')) and '\n' not in message
        if name in SECRET_SETTINGS and len(value.strip()) >= 12:  # shorter ones turn up in the examples
            assert value.strip() not in message
        return
    # what start-up and the doctor do with settings before they reach the network
    bot.secrets_of(settings)
    secrets = doctor.secret_values(settings)
    doctor.redact(doctor.describe_settings(settings), secrets)
    doctor.describe_database(settings.database_url)
    for url in [settings.xui_url, settings.xui_sub_url, settings.cryptopay_url, settings.telegram_api_url]:
        doctor.host_of(url)
    config.check_database_file(settings.database_url)


# scripts/run.sh (issue 10, item 1)

RUN_FILES = [path.name for path in ROOT.glob('*.py')] + ['requirements.txt', 'requirements.lock', '.env.example',
                                                        'scripts/run.sh']


@pytest.fixture
def checkout(tmp_path):
    """A checkout of the project that shares this venv (run.sh keeps an existing one)."""
    import shutil
    folder = tmp_path / 'checkout'
    (folder / 'scripts').mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(ROOT / name, folder / name)
    (folder / '.venv').symlink_to(ROOT / '.venv')
    return folder


def run_sh(folder, timeout=120, **env):
    clean = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    return subprocess.run(['bash', 'scripts/run.sh'], cwd=folder, env={**clean, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_run_sh_makes_env_and_stops_with_the_next_step(checkout):
    try:
        done = run_sh(checkout, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail('run.sh ran the bot on the placeholders')

    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and 'Traceback' not in done.stderr, done.stderr
    assert 'Created .env' in done.stderr and 'scripts/run.sh' in done.stderr
    assert (checkout / '.env').read_text() == (ROOT / '.env.example').read_text()
    assert (checkout / '.env').stat().st_mode & 0o777 == 0o600


def test_run_sh_refuses_placeholders_and_bad_settings(checkout):
    (checkout / '.env').write_text((ROOT / '.env.example').read_text())
    done = run_sh(checkout, timeout=90)

    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert 'BOT_TOKEN' in done.stderr and 'placeholder' in done.stderr

    (checkout / '.env').write_text('BOT_TOKEN=12345 6:abc\n')
    done = run_sh(checkout, timeout=90)
    assert done.returncode == 2 and done.stderr.startswith('error: BOT_TOKEN '), done.stderr


def test_run_sh_runs_a_filled_env(checkout, panel, cryptopay, telegram, tmp_path):
    import time
    from conftest import settings_env
    env = settings_env(panel, cryptopay, f'sqlite:///{tmp_path}/bot.db', TELEGRAM_API_URL=telegram.url,
                       BACKUP_DIR=tmp_path / 'backups')
    (checkout / '.env').write_text(''.join(f'{name}={value}\n' for name, value in env.items()))
    clean = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    process = subprocess.Popen(['bash', 'scripts/run.sh'], cwd=checkout, env=clean, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while telegram.counts.get('getUpdates', 0) == 0 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert telegram.counts.get('getUpdates', 0) > 0, output


# operator docs (issue 10, item 14): the reference names every command and setting the code has, and no other

REFERENCES = ['docs/COMMANDS_REFERENCE.md', 'docs/COMMANDS_REFERENCE.en.md']


def code_settings():
    import re
    return set(re.findall(r"(?:read|lookup)\('([A-Z_]+)'", (ROOT / 'config.py').read_text()))


def code_commands():
    """Every /command the bot answers: the buyer's (bot.ShopBot.on_command) and the admins' (admin.ADMIN_COMMANDS)."""
    import inspect
    import re
    source = inspect.getsource(bot.ShopBot.on_command)
    buyer = set(re.findall(r"command == '(\w+)'", source))
    for group in re.findall(r"command in \(([^)]*)\)", source):
        buyer |= set(re.findall(r"'(\w+)'", group))
    return buyer | set(admin.ADMIN_COMMANDS)


@pytest.mark.parametrize('path', REFERENCES)
def test_the_reference_lists_every_setting_and_command(path):
    import re
    text = (ROOT / path).read_text()
    settings = set(re.findall(r'^\| `([A-Z][A-Z0-9_]+)`', text, re.MULTILINE))
    commands = set(re.findall(r'^\| `/(\w+)', text, re.MULTILINE))

    assert settings == code_settings(), (f'{path}: add {sorted(code_settings() - settings)}, '
                                         f'drop {sorted(settings - code_settings())}')
    assert commands == code_commands(), (f'{path}: add {sorted(code_commands() - commands)}, '
                                         f'drop {sorted(commands - code_commands())}')


def test_operator_docs_come_in_russian_and_english():
    import re
    for name in ['QUICK_START', 'HOSTING', 'COMMANDS_REFERENCE']:
        russian, english = (ROOT / f'docs/{name}.md').read_text(), (ROOT / f'docs/{name}.en.md').read_text()
        assert re.search('[а-яА-Я]{20,}', russian.replace(' ', '')) and f'{name}.en.md' in russian
        assert not re.search('[а-яА-Я]', english.replace('[Русская версия]', '')) and f'({name}.md)' in english
    for text in [(ROOT / 'README.md').read_text()] + [path.read_text() for path in (ROOT / 'docs').rglob('*.md')]:
        for link in re.findall(r'\]\(([^)#]+\.md)', text):
            assert link.startswith('http') or any((folder / link).exists() for folder in [ROOT, ROOT / 'docs',
                                                                                         ROOT / 'docs' / 'dev']), link
