"""QR codes: the PNG scans back to the link, and each buyer's code is uploaded once, then sent by file_id (users.qr_file_id)."""
import io

import pytest
import telebot
import zxingcpp
from PIL import Image, ImageFilter
from telebot import apihelper

import models
import tgsender
from bot import ShopBot, qr_png
from conftest import BOT_TOKEN

ALICE = {'id': 1007, 'first_name': 'Alice', 'username': 'alice', 'language_code': 'en'}
LINKS = ['https://vpn.example.test:2096/sub/abcdefghij012345',
         'https://panel.example.test/sub/' + 'x' * 200 + '?name=<&>',
         'http://1.2.3.4:2096/s/q']


def decode(png):
    image = Image.open(io.BytesIO(png))
    return image, [(code.text, code.ec_level) for code in zxingcpp.read_barcodes(image)]


@pytest.mark.parametrize('link', LINKS)
def test_qr_png_scans_back_to_the_link(link):
    png = qr_png(link)
    image, found = decode(png)
    assert png.startswith(b'\x89PNG') and image.mode == '1'
    assert found == [(link, 'M')]  # medium error correction, as before: enough for a phone camera
    # as a phone camera sees a screen: a third of the size, smoothed, blurred
    blurred = image.convert('L').resize((image.width // 3, image.height // 3), Image.BILINEAR)
    blurred = blurred.filter(ImageFilter.GaussianBlur(1))
    assert [code.text for code in zxingcpp.read_barcodes(blurred)] == [link]


@pytest.fixture
def chat(telegram, shop, monkeypatch):
    """The real handlers on an unthreaded TeleBot, through our sender, fed from the fake's queue."""
    monkeypatch.setattr(apihelper, 'API_URL', telegram.url + '/bot{0}/{1}')
    monkeypatch.setattr(apihelper, 'CUSTOM_REQUEST_SENDER', tgsender.RequestSender())
    bot = telebot.TeleBot(BOT_TOKEN, threaded=False)
    handlers = ShopBot(bot, shop, shop.settings)
    handlers.username = 'spn_test_bot'
    offset = [0]

    def press_sub():
        message = telegram.send_text(ALICE, '/start')  # noqa: F841 - a menu message to press on
        menu = pump_and_last_message()
        update_id = telegram.press(ALICE, menu, 'sub')
        pump_and_last_message()
        telegram.wait_for_answer(update_id, timeout=2)
        return [call for call in telegram.sent if call.method == 'sendPhoto'][-1]

    def pump_and_last_message():
        updates = bot.get_updates(offset=offset[0], timeout=5, long_polling_timeout=0)
        if updates:
            offset[0] = updates[-1].update_id + 1
        bot.process_new_updates(updates)
        return telegram.messages_to(ALICE['id'])[-1]

    user, _ = shop.register(ALICE['id'], ALICE['username'], ALICE['first_name'], 'en')
    models.grant_days(user.id, 30, 'admin', 'qr-test')
    shop.provision(user.id)
    return press_sub


def stored():
    return {(row.id, row.qr_link, row.qr_file_id) for row in models.User.select() if row.qr_file_id}


def test_qr_is_uploaded_once_then_sent_by_file_id(chat, telegram, shop):
    user = shop.get_user(ALICE['id'])
    link = shop.subscription_link(user)

    first = chat()
    assert set(first.files) == {'photo'} and 'photo' not in first.params
    assert decode(first.files['photo'])[1] == [(link, 'M')]
    file_id = telegram.messages_to(ALICE['id'])[-1]['photo'][-1]['file_id']
    assert stored() == {(user.id, link, file_id)}

    second = chat()
    assert second.files == {} and second.params['photo'] == file_id and second.ok
    assert second.params['caption'] == first.params['caption']
    assert stored() == {(user.id, link, file_id)}


def test_a_new_link_is_uploaded_again(chat, telegram, shop):
    chat()
    models.User.update(panel_sub_id='renamed0000000001').where(models.User.telegram_id == ALICE['id']).execute()
    user = shop.get_user(ALICE['id'])
    new_link = shop.subscription_link(user)
    shop.provision(user.id)

    again = chat()
    assert set(again.files) == {'photo'} and decode(again.files['photo'])[1] == [(new_link, 'M')]
    new_file_id = telegram.messages_to(ALICE['id'])[-1]['photo'][-1]['file_id']
    assert stored() == {(user.id, new_link, new_file_id)}
    assert chat().params['photo'] == new_file_id


def test_a_refused_file_id_is_replaced_by_an_upload(chat, telegram, shop):
    chat()
    models.User.update(qr_file_id='AgACAgIAAxkDAAI-not-ours').execute()  # e.g. stored under another bot token
    again = chat()
    refused = [call for call in telegram.sent if call.method == 'sendPhoto' and not call.ok]
    assert [call.params['photo'] for call in refused] == ['AgACAgIAAxkDAAI-not-ours']
    assert set(again.files) == {'photo'} and again.ok
    assert stored() == {(shop.get_user(ALICE['id']).id, shop.subscription_link(shop.get_user(ALICE['id'])),
                         telegram.messages_to(ALICE['id'])[-1]['photo'][-1]['file_id'])}


def test_wave_one_database_gains_the_qr_columns(database):
    """Migration 20 on a database made before it: the columns appear, rows keep their data, once."""
    migrator = models.SqliteMigrator(models.db.obj) if models.is_sqlite() else models.PostgresqlMigrator(models.db.obj)
    user = models.User.create(telegram_id=55, panel_email='spn-55', first_name='Old')
    models.migrate(migrator.drop_column('users', 'qr_link'), migrator.drop_column('users', 'qr_file_id'))
    models.SchemaVersion.delete().where(models.SchemaVersion.version == 20).execute()
    columns = {column.name for column in models.db.get_columns('users')}
    assert 'qr_link' not in columns and 'qr_file_id' not in columns  # as wave 1 left it

    models.create_schema()
    models.create_schema()
    assert {'qr_link', 'qr_file_id'} <= {column.name for column in models.db.get_columns('users')}
    again = models.User.get_by_id(user.id)
    assert (again.first_name, again.qr_link, again.qr_file_id) == ('Old', None, None)
    assert models.SchemaVersion.select().where(models.SchemaVersion.version == 20).count() == 1
