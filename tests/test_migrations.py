"""Upgrading a wave-1 database (built by the wave-1 models, frozen in tests/wave1/) to today's schema."""
import importlib.util
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from peewee import IntegrityError

import models
from conftest import database_url

NOW = datetime(2026, 11, 30, 12, 0, 0)
WAVE1 = Path(__file__).resolve().parent / 'wave1' / 'models.py'


def load_wave1():
    spec = importlib.util.spec_from_file_location('wave1_models', WAVE1)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drop_everything():
    """Leave the test database without any of our tables (PostgreSQL is shared by the whole run)."""
    with models.db.connection_context():
        tables = [name for name in models.db.get_tables()]
        for name in tables:
            models.db.execute_sql(f'DROP TABLE IF EXISTS "{name}" CASCADE' if not models.is_sqlite()
                                  else f'DROP TABLE IF EXISTS "{name}"')


@pytest.fixture
def wave1(tmp_path):
    """A wave-1 database with buyers in every panel state; yields (url, {telegram_id: wave-1 user row})."""
    url = database_url(tmp_path)
    current = models.connect_database(url, pool_size=4)
    drop_everything()
    old = load_wave1()
    old_db = old.connect_database(url, pool_size=4)
    old.create_schema()
    with old.db.connection_context():
        synced = old.User.create(telegram_id=1, panel_email='spn-1', panel_uuid='uuid-1')
        old.grant_days(synced.id, 30, 'payment', 101, now=NOW)
        old.User.update(panel_dirty=False).where(old.User.id == synced.id).execute()
        waiting = old.User.create(telegram_id=2, panel_email='spn-2')
        old.grant_days(waiting.id, 7, 'promo', 1, now=NOW)
        old.User.update(panel_failures=6, panel_retry_at=NOW + timedelta(minutes=1), panel_alerted=True).where(
            old.User.id == waiting.id).execute()
        old.User.create(telegram_id=3, panel_email='spn-3')  # never bought: no client anywhere
        old.Payment.create(invoice_id=101, user=synced, plan_days=30, amount=Decimal('100.50'), currency='RUB',
                           status='paid', pay_url='https://t.me/x', paid_at=NOW, provisioned_at=NOW)
        before = {user.telegram_id: user for user in old.User.select()}
    if hasattr(old_db, 'close_all'):
        old_db.close_all()
    models.connect_database(url, pool_size=4)
    yield url, before
    drop_everything()
    with models.db.connection_context():
        models.create_schema()
    if hasattr(current, 'close_all'):
        current.close_all()


def column_names(table):
    with models.db.connection_context():
        return {column.name for column in models.db.get_columns(table)}


def test_a_wave1_database_upgrades_with_every_buyer_intact(wave1):
    url, before = wave1
    assert 'panel_dirty' in column_names('users')
    with models.db.connection_context():
        models.create_schema()
        versions = [row.version for row in models.SchemaVersion.select()]
        users = {user.telegram_id: user for user in models.User.select()}
        assert set(users) == set(before)
        for telegram_id, old in before.items():
            new = users[telegram_id]
            assert (new.expires_at, new.panel_sub_id, new.panel_email, new.invite_code) == (
                old.expires_at, old.panel_sub_id, old.panel_email, old.invite_code)
        state = {row.user.telegram_id: row for row in models.PanelClient.select()}
        assert set(state) == {1, 2}  # the buyer who never bought has no client to track
        assert (state[1].panel, state[1].dirty, state[1].pushed_expiry, state[1].uuid) == (
            'main', False, before[1].expires_at, 'uuid-1')
        assert (state[2].dirty, state[2].failures, state[2].retry_at, state[2].alerted) == (
            True, 6, NOW + timedelta(minutes=1), True)
        assert models.Payment.get(models.Payment.invoice_id == 101).amount == Decimal('100.50')
        assert models.Grant.select().count() == 2
    assert 'panel_dirty' not in column_names('users') and 'panel_uuid' not in column_names('users')
    assert 'link_base' in column_names('users')
    # a second run changes nothing
    with models.db.connection_context():
        models.create_schema()
        assert [row.version for row in models.SchemaVersion.select()] == versions
        assert models.PanelClient.select().count() == 2
        # and the ledger still works on the upgraded database
        models.grant_days(users[2].id, 1, 'admin', 'after-upgrade', now=NOW)
        assert models.PanelClient.get(models.PanelClient.user == users[2].id).dirty


def test_a_failed_upgrade_leaves_the_database_as_it_was(wave1):
    url, before = wave1
    with models.db.connection_context():
        # a stray row that makes the data move fail half-way
        models.db.create_tables([models.PanelClient])
        user_id = models.db.execute_sql('SELECT id FROM users WHERE telegram_id = 1').fetchone()[0]
        models.db.execute_sql("INSERT INTO panel_clients (user_id, panel, dirty, failures, refused, alerted) "
                              "VALUES (%s, 'main', true, 0, false, false)" % user_id)
        with pytest.raises(IntegrityError):
            models.create_schema()
    assert 'panel_dirty' in column_names('users')  # nothing dropped
    with models.db.connection_context():
        assert models.PanelClient.select().count() == 1
        assert 50 not in [row.version for row in models.SchemaVersion.select()]
        rows = models.db.execute_sql('SELECT telegram_id, panel_failures FROM users ORDER BY telegram_id').fetchall()
        assert [tuple(row) for row in rows] == [(1, 0), (2, 6), (3, 0)]
