"""Tests for cryptobot.py against the loopback Crypto Pay fake (and tests that the fake is faithful)."""
import json
import logging
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project root, wherever pytest runs from

from cryptobot import CryptoPayClient, CryptoPayError, parse_amount, parse_time  # noqa: E402
from fake_cryptopay import FakeCryptoPay  # noqa: E402

BACKOFF = 0.01
RETRIES = 3


@pytest.fixture
def fake():
    with FakeCryptoPay() as server:
        yield server


@pytest.fixture
def sleeps():
    """Record every pause the client asks for, and pause briefly."""
    taken = []

    def sleep(seconds):
        taken.append(seconds)
        time.sleep(min(seconds, 0.1))  # capped, so a wrong wait fails the test instead of hanging it

    sleep.taken = taken
    return sleep


@pytest.fixture
def client(fake, sleeps):
    with CryptoPayClient(fake.token, fake.url + '/', timeout=(5, 1.5), retries=RETRIES, backoff=BACKOFF,
                         max_retry_after=0.05, sleep=sleeps) as crypto:
        yield crypto


def methods(fake):
    return [method for method, _ in fake.calls]


def create(client, order_id=42, **overrides):
    args = dict(amount=Decimal('199.00'), fiat='RUB', description='VPN, 1 month', payload=order_id, expires_in=900)
    return client.create_invoice(**{**args, **overrides})


def api(fake, method, params=None, verb='post', token=None, form=None):
    """Call the fake directly, the way other clients call the real API."""
    headers = {'Crypto-Pay-API-Token': fake.token if token is None else token}
    if verb == 'get':
        return requests.get(f'{fake.url}/api/{method}', params=params, headers=headers, timeout=2)
    return requests.post(f'{fake.url}/api/{method}', json=params, data=form, headers=headers, timeout=2)


# happy paths

@pytest.mark.parametrize('testnet, bot', [(False, 'CryptoBot'), (True, 'CryptoTestnetBot')])
def test_get_me_returns_the_app_and_tells_the_network(testnet, bot, sleeps):
    with FakeCryptoPay(testnet=testnet) as fake, CryptoPayClient(fake.token, fake.url, sleep=sleeps) as client:
        assert client.is_testnet is False  # a loopback URL says nothing yet
        me = client.get_me()
        assert me == {'app_id': 12345, 'name': fake.name, 'payment_processing_bot_username': bot}
        assert client.is_testnet is testnet
        assert methods(fake) == ['getMe']


def test_is_testnet_follows_the_host_before_get_me():
    assert CryptoPayClient('1:x', 'https://testnet-pay.crypt.bot/').is_testnet is True
    assert CryptoPayClient('1:x').is_testnet is False
    assert CryptoPayClient('1:x', 'https://testnet-pay.crypt.bot/').base_url == 'https://testnet-pay.crypt.bot'


def test_create_invoice_sends_a_fiat_invoice_the_way_the_api_wants(client, fake):
    invoice = create(client)
    method, sent = fake.calls[-1]
    assert method == 'createInvoice'
    assert sent == {'currency_type': 'fiat', 'fiat': 'RUB', 'amount': '199.00', 'accepted_assets': 'USDT,TON,BTC',
                    'description': 'VPN, 1 month', 'payload': '42', 'expires_in': 900}
    assert invoice == fake.invoices[invoice['invoice_id']]
    assert invoice['status'] == 'active'
    assert invoice['accepted_assets'] == ['USDT', 'TON', 'BTC']
    assert invoice['payload'] == '42'
    assert parse_amount(invoice['amount']) == Decimal('199')
    assert invoice['bot_invoice_url'] == f'https://t.me/CryptoBot?start={invoice["hash"]}'
    created = parse_time(invoice['created_at'])
    assert created.tzinfo is timezone.utc
    assert parse_time(invoice['expiration_date']) - created == timedelta(seconds=900)


def test_create_invoice_takes_amounts_as_strings_and_assets_as_a_string(client, fake):
    invoice = create(client, amount='1E+2', accepted_assets='usdt, ton')
    assert fake.calls[-1][1]['amount'] == '100'
    assert invoice['accepted_assets'] == ['USDT', 'TON']


@pytest.mark.parametrize('overrides, error', [
    ({'amount': 199.0}, TypeError),
    ({'amount': '0'}, ValueError),
    ({'amount': 'a lot'}, ValueError),
    ({'expires_in': 0}, ValueError),
    ({'expires_in': 2678401}, ValueError),
    ({'expires_in': True}, ValueError),
    ({'expires_in': 900.0}, ValueError),
    ({'description': 'x' * 1025}, ValueError),
    ({'accepted_assets': ()}, ValueError),
])
def test_create_invoice_refuses_bad_arguments_before_any_request(client, fake, overrides, error):
    with pytest.raises(error):
        create(client, **overrides)
    assert fake.calls == []


def test_create_invoice_accepts_the_longest_expiry(client):
    assert create(client, expires_in=2678400)['status'] == 'active'


def test_get_invoices_reports_paid_expired_and_deleted(client, fake):
    paid, expired, deleted, active = (create(client, order_id=n)['invoice_id'] for n in range(4))
    fake.pay(paid, asset='TON')
    fake.expire(expired)
    fake.delete(deleted)
    found = {invoice['invoice_id']: invoice for invoice in client.get_invoices([paid, expired, deleted, active, 999])}
    assert sorted(found) == sorted([paid, expired, active])
    assert [found[paid]['status'], found[expired]['status'], found[active]['status']] == ['paid', 'expired', 'active']
    assert found[paid]['paid_asset'] == 'TON'
    assert parse_time(found[paid]['paid_at']) >= parse_time(found[paid]['created_at'])
    assert fake.calls[-1] == ('getInvoices', {'invoice_ids': f'{paid},{expired},{deleted},{active},999', 'count': 5})


def test_get_invoices_without_ids_makes_no_call(client, fake):
    assert client.get_invoices([]) == []
    assert fake.calls == []


def test_get_invoices_batches_by_a_thousand_with_count(client, fake):
    for order_id in range(2500):
        status, _, body, _ = fake.handle('/api/createInvoice', fake.token, {
            'currency_type': 'fiat', 'fiat': 'USD', 'amount': '1', 'payload': str(order_id)})
        assert status == 200, body
    fake.calls.clear()
    invoices = client.get_invoices(range(1, 2501))
    assert sorted(invoice['invoice_id'] for invoice in invoices) == list(range(1, 2501))
    assert methods(fake) == ['getInvoices'] * 3
    batches = [params['invoice_ids'].split(',') for _, params in fake.calls]
    assert [len(batch) for batch in batches] == [1000, 1000, 500]
    assert [params['count'] for _, params in fake.calls] == [1000, 1000, 500]
    assert batches[2][-1] == '2500'


def test_delete_invoice_removes_it(client, fake):
    invoice_id = create(client)['invoice_id']
    assert client.delete_invoice(invoice_id) is True
    assert client.get_invoices([invoice_id]) == []
    with pytest.raises(CryptoPayError) as caught:
        client.delete_invoice(invoice_id)
    assert caught.value.status == 400


# the API's errors

def test_wrong_token_is_unauthorized_with_a_hint_and_not_retried(fake, sleeps):
    with CryptoPayClient('999:wrong', fake.url, sleep=sleeps) as client, pytest.raises(CryptoPayError) as caught:
        client.get_me()
    assert (caught.value.status, caught.value.name) == (401, 'UNAUTHORIZED')
    assert 'CRYPTOPAY_TOKEN' in str(caught.value) and 'testnet' in str(caught.value)
    assert len(fake.calls) == 1


def test_api_400_carries_status_and_name_and_is_not_retried(client, fake):
    with pytest.raises(CryptoPayError) as caught:
        create(client, accepted_assets=('USDT', 'FFF'))
    assert (caught.value.status, caught.value.name) == (400, 'UNSUPPORTED_ASSET')
    assert methods(fake) == ['createInvoice']
    assert fake.invoices == {}


def test_unknown_method_is_405(fake):
    answer = api(fake, 'setWebhook')  # no such method: the webhook URL is set in @CryptoBot
    assert answer.status_code == 405
    assert answer.json() == {'ok': False, 'error': {'code': 405, 'name': 'METHOD_NOT_FOUND'}}
    assert len(fake.calls) == 1


def test_wrong_base_path_is_404_with_a_hint(fake, sleeps):
    with CryptoPayClient(fake.token, fake.url + '/abc', sleep=sleeps) as client, \
            pytest.raises(CryptoPayError) as caught:
        client.get_me()
    assert caught.value.status == 404
    assert 'CRYPTOPAY_URL' in str(caught.value)
    assert fake.calls == []


def test_500_then_recovery(client, fake, sleeps):
    fake.fail_next(2)
    assert client.get_me()['app_id'] == 12345
    assert methods(fake) == ['getMe'] * 3
    assert sleeps.taken == [BACKOFF, BACKOFF * 2]


def test_500_forever_gives_up_after_bounded_retries(client, fake, sleeps):
    fake.fail_next(100)
    with pytest.raises(CryptoPayError) as caught:
        client.get_invoices([1])
    assert (caught.value.status, caught.value.name) == (500, 'INTERNAL_SERVER_ERROR')
    assert len(fake.calls) == RETRIES + 1
    assert len(sleeps.taken) == RETRIES


def test_create_invoice_retries_a_500_but_not_a_gateway_error(client, fake):
    fake.fail_next(1, status=500)
    create(client)
    assert len(fake.invoices) == 1
    fake.calls.clear()
    fake.fail_next(1, status=502, name='BAD_GATEWAY')
    with pytest.raises(CryptoPayError) as caught:
        create(client)
    assert caught.value.status == 502
    assert len(fake.calls) == 1


def test_429_waits_retry_after(client, fake, sleeps):
    fake.rate_limit_next(2, retry_after=0)
    create(client)
    assert methods(fake) == ['createInvoice'] * 3
    assert sleeps.taken == [0, 0]
    assert len(fake.invoices) == 1


def test_429_wait_is_capped_by_max_retry_after(client, fake, sleeps):
    fake.rate_limit_next(1, retry_after=3600)
    client.get_me()
    assert sleeps.taken == [0.05]


def test_429_forever_gives_up(client, fake):
    fake.rate_limit_next(100, retry_after=0)
    with pytest.raises(CryptoPayError) as caught:
        client.get_me()
    assert caught.value.status == 429
    assert len(fake.calls) == RETRIES + 1


# transport failures

def test_hanging_read_times_out_after_bounded_retries(fake, sleeps):
    fake.hang_next(100, seconds=5)
    with CryptoPayClient(fake.token, fake.url, timeout=(5, 1.5), retries=1, backoff=BACKOFF, sleep=sleeps) \
            as client, pytest.raises(CryptoPayError) as caught:
        client.get_me()
    assert (caught.value.status, caught.value.name) == (None, 'TIMEOUT')
    assert methods(fake) == ['getMe'] * 2


def test_read_is_retried_after_one_hang(client, fake):
    invoice_id = create(client)['invoice_id']
    fake.hang_next(1, seconds=5)
    assert [invoice['invoice_id'] for invoice in client.get_invoices([invoice_id])] == [invoice_id]
    assert methods(fake) == ['createInvoice', 'getInvoices', 'getInvoices']


def test_create_invoice_timeout_is_not_retried(client, fake):
    fake.hang_next(1, seconds=5)
    with pytest.raises(CryptoPayError) as caught:
        create(client)
    assert caught.value.name == 'TIMEOUT'
    assert methods(fake) == ['createInvoice']
    # the service did create it: a retry would have made a second one
    assert len(fake.invoices) == 1


def test_malformed_json_is_bad_json_and_not_retried(client, fake):
    fake.garbage_next(1)
    with pytest.raises(CryptoPayError) as caught:
        client.get_me()
    assert (caught.value.status, caught.value.name) == (200, 'BAD_JSON')
    assert len(fake.calls) == 1


def test_refused_connection_is_retried_then_reported(client, fake, sleeps):
    fake.refuse()
    with pytest.raises(CryptoPayError) as caught:
        client.get_me()
    assert (caught.value.status, caught.value.name) == (None, 'CONNECTION')
    assert len(sleeps.taken) == RETRIES
    fake.accept()
    assert client.get_me()['app_id'] == 12345


def test_create_invoice_retries_a_refused_connection(fake):
    fake.refuse()
    with CryptoPayClient(fake.token, fake.url, sleep=lambda seconds: fake.accept()) as client:
        invoice = create(client)
    assert methods(fake) == ['createInvoice']
    assert list(fake.invoices) == [invoice['invoice_id']]


# webhooks

def test_webhook_signature_verifies_only_the_exact_body_and_token(client, fake):
    invoice_id = create(client, order_id='order-7')['invoice_id']
    fake.pay(invoice_id)
    raw, signature = fake.webhook_body(invoice_id)
    update = json.loads(raw)
    assert update['update_type'] == 'invoice_paid'
    assert update['payload']['payload'] == 'order-7'
    assert CryptoPayClient.verify_webhook(fake.token, raw, signature) is True
    assert CryptoPayClient.verify_webhook(fake.token, raw, signature.upper()) is True
    assert CryptoPayClient.verify_webhook('12345:other', raw, signature) is False
    forged = FakeCryptoPay(token='12345:attacker')
    forged.invoices = {invoice_id: fake.invoices[invoice_id]}
    assert CryptoPayClient.verify_webhook(fake.token, *forged.webhook_body(invoice_id)) is False
    tampered = raw.replace(b'"status":"paid"', b'"status":"paid" ')
    assert tampered != raw
    assert CryptoPayClient.verify_webhook(fake.token, tampered, signature) is False
    reserialized = json.dumps(update).encode()
    assert CryptoPayClient.verify_webhook(fake.token, reserialized, signature) is False
    for bad in (None, '', 'zz', signature[:-1], 'é' * 64, 12345):
        assert CryptoPayClient.verify_webhook(fake.token, raw, bad) is False


# secrets

def test_token_never_appears_in_errors_logs_or_repr(fake, caplog):
    secret = 'AAsuperSecretTokenPart987654321'
    token = f'12345:{secret}'
    texts = []

    def failure(action, url):
        """Run action on a client with our token; return the (status, name) it failed with."""
        with CryptoPayClient(token, url, timeout=(5, 1.5), retries=1, backoff=0, sleep=lambda s: None) as client:
            texts.append(repr(client))
            with pytest.raises(CryptoPayError) as caught:
                action(client)
        error = caught.value
        while error is not None:
            texts.extend([str(error), repr(error)])
            error = error.__cause__
        return caught.value.status, caught.value.name

    caplog.set_level(logging.DEBUG)
    get_me = CryptoPayClient.get_me
    with FakeCryptoPay(token=token) as ours:
        assert failure(get_me, ours.url + '/api') == (404, 'HTTP_ERROR')
        ours.fail_next(2)
        assert failure(get_me, ours.url) == (500, 'INTERNAL_SERVER_ERROR')
        ours.rate_limit_next(2, retry_after=0)
        assert failure(get_me, ours.url) == (429, 'TOO_MANY_REQUESTS')
        ours.garbage_next(1)
        assert failure(get_me, ours.url) == (200, 'BAD_JSON')
        ours.hang_next(1, seconds=5)
        assert failure(create, ours.url) == (None, 'TIMEOUT')
        bad_asset = failure(lambda client: create(client, accepted_assets='USDT,FFF'), ours.url)
        assert bad_asset == (400, 'UNSUPPORTED_ASSET')
    assert failure(get_me, fake.url) == (401, 'UNAUTHORIZED')  # this fake has another token
    fake.refuse()
    assert failure(get_me, fake.url) == (None, 'CONNECTION')
    assert 'retry 1/1' in caplog.text
    text = '\n'.join(texts + [caplog.text])
    assert secret not in text
    assert token not in text


# helpers

def test_parse_amount_and_time():
    assert parse_amount('10.50') == Decimal('10.50')
    assert parse_amount(' 0.00000001 ') == Decimal('1E-8')
    for bad in ('', 'ten', 'NaN', 'Infinity', None):
        with pytest.raises(ValueError):
            parse_amount(bad)
    assert parse_time('2025-02-08T12:11:01.341Z') == datetime(2025, 2, 8, 12, 11, 1, 341000, tzinfo=timezone.utc)
    assert parse_time('2025-02-08T15:11:01+03:00') == datetime(2025, 2, 8, 12, 11, 1, tzinfo=timezone.utc)
    assert parse_time('2025-02-08T12:11:01').tzinfo is timezone.utc
    with pytest.raises(ValueError):
        parse_time('yesterday')


# the fake itself, against the reference

def test_fake_takes_query_strings_json_and_forms(fake):
    assert api(fake, 'getMe', verb='get').json()['result']['payment_processing_bot_username'] == 'CryptoBot'
    # aiocryptopay style: everything in the query string, numbers and booleans as text
    by_query = api(fake, 'createInvoice', {'asset': 'TON', 'amount': '1.5', 'expires_in': '60',
                                            'allow_comments': 'false'}, verb='get').json()['result']
    assert (by_query['asset'], by_query['amount'], by_query['allow_comments']) == ('TON', '1.5', False)
    by_form = api(fake, 'createInvoice', form={'currency_type': 'fiat', 'fiat': 'EUR', 'amount': '3'})
    assert by_form.json()['result']['accepted_assets'][:2] == ['USDT', 'TON']
    # C# style: numbers written as JSON strings; aiosend style: amount as a JSON number
    assert api(fake, 'createInvoice', {'asset': 'USDT', 'amount': 2.5, 'expires_in': '1800'}).status_code == 200
    assert [method for method, _ in fake.calls] == ['getMe', 'createInvoice', 'createInvoice', 'createInvoice']


@pytest.mark.parametrize('method, params, status, name', [
    ('createInvoice', {'currency_type': 'fiat', 'fiat': 'RUB', 'amount': '1', 'accepted_assets': ['USDT']},
     500, 'APP_ERROR'),
    ('createInvoice', {'asset': 'FFF', 'amount': '1'}, 400, 'UNSUPPORTED_ASSET'),
    ('createInvoice', {'asset': 'JET', 'amount': '1'}, 400, 'UNSUPPORTED_ASSET'),  # testnet only
    ('createInvoice', {'asset': 'USDT', 'amount': '1', 'expires_in': 0}, 400, 'EXPIRES_IN_INVALID'),
    ('createInvoice', {'asset': 'USDT', 'amount': '1', 'expires_in': 2678401}, 400, 'EXPIRES_IN_INVALID'),
    ('createInvoice', {'asset': 'USDT', 'amount': '1', 'paid_btn_name': 'viewItem'}, 400, 'PAID_BTN_URL_REQUIRED'),
    ('createInvoice', {'currency_type': 'fiat', 'fiat': 'XXX', 'amount': '1'}, 400, None),
    ('createInvoice', {'asset': 'USDT', 'amount': 'ten'}, 400, None),
    ('getInvoices', {'count': -30}, 500, None),
    ('getInvoices', {'offset': -10}, 500, None),
    ('getInvoices', {'count': 1001}, 400, None),
    ('getInvoices', {'status': 'expired'}, 400, None),
    ('setWebhook', {}, 405, 'METHOD_NOT_FOUND'),
    ('createPayment', {}, 405, 'METHOD_NOT_FOUND'),
])
def test_fake_errors_match_the_reference(fake, method, params, status, name):
    reply = api(fake, method, params)
    body = reply.json()
    assert reply.status_code == status == body['error']['code']
    assert body['ok'] is False
    if name:
        assert body['error']['name'] == name


@pytest.mark.parametrize('token', ['', '12345:wrong'])
def test_fake_rejects_a_wrong_or_missing_token(fake, token):
    reply = api(fake, 'getMe', token=token)
    assert (reply.status_code, reply.json()) == (401, {'ok': False, 'error': {'code': 401, 'name': 'UNAUTHORIZED'}})


def test_fake_wrong_path_is_404_without_envelope(fake):
    reply = requests.get(f'{fake.url}/abc/api/getMe', headers={'Crypto-Pay-API-Token': fake.token}, timeout=2)
    assert reply.status_code == 404
    with pytest.raises(ValueError):
        reply.json()


def test_fake_get_invoices_default_count_truncates_and_filters(fake):
    for _ in range(150):
        fake.handle('/api/createInvoice', fake.token, {'asset': 'USDT', 'amount': '1'})
    fake.pay(7)
    ids = ','.join(map(str, range(1, 151)))
    assert len(api(fake, 'getInvoices', {'invoice_ids': ids}).json()['result']['items']) == 100
    assert len(api(fake, 'getInvoices', {'invoice_ids': ids, 'count': 150}).json()['result']['items']) == 150
    paid = api(fake, 'getInvoices', {'status': 'paid'}).json()['result']['items']
    assert [invoice['invoice_id'] for invoice in paid] == [7]


def test_fake_expires_invoices_by_its_clock(client):
    clock = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    with FakeCryptoPay(now=lambda: clock[0]) as fake, CryptoPayClient(fake.token, fake.url) as crypto:
        invoice = create(crypto, expires_in=60)
        assert invoice['created_at'] == '2026-01-01T00:00:00.000Z'
        assert invoice['expiration_date'] == '2026-01-01T00:01:00.000Z'
        clock[0] += timedelta(seconds=61)
        assert crypto.get_invoices([invoice['invoice_id']])[0]['status'] == 'expired'
        with pytest.raises(ValueError):
            fake.pay(invoice['invoice_id'])
