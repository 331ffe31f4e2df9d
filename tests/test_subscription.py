"""The merged subscription: real panels (fake, both generations) with their sub servers, over real HTTP."""
import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

import subscription
from conftest import PANEL_PASSWORD, PANEL_USER
from fake_subserver import FakeSubServer
from fake_xui import FakePanel
from panels import PanelConfig
from subscription import PanelFeedError, SubscriptionMerger, decode_lines, parse_userinfo
from xui import XuiClient

SUB_ID = 'abcdefghijklmnop'
EXPIRY = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


@pytest.fixture
def locations():
    """Three panels of mixed API generations, each with its sub server; the buyer is on all three."""
    started = []
    try:
        for number, generation in enumerate(('legacy', 'v3', 'v3'), start=1):
            panel = FakePanel(generation=generation, username=PANEL_USER, password=PANEL_PASSWORD).start()
            started.append(panel)
            sub = FakeSubServer(panel, host=f'node{number}.example.test', remark=f'loc{number}',
                                encrypt=number != 2).start()  # panel 2 serves plain text
            started.append(sub)
            client = XuiClient(panel.url, panel.inbound_id, sub.url, username=PANEL_USER,
                               password=PANEL_PASSWORD, timeout=(1, 2), retries=0)
            client.ensure_client('spn-42', EXPIRY, SUB_ID, 42)
            panel.traffic['spn-42'].update(up=1000 * number, down=20000 * number)
        yield [(started[i], started[i + 1]) for i in range(0, len(started), 2)]
    finally:
        for server in reversed(started):
            server.stop()


def configs(subs, names=None):
    return [PanelConfig(name=f'loc{i}', url='http://127.0.0.1:1', inbound_id=1, sub_url=sub.url,
                        username='u', password='p') for i, sub in enumerate(subs, start=1)]


def merger_for(locations, **kwargs):
    return SubscriptionMerger(configs([sub for _, sub in locations]), 'Shop <&> "Ω"', **kwargs)


def test_the_feed_merges_every_panel_as_the_apps_expect(locations):
    merger = merger_for(locations)
    status, headers, body = merger.response(SUB_ID, EXPIRY)
    assert status == 200
    lines = base64.b64decode(body).decode().splitlines()
    assert [line.rsplit('#', 1)[1] for line in lines] == ['loc1-spn-42', 'loc2-spn-42', 'loc3-spn-42']
    assert all(line.startswith('vless://') for line in lines)
    headers = dict(headers)
    assert headers['Subscription-Userinfo'] == (
        f'upload=6000; download=120000; total=0; expire={int(EXPIRY.timestamp())}')
    assert base64.b64decode(headers['Profile-Title'].removeprefix('base64:')).decode() == 'Shop <&> "Ω"'
    assert headers['Profile-Update-Interval'] == '12'
    assert headers['Content-Disposition'].startswith("attachment; filename*=UTF-8''Shop%20%3C%26%3E")


def test_expire_comes_from_our_ledger_in_utc_even_when_stored_naive(locations):
    naive = EXPIRY.replace(tzinfo=None)
    _, headers, _ = merger_for(locations).response(SUB_ID, naive)
    assert dict(headers)['Subscription-Userinfo'].endswith(f'expire={int(EXPIRY.timestamp())}')


@pytest.mark.parametrize('fault', ['down', 'garbage', 'error', 'hang'])
def test_a_failing_panel_is_left_out_and_the_rest_served(locations, fault, caplog):
    panel, sub = locations[1]
    if fault == 'down':
        sub.stop()
    else:
        sub.mode = fault
        sub.hang_seconds = 20
    merger = merger_for(locations, timeout=(1, 1.5), deadline=1.8)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        status, headers, body = merger.response(SUB_ID, EXPIRY)
    # not waiting for the hanging panel is the point, not a speed figure
    assert time.monotonic() - started < sub.hang_seconds
    assert status == 200
    names = [line.rsplit('#', 1)[1] for line in base64.b64decode(body).decode().splitlines()]
    assert names == ['loc1-spn-42', 'loc3-spn-42']
    assert 'upload=4000; download=80000' in dict(headers)['Subscription-Userinfo']
    assert 'loc2' in caplog.text and SUB_ID not in caplog.text
    # a partial feed is not cached: once the panel is back, it is in again
    sub.mode = 'ok'
    if fault == 'down':
        sub.start(port=sub.port)
    _, _, body = merger.response(SUB_ID, EXPIRY)
    assert len(base64.b64decode(body).decode().splitlines()) == 3


def test_every_panel_down_is_a_retry_later_not_a_not_found(locations):
    for _, sub in locations:
        sub.stop()
    status, headers, _ = merger_for(locations).response(SUB_ID, EXPIRY)
    assert status == 503 and dict(headers)['Retry-After'] == '60'


def test_a_subid_no_panel_knows_is_the_one_not_found(locations):
    assert merger_for(locations).response('zzzzzzzzzzzzzzzz', EXPIRY) == subscription.NOT_FOUND


def test_a_disabled_client_is_served_by_no_panel(locations):
    for panel, _ in locations:
        panel.disable('spn-42')
    assert merger_for(locations).response(SUB_ID, EXPIRY) == subscription.NOT_FOUND


def test_feeds_are_cached_briefly_per_buyer(locations):
    now = [1000.0]
    merger = merger_for(locations, clock=lambda: now[0], cache_seconds=60)
    merger.response(SUB_ID, EXPIRY)
    asked = [sub.requests for _, sub in locations]
    merger.response(SUB_ID, EXPIRY)
    assert [sub.requests for _, sub in locations] == asked
    now[0] += 61
    merger.response(SUB_ID, EXPIRY)
    assert [sub.requests for _, sub in locations] == [n + 1 for n in asked]
    merger.forget(SUB_ID)
    merger.response(SUB_ID, EXPIRY)
    assert [sub.requests for _, sub in locations] == [n + 2 for n in asked]


def test_a_subid_that_is_no_buyers_is_asked_of_every_panel_and_cached_like_one(locations):
    """The timing of /sub must not tell whether a subId exists: the made-up one costs the same fetches."""
    now = [1000.0]
    merger = merger_for(locations, clock=lambda: now[0], cache_seconds=60)
    for sub_id, known in ((SUB_ID, True), ('zzzzzzzzzzzzzzzz', False)):
        before = [sub.requests for _, sub in locations]
        merger.response(sub_id, EXPIRY, known=known)
        merger.response(sub_id, EXPIRY, known=known)
        assert [sub.requests - n for (_, sub), n in zip(locations, before)] == [1, 1, 1], sub_id
        assert all(sub.asked[-1] == sub_id for _, sub in locations)


def test_lines_a_panel_serves_for_a_subid_that_is_no_buyers_are_not_served(locations):
    assert merger_for(locations).response(SUB_ID, EXPIRY, known=False) == subscription.NOT_FOUND
    for _, sub in locations[1:]:
        sub.mode = 'error'
    status, _, body = merger_for(locations).response(SUB_ID, EXPIRY, known=False)
    assert (status, body) == (503, b'Service Unavailable\n')


def test_a_flood_of_made_up_subids_does_not_push_the_buyers_feeds_out(locations, monkeypatch):
    monkeypatch.setattr(subscription, 'CACHE_SIZE', 5)
    monkeypatch.setattr(subscription, 'EMPTY_CACHE_SIZE', 5)
    merger = merger_for(locations, cache_seconds=600)
    merger.response(SUB_ID, EXPIRY)
    for number in range(20):
        assert merger.response(f'madeup{number:010d}', None, known=False) == subscription.NOT_FOUND
    asked = [sub.requests for _, sub in locations]
    assert merger.response(SUB_ID, EXPIRY)[0] == 200
    assert [sub.requests for _, sub in locations] == asked  # still cached
    # the made-up ones are bounded: the oldest were dropped and are asked again
    merger.response('madeup0000000000', None, known=False)
    assert [sub.requests for _, sub in locations] == [n + 1 for n in asked]


def test_fetches_still_queued_at_the_deadline_are_dropped_not_run_later(locations):
    """A burst of feeds behind a hanging panel must not leave a backlog of requests to it."""
    _, sub = locations[0]
    sub.mode, sub.hang_seconds = 'hang', 1.5
    merger = SubscriptionMerger(configs([sub]), 'Shop', timeout=(1, 10), deadline=0.3)
    burst = 3 * merger.workers
    gate = threading.Barrier(burst)

    def one(number):
        gate.wait()
        return merger.feed(f'burst{number:010d}')

    with ThreadPoolExecutor(burst) as callers:
        feeds = list(callers.map(one, range(burst)))
    assert all(feed.panels_failed == 1 for feed in feeds)
    time.sleep(2.5)  # past the first wave's hang: a kept backlog would have started its next wave by now
    assert sub.requests == merger.workers
    merger.close()


def test_a_disabled_panel_is_never_asked(locations):
    subs = [sub for _, sub in locations]
    panels = configs(subs)
    panels[0] = PanelConfig(**{**panels[0].__dict__, 'enabled': False})
    status, _, body = SubscriptionMerger(panels, 'Shop').response(SUB_ID, EXPIRY)
    assert status == 200 and subs[0].requests == 0
    assert len(base64.b64decode(body).splitlines()) == 2


@pytest.mark.parametrize('raw, lines', [
    (base64.b64encode(b'vless://a@h:1#x\nvmess://eyJ9\n'), ('vless://a@h:1#x', 'vmess://eyJ9')),
    (base64.b64encode(b'trojan://p@h:1#x\n').rstrip(b'='), ('trojan://p@h:1#x',)),
    (base64.urlsafe_b64encode(b'ss://YWVzLTI1Ni1nY20_@h:1#\xd0\xb9\n'), ('ss://YWVzLTI1Ni1nY20_@h:1#й',)),
    (b'vless://a@h:1#x\r\n\r\n# comment\nhysteria2://k@h:1\n', ('vless://a@h:1#x', 'hysteria2://k@h:1')),
])
def test_bodies_are_read_in_both_forms(raw, lines):
    assert decode_lines(raw) == lines


@pytest.mark.parametrize('raw', [b'', b'   ', b'<html>oops</html>', b'\xff\xfe\xfd', base64.b64encode(b'hello')])
def test_garbage_bodies_are_refused(raw):
    with pytest.raises(PanelFeedError):
        decode_lines(raw)


@pytest.mark.parametrize('header, expected', [
    ('upload=1; download=2; total=3; expire=4', {'upload': 1, 'download': 2, 'total': 3, 'expire': 4}),
    ('upload=-1; download=x; total=; expire=9', {'expire': 9}),
    (None, {}),
    ('garbage', {}),
])
def test_userinfo_headers_are_read_strictly(header, expected):
    assert parse_userinfo(header) == expected


@pytest.mark.parametrize('text, ok', [('abcdefghijklmnop', True), ('A-b_9', True), ('', False),
                                      ('../etc/passwd', False), ('a' * 65, False), ('a b', False)])
def test_subid_form(text, ok):
    assert subscription.is_sub_id(text) is ok


def test_expiry_in_the_past_is_still_reported(locations):
    past = datetime.now(timezone.utc) - timedelta(days=1)
    _, headers, _ = merger_for(locations).response(SUB_ID, past)
    assert dict(headers)['Subscription-Userinfo'].endswith(f'expire={int(past.timestamp())}')
