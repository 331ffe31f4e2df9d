"""The shop acts only in private chats: nothing posted to groups, nobody registered from them (issue 9.2).

The real handlers run on an unthreaded TeleBot over HTTP against the fake Bot API, fed update by update.
"""
import pytest
import telebot
from telebot import apihelper

import models
from bot import ShopBot
from conftest import BOT_TOKEN
from models import User

GROUP = -1009876543210
ADMIN = {'id': 900, 'first_name': 'Boss', 'username': 'boss', 'language_code': 'en'}
ALICE = {'id': 1001, 'first_name': 'Alice', 'username': 'alice', 'language_code': 'en'}
BOB = {'id': 1002, 'first_name': 'Bob', 'username': 'bob', 'language_code': 'ru'}


class Chats:
    """ShopBot's handlers, fed every queued update of the fake Telegram in this thread."""

    def __init__(self, telegram, shop):
        apihelper.API_URL = telegram.url + '/bot{0}/{1}'
        self.telegram = telegram
        self.bot = telebot.TeleBot(BOT_TOKEN, threaded=False)
        self.handlers = ShopBot(self.bot, shop, shop.settings)
        self.handlers.username = self.bot.get_me().username
        self.offset = 0

    def pump(self):
        updates = self.bot.get_updates(offset=self.offset, timeout=5, long_polling_timeout=0)
        if updates:
            self.offset = updates[-1].update_id + 1
        self.bot.process_new_updates(updates)
        return len(updates)

    def calls_about(self, chat_id):
        """Every call the bot made that posts or changes something in chat_id."""
        return [call for call in self.telegram.sent if call.method in ('sendMessage', 'sendPhoto', 'editMessageText',
                                                                      'editMessageReplyMarkup', 'sendChatAction')
                and str(call.params.get('chat_id')) == str(chat_id)]


@pytest.fixture
def chats(telegram, shop):
    telegram.add_chat(GROUP, kind='supergroup', title='Football club')
    return Chats(telegram, shop)


def buyer(chats, user, days=30):
    """Register user in their private chat and give them days (so they have a link)."""
    chats.telegram.send_text(user, '/start')
    chats.pump()
    customer = User.get(User.telegram_id == user['id'])
    models.grant_days(customer.id, days, 'admin', f'test{user["id"]}')
    return customer


@pytest.mark.parametrize('text', ['/start', '/start@spn_test_bot', '/help', '/promo SPRING24',
                                  'anyone for football?'])
def test_a_group_message_posts_nothing_and_registers_nobody(chats, text):
    chats.telegram.send_text(BOB, text, chat_id=GROUP)
    assert chats.pump() == 1
    assert chats.calls_about(GROUP) == []
    assert chats.calls_about(BOB['id']) == []
    assert User.select().count() == 0


def test_my_subscription_pressed_under_a_group_message_shows_nothing_there(chats, shop):
    customer = buyer(chats, ALICE)
    link = shop.subscription_link(customer)
    menu = chats.telegram.post_as_bot(GROUP, 'Main menu', {'inline_keyboard': [[
        {'text': '📱 My subscription', 'callback_data': 'sub'}, {'text': 'Buy', 'callback_data': 'buy'}]]})
    before = len(chats.telegram.sent)
    for data in ('sub', 'buy', 'gift', 'invite', 'check:1'):
        update_id = chats.telegram.press(ALICE, menu, data, strict=False)
        chats.pump()
        answer = chats.telegram.wait_for_answer(update_id, timeout=1)  # the spinner stops, privately
        assert link not in str(answer['text'])
    assert chats.calls_about(GROUP) == []
    assert chats.telegram.get_message(GROUP, menu['message_id'])['text'] == 'Main menu'
    assert not [call for call in chats.telegram.sent[before:] if call.method == 'sendPhoto']
    assert not [call for call in chats.telegram.sent if link in str(call.params)
                and str(call.params.get('chat_id')) != str(ALICE['id'])]


def test_an_admins_customer_lookup_in_a_group_shows_nothing(chats):
    buyer(chats, ALICE)
    chats.telegram.send_text(ADMIN, '/user 1001', chat_id=GROUP)
    chats.telegram.send_text(ADMIN, '/user@spn_test_bot @alice', chat_id=GROUP)
    chats.telegram.send_text(ADMIN, '/stats', chat_id=GROUP)
    chats.pump()
    assert chats.calls_about(GROUP) == [] and chats.calls_about(ADMIN['id']) == []
    assert not User.select().where(User.telegram_id == ADMIN['id']).exists()


def test_the_same_in_private_is_answered(chats):
    """The control: the handlers that stay silent in groups do answer in a private chat."""
    buyer(chats, ALICE)
    menu = chats.telegram.messages_to(ALICE['id'])[-1]
    chats.telegram.press(ALICE, menu, 'sub')
    chats.pump()
    assert [call.method for call in chats.calls_about(ALICE['id'])][-2:] == ['editMessageText', 'sendPhoto']
    chats.telegram.send_text(ADMIN, '/user 1001')
    chats.pump()
    assert '1001' in chats.telegram.messages_to(ADMIN['id'])[-1]['text']
