"""The 3x-ui client against the loopback fake panel, in every API generation and with its failures."""
import copy
import json
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests

import config
import httppool
from conftest import PANEL_PASSWORD, PANEL_USER, TIMEOUT, make_shop, settings_env
from fake_telegram import throwaway_tls
from fake_xui import LOGIN_BAD, running_panel
import models
from models import User
from xui import XuiClient, XuiError, XuiLoginError

PASSWORD = 'panel-pass-Zq81'
TOKEN = 'api-token-Xk27sQ'
SECRET_PATH = '/hidden-b4se-path/'
GIB = 1024 ** 3
EXPIRY = datetime(2031, 5, 17, 12, 30, 15, tzinfo=timezone.utc)
FLAVOURS = {
    'v2': dict(generation='legacy', csrf=False),
    'v2.8.3': dict(generation='legacy', csrf=False, redirect_unauthenticated=True),
    'v3.0': dict(generation='legacy', csrf=True),
    'v3.0-token': dict(generation='legacy', csrf=True, api_token=TOKEN),
    'v3.1': dict(generation='v3', version='3.1.0'),
    'v3.1-token': dict(generation='v3', version='3.1.0', api_token=TOKEN),
    'v3.3': dict(generation='v3', version='3.3.0'),
    'v3.4.2': dict(generation='v3', version='3.4.2'),
    'v3.6': dict(generation='v3', version='3.6.0'),
    'v3.6-token': dict(generation='v3', version='3.6.0', api_token=TOKEN),
    'v3-secret-path': dict(generation='v3', base_path=SECRET_PATH),
    'v2-secret-path': dict(generation='legacy', csrf=False, base_path=SECRET_PATH),
}
SESSION_FLAVOURS = [name for name, kw in FLAVOURS.items() if 'api_token' not in kw]


def make_client(panel, **overrides):
    """Build a client for the fake with short timeouts and tiny backoffs."""
    kwargs = dict(base_url=panel.url, inbound_id=panel.inbound_id, sub_url='https://sub.example.com:2096/sub/',
                  timeout=TIMEOUT, retries=2, backoff=0.01)
    if panel.api_token:
        kwargs['api_token'] = panel.api_token
    else:
        kwargs.update(username=panel.username, password=panel.password)
    kwargs.update(overrides)
    return XuiClient(**kwargs)


def assert_no_secrets(error):
    """Check an XuiError's message names no password, token or secret path."""
    text = str(error)
    for secret in (PASSWORD, TOKEN, SECRET_PATH.strip('/'), 'wrong-pass', 'bad-token'):
        assert secret not in text


@pytest.fixture(params=list(FLAVOURS))
def panel(request):
    """Run the fake panel in each flavour (overrides conftest's v3-only `panel` in this module)."""
    with running_panel(password=PASSWORD, **FLAVOURS[request.param]) as fake:
        yield fake


@pytest.fixture
def xui(panel):
    return make_client(panel)


def ensure(xui, email='u100@spn', expiry=EXPIRY, sub_id='sub100abc', tg_id=100, **kwargs):
    return xui.ensure_client(email, expiry, sub_id, tg_id, **kwargs)


# creating, renewing, reading, deleting

def test_create_stores_full_enabled_client(panel, xui):
    made = ensure(xui, total_bytes=10 * GIB, limit_ip=2)
    stored = panel.clients['u100@spn']
    assert stored['expiryTime'] == 1936787415000  # calendar.timegm of 2031-05-17 12:30:15
    assert (stored['enable'], stored['subId'], stored['tgId']) == (True, 'sub100abc', 100)
    assert (stored['totalGB'], stored['limitIp']) == (10 * GIB, 2)
    assert uuid.UUID(stored['id']).version == 4
    assert made == {'email': 'u100@spn', 'uuid': stored['id'], 'sub_id': 'sub100abc', 'expiry': EXPIRY,
                    'enable': True, 'total_bytes': 10 * GIB, 'tg_id': 100}
    assert xui.get_client('u100@spn') == made
    assert panel.traffic['u100@spn']['enable'] is True


def test_renewal_keeps_key_and_link_and_sets_absolute_expiry(panel, xui):
    first = ensure(xui)
    panel.disable('u100@spn')
    later = EXPIRY + timedelta(days=90)
    renewed = ensure(xui, expiry=later, total_bytes=GIB)
    stored = panel.clients['u100@spn']
    assert renewed['uuid'] == first['uuid'] == stored['id']
    assert stored['subId'] == 'sub100abc' and stored['enable'] is True
    assert stored['expiryTime'] == int(later.timestamp() * 1000) and stored['totalGB'] == GIB
    assert panel.traffic['u100@spn']['enable'] is True
    snapshot = copy.deepcopy(stored)
    assert ensure(xui, expiry=later, total_bytes=GIB) == renewed
    again = panel.clients['u100@spn']
    assert {k: v for k, v in again.items() if k != 'updated_at'} == \
        {k: v for k, v in snapshot.items() if k != 'updated_at'}
    assert len(panel.clients) == 1


@pytest.mark.parametrize('flavour', ['v3.1', 'v3.3', 'v3.6', 'v3.6-token'])
def test_a_v3_renewal_is_two_calls_and_tells_the_key_it_sent(flavour):
    # update answers obj:null and stores the body it was sent (the key included), so reading the client back
    # would only spend a round trip: the renewal is clients/get, then clients/update
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel)
        first = ensure(xui)
        gets, updates = panel.count('GET panel/api/clients/get/'), panel.count('POST panel/api/clients/update/')
        renewed = ensure(xui, expiry=EXPIRY + timedelta(days=30))
        assert panel.count('GET panel/api/clients/get/') == gets + 1
        assert panel.count('POST panel/api/clients/update/') == updates + 1
        assert renewed == {**first, 'expiry': EXPIRY + timedelta(days=30)}
        assert renewed['uuid'] == panel.clients['u100@spn']['id'] == panel.records['u100@spn']['uuid']


def test_renewal_keeps_fields_the_bot_does_not_manage(panel, xui):
    ensure(xui)
    panel.clients['u100@spn']['flow'] = 'xtls-rprx-vision'
    if panel.records:
        panel.records['u100@spn']['flow'] = 'xtls-rprx-vision'
    ensure(xui, expiry=EXPIRY + timedelta(days=1))
    assert panel.clients['u100@spn']['flow'] == 'xtls-rprx-vision'


WIREGUARD_IPS = '10.0.0.2/32, fd00::2/128'  # as ClientRecord stores them: Client's []string joined by commas


def _datetime_ms(naive_utc):
    return int(naive_utc.replace(tzinfo=timezone.utc).timestamp() * 1000)


def made_on_the_panel(panel, allowed_ips=''):
    """Give the panel a client of our inbound as its own web page would: key, flow, comment, group, reverse,
    and (3.4.2+) wireguard fields on the record; return its key."""
    session = logged_in(panel)
    client = {'email': 'u100@spn', 'subId': 'sub100abc', 'enable': True, 'tgId': 100, 'flow': 'xtls-rprx-vision',
              'comment': 'made by hand', 'reverse': {'tag': 'rev-out'}}
    if panel.generation == 'v3':
        if panel.since('3.2.0'):
            client['group'] = 'friends'
        answer = session.post(panel.url + '/panel/api/clients/add', json={'client': client, 'inboundIds': [1]})
        assert answer.json()['success'] is True, answer.json()
        if panel.since('3.4.2'):
            panel.records['u100@spn'].update(allowedIPs=allowed_ips, privateKey='wg-private', keepAlive=25)
        return panel.records['u100@spn']['uuid']
    client.update(id=str(uuid.uuid4()), tgId='', totalGB=0, expiryTime=0)  # the legacy web page sends tgId ''
    answer = session.post(panel.url + '/panel/api/inbounds/addClient',
                          json={'id': 1, 'settings': json.dumps({'clients': [client]})})
    assert answer.json()['success'] is True, answer.json()
    return client['id']


# (panel version, the record's allowedIPs): wireguard fields and the string allowedIPs appear in v3.4.2
SHAPES = [('2.9.4', ''), ('3.0.1', ''), ('3.1.0', ''), ('3.3.0', ''), ('3.4.2', ''), ('3.4.2', WIREGUARD_IPS),
          ('3.5.0', ''), ('3.5.0', WIREGUARD_IPS), ('3.6.0', ''), ('3.6.0', WIREGUARD_IPS)]


@pytest.mark.parametrize('version, allowed_ips', SHAPES)
def test_renewing_a_client_the_panel_made_on_every_record_shape(version, allowed_ips):
    legacy = version in ('2.9.4', '3.0.1')
    with running_panel(generation='legacy' if legacy else 'v3', csrf=version != '2.9.4', version=version,
                       password=PASSWORD) as panel:
        key = made_on_the_panel(panel, allowed_ips)
        xui = make_client(panel)
        renewed = ensure(xui, expiry=EXPIRY + timedelta(days=30), total_bytes=GIB)
        stored = panel.clients['u100@spn']
        assert renewed['uuid'] == key == stored['id'] and stored['subId'] == 'sub100abc'
        assert stored['expiryTime'] == int((EXPIRY + timedelta(days=30)).timestamp() * 1000)
        assert (stored['enable'], stored['totalGB'], stored['tgId']) == (True, GIB, 100)
        assert (stored['flow'], stored['comment'], stored['reverse']) == ('xtls-rprx-vision', 'made by hand',
                                                                           {'tag': 'rev-out'})
        if panel.generation == 'v3' and panel.since('3.2.0'):
            assert panel.records['u100@spn']['group'] == 'friends'
        if panel.generation == 'v3' and panel.since('3.4.2'):
            record = panel.records['u100@spn']
            assert (record['privateKey'], record['keepAlive']) == ('wg-private', 25)
            assert record['allowedIPs'] == allowed_ips.replace(' ', '')
        assert panel.traffic['u100@spn']['enable'] is True


@pytest.mark.parametrize('version, allowed_ips', [shape for shape in SHAPES if shape[0] not in ('3.4.2', '3.5.0')])
def test_a_buyer_who_has_a_client_gets_more_days_on_the_panel(database, cryptopay, version, allowed_ips):
    """Renewal through the shop on the real database: the panel follows the ledger on every record shape."""
    legacy = version in ('2.9.4', '3.0.1')
    with running_panel(generation='legacy' if legacy else 'v3', csrf=version != '2.9.4', version=version,
                       username=PANEL_USER, password=PANEL_PASSWORD) as panel:
        shop = make_shop(config.load(settings_env(panel, cryptopay, database)))
        user, _ = shop.register(4242, 'buyer', 'Buyer', 'en')
        shop.admin_give(900, user, 30, 'first')
        assert shop.provision(user.id)
        user = User.get_by_id(user.id)
        if panel.generation == 'v3' and panel.since('3.4.2'):
            panel.records[user.panel_email]['allowedIPs'] = allowed_ips  # also on a wireguard inbound, say
        key = panel.clients[user.panel_email]['id']
        shop.admin_give(900, user, 10, 'second')  # a renewal, promo, referral bonus or /give: the same push
        assert shop.provision(user.id)
        user = User.get_by_id(user.id)
        stored = panel.clients[user.panel_email]
        assert stored['expiryTime'] == _datetime_ms(user.expires_at) and stored['enable'] is True
        assert (stored['id'], stored['subId']) == (key, user.panel_sub_id) and not models.PanelClient.get(models.PanelClient.user == user.id).dirty


def test_never_expiring_and_naive_utc(panel, xui):
    assert ensure(xui, expiry=None)['expiry'] is None
    assert panel.clients['u100@spn']['expiryTime'] == 0
    ensure(xui, expiry=EXPIRY.replace(tzinfo=None))
    assert xui.get_client('u100@spn')['expiry'] == EXPIRY


def test_get_unknown_client_is_none(panel, xui):
    assert xui.get_client('nobody@spn') is None
    assert xui.get_client('Taken@example.com') is None  # another inbound's client is not ours


def test_traffic(panel, xui):
    ensure(xui, total_bytes=5 * GIB)
    panel.traffic['u100@spn'].update(up=1500, down=2 * GIB)
    assert xui.get_traffic('u100@spn') == {'up': 1500, 'down': 2 * GIB, 'total': 5 * GIB, 'expiry': EXPIRY,
                                           'enable': True}
    assert xui.get_traffic('nobody@spn') is None


@pytest.mark.parametrize('generation', ['legacy', 'v3'])
def test_traffic_unknown_as_null(generation):
    with running_panel(generation=generation, traffic_unknown_null=True) as panel:
        assert make_client(panel).get_traffic('nobody@spn') is None


def test_traffic_refusal_for_a_known_client_is_an_error(panel, xui):
    ensure(xui)
    panel.success_false_next(1, 'Error getting traffic. (database is locked\n)', route='GET panel/api/')
    with pytest.raises(XuiError, match='database is locked'):
        xui.get_traffic('u100@spn')


def test_delete(panel, xui):
    ensure(xui)
    ensure(xui, email='u200@spn', sub_id='sub200abc', tg_id=200)
    xui.delete_client('u100@spn')
    assert xui.get_client('u100@spn') is None
    assert 'u100@spn' not in panel.clients and 'u100@spn' not in panel.traffic
    assert [c['email'] for c in xui.list_clients()] == ['u200@spn']
    xui.delete_client('u100@spn')  # already gone: nothing to do
    xui.delete_client('Taken@example.com')  # not ours: left alone
    assert 'Taken@example.com' in panel.traffic


@pytest.mark.parametrize('generation, allowed', [('legacy', False), ('v3', True)])
def test_delete_last_client(generation, allowed):
    with running_panel(generation=generation) as panel:
        xui = make_client(panel)
        ensure(xui)
        if allowed:
            xui.delete_client('u100@spn')
            assert panel.clients == {}
        else:
            with pytest.raises(XuiError, match='no client remained in Inbound'):
                xui.delete_client('u100@spn')


def test_list_clients_of_our_inbound_only(panel, xui):
    assert xui.list_clients() == []
    made = [ensure(xui, email=f'u{n}@spn', sub_id=f'sub{n}abc', tg_id=n) for n in (1, 2, 3)]
    assert sorted(xui.list_clients(), key=lambda c: c['email']) == made


@pytest.mark.parametrize('protocol', ['vmess', 'trojan', 'shadowsocks'])
@pytest.mark.parametrize('generation', ['legacy', 'v3'])
def test_other_protocols_keep_their_key(protocol, generation):
    with running_panel(generation=generation, protocol=protocol) as panel:
        xui = make_client(panel)
        first = ensure(xui)
        key = panel.clients['u100@spn']['id' if protocol == 'vmess' else 'password']
        assert first['uuid'] == key and key
        panel.disable('u100@spn')
        assert ensure(xui, expiry=EXPIRY + timedelta(days=30))['uuid'] == key
        assert panel.clients['u100@spn']['enable'] is True
        assert xui.check()['protocol'] == protocol
        ensure(xui, email='u200@spn', sub_id='sub200abc', tg_id=200)
        xui.delete_client('u100@spn')
        assert set(panel.clients) == {'u200@spn'}


@pytest.mark.parametrize('sub_url', ['https://sub.example.com:2096/sub', 'https://sub.example.com:2096/sub/'])
def test_subscription_link(sub_url):
    xui = XuiClient('http://127.0.0.1:9/', 1, sub_url, api_token=TOKEN)
    assert xui.subscription_link('k3j5h2g8f9d0s1a2') == 'https://sub.example.com:2096/sub/k3j5h2g8f9d0s1a2'


@pytest.mark.parametrize('base', ['{url}', '{url}/'])
def test_base_url_with_or_without_slash(base):
    with running_panel(generation='v3', base_path=SECRET_PATH, password=PASSWORD) as panel:
        xui = make_client(panel, base_url=base.format(url=panel.url))
        assert ensure(xui)['email'] == 'u100@spn'


# duplicate emails

@pytest.mark.parametrize('email', ['Taken@example.com', 'taken@example.com'])
def test_email_of_another_inbound_is_refused(panel, xui, email):
    with pytest.raises(XuiError, match=r'(?i)taken@example\.com') as caught:
        ensure(xui, email=email)
    assert '\n' not in str(caught.value)
    assert panel.clients == {}


# sessions and logins

@pytest.mark.parametrize('flavour', SESSION_FLAVOURS)
def test_expired_session_costs_one_login(flavour):
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel)
        ensure(xui)
        assert panel.count('POST login') == 1
        panel.expire_sessions()
        ensure(xui, expiry=EXPIRY + timedelta(days=1))
        assert panel.count('POST login') == 2
        assert xui.get_client('u100@spn')['expiry'] == EXPIRY + timedelta(days=1)
        assert panel.count('POST login') == 2


def test_session_cookie_dropped_by_the_jar_means_log_in_first():
    """The panel's cookie lives Max-Age seconds and is never refreshed: once it is gone, log in before calling."""
    with running_panel(generation='v3', password=PASSWORD, cookie_max_age=3) as panel:
        xui = make_client(panel)
        xui.get_client('u100@spn')
        time.sleep(3.1)  # the jar drops the cookie (not a timing assertion: only its lifetime has to pass)
        xui.get_client('u100@spn')
        # probe + two lookups, none of them refused for want of a session
        assert panel.count('POST login') == 2 and panel.count('GET panel/api/clients/get') == 3


@pytest.mark.parametrize('flavour', ['v2', 'v3.0', 'v3.1', 'v3.6'])
def test_wrong_password_one_login_per_call(flavour):
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel, password='wrong-pass-Hj3')
        for calls in (1, 2):
            with pytest.raises(XuiLoginError, match=re.escape(LOGIN_BAD)) as caught:
                ensure(xui)
            assert_no_secrets(caught.value)
            assert panel.count('POST login') == calls
        assert panel.count('GET panel/api/') == 0


def test_login_rate_limit_blocks_even_the_right_password():
    with running_panel(generation='v3', password=PASSWORD) as panel:
        wrong = make_client(panel, password='wrong-pass-Hj3')
        for _ in range(5):
            with pytest.raises(XuiError):
                wrong.check()
        with pytest.raises(XuiLoginError, match=re.escape(LOGIN_BAD)):
            make_client(panel).check()
        assert panel.count('POST login') == 6


@pytest.mark.parametrize('flavour', ['v2', 'v3.0', 'v3.6'])
def test_two_factor_login_keeps_the_panels_words_and_the_panel_says_why(flavour):
    with running_panel(password=PASSWORD, two_factor=True, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel)
        with pytest.raises(XuiLoginError) as caught:
            xui.check()
        assert 'Invalid username or password or two-factor code.' in str(caught.value)
        assert 'XUI_API_TOKEN' in str(caught.value) and 'wrong username or password' not in str(caught.value)
        assert_no_secrets(caught.value)
        assert make_client(panel).two_factor_enabled() is True
        assert panel.count('POST getTwoFactorEnable') == 1
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel)
        xui.check()
        assert xui.two_factor_enabled() is False
        assert xui.get_client('u100@spn') is None and panel.count('POST login') == 1  # the session is kept


def test_inbound_refusal_keeps_the_panels_reason():
    with running_panel(generation='v3', password=PASSWORD) as panel:
        xui = make_client(panel)
        panel.success_false_next(1, 'Obtain (database is locked\n)', route='GET panel/api/inbounds/get')
        with pytest.raises(XuiError) as caught:
            xui.check()
        assert 'Obtain (database is locked)' in str(caught.value) and 'no inbound' not in str(caught.value)


def test_server_error_with_an_envelope_keeps_its_message():
    with running_panel(generation='v3', password=PASSWORD) as panel:
        xui = make_client(panel)
        xui.check()
        panel.fail_next(3, status=500, msg='Something went wrong (disk I/O error)')
        with pytest.raises(XuiError, match=re.escape('HTTP 500: Something went wrong (disk I/O error)')):
            xui.get_client('u100@spn')


def test_api_token_needs_no_login():
    with running_panel(generation='v3', api_token=TOKEN) as panel:
        xui = make_client(panel)
        ensure(xui)
        assert xui.check()['generation'] == 'v3'
        assert panel.count('POST login') == 0 and panel.count('GET csrf-token') == 0


@pytest.mark.parametrize('flavour', ['v3.0-token', 'v3.1-token'])
def test_wrong_api_token(flavour):
    with running_panel(**FLAVOURS[flavour]) as panel:
        with pytest.raises(XuiError, match='API token') as caught:
            ensure(make_client(panel, api_token='bad-token-77'))
        assert_no_secrets(caught.value)
        assert panel.clients == {}


# failures

def test_server_error_then_recovery(panel, xui):
    ensure(xui)
    before = panel.count('GET panel/api/')
    panel.fail_next(2, route='GET panel/api/')
    assert xui.get_client('u100@spn')['email'] == 'u100@spn'
    assert panel.count('GET panel/api/') == before + 3


def test_server_error_forever_gives_up_after_retries(panel, xui):
    ensure(xui)
    panel.fail_next(100, status=502)
    before = panel.count('GET panel/api/')
    with pytest.raises(XuiError, match='HTTP 502 3 times') as caught:
        xui.get_client('u100@spn')
    assert_no_secrets(caught.value)
    assert panel.count('GET panel/api/') == before + 3


@pytest.mark.parametrize('flavour', ['v2', 'v3.0', 'v3.1'])
def test_hang_past_read_timeout(flavour):
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel, timeout=(5, 1.5))
        ensure(xui)
        panel.hang_next(1, seconds=5)
        before = panel.count('GET panel/api/')
        with pytest.raises(XuiError, match='did not answer') as caught:
            xui.get_client('u100@spn')
        assert_no_secrets(caught.value)
        assert panel.count('GET panel/api/') == before + 1  # a read timeout is not retried
        assert xui.get_client('u100@spn')['email'] == 'u100@spn'


@pytest.mark.parametrize('generation', ['legacy', 'v3'])
def test_add_whose_answer_was_lost_converges(generation):
    with running_panel(generation=generation) as panel:
        xui = make_client(panel, timeout=(5, 1.5))
        add = 'POST panel/api/clients/add' if generation == 'v3' else 'POST panel/api/inbounds/addClient'
        panel.hang_next(1, seconds=5, route=add)
        with pytest.raises(XuiError, match='did not answer'):
            ensure(xui)
        assert 'u100@spn' in panel.clients  # applied, answer lost
        key = panel.clients['u100@spn']['id']
        assert ensure(xui)['uuid'] == key and len(panel.clients) == 1


@pytest.mark.parametrize('generation', ['legacy', 'v3'])
def test_add_applied_but_connection_dropped_is_retried(generation):
    with running_panel(generation=generation) as panel:
        xui = make_client(panel)
        add = 'POST panel/api/clients/add' if generation == 'v3' else 'POST panel/api/inbounds/addClient'
        panel.drop_next(1, route=add)
        made = ensure(xui)
        assert panel.count(add) == 2 and len(panel.clients) == 1
        assert made['uuid'] == panel.clients['u100@spn']['id'] and made['expiry'] == EXPIRY


def test_redirect_to_login_page_is_not_followed():
    with running_panel(generation='legacy', csrf=False, redirect_unauthenticated=True) as panel:
        xui = make_client(panel)
        ensure(xui)
        panel.redirect_next(1)
        assert xui.get_client('u100@spn')['email'] == 'u100@spn'
        assert panel.hits['GET '] == 0 and panel.count('POST login') == 2


@pytest.mark.parametrize('flavour', SESSION_FLAVOURS)
def test_page_instead_of_json_means_log_in_again(flavour):
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel)
        ensure(xui)
        panel.garbage_next(1)
        assert xui.get_client('u100@spn')['email'] == 'u100@spn'
        assert panel.count('POST login') == 2
        panel.garbage_next(10)
        with pytest.raises(XuiError, match='HTTP 200') as caught:
            xui.get_client('u100@spn')
        assert_no_secrets(caught.value)
        assert panel.count('POST login') == 3


def test_success_false_is_an_error_with_the_panel_message(panel, xui):
    ensure(xui)
    panel.success_false_next(1, 'Something went wrong (database is locked\n)', route='POST panel/api/')
    with pytest.raises(XuiError) as caught:
        ensure(xui, expiry=EXPIRY + timedelta(days=1))
    assert str(caught.value).endswith('Something went wrong (database is locked)')
    # a success-sounding message on success:false is still a failure
    panel.success_false_next(1, 'Inbound has been successfully updated. (json: cannot unmarshal object into Go '
                                'struct field Inbound.settings of type string)', route='POST panel/api/')
    with pytest.raises(XuiError, match='cannot unmarshal'):
        ensure(xui, expiry=EXPIRY + timedelta(days=1))
    assert panel.clients['u100@spn']['expiryTime'] == int(EXPIRY.timestamp() * 1000)


def test_refused_connection_then_back(panel, xui):
    ensure(xui)
    panel.refuse()
    with pytest.raises(XuiError, match='cannot connect') as caught:
        ensure(xui, expiry=EXPIRY + timedelta(days=1))
    assert_no_secrets(caught.value)
    panel.accept()
    assert ensure(xui, expiry=EXPIRY + timedelta(days=1))['expiry'] == EXPIRY + timedelta(days=1)


@pytest.fixture(scope='module')
def panel_tls(tmp_path_factory):
    """(server ssl context, CA PEM path): a panel's certificate from a CA no system trusts."""
    return throwaway_tls(tmp_path_factory.mktemp('panel-tls'))


@pytest.mark.parametrize('generation', ['legacy', 'v3'])
def test_a_panel_over_https_is_verified_against_the_ca_the_operator_trusts(panel_tls, monkeypatch, generation):
    context, ca = panel_tls
    for name in ('SSL_CERT_FILE', 'SSL_CERT_DIR', 'REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE'):
        monkeypatch.delenv(name, raising=False)
    with running_panel(generation=generation, base_path=SECRET_PATH, tls=context) as panel:
        assert panel.url.startswith('https://')
        untrusted = make_client(panel, pools=httppool.Pools())
        with pytest.raises(XuiError, match='TLS certificate that does not verify') as caught:
            untrusted.check()
        assert_no_secrets(caught.value)
        assert not panel.hits  # nothing was sent, not even the login: never a silent insecure fallback

        monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(ca))  # added to the system's CAs, as requests read it
        trusted = make_client(panel, pools=httppool.Pools())
        assert ensure(trusted)['uuid'] == panel.clients['u100@spn']['id']
        assert trusted.get_client('u100@spn')['expiry'] == EXPIRY
        assert panel.count('POST login') == 1  # the session cookie is kept over HTTPS


def test_nothing_listening():
    with running_panel() as panel:
        url = panel.url
    xui = XuiClient(url, 1, 'https://s/sub', username='admin', password=PASSWORD, timeout=(0.5, 0.5),
                    backoff=0.01)
    with pytest.raises(XuiError, match='cannot connect'):
        xui.check()


# API generations

@pytest.mark.parametrize('flavour', ['v2', 'v3.0', 'v3.0-token'])
def test_upgrade_to_v3_is_detected(flavour):
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        xui = make_client(panel)
        assert xui.generation == 'legacy'
        key = ensure(xui)['uuid']
        panel.set_generation('v3')
        renewed = ensure(xui, expiry=EXPIRY + timedelta(days=30))
        assert xui.generation == 'v3'
        assert renewed['uuid'] == key == panel.records['u100@spn']['uuid']
        assert panel.clients['u100@spn']['expiryTime'] == int((EXPIRY + timedelta(days=30)).timestamp() * 1000)
        assert panel.count('POST login') <= 2


def test_upgrade_to_v3_0_brings_csrf():
    with running_panel(generation='legacy', csrf=False, password=PASSWORD) as panel:
        xui = make_client(panel)
        key = ensure(xui)['uuid']
        panel.set_generation('legacy', csrf=True)  # the old session has no CSRF token: POSTs get 403
        assert ensure(xui, expiry=EXPIRY + timedelta(days=30))['uuid'] == key
        assert panel.count('POST login') == 2 and xui.generation == 'legacy'


def test_downgrade_to_legacy_is_detected():
    with running_panel(generation='v3', password=PASSWORD) as panel:
        xui = make_client(panel)
        key = ensure(xui)['uuid']
        panel.set_generation('legacy')
        assert xui.get_client('u100@spn')['uuid'] == key
        assert xui.generation == 'legacy'


def test_v3_update_without_key_would_rotate_it():
    """Guard the fake's v3.1 - v3.3.0 quirk that ensure_client must defend against."""
    with running_panel(generation='v3', version='3.3.0', password=PASSWORD) as panel:
        key = ensure(make_client(panel))['uuid']
        session = logged_in(panel)
        record = session.get(panel.url + '/panel/api/clients/get/u100@spn').json()['obj']['client']
        body = {k: record[k] for k in ('email', 'subId', 'expiryTime', 'tgId')}
        answer = session.post(panel.url + '/panel/api/clients/update/u100@spn', json=body).json()
        assert answer['success'] is True
        stored = panel.clients['u100@spn']
        assert stored['id'] != key and stored['enable'] is False  # omitted key minted anew, omitted enable false


# the doctor

def test_check(panel, xui):
    assert xui.check() == {'generation': 'v3' if panel.generation == 'v3' else 'legacy',
                           'inbound_id': 1, 'protocol': 'vless'}


def test_check_unknown_inbound(panel):
    with pytest.raises(XuiError, match='no inbound 99') as caught:
        make_client(panel, inbound_id=99).check()
    assert_no_secrets(caught.value)


@pytest.mark.parametrize('flavour', ['v2-secret-path', 'v3-secret-path'])
def test_check_without_the_secret_path(flavour):
    with running_panel(password=PASSWORD, **FLAVOURS[flavour]) as panel:
        with pytest.raises(XuiError, match='secret path') as caught:
            make_client(panel, base_url=f'http://127.0.0.1:{panel.port}').check()
        assert_no_secrets(caught.value)


def test_check_unsupported_protocol():
    with running_panel(generation='v3', protocol='wireguard') as panel:
        with pytest.raises(XuiError, match="protocol 'wireguard' is not supported"):
            make_client(panel).check()


def test_missing_credentials():
    with pytest.raises(XuiError, match='XUI_API_TOKEN'):
        XuiClient('http://127.0.0.1:9', 1, 'https://s/sub', username='admin')


# threads

def test_threads_share_one_client_and_one_login():
    with running_panel(generation='v3', password=PASSWORD) as panel:
        xui = make_client(panel)
        errors = []

        def buy(n):
            try:
                ensure(xui, email=f'u{n}@spn', sub_id=f'sub{n}abc', tg_id=n)
            except XuiError as exc:
                errors.append(exc)
        threads = [threading.Thread(target=buy, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(panel.clients) == 8 and panel.count('POST login') == 1


# the fake itself speaks the real protocol

def logged_in(panel):
    """Log a plain requests.Session in the way a browser would, with the CSRF handshake where needed."""
    session = requests.Session()
    if panel.csrf:
        session.headers['X-CSRF-Token'] = session.get(panel.url + '/csrf-token').json()['obj']
    answer = session.post(panel.url + '/login', data={'username': panel.username, 'password': panel.password})
    assert answer.json()['success'] is True
    return session


def test_fake_cookie_lives_under_the_base_path():
    with running_panel(generation='v3', base_path=SECRET_PATH) as panel:
        session = logged_in(panel)
        assert [(c.name, c.path) for c in session.cookies] == [('3x-ui', SECRET_PATH)]
        outside = session.get(f'http://127.0.0.1:{panel.port}/panel/api/inbounds/list', allow_redirects=False)
        assert outside.status_code == 404


def test_fake_csrf_is_required_on_login_and_posts():
    with running_panel(generation='v3') as panel:
        bare = requests.post(panel.url + '/login', data={'username': 'admin', 'password': 'admin-pass'})
        assert (bare.status_code, bare.content) == (403, b'')
        session = logged_in(panel)
        del session.headers['X-CSRF-Token']
        assert session.post(panel.url + '/panel/api/clients/add', json={}).status_code == 403


@pytest.mark.parametrize('flavour, xhr, status', [('v2', True, 404), ('v3.0', True, 404), ('v3.1', True, 401),
                                                  ('v3.1', False, 404), ('v2.8.3', False, 307)])
def test_fake_unauthenticated_answers(flavour, xhr, status):
    with running_panel(**FLAVOURS[flavour]) as panel:
        headers = {'X-Requested-With': 'XMLHttpRequest'} if xhr else {}
        answer = requests.get(panel.url + '/panel/api/inbounds/list', headers=headers, allow_redirects=False)
        assert answer.status_code == status


def test_fake_removed_routes_and_string_settings():
    with running_panel(generation='v3') as panel:
        session = logged_in(panel)
        assert session.post(panel.url + '/panel/api/inbounds/addClient', json={}).status_code == 404
        assert isinstance(session.get(panel.url + '/panel/api/inbounds/get/1').json()['obj']['settings'], dict)
    with running_panel(generation='legacy') as panel:
        session = logged_in(panel)
        assert isinstance(session.get(panel.url + '/panel/api/inbounds/get/1').json()['obj']['settings'], str)
        assert session.get(panel.url + '/panel/api/clients/list').status_code == 404
        answer = session.post(panel.url + '/panel/api/inbounds/addClient', json={'id': 1, 'settings': '{}'})
        assert (answer.status_code, answer.content) == (500, b'')
        answer = session.post(panel.url + '/panel/api/inbounds/addClient', json={'id': 1, 'settings': {}})
        assert answer.json()['success'] is False and answer.json()['msg'].startswith('Inbound has been successfully')


def test_fake_legacy_update_replaces_the_whole_client():
    with running_panel(generation='legacy') as panel:
        key = ensure(make_client(panel))['uuid']
        session = logged_in(panel)
        settings = '{"clients": [{"id": "%s", "email": "u100@spn"}]}' % key
        answer = session.post(panel.url + f'/panel/api/inbounds/updateClient/{key}', json={'id': 1, 'settings': settings})
        assert answer.json() == {'success': True, 'msg': 'Inbound client has been updated.', 'obj': None}
        assert 'subId' not in panel.clients['u100@spn'] and panel.traffic['u100@spn']['enable'] is False



def go_error(field, kind, go_type, struct='Client'):
    return (f'Something went wrong (json: cannot unmarshal {kind} into Go struct field {struct}.{field} '
            f'of type {go_type})')


@pytest.mark.parametrize('field, value, message', [
    ('allowedIPs', '', go_error('allowedIPs', 'string', '[]string')),
    ('allowedIPs', [1], go_error('allowedIPs', 'number', 'string')),
    ('keepAlive', '0', go_error('keepAlive', 'string', 'int')),
    ('reverse', '', go_error('reverse', 'string', 'model.ClientReverse')),
    ('reverse', {'tag': 7}, go_error('reverse.tag', 'number', 'string', struct='ClientReverse')),
    ('privateKey', 0, go_error('privateKey', 'number', 'string')),
    ('created_at', '1', go_error('created_at', 'string', 'int64')),
    ('totalGB', 1.5, go_error('totalGB', 'number 1.5', 'int64')),
    ('expiryTime', 2 ** 63, go_error('expiryTime', f'number {2 ** 63}', 'int64')),
    ('enable', 'true', go_error('enable', 'string', 'bool')),
    ('tgId', None, None),  # null leaves the zero value
    ('Enable', True, None),  # keys match case-insensitively
    ('usedTraffic', 'x', None),  # unknown keys are ignored
])
def test_fake_v3_6_update_decodes_the_body_into_client_as_go_does(field, value, message):
    with running_panel(generation='v3', version='3.6.0') as panel:
        key = ensure(make_client(panel))['uuid']
        body = {'id': key, 'email': 'u100@spn', 'subId': 'sub100abc', field: value}
        answer = logged_in(panel).post(panel.url + '/panel/api/clients/update/u100@spn', json=body).json()
        assert (answer['success'], answer['msg']) == ((False, message) if message else
                                                      (True, 'Inbound client has been updated.'))


@pytest.mark.parametrize('version, accepted', [('3.1.0', True), ('3.4.1', True), ('3.4.2', False), ('3.6.0', False)])
def test_fake_string_allowed_ips_is_refused_from_v3_4_2(version, accepted):
    with running_panel(generation='v3', version=version) as panel:
        key = ensure(make_client(panel))['uuid']
        body = {'id': key, 'email': 'u100@spn', 'enable': True, 'allowedIPs': ''}
        answer = logged_in(panel).post(panel.url + '/panel/api/clients/update/u100@spn', json=body).json()
        assert answer['success'] is accepted


def test_fake_add_and_top_level_type_errors():
    with running_panel(generation='v3', version='3.6.0') as panel:
        session = logged_in(panel)
        add = panel.url + '/panel/api/clients/add'
        answer = session.post(add, json={'client': {'email': 'a@spn', 'totalGB': '1'}, 'inboundIds': [1]}).json()
        assert answer['msg'] == go_error('client.totalGB', 'string', 'int64')
        answer = session.post(add, json={'client': {'email': 'a@spn'}, 'inboundIds': ['1']}).json()
        assert answer['msg'] == go_error('inboundIds', 'string', 'int', struct='ClientCreatePayload')
        answer = session.post(panel.url + '/panel/api/clients/update/x', json=[]).json()
        assert answer['msg'] == 'Something went wrong (json: cannot unmarshal array into Go value of type model.Client)'
        answer = session.post(add, data='client=1').json()
        assert answer['msg'] == "Something went wrong (invalid character 'c' looking for beginning of value)"
        assert panel.records.keys() == {'Taken@example.com'}


def test_fake_legacy_settings_decode_ignores_type_errors_as_the_panel_does():
    """Legacy panels decode settings.clients with errors ignored (zero values) and store the JSON as sent."""
    with running_panel(generation='legacy', version='2.9.4') as panel:
        session = logged_in(panel)
        key = str(uuid.uuid4())
        entry = {'id': key, 'email': 'u100@spn', 'enable': True, 'tgId': '', 'totalGB': '5', 'expiryTime': 0}
        answer = session.post(panel.url + '/panel/api/inbounds/addClient',
                              json={'id': 1, 'settings': json.dumps({'clients': [entry]})}).json()
        assert answer == {'success': True, 'msg': 'Inbound client(s) have been added.', 'obj': None}
        assert panel.clients['u100@spn']['tgId'] == '' and panel.clients['u100@spn']['totalGB'] == '5'
        assert panel.traffic['u100@spn']['total'] == 0  # the typed view: a string totalGB is zero
        numeric_key = {'id': 12345, 'email': 'u200@spn', 'enable': True}  # a number key is '' once typed
        answer = session.post(panel.url + '/panel/api/inbounds/addClient',
                              json={'id': 1, 'settings': json.dumps({'clients': [numeric_key]})}).json()
        assert answer['msg'] == 'Something went wrong (empty client ID\n)'
        unknown = {'id': str(uuid.uuid4()), 'email': 'u100@spn'}
        answer = session.post(panel.url + '/panel/api/inbounds/updateClient/not-a-key',
                              json={'id': 1, 'settings': json.dumps({'clients': [unknown]})}).json()
        assert answer['msg'] == 'Something went wrong (empty client ID\n)'
        answer = session.post(panel.url + '/panel/api/inbounds/addClient', json={'id': '1', 'settings': '{}'}).json()
        assert answer['msg'] == ('Inbound has been successfully updated. (json: cannot unmarshal string into Go struct '
                                 'field Inbound.id of type int)')


@pytest.mark.parametrize('version, get_msg, traffic_null, delete_msg', [
    ('3.1.0', ' (record not found)', False, 'Something went wrong (record not found)'),
    ('3.2.8', ' (record not found)', True, 'Something went wrong (client "x@spn" not found in any inbound or client '
                                           'record\n)'),
    ('3.6.0', 'Obtain (record not found)', True, 'Something went wrong (client "x@spn" not found in any inbound or '
                                                  'client record\n)'),
])
def test_fake_unknown_email_answers_per_version(version, get_msg, traffic_null, delete_msg):
    with running_panel(generation='v3', version=version) as panel:
        session = logged_in(panel)
        assert session.get(panel.url + '/panel/api/clients/get/x@spn').json()['msg'] == get_msg
        traffic = session.get(panel.url + '/panel/api/clients/traffic/x@spn').json()
        assert (traffic['success'], traffic['obj']) == (True, None) if traffic_null else traffic['success'] is False
        assert session.post(panel.url + '/panel/api/clients/del/x@spn').json()['msg'] == delete_msg


WIREGUARD_KEYS = {'privateKey', 'publicKey', 'allowedIPs', 'preSharedKey', 'keepAlive'}


@pytest.mark.parametrize('version, keys', [
    ('3.1.0', {'group', 'secret', 'adTag', *WIREGUARD_KEYS}), ('3.3.0', {'secret', 'adTag', *WIREGUARD_KEYS}),
    ('3.4.2', {'secret', 'adTag'}), ('3.6.0', set())])
def test_fake_record_shape_per_version(version, keys):
    with running_panel(generation='v3', version=version) as panel:
        ensure(make_client(panel))
        record = logged_in(panel).get(panel.url + '/panel/api/clients/get/u100@spn').json()['obj']['client']
        newest = {'id', 'email', 'subId', 'uuid', 'password', 'auth', 'flow', 'security', 'privateKey', 'publicKey',
                  'allowedIPs', 'preSharedKey', 'keepAlive', 'secret', 'adTag', 'limitIp', 'totalGB', 'expiryTime',
                  'enable', 'tgId', 'group', 'comment', 'reset', 'createdAt', 'updatedAt', 'reverse'}
        assert set(record) == newest - keys
        assert list(record)[-1] == 'reverse' and isinstance(record['id'], int)
        if 'allowedIPs' in record:
            assert record['allowedIPs'] == '' and record['reverse'] is None


@pytest.mark.parametrize('body, msg', [
    ({'username': 'admin', 'password': 12345}, 'The input data format is invalid.'),
    (None, 'Username is required'),
    ({'username': 'admin', 'password': 'admin-pass', 'twoFactorCode': 284913}, 'The input data format is invalid.'),
])
def test_fake_login_decodes_a_json_form_as_go_does(body, msg):
    with running_panel(generation='v3', version='3.6.0') as panel:
        session = requests.Session()
        session.headers['X-CSRF-Token'] = session.get(panel.url + '/csrf-token').json()['obj']
        assert session.post(panel.url + '/login', json=body).json() == {'success': False, 'msg': msg, 'obj': None}
