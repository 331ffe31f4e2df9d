"""`python bot.py check` against the loopback panel, Crypto Pay and Telegram: what it finds and what it says to fix."""
import os
import subprocess
import sys

import pytest

import config
import doctor
from conftest import BOT_TOKEN, CRYPTOPAY_TOKEN, PANEL_PASSWORD, PANEL_USER, ROOT, settings_env
from fake_cryptopay import FakeCryptoPay
from fake_telegram import FakeTelegram
from fake_xui import FakePanel

CHANNEL = -1001234567890
BOT_ID = int(BOT_TOKEN.split(':')[0])
WRONG_PASSWORD = 'wrong-panel-pw-42'
WRONG_CRYPTO_TOKEN = '9999:WRONG-crypto-token'
WRONG_BOT_TOKEN = '123456:WRONG-bot-token-zz'
DB_PASSWORD = 'db-secret-pw-77'
SECRETS = [BOT_TOKEN, BOT_TOKEN.split(':')[1], PANEL_PASSWORD, CRYPTOPAY_TOKEN, WRONG_PASSWORD,
           WRONG_CRYPTO_TOKEN, WRONG_BOT_TOKEN, WRONG_BOT_TOKEN.split(':')[1], DB_PASSWORD]


@pytest.fixture
def telegram():
    """A Bot API server where our bot is an admin of the gift channel @spn_channel."""
    with FakeTelegram(token=BOT_TOKEN, username='spn_shop_bot') as fake:
        fake.add_chat(CHANNEL, title='SPN Channel', username='spn_channel')
        fake.set_member(CHANNEL, BOT_ID, 'administrator')
        yield fake


@pytest.fixture
def check(panel, cryptopay, telegram, database, tmp_path):
    """Return run(**settings) -> (exit code, output) that runs `python bot.py check` against the fakes."""
    def run(panel=panel, cryptopay=cryptopay, telegram=telegram, database=database, **overrides):
        overrides.setdefault('BACKUP_DIR', tmp_path / 'backups')
        env = {**os.environ, **settings_env(panel, cryptopay, database, TELEGRAM_API_URL=telegram.url, **overrides)}
        done = subprocess.run([sys.executable, 'bot.py', 'check'], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        output = done.stdout + done.stderr
        for secret in SECRETS:
            assert secret not in output, f'a secret was printed:\n{output}'
        return done.returncode, output
    return run


def line(output, name):
    """Return the table line of one check."""
    [found] = [text for text in output.splitlines() if text[6:].startswith(name + ' ')]
    return found


def fix(output, name):
    [found] = [text for text in output.splitlines() if text.startswith(f'- {name}: ')]
    return found


def test_everything_ok(check, telegram):
    code, output = check()

    assert code == 0, output
    assert line(output, 'settings').startswith('OK')
    assert 'gift on (@spn_channel, 3 days)' in line(output, 'settings')
    assert '1 admin' in line(output, 'settings')
    assert line(output, 'database').startswith('OK') and 'write test passed' in line(output, 'database')
    assert line(output, 'backups').startswith('OK')
    assert line(output, 'panel').startswith('OK') and 'v3.1+' in line(output, 'panel')
    assert 'inbound 1 (vless)' in line(output, 'panel')
    assert line(output, 'crypto pay').startswith('OK') and 'mainnet via @CryptoBot' in line(output, 'crypto pay')
    assert line(output, 'telegram').startswith('OK') and '@spn_shop_bot' in line(output, 'telegram')
    assert line(output, 'channel').startswith('OK') and 'SPN Channel' in line(output, 'channel')
    assert 'How to fix' not in output and 'All checks passed.' in output
    assert ('running as root' in output) == (os.geteuid() == 0)  # root would own the files it makes
    assert telegram.counts['getChatMember'] == 1


def test_gift_off_skips_the_channel_and_testnet_is_named(check):
    with FakeCryptoPay(token=CRYPTOPAY_TOKEN, testnet=True) as testnet:
        code, output = check(cryptopay=testnet, CHANNEL_ID='', ADMIN_IDS='')

    assert code == 0, output
    assert 'gift off' in line(output, 'settings') and 'no admins' in line(output, 'settings')
    assert 'TESTNET' in line(output, 'crypto pay')
    assert 'channel' not in [text[6:].split(' ')[0] for text in output.splitlines()]


def test_wrong_panel_password(check):
    code, output = check(XUI_PASSWORD=WRONG_PASSWORD)

    assert code == 1
    assert line(output, 'panel').startswith('FAIL')
    assert 'Invalid username or password or two-factor code.' in line(output, 'panel')  # the panel's own words
    assert 'XUI_USERNAME and XUI_PASSWORD' in fix(output, 'panel')
    assert line(output, 'crypto pay').startswith('OK') and line(output, 'telegram').startswith('OK')
    assert '1 of 7 checks failed.' in output


def test_two_factor_panel_login_names_the_way_out(check):
    with FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD, two_factor=True) as panel:
        code, output = check(panel=panel)

    assert code == 1
    assert 'Invalid username or password or two-factor code.' in line(output, 'panel')
    assert 'two-factor login on' in fix(output, 'panel') and 'XUI_API_TOKEN' in fix(output, 'panel')
    assert panel.count('POST getTwoFactorEnable') == 1


def test_wrong_panel_api_token(check):
    with FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD, api_token='right-api-token') as panel:
        code, output = check(panel=panel, XUI_API_TOKEN=WRONG_PASSWORD)

    assert code == 1
    assert line(output, 'panel').startswith('FAIL')
    assert 'Settings → Security → API token' in fix(output, 'panel')


def test_wrong_inbound_on_an_old_panel(check):
    with FakePanel(generation='legacy', username=PANEL_USER, password=PANEL_PASSWORD) as panel:
        code, output = check(panel=panel, XUI_INBOUND_ID=7)

    assert code == 1
    assert 'no inbound 7' in line(output, 'panel')
    assert 'XUI_INBOUND_ID' in fix(output, 'panel')


def test_unreachable_panel(check):
    panel = FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD).start()
    panel.stop()  # nothing listens on its port any more

    code, output = check(panel=panel)

    assert code == 1
    assert 'cannot connect' in line(output, 'panel')
    assert 'XUI_URL' in fix(output, 'panel')


def test_wrong_cryptopay_token(check):
    code, output = check(CRYPTOPAY_TOKEN=WRONG_CRYPTO_TOKEN)

    assert code == 1
    assert line(output, 'crypto pay').startswith('FAIL') and '401' in line(output, 'crypto pay')
    assert '@CryptoBot → Crypto Pay → Create App' in fix(output, 'crypto pay')
    assert line(output, 'panel').startswith('OK')


def test_bot_is_a_plain_member_of_the_channel(check, telegram):
    telegram.set_member(CHANNEL, BOT_ID, 'member')

    code, output = check()

    assert code == 1
    assert line(output, 'channel').startswith('FAIL') and 'not an administrator' in line(output, 'channel')
    assert 'make the bot an admin of the channel @spn_channel' in fix(output, 'channel')
    assert line(output, 'telegram').startswith('OK')


def test_bot_cannot_see_the_channel_members(check):
    with FakeTelegram(token=BOT_TOKEN) as telegram:
        telegram.add_chat(CHANNEL, username='spn_channel', members_visible=False)
        code, output = check(telegram=telegram)

    assert code == 1
    assert 'member list is inaccessible' in line(output, 'channel')
    assert 'make the bot an admin of the channel' in fix(output, 'channel')


def test_unknown_channel(check):
    code, output = check(CHANNEL_ID='@no_such_channel')

    assert code == 1
    assert 'chat not found' in line(output, 'channel')
    assert 'CHANNEL_ID' in fix(output, 'channel')


def test_wrong_bot_token_skips_the_channel(check):
    code, output = check(BOT_TOKEN=WRONG_BOT_TOKEN)

    assert code == 1
    assert line(output, 'telegram').startswith('FAIL') and '401' in line(output, 'telegram')
    assert '@BotFather' in fix(output, 'telegram')
    assert line(output, 'channel').startswith('SKIP')


@pytest.mark.parametrize('url, advice', [
    (f'postgresql://spn:{DB_PASSWORD}@127.0.0.1:9/spn', 'sslmode=require'),
    ('sqlite:////nonexistent-folder/spn/bot.db', 'folder of the SQLite file'),
])
def test_unreachable_database(check, url, advice):
    code, output = check(database=url)

    assert code == 1
    assert line(output, 'database').startswith('FAIL')
    assert advice in fix(output, 'database')
    assert line(output, 'panel').startswith('OK')


def test_a_hanging_service_fails_its_check_at_the_deadline(database):
    with FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD) as panel:
        settings = config.load(settings_env(panel, panel, database))
        panel.hang_next(5, seconds=3)

        result = doctor.run_one('panel', lambda: doctor.check_panel(settings), 0.5, 'is the panel up?')

    assert result == ('FAIL', 'panel', 'no answer within 0.5 s', 'is the panel up?')
