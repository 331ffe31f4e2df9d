"""Telegram's clock: a button press must be answered within about 15 s, whatever an outside service does.

The fake Bot API refuses late answers as the real one does. The handlers here run with the production
clients (bot.build_shop), so the timeouts under test are the ones the shop really uses.
"""
import time

import pytest
import telebot
from telebot import apihelper
from telebot.apihelper import ApiTelegramException

import bot
import models
from conftest import BOT_TOKEN
from fake_telegram import FakeTelegram
from models import PENDING, Payment
from test_e2e import CHANNEL, CHANNEL_CHAT_ID, invoice_id_of, person

LONG = 60  # seconds a fake holds a reply: longer than any budget a button has
TRY_AGAIN = 'try again'


@pytest.fixture
def telegram():
    with FakeTelegram(token=BOT_TOKEN) as fake:
        fake.add_chat(CHANNEL_CHAT_ID, username=CHANNEL)
        yield fake


class Chat:
    """The real handlers on an unthreaded TeleBot over the fake Bot API, with the production shop."""

    def __init__(self, telegram, settings):
        apihelper.API_URL = telegram.url + '/bot{0}/{1}'
        self.telegram = telegram
        self.bot = telebot.TeleBot(BOT_TOKEN, threaded=False)
        self.handlers = bot.ShopBot(self.bot, bot.build_shop(settings), settings)
        self.handlers.username = self.bot.get_me().username
        self.offset = 0

    def pump(self):
        updates = self.bot.get_updates(offset=self.offset, timeout=5, long_polling_timeout=0)
        if updates:
            self.offset = updates[-1].update_id + 1
        self.bot.process_new_updates(updates)

    def say(self, user, text):
        self.telegram.send_text(user, text)
        self.pump()
        return self.telegram.messages_to(user['id'])[-1]

    def press(self, user, message, data):
        """Press a button; return (the answer Telegram accepted, seconds the handler took)."""
        update_id = self.telegram.press(user, message, data, strict=False)
        started = time.monotonic()
        self.pump()
        took = time.monotonic() - started
        return self.telegram.wait_for_answer(update_id, timeout=1), took

    def invoice(self, user, days=30):
        menu = self.say(user, '/start')
        self.press(user, menu, 'buy')
        self.press(user, menu, f'plan:{days}')
        return self.telegram.get_message(user['id'], menu['message_id'])


def test_fake_refuses_an_answer_after_the_limit(telegram):
    now = [1_000_000.0]
    with FakeTelegram(token=BOT_TOKEN, clock=lambda: now[0]) as slow:
        slow.answer_limit = 15
        apihelper.API_URL = slow.url + '/bot{0}/{1}'
        client = telebot.TeleBot(BOT_TOKEN, threaded=False)
        alice = person(7001)
        slow.add_user(alice)
        message = client.send_message(7001, 'menu')
        shown = slow.get_message(7001, message.message_id)
        on_time, late = (slow.press(alice, shown, 'buy', strict=False) for _ in range(2))
        queries = [update.callback_query.id for update in client.get_updates(timeout=1)]
        now[0] += 14.9
        assert client.answer_callback_query(queries[0], 'ok')
        now[0] += 0.2
        with pytest.raises(ApiTelegramException) as error:
            client.answer_callback_query(queries[1], 'late')
        assert error.value.description == ('Bad Request: query is too old and response timeout expired '
                                           'or query ID is invalid')
        assert slow.wait_for_answer(on_time, timeout=1)['text'] == 'ok'
        assert late not in {answer['update_id'] for answer in slow.callback_answers}


def test_check_press_answered_in_time_while_crypto_pay_hangs(settings, telegram, cryptopay):
    chat, alice = Chat(telegram, settings), person(7101)
    invoice = chat.invoice(alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.pay(invoice_id)
    cryptopay.hang_next(10, seconds=LONG)
    answer, took = chat.press(alice, invoice, f'check:{invoice_id}')
    assert TRY_AGAIN in answer['text'], (answer, took)
    assert Payment.get(Payment.invoice_id == invoice_id).status == PENDING


def test_plan_press_answered_in_time_while_crypto_pay_hangs(settings, telegram, cryptopay):
    chat, alice = Chat(telegram, settings), person(7102)
    menu = chat.say(alice, '/start')
    chat.press(alice, menu, 'buy')
    cryptopay.hang_next(10, seconds=LONG)
    answer, took = chat.press(alice, menu, 'plan:30')
    assert TRY_AGAIN in answer['text'], (answer, took)


def test_check_press_answered_in_time_while_crypto_pay_rate_limits(settings, telegram, cryptopay):
    chat, alice = Chat(telegram, settings), person(7103)
    invoice = chat.invoice(alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.rate_limit_next(10, retry_after=30)
    answer, took = chat.press(alice, invoice, f'check:{invoice_id}')
    assert TRY_AGAIN in answer['text'], (answer, took)


def test_check_press_answered_in_time_while_the_panel_hangs(settings, telegram, cryptopay, panel):
    chat, alice = Chat(telegram, settings), person(7104)
    invoice = chat.invoice(alice)
    invoice_id = invoice_id_of(telegram, invoice)
    cryptopay.pay(invoice_id)
    panel.hang_next(10, seconds=LONG)
    answer, took = chat.press(alice, invoice, f'check:{invoice_id}')
    assert answer['text'] is None, (answer, took)  # the message itself says "being prepared"
    assert 'being prepared' in telegram.get_message(7104, invoice['message_id'])['text']


def test_gift_and_subscription_answered_in_time_while_the_panel_hangs(settings, telegram, panel):
    chat, alice = Chat(telegram, settings), person(7105)
    menu = chat.say(alice, '/start')
    telegram.set_member(CHANNEL_CHAT_ID, 7105)
    panel.hang_next(10, seconds=LONG)
    answer, took = chat.press(alice, menu, 'gift')
    assert answer is not None, took
    panel.hang_next(10, seconds=LONG)
    answer, took = chat.press(alice, telegram.get_message(7105, menu['message_id']), 'sub')
    assert answer is not None, took
    assert models.User.get(models.User.telegram_id == 7105).expires_at is not None
