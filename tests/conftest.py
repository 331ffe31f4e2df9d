"""Shared fixtures: a real database (SQLite, or PostgreSQL when TEST_DATABASE_URL is set) and the loopback fakes."""
import os
import sys
from pathlib import Path

import pytest
import telebot
from telebot import apihelper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

import config  # noqa: E402
import models  # noqa: E402
from cryptobot import CryptoPayClient  # noqa: E402
from fake_cryptopay import FakeCryptoPay  # noqa: E402
from fake_telegram import FakeTelegram  # noqa: E402
from messenger import Messenger  # noqa: E402
from fake_xui import FakePanel  # noqa: E402
from shop import Shop  # noqa: E402
from xui import XuiClient  # noqa: E402

PG_URL = os.environ.get('TEST_DATABASE_URL', '')
BOT_TOKEN = '123456:TEST-token-not-real'
CRYPTOPAY_TOKEN = '4242:CRYPTO-test-token'
PANEL_USER, PANEL_PASSWORD = 'admin', 'panel-secret-pw'
# (connect, read) seconds for clients that expect the fakes to answer: room for a machine at load 8
# (2 cores), where a loopback answer can take seconds. Tests of hangs pass their own short timeouts.
TIMEOUT = (5, 10)


def database_url(tmp_path):
    """Return the database URL a test should use."""
    return PG_URL or f'sqlite:///{tmp_path / "test.db"}'


def clear_database():
    """Empty every table, so each test starts from nothing."""
    if models.is_sqlite():
        with models.db.atomic():
            for model in reversed(models.MODELS):
                if model is not models.SchemaVersion:
                    model.delete().execute()
    else:
        tables = ', '.join(model._meta.table_name for model in models.MODELS if model is not models.SchemaVersion)
        models.db.execute_sql(f'TRUNCATE {tables} RESTART IDENTITY CASCADE')


@pytest.fixture(autouse=True)
def fresh_prepared_sql():
    """Each test builds the prepared queries' SQL anew (models.prepared keeps it per process): a mutant inside
    a query's build (scripts/mutate.sh) is then run, not the SQL an earlier test in the process built."""
    models.forget_prepared()


@pytest.fixture
def database(tmp_path):
    """Bind the models to a fresh, empty real database and hold a connection for the test."""
    url = database_url(tmp_path)
    database = models.connect_database(url, pool_size=40)
    models.use_panels(['main'])  # set per process at start-up, like the database: a Shop of a test sets its own
    models.create_schema()
    with models.db.connection_context():
        clear_database()
    models.db.connect(reuse_if_open=True)
    yield url
    if not models.db.is_closed():
        models.db.close()
    if hasattr(database, 'close_all'):
        database.close_all()


@pytest.fixture
def panel():
    with FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD) as fake:
        yield fake


@pytest.fixture
def telegram():
    with FakeTelegram(token=BOT_TOKEN) as fake:
        yield fake


@pytest.fixture
def messenger(telegram):
    """A Messenger over an in-process TeleBot that talks to the fake Telegram."""
    apihelper.API_URL = telegram.url + '/bot{0}/{1}'
    return Messenger(telebot.TeleBot(BOT_TOKEN, threaded=False))


@pytest.fixture
def cryptopay():
    with FakeCryptoPay(token=CRYPTOPAY_TOKEN) as fake:
        yield fake


def settings_env(panel, cryptopay, database_url, **overrides):
    """Return the environment of settings that points the bot at the fakes."""
    env = {
        'BOT_TOKEN': BOT_TOKEN,
        'XUI_URL': panel.url, 'XUI_USERNAME': PANEL_USER, 'XUI_PASSWORD': PANEL_PASSWORD,
        'XUI_INBOUND_ID': str(panel.inbound_id), 'XUI_SUB_URL': 'https://vpn.example.test:2096/sub/',
        'CRYPTOPAY_TOKEN': CRYPTOPAY_TOKEN, 'CRYPTOPAY_URL': cryptopay.url,
        'DATABASE_URL': database_url, 'ADMIN_IDS': '900', 'CHANNEL_ID': '@spn_channel',
        'CHANNEL_URL': 'https://t.me/spn_channel', 'TIMEZONE': 'UTC',
        'HTTP_PORT': '0',  # the HTTP side is off unless a test asks for it (tests run side by side)
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


@pytest.fixture
def settings(panel, cryptopay, database):
    return config.load(settings_env(panel, cryptopay, database))


def make_shop(settings):
    """Build a Shop whose clients talk to the fakes, with short timeouts and tiny backoffs."""
    xui = XuiClient(settings.xui_url, settings.xui_inbound_id, settings.xui_sub_url,
                    username=settings.xui_username, password=settings.xui_password,
                    timeout=TIMEOUT, retries=1, backoff=0.01)
    crypto = CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, timeout=TIMEOUT, retries=1,
                             backoff=0.01)
    return Shop(settings, xui, crypto)


@pytest.fixture
def shop(settings):
    return make_shop(settings)


def pool_in_use():
    """Return how many pooled PostgreSQL connections are checked out now (SQLite has no pool: 0)."""
    return len(getattr(models.db.obj, '_in_use', {}))


def our_threads():
    """Return the live threads other than the loopback fakes' request threads (which may hang on purpose)."""
    import threading
    return {thread for thread in threading.enumerate() if 'process_request_thread' not in thread.name}


def wait_threads_back(before, timeout=10):
    """Wait until no thread is alive that was not in `before`; return the ones left."""
    import time
    deadline = time.monotonic() + timeout
    while (left := our_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def race_held_at_a_lock(before, after, ours):
    """Hold a race at a row lock (PostgreSQL only): another thread runs before() in a transaction it keeps
    open; ours() then runs on a thread of its own until it waits on a lock of that transaction (pg_locks shows
    a lock not granted); then the other thread runs after() and commits. Return what ours() returned."""
    import threading
    import time
    started, commit, outcome = threading.Event(), threading.Event(), []

    def other():
        with models.connection(), models.transaction():
            before()
            started.set()
            commit.wait(30)
            after()

    def mine():
        with models.connection():
            outcome.append(ours())

    threads = [threading.Thread(target=other), threading.Thread(target=mine)]
    threads[0].start()
    assert started.wait(30)
    threads[1].start()
    deadline = time.monotonic() + 30
    while not models.db.execute_sql('SELECT count(*) FROM pg_locks WHERE NOT granted').fetchone()[0]:
        assert time.monotonic() < deadline, 'ours never waited on the other transaction'
        time.sleep(0.01)
    commit.set()
    for thread in threads:
        thread.join(30)
    (result,) = outcome
    return result
