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
    def run(panel=panel, cryptopay=cryptopay, telegram=telegram, database=database, prepare=None, **overrides):
        overrides.setdefault('BACKUP_DIR', tmp_path / 'backups')
        if database.startswith('sqlite:///') and os.path.exists(database[len('sqlite:///'):]):
            os.chmod(database[len('sqlite:///'):], 0o600)  # as the bot makes it; the fixture's is 0644
        if prepare:
            prepare()
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


# placeholders, admins and plain http (issue 10, items 4 and 13)


def example_values():
    from decouple import RepositoryEnv
    return RepositoryEnv(str(ROOT / '.env.example')).data


def test_placeholders_from_the_example_fail(check):
    example = example_values()
    code, output = check(BOT_TOKEN=example['BOT_TOKEN'], CRYPTOPAY_TOKEN=example['CRYPTOPAY_TOKEN'],
                         CHANNEL_ID='@your_channel', SUPPORT_CONTACT='@your_support', ADMIN_IDS='111111111,222222222')

    assert code == 1
    assert line(output, 'settings').startswith('FAIL'), output
    for name in ['BOT_TOKEN', 'CRYPTOPAY_TOKEN', 'CHANNEL_ID', 'SUPPORT_CONTACT', 'ADMIN_IDS']:
        assert name in line(output, 'settings')
    assert 'placeholder' in fix(output, 'settings')


def test_no_admin_is_a_warning(check):
    code, output = check(ADMIN_IDS='')

    assert code == 0, output
    assert line(output, 'admins').startswith('WARN') and 'ADMIN_IDS' in line(output, 'admins')


def test_a_database_file_others_may_read_is_a_warning(check, database):
    if not database.startswith('sqlite:'):
        pytest.skip('a SQLite file')
    path = database[len('sqlite:///'):]

    code, output = check(database=database, prepare=lambda: os.chmod(path, 0o644))

    assert code == 0, output
    assert line(output, 'database').startswith('WARN') and 'mode 0644' in line(output, 'database')
    assert f'chmod 600 {path}' in fix(output, 'database')


def test_the_example_has_no_real_admin_ids():
    assert example_values()['ADMIN_IDS'] == ''


@pytest.mark.parametrize('overrides, warned', [
    ({'XUI_URL': 'http://panel.example.test:2053/secret'}, ['XUI_URL']),
    ({'CRYPTOPAY_URL': 'http://pay.example.test', 'TELEGRAM_API_URL': 'http://10.0.0.5:8081'},
     ['CRYPTOPAY_URL', 'TELEGRAM_API_URL']),
    ({'XUI_URL': 'http://127.0.0.1:2053/secret', 'TELEGRAM_API_URL': 'http://localhost:8081'}, []),
    ({'XUI_URL': 'https://panel.example.test/secret'}, []),
])
def test_plain_http_to_another_host_is_warned(overrides, warned):
    env = {'BOT_TOKEN': BOT_TOKEN, 'XUI_URL': 'https://panel.example.test/s', 'XUI_USERNAME': 'a', 'XUI_PASSWORD': 'b',
           'XUI_INBOUND_ID': '1', 'XUI_SUB_URL': 'https://panel.example.test/sub', 'CRYPTOPAY_TOKEN': CRYPTOPAY_TOKEN,
           **overrides}
    results = doctor.plain_http(config.load(env))

    assert [name for name in warned if any(name in result.detail for result in results)] == warned
    assert bool(results) == bool(warned)
    assert all(result.status == 'WARN' and '/secret' not in result.detail for result in results)


# files made by the wrong user (issue 10, item 5)

OTHER_USER = 'nobody'


@pytest.fixture
def shop_folder():
    """A folder like a deployed one: the bot user owns data/ and backups/; everyone may read the path."""
    import pwd
    import shutil
    import tempfile
    if os.geteuid() != 0:
        pytest.skip('needs root to play two users')
    folder = tempfile.mkdtemp(prefix='spn-owner-')
    os.chmod(folder, 0o755)
    user = pwd.getpwnam(OTHER_USER)
    for name in ['data', 'backups']:
        os.mkdir(os.path.join(folder, name), 0o700)
        os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid)
    yield folder
    shutil.rmtree(folder)


def owners(folder):
    import pwd
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            info = os.stat(path)
            found[os.path.relpath(path, folder)] = (pwd.getpwuid(info.st_uid).pw_name, oct(info.st_mode & 0o777))
    return found


def test_the_doctor_as_root_makes_files_only_as_the_folders_owner(check, shop_folder):
    code, output = check(database=f'sqlite:///{shop_folder}/data/bot.db', BACKUP_DIR=f'{shop_folder}/backups')

    assert code == 0, output
    found = owners(shop_folder)
    assert found['data/bot.db'] == (OTHER_USER, '0o600'), found
    assert {owner for owner, _ in found.values()} == {OTHER_USER}, found
    assert f'working as {OTHER_USER}' in output


def user_python():
    """Return an interpreter the other user may run (the venv's may live under /root) and its PYTHONPATH."""
    import sysconfig
    for candidate in [sys.executable, '/usr/bin/python3.11', '/usr/bin/python3']:
        done = subprocess.run(['runuser', '-u', OTHER_USER, '--', candidate, '-c', 'import sys; print(sys.version_info[:2])'],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate, sysconfig.get_paths()['purelib']
    pytest.skip(f'no Python {sys.version_info[:2]} that {OTHER_USER} may run')


def as_user(command, env, timeout=60):
    python, packages = user_python()
    return subprocess.run(['runuser', '-u', OTHER_USER, '--', python, 'bot.py', *command], cwd=ROOT,
                          env={**env, 'PYTHONPATH': packages}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('command', [[], ['check']], ids=['bot.py', 'bot.py check'])
def test_a_database_the_bot_cannot_write_stops_it_with_one_line(shop_folder, panel, cryptopay, telegram, command):
    database = f'{shop_folder}/data/bot.db'
    import models
    models.connect_database(f'sqlite:///{database}').close()
    models.create_schema()  # made by root, as `bot.py check` run as root used to leave it
    models.db.close()
    os.chmod(database, 0o644)
    env = {**os.environ, **settings_env(panel, cryptopay, f'sqlite:///{database}', TELEGRAM_API_URL=telegram.url,
                                        BACKUP_DIR=f'{shop_folder}/backups')}

    try:
        done = as_user(command, env, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail('the bot started on a database it cannot write')

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count('\n') == 1 and 'Traceback' not in done.stderr
    assert f'{database} belongs to root' in done.stderr and f'runs as {OTHER_USER}' in done.stderr
    assert f'chown {OTHER_USER}:' in done.stderr


def test_the_bot_makes_its_sqlite_files_private(tmp_path, panel, cryptopay, telegram):
    import time
    database = tmp_path / 'bot.db'
    env = {**os.environ, **settings_env(panel, cryptopay, f'sqlite:///{database}', TELEGRAM_API_URL=telegram.url,
                                        BACKUP_DIR=tmp_path / 'backups')}
    process = subprocess.Popen([sys.executable, 'bot.py'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while telegram.counts.get('getUpdates', 0) == 0 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]

    assert telegram.counts.get('getUpdates', 0) > 0, output
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.glob('bot.db*')}
    assert modes and set(modes.values()) == {'0o600'}, modes
