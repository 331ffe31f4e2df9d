"""Messages as Telegram reads them: outside values escaped, lengths in visible UTF-16 units, the operator's
shop name and texts file (issue 9 items 3 and 4, issue 10 item 9).

Every message goes through the fake Bot API's HTML check, which refuses what Telegram refuses.
"""
import string

import pytest
from telebot.apihelper import ApiTelegramException

import config
import jobs
import markup
import models
import texts
from conftest import settings_env
from fake_telegram import TelegramError, parse_html, utf16_len
from models import User
from test_chats import ADMIN, ALICE, Chats, buyer

HOSTILE = ['ivan<friend>', 'Petya&Masha<3', '</code>', '<a href="https://evil.example/?a=1&b=2">x</a>',
           '&amp;', '&lt', '{name}', '1 < 2 & 3 > 2', '😀' * 3]
HOSTILE_TEXT = ' '.join(HOSTILE)


@pytest.fixture(autouse=True)
def default_texts():
    reset = getattr(texts, 'configure', lambda: None)
    reset()
    yield
    reset()


@pytest.fixture
def chats(telegram, shop):
    return Chats(telegram, shop)


def refusals(telegram):
    return [call for call in telegram.sent if not call.ok]


def visible(call):
    return parse_html(call.params['text'])[0] if call.params.get('parse_mode') else call.params['text']


# The fake's HTML check (what Telegram refuses, it refuses)

@pytest.mark.parametrize('text, detail', [
    ('emails: ivan<friend>', 'Unsupported start tag "friend" at byte offset 12'),
    ('Petya&Masha<3', 'Character "&" must be escaped as "&amp;" at byte offset 5'),
    ('Petya&amp;Masha<3', 'Unclosed start tag at byte offset 15'),
    ('Petya&amp;Masha<3 ok', 'Unsupported start tag "3" at byte offset 15'),
    ('<code>x</code></code>', 'Unexpected end tag at byte offset 14'),
    ('fish & chips', 'Character "&" must be escaped as "&amp;" at byte offset 5'),
    ('&#0;', 'Character "&" must be escaped as "&amp;" at byte offset 0'),
    ('<b>bold', 'Can\'t find end tag corresponding to start tag "b"'),
])
def test_the_fake_refuses_bad_html_with_telegrams_words(text, detail):
    with pytest.raises(TelegramError) as error:
        parse_html(text)
    assert error.value.description == "Bad Request: can't parse entities: " + detail


def test_the_fake_decodes_entities_as_telegram_does():
    assert parse_html('&lt;b&gt; &amp; &quot; &#128512; &#x1F600;')[0] == '<b> & " 😀 😀'
    # Telegram (tdlib) itself shows a bare "&" and takes entities without ";": the lenient mode does too
    assert parse_html('fish & chips &lt3 &amp &#65', strict=False)[0] == 'fish & chips <3 & A'


# 9.3: values not written by texts.py are escaped

def hostile_values(template):
    return {name: HOSTILE_TEXT for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize('lang', ['en', 'ru'])
def test_every_text_renders_with_hostile_values(lang):
    for key, template in texts.TEXTS[lang].items():
        values = hostile_values(template)
        rendered = texts.t(lang, key, **values)
        shown, _ = parse_html(rendered)  # raises like Telegram on anything unescaped
        if values:
            assert HOSTILE_TEXT in shown, key
        assert markup.visible(rendered) == shown.strip() or markup.visible(rendered).strip() == shown, key


def test_hostile_panel_emails_reach_the_admin_in_sync_and_the_daily_report(chats, shop, panel, messenger):
    for email in ('ivan<friend>', 'Petya&Masha<3', '<code><a_href="x">'):
        shop.panel.ensure_client(email=email, expiry=None, sub_id=f'sub{len(email)}x', tg_id=1)
    chats.telegram.send_text(ADMIN, '/sync')
    chats.pump()
    jobs.report_reconcile(shop, messenger)
    assert refusals(chats.telegram) == []
    reports = [visible(call) for call in chats.telegram.sent if call.method == 'sendMessage']
    assert len(reports) == 2
    for report in reports:
        assert 'ivan<friend>' in report and 'petya&masha<3' in report.lower() and '<code><a_href="x">' in report


def test_a_panel_error_with_markup_reaches_the_admin(chats, panel):
    panel.success_false_next(5, msg='bad <inbound> & no "clients"')
    chats.telegram.send_text(ADMIN, '/sync')
    chats.pump()
    assert refusals(chats.telegram) == []
    assert 'Sync failed' in chats.telegram.messages_to(ADMIN['id'])[-1]['text']


def test_admin_and_buyer_messages_with_hostile_names_and_settings(telegram, panel, cryptopay, database):
    settings = config.load(settings_env(panel, cryptopay, database, SUPPORT_CONTACT='<@help&co>',
                                        CHANNEL_URL='https://t.me/x?a=<1>&b', SHOP_NAME='Ёж & Co <VPN>'))
    from conftest import make_shop
    chats = Chats(telegram, make_shop(settings))
    evil = {'id': 1001, 'first_name': '</b><i>Ivan & "Co"', 'username': 'ivan_co', 'language_code': 'ru'}
    telegram.add_chat(-1001234567890, username='@spn_channel')
    telegram.set_member(-1001234567890, 1001, 'left')
    chats.telegram.send_text(evil, '/start')
    chats.telegram.send_text(evil, '/help')
    chats.pump()
    menu = chats.telegram.messages_to(1001)[0]
    for data in ('sub', 'invite', 'help', 'gift', 'buy', 'plan:30', 'promo'):
        chats.telegram.press(evil, menu, data, strict=False)
        chats.pump()
    customer = User.get(User.telegram_id == 1001)
    models.grant_days(customer.id, 30, 'admin', 'hostile')
    for command in ('/start', '/stats', '/user 1001', '/user @ivan_co', '/user <b>&', '/give 1001 5',
                    '/give <x> 5', '/newcode 5 1 <b>', '/newcode 5 1 AMP&AMP', '/broadcast <b>&'):
        chats.telegram.send_text(ADMIN, command)
        chats.pump()
    chats.telegram.wait_for(lambda call: 'finished' in str(call.params.get('text')), timeout=10)
    assert refusals(telegram) == []
    shown = '\n'.join(visible(call) for call in telegram.sent if call.method in ('sendMessage', 'editMessageText'))
    assert '</b><i>Ivan & "Co"' in shown and '<@help&co>' in shown and 'https://t.me/x?a=<1>&b' in shown
    assert 'Ёж & Co <VPN>' in shown


# 9.4: lengths as Telegram counts them

def test_a_broadcast_of_3907_characters_with_230_ampersands_arrives_whole(chats):
    buyer(chats, ALICE)
    words = ['Tom & Jerry'] * 230
    text = ' '.join(words)
    text += ' ' + 'x' * (3907 - len(text) - 1)
    assert len(text) == 3907 and text.count('&') == 230
    chats.telegram.send_text(ADMIN, '/broadcast ' + text)
    chats.pump()
    chats.telegram.wait_for(lambda call: 'finished' in str(call.params.get('text')), timeout=15)
    got = [visible(call) for call in chats.telegram.sent
           if call.method == 'sendMessage' and str(call.params['chat_id']) == str(ALICE['id'])]
    assert got[-1] == text


def test_a_long_broadcast_is_cut_on_visible_utf16_units_and_never_inside_an_entity(chats):
    buyer(chats, ALICE)
    text = ('&<>😀' * 2000)[:4000]
    chats.telegram.send_text(ADMIN, '/broadcast ' + text)
    chats.pump()
    chats.telegram.wait_for(lambda call: 'finished' in str(call.params.get('text')), timeout=15)
    assert refusals(chats.telegram) == []
    got = [visible(call) for call in chats.telegram.sent
           if call.method == 'sendMessage' and str(call.params['chat_id']) == str(ALICE['id'])][-1]
    assert utf16_len(got) <= 4096 and got.endswith('…') and text.startswith(got[:-1])
    assert utf16_len(got) >= 4094


@pytest.mark.parametrize('limit', [1, 2, 5, 200, 1024, 4096])
def test_clip_html_counts_visible_utf16_and_keeps_markup_whole(limit):
    source = markup.Html('<b>' + markup.html('😀&<x>' * 3000) + '</b> <code>' + markup.html('a&b' * 100) + '</code>')
    clipped = markup.clip_html(source, limit)
    shown, _ = parse_html(clipped)  # balanced tags, no cut entity
    assert utf16_len(shown) <= limit and shown.endswith('…')
    short = markup.clip_html(markup.Html('<b>short &amp; sweet</b>'), limit)
    assert short == '<b>short &amp; sweet</b>' if limit >= 13 else parse_html(short)[0].endswith('…')


def test_clip_plain_counts_utf16_units():
    assert markup.clip_plain('😀' * 150, 200) == '😀' * 99 + '…'
    assert markup.clip_plain('x' * 200, 200) == 'x' * 200
    assert utf16_len(markup.clip_plain('a😀' * 100, 5)) <= 5


def test_a_long_callback_notice_is_cut_to_200_utf16_units(chats, telegram):
    texts.configure(overrides={'en': {'stale': '😀' * 150}})
    chats.telegram.send_text(ALICE, '/start')
    chats.pump()
    menu = telegram.messages_to(ALICE['id'])[-1]
    update_id = telegram.press(ALICE, menu, 'nonsense', strict=False)
    chats.pump()
    answer = telegram.wait_for_answer(update_id, timeout=2)
    assert answer['text'] == '😀' * 99 + '…'


def test_the_fake_refuses_a_callback_answer_over_200_utf16_units(chats, telegram):
    chats.telegram.send_text(ALICE, '/start')
    chats.pump()
    menu = telegram.messages_to(ALICE['id'])[-1]
    telegram.press(ALICE, menu, 'buy')
    call = chats.bot.get_updates(offset=chats.offset, timeout=1)[-1].callback_query
    with pytest.raises(ApiTelegramException) as error:
        chats.bot.answer_callback_query(call.id, '😀' * 101)
    assert error.value.description == 'Bad Request: MESSAGE_TOO_LONG'


def test_a_long_reconciliation_report_is_cut_whole(chats, shop):
    for n in range(12):
        shop.panel.ensure_client(email=f'{n}-' + '&<' * 250, expiry=None, sub_id=f'longsub{n:04d}', tg_id=1)
    chats.telegram.send_text(ADMIN, '/sync')
    chats.pump()
    assert refusals(chats.telegram) == []
    shown = chats.telegram.messages_to(ADMIN['id'])[-1]['text']
    assert utf16_len(shown) <= 4096 and '0-&<&<' in shown


# 10.9: the shop's name and the operator's texts file

def test_shop_name_is_used_in_messages_and_the_bot_description(telegram, panel, cryptopay, database):
    settings = config.load(settings_env(panel, cryptopay, database, SHOP_NAME='Ёжик & <VPN>'))
    from conftest import make_shop
    chats = Chats(telegram, make_shop(settings))
    chats.handlers.set_commands()
    telegram.send_text(ALICE, '/start')
    chats.pump()
    assert 'Ёжик & <VPN>' in telegram.messages_to(ALICE['id'])[-1]['text']
    assert 'SPN' not in telegram.messages_to(ALICE['id'])[-1]['text']
    for kind in ('description', 'short_description'):
        for language in ('', 'ru'):
            assert 'Ёжик & <VPN>' in telegram.descriptions[(kind, language)], (kind, language)
    assert telegram.descriptions[('description', 'ru')] != telegram.descriptions[('description', '')]


def write(tmp_path, body):
    path = tmp_path / 'texts.toml'
    path.write_text(body, encoding='utf-8')
    return path


def test_the_texts_file_overrides_texts_per_language(telegram, panel, cryptopay, database, tmp_path):
    path = write(tmp_path, '[ru]\nwelcome = "Здравствуйте, {name}! Это <b>{shop}</b>."\n'
                           'btn_buy = "Купить &amp; продлить"\n[en]\nunknown = "Say /start, please."\n')
    settings = config.load(settings_env(panel, cryptopay, database, TEXTS_FILE=path, SHOP_NAME='Ёж'))
    from conftest import make_shop
    chats = Chats(telegram, make_shop(settings))
    bob = {'id': 1002, 'first_name': 'Bob', 'language_code': 'ru'}
    telegram.send_text(bob, '/start')
    telegram.send_text(ALICE, 'hello')
    chats.pump()
    welcome = telegram.messages_to(1002)[-1]
    assert welcome['text'] == 'Здравствуйте, Bob! Это Ёж.'
    assert ('Купить & продлить', 'buy') in telegram.buttons(welcome)
    assert telegram.messages_to(ALICE['id'])[-1]['text'] == 'Say /start, please.'
    texts.configure()
    assert 'SPN VPN' in texts.t('ru', 'welcome', name='Bob')


@pytest.mark.parametrize('body, expected', [
    ('[ru]\nwelcom = "Hi"\n', "TEXTS_FILE: unknown key 'welcom' in [ru]"),
    ('[de]\nwelcome = "Hallo"\n', "TEXTS_FILE: unknown language [de] (use [en] and [ru])"),
    ('welcome = "Hi"\n', "TEXTS_FILE: put 'welcome' under [en] or [ru]"),
    ('[en]\nwelcome = "Hi {nmae}"\n', "TEXTS_FILE: [en] welcome: unknown placeholder {nmae} (it may use {name}, {shop})"),
    ('[en]\nwelcome = "Hi {name"\n', "TEXTS_FILE: [en] welcome: bad placeholder (expected '}' before end of string)"),
    ('[en]\nwelcome = "Hi {0}"\n', "TEXTS_FILE: [en] welcome: unknown placeholder {0} (it may use {name}, {shop})"),
    ('[en]\nwelcome = "<b>Hi {name}"\n', "TEXTS_FILE: [en] welcome: <b> is not closed"),
    ('[en]\nwelcome = "Hi & bye"\n', "TEXTS_FILE: [en] welcome: write & as &amp; (and < as &lt;, > as &gt;)"),
    ('[en]\nwelcome = "<br>"\n', "TEXTS_FILE: [en] welcome: <br> is not a tag Telegram knows"),
    ('[en]\nwelcome = 5\n', "TEXTS_FILE: [en] welcome must be a string"),
    ('[en]\nsub_active = "until {expiry} ({days:.2f} days)"\n',
     "TEXTS_FILE: [en] sub_active: bad placeholder (Unknown format code 'f' for object of type 'str')"),
    ('[en]\nwelcome = "<span>{name}</span>"\n', 'TEXTS_FILE: [en] welcome: <span> needs class="tg-spoiler"'),
    ('[en\nwelcome = "x"\n', "TEXTS_FILE: not valid TOML: "),
])
def test_a_bad_texts_file_is_one_clear_line(panel, cryptopay, database, tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(config.SettingError) as error:
        config.load(settings_env(panel, cryptopay, database, TEXTS_FILE=path))
    message = str(error.value)
    assert message.startswith(expected) and '\n' not in message, message


def test_a_missing_texts_file_is_named(panel, cryptopay, database, tmp_path):
    with pytest.raises(config.SettingError) as error:
        config.load(settings_env(panel, cryptopay, database, TEXTS_FILE=tmp_path / 'nope.toml'))
    assert str(error.value) == f'TEXTS_FILE: cannot read {tmp_path / "nope.toml"} (No such file or directory)'


def test_the_example_texts_file_is_valid():
    overrides = texts.load_overrides(config.HERE / 'texts.example.toml')
    assert set(overrides) == {'en', 'ru'} and 'welcome' in overrides['ru']


def test_bot_py_stops_on_a_bad_texts_file_with_one_line(panel, cryptopay, database, tmp_path):
    import os
    import subprocess
    import sys
    path = write(tmp_path, '[ru]\nwelcome = "Привет, {imya}!"\n')
    env = {**os.environ, **settings_env(panel, cryptopay, database, TEXTS_FILE=path)}
    done = subprocess.run([sys.executable, str(config.HERE / 'bot.py')], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.splitlines() == [
        'error: TEXTS_FILE: [ru] welcome: unknown placeholder {imya} (it may use {name}, {shop})']


def test_callback_data_over_64_bytes_is_refused_before_telegram_sees_it():
    import keyboards
    assert keyboards.button('ok', 'check:' + '9' * 19).callback_data == 'check:' + '9' * 19
    with pytest.raises(ValueError):
        keyboards.button('too long', 'plan:' + 'я' * 30)  # 65 bytes
