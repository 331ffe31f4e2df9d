"""Several panels (locations) behind one link: settings, per-panel pushes and retries, backfill, reconcile."""
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest

import config
import jobs
import models
import panels
from conftest import BOT_TOKEN, PANEL_PASSWORD, PANEL_USER, ROOT, settings_env
from cryptobot import CryptoPayClient
from fake_xui import FakePanel
from models import PAID, PanelClient, Payment, User
from shop import Shop
from xui import XuiClient

NOW = datetime(2026, 11, 30, 12, 0, 0)


def panels_toml(fakes, disabled=()):
    blocks = []
    for name, fake in fakes:
        blocks.append(f'''[[panels]]
name = "{name}"
url = "{fake.url}"
username = "{PANEL_USER}"
password = "{PANEL_PASSWORD}"
inbound_id = {fake.inbound_id}
sub_url = "https://{name.lower()}.example.test/sub/"
enabled = {'false' if name in disabled else 'true'}
''')
    return '\n'.join(blocks)


@pytest.fixture
def fakes():
    """Three panels: Germany (legacy API), Finland and Japan (v3.1+)."""
    started = [(name, FakePanel(generation=generation, username=PANEL_USER, password=PANEL_PASSWORD).start())
               for name, generation in (('Germany', 'legacy'), ('Finland', 'v3'), ('Japan', 'v3'))]
    yield started
    for _, fake in started:
        fake.stop()


def make_settings(tmp_path, panel, cryptopay, database, fakes, disabled=(), **overrides):
    path = tmp_path / 'panels.toml'
    path.write_text(panels_toml(fakes, disabled))
    path.chmod(0o600)
    env = settings_env(panel, cryptopay, database, PANELS_FILE=str(path), **overrides)
    for key in ('XUI_URL', 'XUI_USERNAME', 'XUI_PASSWORD', 'XUI_INBOUND_ID', 'XUI_SUB_URL'):
        env.pop(key)
    return config.load(env)


def client_for(config_):
    return XuiClient(config_.url, config_.inbound_id, config_.sub_url, username=config_.username,
                     password=config_.password, timeout=(1, 2), retries=0, backoff=0.01)


def make_shop(settings):
    crypto = CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, timeout=(1, 2), retries=1,
                             backoff=0.01)
    return Shop(settings, panels.connect(settings.panels, client_for), crypto)


@pytest.fixture
def multi(tmp_path, panel, cryptopay, database, fakes):
    settings = make_settings(tmp_path, panel, cryptopay, database, fakes, PUBLIC_URL='https://shop.example.test/')
    return make_shop(settings), dict(fakes)


def state(user, panel_name):
    return PanelClient.get_or_none(PanelClient.user == user.id, PanelClient.panel == panel_name)


def expiry_on(fake, user):
    client = fake.clients.get(user.panel_email)
    return client and datetime.utcfromtimestamp(client['expiryTime'] / 1000)


@contextmanager
def recorded():
    """Within: the list of (sql, params) of every statement this thread's database connection runs."""
    seen, database = [], models.db.obj
    real = database.execute_sql

    def execute_sql(sql, params=None, *args, **kwargs):
        seen.append((sql, list(params or ())))
        return real(sql, params, *args, **kwargs)

    database.execute_sql = execute_sql
    try:
        yield seen
    finally:
        del database.execute_sql


def reads_of_buyers(seen):
    return [sql for sql, _ in seen if 'FROM "users"' in sql or sql.startswith('UPDATE "users"')]


NEWEST_ID = 'SELECT MAX("t1"."id") FROM "users" AS "t1"'


def paid_buyer(shop, cryptopay, telegram_id=501):
    user, _ = shop.register(telegram_id, 'buyer', 'Buyer', 'ru')
    payment = shop.create_invoice(user, 30)
    cryptopay.pay(payment.invoice_id)
    return user, payment


def test_panels_file_replaces_the_xui_settings(multi):
    shop, fakes = multi
    assert [panel.name for panel in shop.enabled_panels] == ['Germany', 'Finland', 'Japan']
    assert models.panel_names == ('Germany', 'Finland', 'Japan')
    user, _ = shop.register(7, None, 'X', 'en')
    assert shop.subscription_link(user) == f'https://shop.example.test/sub/{user.panel_sub_id}'


def test_several_panels_without_public_url_stop_start_up_with_one_line(tmp_path, panel, cryptopay, database, fakes):
    with pytest.raises(config.SettingError, match='PUBLIC_URL is not set: with more than one panel'):
        make_settings(tmp_path, panel, cryptopay, database, fakes)
    # one enabled panel needs no PUBLIC_URL; its own subscription link is the buyer's
    settings = make_settings(tmp_path, panel, cryptopay, database, fakes, disabled=('Finland', 'Japan'))
    shop = make_shop(settings)
    user, _ = shop.register(8, None, 'X', 'en')
    assert shop.subscription_link(user) == f'https://germany.example.test/sub/{user.panel_sub_id}'
    env = settings_env(panel, cryptopay, database, PANELS_FILE=str(tmp_path / 'panels.toml'))
    (tmp_path / 'panels.toml').write_text(panels_toml(fakes))
    result = subprocess.run([sys.executable, str(ROOT / 'bot.py')], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: PUBLIC_URL is not set: with more than one panel buyers get one link, {PUBLIC_URL}/sub/{subId}, '
        'served by the bot (like https://vpn.example.com)']
    assert PANEL_PASSWORD not in result.stderr + result.stdout and BOT_TOKEN not in result.stderr


def test_a_payment_reaches_every_panel_with_one_email_subid_and_expiry(multi, cryptopay):
    shop, fakes = multi
    user, payment = paid_buyer(shop, cryptopay)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.status == PAID and result.provisioned
    user = User.get_by_id(user.id)
    for name, fake in fakes.items():
        client = fake.clients[user.panel_email]
        assert client['subId'] == user.panel_sub_id and int(client['tgId']) == user.telegram_id
        assert expiry_on(fake, user) == user.expires_at
        assert not state(user, name).dirty and state(user, name).pushed_expiry == user.expires_at


def test_a_panel_that_is_down_delays_only_its_own_copy(multi, cryptopay, telegram, messenger):
    shop, fakes = multi
    fakes['Finland'].refuse()
    user, payment = paid_buyer(shop, cryptopay)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    # the link works at once: two panels have the days
    assert result.provisioned and Payment.get_by_id(payment.id).provisioned_at is not None
    user = User.get_by_id(user.id)
    assert expiry_on(fakes['Germany'], user) == expiry_on(fakes['Japan'], user) == user.expires_at
    finland = state(user, 'Finland')
    assert finland.dirty and finland.failures == 1 and 'cannot connect' in finland.last_error
    # a renewal meanwhile also reaches the panels that are up
    models.grant_days(user.id, 7, 'admin', 'while-down', now=NOW)
    assert shop.provision(user.id, now=NOW)
    assert expiry_on(fakes['Japan'], User.get_by_id(user.id)) == User.get_by_id(user.id).expires_at
    # Finland is back: the next retry round brings it level
    fakes['Finland'].accept()
    jobs.retry_provisioning(shop, messenger, now=datetime.utcnow() + timedelta(minutes=2))
    user = User.get_by_id(user.id)
    assert expiry_on(fakes['Finland'], user) == user.expires_at and not state(user, 'Finland').dirty


def test_when_every_panel_is_down_the_link_is_not_said_to_work(multi, cryptopay):
    shop, fakes = multi
    for fake in fakes.values():
        fake.refuse()
    user, payment = paid_buyer(shop, cryptopay)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.status == PAID and not result.provisioned
    assert Payment.get_by_id(payment.id).provisioned_at is None
    assert all(state(user, name).dirty and state(user, name).failures == 1 for name in fakes)


def test_a_buyer_from_before_a_panel_was_added_is_not_on_it_until_the_backfill(tmp_path, panel, cryptopay, database,
                                                                            fakes):
    germany_only = make_shop(make_settings(tmp_path, panel, cryptopay, database, fakes[:1]))
    user, _ = germany_only.register(1, None, 'A', 'ru')
    models.grant_days(user.id, 30, 'admin', 'a')
    assert germany_only.provision(user.id)
    # the operator moves the shop to Finland alone: the buyer has days but no client there yet
    finland_only = make_shop(make_settings(tmp_path, panel, cryptopay, database, fakes[1:2]))
    assert finland_only.provision(user.id) is False
    assert user.panel_email not in fakes[1][1].clients
    assert jobs.backfill_panels(finland_only, now=datetime.utcnow()) == {'Finland': 1}
    assert finland_only.provision(user.id)
    assert expiry_on(fakes[1][1], user) == User.get_by_id(user.id).expires_at



def test_a_hanging_panel_does_not_hold_up_the_others_in_the_job(multi, cryptopay, messenger):
    shop, fakes = multi
    users = [paid_buyer(shop, cryptopay, 600 + n)[0] for n in range(3)]
    for user in users:
        shop.settle(Payment.get(Payment.user == user.id).invoice_id)
    fakes['Germany'].hang_next(n=100, seconds=3)
    jobs.retry_provisioning(shop, messenger, now=datetime.utcnow())
    for user in users:
        user = User.get_by_id(user.id)
        assert expiry_on(fakes['Finland'], user) == expiry_on(fakes['Japan'], user) == user.expires_at
        assert state(user, 'Germany').dirty


def test_the_stuck_alert_names_the_panel_and_its_reason(multi, cryptopay, telegram, messenger):
    shop, fakes = multi
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    user, _ = shop.register(777, None, 'X', 'en')
    models.grant_days(user.id, 30, 'admin', 'x')
    fakes['Japan'].success_false_next(n=1000, msg='Something went wrong (Duplicate email: spn-777\n)')
    for minute in range(0, 600, 31):
        jobs.retry_provisioning(shop, messenger, now=datetime.utcnow() + timedelta(minutes=minute))
    alerts = [c.params['text'] for c in telegram.sent if c.method == 'sendMessage' and str(c.params['chat_id']) == '900']
    assert len(alerts) == 1
    assert 'Panel Japan' in alerts[0] and 'Duplicate email: spn-777' in alerts[0]
    assert not state(user, 'Germany').dirty and not state(user, 'Finland').dirty


@pytest.mark.timeout(900)  # 900 pushes over loopback HTTP: seconds alone, minutes on a loaded machine
def test_a_new_panel_gets_every_active_buyer_paced_and_a_disabled_one_none(tmp_path, panel, cryptopay, database,
                                                                           fakes, messenger):
    germany = fakes[0]
    settings = make_settings(tmp_path, panel, cryptopay, database, fakes[:1])
    shop = make_shop(settings)
    # 1,000 buyers on the one panel (the state a wave-1 shop has), 100 of them expired
    with models.db.atomic():
        User.insert_many([{'telegram_id': 10_000 + n, 'panel_email': f'spn-{10_000 + n}',
                           'panel_sub_id': f'sub{n:013d}', 'invite_code': f'i{n:09d}',
                           'expires_at': NOW + timedelta(days=30 if n % 10 else -1)} for n in range(1000)]).execute()
        ids = [user.id for user in User.select(User.id)]
        PanelClient.insert_many([{'user': user_id, 'panel': 'Germany', 'dirty': False} for user_id in ids]).execute()
    # the operator adds Finland and Japan (disabled) to the file
    settings = make_settings(tmp_path, panel, cryptopay, database, fakes, disabled=('Japan',),
                             PUBLIC_URL='https://shop.example.test')
    shop = make_shop(settings)
    added = jobs.backfill_panels(shop, now=NOW, per_round=100)
    assert added == {'Germany': 0, 'Finland': 100}
    assert jobs.backfill_panels(shop, now=NOW, per_round=100)['Finland'] == 100
    active = [user.id for user in User.select(User.id).where(User.expires_at > NOW).order_by(User.id)]
    reached = models.Cursor.get(models.Cursor.name == 'backfill:Finland').position
    assert reached == active[199]
    # the bot restarts mid-backfill: the new process carries on after the last buyer put on the panel
    shop = make_shop(settings)
    with recorded() as seen:
        assert jobs.backfill_panels(shop, now=NOW, per_round=100) == {'Germany': 0, 'Finland': 100}
    assert [params[0] for sql, params in seen if 'EXISTS' in sql] == [reached]  # (Germany's pass is done)
    rounds = 3
    while jobs.backfill_panels(shop, now=NOW, per_round=100)['Finland']:
        rounds += 1
    assert rounds == 9  # 900 active buyers, 100 a round: paced
    assert PanelClient.select().where(PanelClient.panel == 'Finland').count() == 900
    assert PanelClient.select().where(PanelClient.panel == 'Japan').count() == 0
    before = fakes[1][1].count('POST')
    for _ in range(5):
        jobs.retry_panel(shop, shop.enabled_panels[1], datetime.utcnow())
    assert fakes[1][1].count('POST') - before <= 5 * jobs.PUSH_BATCH * 2  # add and nothing more per client
    assert len([email for email in fakes[1][1].clients if email.startswith('spn-')]) == 900
    assert not fakes[2][1].clients or not any(email.startswith('spn-') for email in fakes[2][1].clients)
    assert PanelClient.select().where(PanelClient.dirty == True).count() == 0  # noqa: E712


def test_a_complete_panel_costs_the_backfill_no_read_of_the_buyers_and_a_buyer_missed_elsewhere_is_found(
        multi, cryptopay):
    shop, fakes = multi
    with models.db.atomic():  # 30 buyers from before the panels were added: on none of them yet
        User.insert_many([{'telegram_id': 20_000 + n, 'panel_email': f'spn-{20_000 + n}',
                           'panel_sub_id': f'sub{n:013d}', 'invite_code': f'i{n:09d}',
                           'expires_at': NOW + timedelta(days=30)} for n in range(30)]).execute()
    names = ['Germany', 'Finland', 'Japan']
    assert jobs.backfill_panels(shop, now=NOW) == {name: 30 for name in names}
    # nobody is missing: a round reads each panel's cursor and the newest buyer's id, no buyer
    with recorded() as seen:
        assert jobs.backfill_panels(shop, now=NOW + timedelta(minutes=1)) == {name: 0 for name in names}
    assert reads_of_buyers(seen) == [NEWEST_ID] * 3
    # a buyer who gets days later is put on every enabled panel by the grant itself, not by the backfill
    user, _ = shop.register(555, None, 'Late', 'en')
    models.grant_days(user.id, 30, 'admin', 'late', now=NOW)
    assert sorted(row.panel for row in PanelClient.select().where(PanelClient.user == user.id)) == sorted(names)
    # one with days but no rows, above the cursors (written by a process with the old panels file): next round
    stray = User.create(telegram_id=556, panel_email='spn-556', expires_at=NOW + timedelta(days=3))
    assert jobs.backfill_panels(shop, now=NOW + timedelta(minutes=2)) == {name: 1 for name in names}
    assert state(stray, 'Japan').dirty
    # one below the cursors that lost its row (an older backup restored): found by the hourly pass
    first = User.select().order_by(User.id).first()
    PanelClient.delete().where(PanelClient.user == first.id, PanelClient.panel == 'Finland').execute()
    assert jobs.backfill_panels(shop, now=NOW + timedelta(minutes=30))['Finland'] == 0
    assert jobs.backfill_panels(shop, now=NOW + timedelta(minutes=61)) == {'Germany': 0, 'Finland': 1, 'Japan': 0}
    assert state(first, 'Finland').dirty


def test_the_link_announcement_reads_no_buyer_once_all_were_told_and_finds_a_stale_one_later(
        tmp_path, panel, cryptopay, database, fakes, telegram, messenger):
    shop = make_shop(make_settings(tmp_path, panel, cryptopay, database, fakes, PUBLIC_URL='https://shop.example.test'))
    old = 'https://germany.example.test/sub/'
    ids = list(range(10, 130, 10))  # 12 active wave-1 buyers (no base recorded) and one lapsed
    with models.db.atomic():
        User.insert_many([{'id': user_id, 'telegram_id': user_id, 'panel_email': f'spn-{user_id}',
                           'invite_code': f'i{user_id:09d}', 'panel_sub_id': f'sub{user_id:013d}',
                           'expires_at': NOW + timedelta(days=1 if user_id != 130 else -1)}
                          for user_id in ids + [130]]).execute()
    for user_id in ids + [55, 140, 130]:
        telegram.add_user({'id': user_id, 'first_name': 'B'})
    assert [jobs.announce_new_link(shop, messenger, now=NOW, per_round=5) for _ in range(4)] == [5, 5, 2, 0]
    with recorded() as seen:
        assert jobs.announce_new_link(shop, messenger, now=NOW + timedelta(minutes=1), per_round=5) == 0
    assert reads_of_buyers(seen) == [NEWEST_ID]
    # a buyer registered by a process with the old settings, above the cursor: told next round
    User.create(id=140, telegram_id=140, panel_email='spn-140', link_base=old, expires_at=NOW + timedelta(days=9))
    assert jobs.announce_new_link(shop, messenger, now=NOW + timedelta(minutes=2)) == 1
    # one below the cursor (an older backup's row restored): told by the hourly pass
    User.create(id=55, telegram_id=55, panel_email='spn-55', link_base=old, expires_at=NOW + timedelta(days=9))
    assert jobs.announce_new_link(shop, messenger, now=NOW + timedelta(minutes=30)) == 0
    assert jobs.announce_new_link(shop, messenger, now=NOW + timedelta(minutes=61)) == 1
    told = sorted(int(c.params['chat_id']) for c in telegram.sent if c.method == 'sendMessage')
    assert told == sorted(ids + [55, 140])  # each active one once; the lapsed buyer never
    stale = User.link_base.is_null() | (User.link_base != 'https://shop.example.test/sub/')
    assert [user.id for user in User.select().where(stale)] == [130]  # the lapsed one


def test_reconcile_covers_and_reports_every_panel(multi, cryptopay, telegram, messenger):
    shop, fakes = multi
    telegram.add_user({'id': 900, 'first_name': 'Boss'})
    user, payment = paid_buyer(shop, cryptopay)
    shop.check_payment(user.telegram_id, payment.invoice_id)
    user = User.get_by_id(user.id)
    fakes['Japan'].disable(user.panel_email)
    reports = jobs.report_reconcile(shop, messenger)
    assert [(r.panel, r.checked, r.fixed, r.disabled) for r in reports] == [
        ('Germany', 1, 0, []), ('Finland', 1, 0, []), ('Japan', 1, 1, [user.telegram_id])]
    text = [c.params['text'] for c in telegram.sent if c.method == 'sendMessage'][-1]
    assert '<b>Germany</b>\nSync' in text and '<b>Japan</b>\nSync: 1 active users checked, 1 fixed' in text
    assert fakes['Japan'].clients[user.panel_email]['enable'] is True


def test_panel_report_for_admins(multi, cryptopay):
    shop, fakes = multi
    fakes['Japan'].refuse()
    user, payment = paid_buyer(shop, cryptopay)
    shop.check_payment(user.telegram_id, payment.invoice_id)
    report = {row['name']: row for row in shop.panel_report(probe=True)}
    assert report['Germany']['clients'] == 1 and report['Germany']['pending'] == 0
    assert (report['Germany']['reachable'], report['Germany']['generation']) == (True, 'legacy')
    assert (report['Finland']['reachable'], report['Finland']['generation']) == (True, 'v3')
    assert report['Japan']['pending'] == 1 and 'cannot connect' in report['Japan']['last_error']
    assert report['Japan']['reachable'] is False and 'cannot connect' in report['Japan']['error']


def test_traffic_is_summed_over_panels(multi, cryptopay):
    shop, fakes = multi
    user, payment = paid_buyer(shop, cryptopay)
    shop.check_payment(user.telegram_id, payment.invoice_id)
    for number, fake in enumerate(fakes.values(), start=1):
        fake.traffic[user.panel_email].update(up=10 * number, down=100 * number)
    fakes['Finland'].refuse()
    traffic = shop.traffic(User.get_by_id(user.id))
    assert (traffic['up'], traffic['down']) == (40, 400)


def test_moving_to_several_panels_tells_each_active_buyer_their_new_link_once(tmp_path, panel, cryptopay, database,
                                                                              fakes, telegram, messenger):
    settings = make_settings(tmp_path, panel, cryptopay, database, fakes[:1])
    one = make_shop(settings)
    telegram.add_user({'id': 1, 'first_name': 'A'})
    telegram.add_user({'id': 2, 'first_name': 'B'})
    active, _ = one.register(1, None, 'A', 'ru')
    lapsed, _ = one.register(2, None, 'B', 'en')
    models.grant_days(active.id, 30, 'admin', 'a')
    models.grant_days(lapsed.id, 30, 'admin', 'b', now=NOW - timedelta(days=60))
    User.update(link_base=None).execute()  # as wave-1 buyers are after the upgrade
    assert jobs.announce_new_link(one, messenger) == 0  # one panel, same link: nothing to say
    assert User.select().where(User.link_base.is_null()).count() == 0
    with recorded() as seen:  # and next minute, no buyer is read or written
        assert jobs.announce_new_link(one, messenger) == 0
    assert reads_of_buyers(seen) == [NEWEST_ID]
    several = make_shop(make_settings(tmp_path, panel, cryptopay, database, fakes,
                                      PUBLIC_URL='https://shop.example.test'))
    assert jobs.announce_new_link(several, messenger) == 1
    assert jobs.announce_new_link(several, messenger) == 0
    (message,) = [c.params for c in telegram.sent if c.method == 'sendMessage']
    assert message['chat_id'] in (1, '1')
    assert f'https://shop.example.test/sub/{active.panel_sub_id}' in message['text']
    # the old link still points at the first panel, which keeps serving it
    assert one.subscription_link(User.get_by_id(active.id)).startswith('https://germany.example.test/sub/')


def test_a_buyer_and_an_admin_with_three_panels_end_to_end(tmp_path, panel, cryptopay, database, fakes):
    """bot.py as a process: the buyer pays with one panel down, gets the one link; /panels and /stats per panel."""
    from fake_telegram import FakeTelegram
    from test_e2e import ADMIN, ask, buy, current, eventually, invoice_id_of, person, press, start_bot
    path = tmp_path / 'panels.toml'
    path.write_text(panels_toml(fakes))
    path.chmod(0o600)
    fakes[1][1].refuse()  # Finland is down
    with FakeTelegram(token=BOT_TOKEN) as telegram:
        bot = start_bot(telegram, panel, cryptopay, database, tmp_path, PANELS_FILE=path,
                        PUBLIC_URL='https://shop.example.test', XUI_URL='', XUI_INBOUND_ID='',
                        XUI_SUB_URL='', XUI_USERNAME='', XUI_PASSWORD='')
        try:
            buyer = person(4242, 'ru', 'Ира')
            telegram.add_user(buyer)
            telegram.add_user(ADMIN)
            invoice = buy(telegram, buyer)
            cryptopay.pay(invoice_id_of(telegram, invoice))
            press(telegram, buyer, invoice, f'check:{invoice_id_of(telegram, invoice)}')
            user = eventually(lambda: User.get_or_none(User.telegram_id == 4242))
            link = f'https://shop.example.test/sub/{user.panel_sub_id}'
            assert eventually(lambda: link in (current(telegram, invoice).get('text') or ''))
            user = User.get_by_id(user.id)
            assert expiry_on(fakes[0][1], user) == expiry_on(fakes[2][1], user) == user.expires_at
            panels_text = ask(telegram, ADMIN, '/panels', contains='Finland')['text']
            assert 'Germany: answers, inbounds API' in panels_text and 'Japan: answers, v3.1+' in panels_text
            assert 'Finland: does not answer: cannot connect' in panels_text
            assert 'pending pushes: 1' in panels_text
            stats = ask(telegram, ADMIN, '/stats', contains='Clients per panel')['text']
            assert 'Clients per panel: Germany 1, Finland 1, Japan 1' in stats
            # Finland comes back: the retry job brings it level within a round or two
            fakes[1][1].accept()
            assert eventually(lambda: expiry_on(fakes[1][1], User.get_by_id(user.id)) == user.expires_at,
                              timeout=90)
        finally:
            bot.stop()
        output = bot.output()
        assert PANEL_PASSWORD not in output and 'Traceback' not in output, output


def test_the_doctor_checks_every_panel_its_subscription_server_and_the_file_mode(tmp_path, panel, cryptopay,
                                                                                 database, fakes):
    import os

    from fake_subserver import FakeSubServer
    subs = [FakeSubServer(fake).start() for _, fake in fakes[:2]]
    try:
        text = panels_toml(fakes)
        for (name, _), sub in zip(fakes, subs):
            text = text.replace(f'https://{name.lower()}.example.test/sub/', sub.url)
        path = tmp_path / 'panels.toml'
        path.write_text(text)
        path.chmod(0o644)  # readable by everyone: it holds passwords
        fakes[2][1].refuse()  # Japan is down
        env = {**os.environ, **settings_env(panel, cryptopay, database, PANELS_FILE=path,
                                            PUBLIC_URL='https://shop.example.test', BACKUP_DIR=tmp_path / 'b',
                                            XUI_URL='', XUI_INBOUND_ID='', XUI_SUB_URL='')}
        done = subprocess.run([sys.executable, 'bot.py', 'check'], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
        output = done.stdout + done.stderr
        assert done.returncode == 1
        lines = output.splitlines()
        assert any(line.startswith('FAIL  panels file') and 'readable by every user' in line for line in lines)
        assert any(line.startswith('OK    panel Germany') and 'subscription server' in line for line in lines)
        assert any(line.startswith('OK    panel Finland') and 'v3.1+ clients API' in line for line in lines)
        assert any(line.startswith('FAIL  panel Japan') and 'cannot connect' in line for line in lines)
        assert f'- panels file: chmod 600 {path}' in output
        assert PANEL_PASSWORD not in output
    finally:
        for sub in subs:
            sub.stop()


def test_a_hanging_panel_does_not_hold_back_the_link(tmp_path, panel, cryptopay, database, fakes):
    """Found by the soak (3 panels, one hanging): the buyer's link waited for the hanging panel's read timeout."""
    settings = make_settings(tmp_path, panel, cryptopay, database, fakes, PUBLIC_URL='https://shop.example.test/')
    crypto = CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, timeout=(1, 2), retries=1,
                             backoff=0.01)

    def patient(config_):  # reads for 60 s: the hang below outlasts any load on the machine
        return XuiClient(config_.url, config_.inbound_id, config_.sub_url, username=config_.username,
                         password=config_.password, timeout=(1, 60), retries=0, backoff=0.01)

    shop = Shop(settings, panels.connect(settings.panels, patient), crypto)
    germany = fakes[0][1]
    germany.hang_next(n=100, seconds=45)
    user, payment = paid_buyer(shop, cryptopay)
    result = shop.check_payment(user.telegram_id, payment.invoice_id)
    assert result.provisioned and Payment.get_by_id(payment.id).provisioned_at is not None
    # the link was given while Germany still holds its answer: its push has neither succeeded nor failed yet
    germany_row = state(User.get_by_id(user.id), 'Germany')
    assert (germany_row.dirty, germany_row.failures) == (True, 0), germany_row.last_error
    germany.stop()  # ends the held answer: the push records its failure in the background
