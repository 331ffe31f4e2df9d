"""Tests for the loopback Telegram fake, driven by a real telebot.TeleBot over HTTP."""

import json
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import requests
import telebot
from telebot import apihelper
from telebot import types
from telebot.apihelper import ApiTelegramException

from fake_telegram import DEFAULT_TOKEN
from fake_telegram import FakeTelegram

ALICE = {"id": 1001, "first_name": "Alice", "username": "alice", "language_code": "en"}
BOB = {"id": 1002, "first_name": "Bob", "language_code": "ru"}


@pytest.fixture
def telegram():
    fake = FakeTelegram()
    yield fake
    fake.close()


@pytest.fixture
def bot(telegram, monkeypatch):
    monkeypatch.setattr(apihelper, "API_URL", telegram.url + "/bot{0}/{1}")
    return telebot.TeleBot(telegram.token, threaded=False)


def png(width, height):
    """Return a minimal valid greyscale PNG of the given size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xff" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def menu(*buttons):
    markup = types.InlineKeyboardMarkup()
    markup.add(*(types.InlineKeyboardButton(text, callback_data=data) for text, data in buttons))
    return markup


def in_thread(function):
    """Run function in a thread; return (thread, outcome list that receives its result or error)."""
    outcome = []

    def run():
        try:
            outcome.append(function())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_get_me_reports_the_configured_bot(bot, telegram):
    me = bot.get_me()
    assert (me.id, me.username, me.is_bot) == (telegram.bot_user["id"], "spn_test_bot", True)


def test_send_message_returns_a_full_message_and_is_recorded(bot, telegram):
    telegram.add_user(ALICE)
    first = bot.send_message(ALICE["id"], "Hello", reply_markup=menu(("Buy", "buy"), ("Help", "help")))
    second = bot.send_message(ALICE["id"], "Again")

    assert second.message_id == first.message_id + 1
    assert (first.chat.id, first.from_user.username, first.text) == (ALICE["id"], "spn_test_bot", "Hello")
    call = telegram.sent[-2]
    assert call.method == "sendMessage" and call.params["text"] == "Hello"
    assert call.params["reply_markup"]["inline_keyboard"][0][0] == {"text": "Buy", "callback_data": "buy"}
    assert telegram.buttons(telegram.get_message(ALICE["id"], first.message_id)) == [("Buy", "buy"), ("Help", "help")]
    assert [m["text"] for m in telegram.messages_to(ALICE["id"])] == ["Hello", "Again"]
    assert telegram.wait_for_message(ALICE["id"])["text"] == "Hello"
    assert telegram.wait_for_message(ALICE["id"])["text"] == "Again"


def test_message_ids_are_shared_by_user_and_bot_within_a_chat(bot, telegram):
    telegram.send_text(ALICE, "hi")
    reply = bot.send_message(ALICE["id"], "hello")
    telegram.add_user(BOB)
    assert reply.message_id == 2
    assert bot.send_message(BOB["id"], "hello").message_id == 1


def test_unknown_chat_is_not_found(bot):
    with pytest.raises(ApiTelegramException) as error:
        bot.send_message(424242, "anyone there?")
    assert (error.value.error_code, error.value.description) == (400, "Bad Request: chat not found")


def test_html_becomes_visible_text_with_entities(bot, telegram):
    telegram.add_user(ALICE)
    sent = bot.send_message(ALICE["id"], '<b>Plan</b> &lt;1 month&gt; <a href="https://t.me/x?a=1&amp;b=2">pay</a>',
                            parse_mode="HTML")
    assert sent.text == "Plan <1 month> pay"
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [("bold", 0, 4), ("text_link", 15, 3)]
    assert sent.entities[1].url == "https://t.me/x?a=1&b=2"


@pytest.mark.parametrize("text, detail", [
    ("<b>open", 'Can\'t find end tag corresponding to start tag "b"'),
    ("close</b>", "Unexpected end tag at byte offset 5"),
    ("<b>x</i>", 'Unmatched end tag at byte offset 4, expected "</b>", found "</i>"'),
    ("<br>line", 'Unsupported start tag "br" at byte offset 0'),
    ("1 < 2", 'Unsupported start tag "" at byte offset 2'),
    ("<span>x</span>", 'Tag "span" must have class "tg-spoiler" at byte offset 0'),
])
def test_bad_html_is_refused_like_telegram(bot, telegram, text, detail):
    telegram.add_user(ALICE)
    with pytest.raises(ApiTelegramException) as error:
        bot.send_message(ALICE["id"], text, parse_mode="HTML")
    assert error.value.description == "Bad Request: can't parse entities: " + detail
    assert telegram.messages_to(ALICE["id"]) == []


def test_html_characters_pass_as_plain_text_without_parse_mode(bot, telegram):
    telegram.add_user(ALICE)
    assert bot.send_message(ALICE["id"], "1 < 2 <b>").text == "1 < 2 <b>"


def test_length_limit_counts_visible_utf16_units(bot, telegram):
    telegram.add_user(ALICE)
    assert bot.send_message(ALICE["id"], "<b>" + "x" * 4096 + "</b>", parse_mode="HTML")
    with pytest.raises(ApiTelegramException) as error:
        bot.send_message(ALICE["id"], "x" * 4095 + "😀")  # the emoji is two UTF-16 units
    assert error.value.description == "Bad Request: message is too long"


def test_callback_data_over_64_bytes_is_refused(bot, telegram):
    telegram.add_user(ALICE)
    with pytest.raises(ApiTelegramException) as error:
        bot.send_message(ALICE["id"], "menu", reply_markup=menu(("Buy", "я" * 33)))
    assert error.value.description == "Bad Request: BUTTON_DATA_INVALID"


def test_send_text_builds_a_real_command_update(bot, telegram):
    update_id = telegram.send_text(ALICE, "/start ref_42")
    [update] = bot.get_updates(long_polling_timeout=5)
    assert update.update_id == update_id
    message = update.message
    assert (message.text, message.from_user.username, message.from_user.language_code) == ("/start ref_42", "alice", "en")
    assert (message.chat.type, message.chat.id) == ("private", ALICE["id"])
    assert [(e.type, e.offset, e.length) for e in message.entities] == [("bot_command", 0, 6)]
    assert telebot.util.extract_arguments(message.text) == "ref_42"


def test_long_polling_delivers_an_update_queued_while_waiting(bot, telegram):
    thread, outcome = in_thread(lambda: bot.get_updates(long_polling_timeout=10))
    telegram.wait_polling()
    update_id = telegram.send_text(ALICE, "hello")
    thread.join(timeout=10)
    assert [u.update_id for u in outcome[0]] == [update_id]


def test_offset_confirms_earlier_updates(bot, telegram):
    first = telegram.send_text(ALICE, "one")
    second = telegram.send_text(BOB, "two")
    assert [u.update_id for u in bot.get_updates(limit=1, long_polling_timeout=5)] == [first]
    assert [u.update_id for u in bot.get_updates(offset=first + 1, long_polling_timeout=5)] == [second]
    assert telegram.pending_updates() == 1
    telegram.send_text(ALICE, "three")
    bot.get_updates(offset=-1, long_polling_timeout=5)
    assert telegram.pending_updates() == 1


def test_a_second_poller_terminates_the_first_with_409(bot, telegram):
    thread, outcome = in_thread(lambda: bot.get_updates(long_polling_timeout=10))
    telegram.wait_polling()
    second = requests.get(f"{telegram.url}/bot{telegram.token}/getUpdates", params={"timeout": 0}, timeout=5)
    thread.join(timeout=10)
    assert second.json() == {"ok": True, "result": []}
    assert isinstance(outcome[0], ApiTelegramException) and outcome[0].error_code == 409
    assert outcome[0].description.startswith("Conflict: terminated by other getUpdates request")


def test_a_polling_bot_answers_a_command(bot, telegram):
    @bot.message_handler(commands=["start"])
    def greet(message):
        bot.reply_to(message, f"Welcome, {message.from_user.first_name}")

    thread, outcome = in_thread(lambda: bot.polling(long_polling_timeout=5))
    telegram.send_text(ALICE, "/start")
    reply = telegram.wait_for_message(ALICE["id"], contains="Welcome")
    bot.stop_polling()
    telegram.close()  # releases the held long poll so the loop notices the stop
    thread.join(timeout=10)
    assert reply["text"] == "Welcome, Alice" and not thread.is_alive()


def test_press_delivers_a_callback_query_and_records_the_answer(bot, telegram):
    @bot.callback_query_handler(func=lambda call: call.data == "buy")
    def on_buy(call):
        bot.answer_callback_query(call.id, "Choose a plan")

    telegram.add_user(ALICE)
    shown = bot.send_message(ALICE["id"], "Menu", reply_markup=menu(("Buy", "buy")))
    update_id = telegram.press(ALICE, telegram.get_message(ALICE["id"], shown.message_id), "buy")
    [update] = bot.get_updates(long_polling_timeout=5)
    query = update.callback_query
    assert (query.data, query.from_user.id, query.message.message_id) == ("buy", ALICE["id"], shown.message_id)
    assert query.message.reply_markup.keyboard[0][0].callback_data == "buy"

    bot.process_new_updates([update])
    assert telegram.wait_for_answer(update_id)["text"] == "Choose a plan"
    assert telegram.callback_answers[0]["callback_query_id"] == query.id
    with pytest.raises(ApiTelegramException) as error:
        bot.answer_callback_query(query.id)
    assert error.value.description.startswith("Bad Request: query is too old")


def test_press_refuses_buttons_that_are_not_shown(bot, telegram):
    telegram.add_user(ALICE)
    shown = bot.send_message(ALICE["id"], "Menu", reply_markup=menu(("Buy", "buy")))
    message = telegram.get_message(ALICE["id"], shown.message_id)
    with pytest.raises(ValueError):
        telegram.press(ALICE, message, "sell")
    assert telegram.press(ALICE, message, "sell", strict=False)


def test_edits_follow_telegram_rules(bot, telegram):
    telegram.add_user(ALICE)
    shown = bot.send_message(ALICE["id"], "Pay 100 RUB", reply_markup=menu(("Check", "check")))

    with pytest.raises(ApiTelegramException) as error:
        bot.edit_message_reply_markup(ALICE["id"], shown.message_id, reply_markup=menu(("Check", "check")))
    assert error.value.description.startswith("Bad Request: message is not modified")

    edited = bot.edit_message_text("<b>Paid</b>", ALICE["id"], shown.message_id, parse_mode="HTML")
    assert edited.text == "Paid" and edited.edit_date
    current = telegram.get_message(ALICE["id"], shown.message_id)
    assert current["text"] == "Paid" and telegram.buttons(current) == []  # no reply_markup drops the keyboard

    with pytest.raises(ApiTelegramException) as error:
        bot.edit_message_text("<b>Paid</b>", ALICE["id"], shown.message_id, parse_mode="HTML")
    assert error.value.description.startswith("Bad Request: message is not modified")
    with pytest.raises(ApiTelegramException) as error:
        bot.edit_message_text("x", ALICE["id"], 999)
    assert error.value.description == "Bad Request: message to edit not found"


def test_rate_limit_answers_429_with_retry_after(bot, telegram):
    telegram.add_user(ALICE)
    telegram.rate_limit_next(2, retry_after=3)
    for _ in range(2):
        with pytest.raises(ApiTelegramException) as error:
            bot.send_message(ALICE["id"], "hi")
        assert error.value.error_code == 429
        assert error.value.result_json["parameters"] == {"retry_after": 3}
        assert error.value.description == "Too Many Requests: retry after 3"
    assert bot.send_message(ALICE["id"], "hi").text == "hi"
    assert [m["text"] for m in telegram.messages_to(ALICE["id"])] == ["hi"]


def test_flood_limit_refuses_sends_beyond_the_per_second_budget(bot, telegram):
    telegram.add_user(ALICE)
    telegram.max_sends_per_second = 2
    bot.send_message(ALICE["id"], "1")
    bot.send_message(ALICE["id"], "2")
    with pytest.raises(ApiTelegramException) as error:
        bot.send_message(ALICE["id"], "3")
    assert error.value.error_code == 429


def test_blocked_user_gets_403_until_unblocked(bot, telegram):
    telegram.add_user(ALICE)
    telegram.block_user(ALICE["id"])
    for send in (lambda: bot.send_message(ALICE["id"], "hi"), lambda: bot.send_photo(ALICE["id"], png(2, 2))):
        with pytest.raises(ApiTelegramException) as error:
            send()
        assert (error.value.error_code, error.value.description) == (403, "Forbidden: bot was blocked by the user")
    [update] = bot.get_updates(long_polling_timeout=5)
    assert update.my_chat_member.new_chat_member.status == "kicked"

    telegram.unblock_user(ALICE["id"])
    assert bot.send_message(ALICE["id"], "welcome back").text == "welcome back"


def test_wrong_token_is_unauthorized_and_unknown_method_not_found(telegram, monkeypatch):
    monkeypatch.setattr(apihelper, "API_URL", telegram.url + "/bot{0}/{1}")
    with pytest.raises(ApiTelegramException) as error:
        telebot.TeleBot("987:wrong-token", threaded=False).get_me()
    assert (error.value.error_code, error.value.description) == (401, "Unauthorized")

    unknown = requests.post(f"{telegram.url}/bot{telegram.token}/sendHologram", timeout=5)
    assert (unknown.status_code, unknown.json()) == (404, {"ok": False, "error_code": 404, "description": "Not Found"})
    any_case = requests.get(f"{telegram.url}/bot{telegram.token}/GETME", timeout=5)
    assert any_case.json()["result"]["username"] == "spn_test_bot"


@pytest.mark.parametrize("status, is_member, kind", [
    ("creator", None, types.ChatMemberOwner),
    ("administrator", None, types.ChatMemberAdministrator),
    ("member", None, types.ChatMemberMember),
    ("restricted", False, types.ChatMemberRestricted),
    ("left", None, types.ChatMemberLeft),
    ("kicked", None, types.ChatMemberBanned),
])
def test_get_chat_member_reports_the_configured_status(bot, telegram, status, is_member, kind):
    telegram.add_chat(-1001234567890, username="spn_news")
    telegram.set_member(-1001234567890, ALICE["id"], status, is_member=is_member)
    member = bot.get_chat_member("@spn_news", ALICE["id"])
    assert isinstance(member, kind) and member.status == status
    if status == "restricted":
        assert member.is_member is False


def test_get_chat_member_errors(bot, telegram):
    with pytest.raises(ApiTelegramException) as error:
        bot.get_chat_member(-100999, ALICE["id"])
    assert error.value.description == "Bad Request: chat not found"
    telegram.add_chat(-100777, members_visible=False)
    with pytest.raises(ApiTelegramException) as error:
        bot.get_chat_member(-100777, ALICE["id"])
    assert error.value.description == "Bad Request: member list is inaccessible"
    telegram.add_chat(-100555)
    assert bot.get_chat_member(-100555, ALICE["id"]).status == "left"


def test_send_photo_uploads_multipart(bot, telegram):
    telegram.add_user(ALICE)
    image = png(33, 21)
    sent = bot.send_photo(ALICE["id"], image, caption="Your <i>QR</i>", parse_mode="HTML")
    assert (sent.photo[0].width, sent.photo[0].height, sent.caption) == (33, 21, "Your QR")
    assert telegram.sent[-1].files["photo"] == image
    assert telegram.file_bytes(sent.photo[0].file_id) == image
    assert telegram.wait_for_message(ALICE["id"], contains="QR")["photo"][0]["file_size"] == len(image)
    with pytest.raises(ApiTelegramException) as error:
        bot.send_photo(ALICE["id"], b"not an image")
    assert error.value.description == "Bad Request: IMAGE_PROCESS_FAILED"


def test_commands_are_stored_per_scope_and_language(bot, telegram):
    bot.set_my_commands([types.BotCommand("start", "Menu")])
    admin_scope = types.BotCommandScopeChat(ALICE["id"])
    bot.set_my_commands([types.BotCommand("stats", "Stats")], scope=admin_scope, language_code="ru")
    assert [c.command for c in bot.get_my_commands()] == ["start"]
    assert [c.command for c in bot.get_my_commands(scope=admin_scope, language_code="ru")] == ["stats"]
    with pytest.raises(ApiTelegramException) as error:
        bot.set_my_commands([types.BotCommand("Bad-Name", "x")])
    assert error.value.description == "Bad Request: BOT_COMMAND_INVALID"


def test_chat_action_and_get_chat(bot, telegram):
    telegram.add_user(ALICE)
    assert bot.send_chat_action(ALICE["id"], "typing") is True
    with pytest.raises(ApiTelegramException):
        bot.send_chat_action(ALICE["id"], "dancing")
    assert bot.get_chat(ALICE["id"]).username == "alice"


def test_delete_webhook_can_drop_pending_updates(bot, telegram):
    telegram.send_text(ALICE, "stale")
    assert bot.delete_webhook(drop_pending_updates=True) is True
    assert telegram.pending_updates() == 0


def test_wait_for_message_times_out_with_a_dump(bot, telegram):
    telegram.add_user(ALICE)
    bot.send_message(ALICE["id"], "something else")
    with pytest.raises(AssertionError) as error:
        telegram.wait_for_message(ALICE["id"], contains="Welcome", timeout=0.2)
    assert "something else" in str(error.value)


def test_command_line_fake_serves_synthetic_batches():
    script = Path(__file__).with_name("fake_telegram.py")
    process = subprocess.Popen([sys.executable, str(script), "--port", "0", "--synthetic", "3", "--total", "5"],
                               stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        endpoint = f"{url}/bot{DEFAULT_TOKEN}/getUpdates"
        first = requests.get(endpoint, params={"timeout": 0}, timeout=5).json()["result"]
        offset = first[-1]["update_id"] + 1
        second = requests.get(endpoint, params={"timeout": 0, "offset": offset}, timeout=5).json()["result"]
        offset = second[-1]["update_id"] + 1
        third = requests.get(endpoint, params={"timeout": 0, "offset": offset}, timeout=5).json()["result"]
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=10)
    assert [len(first), len(second), third] == [3, 2, []]
    assert first[0]["message"]["text"] == "/start"
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["synthetic_updates"], summary["confirmed_updates"], summary["calls"]["getUpdates"]) == (5, 5, 3)


# Stars: the refusals of the Bot API server (github.com/tdlib/telegram-bot-api, telegram-bot-api/Client.cpp)


def call(telegram, method, **params):
    """POST one Bot API call with exactly these form fields; return (status, description or result)."""
    reply = requests.post(f"{telegram.url}/bot{telegram.token}/{method}", data=params, timeout=10).json()
    return reply.get("error_code", 200), reply.get("description", reply.get("result"))


def paid_charge(bot, telegram, user=ALICE, link=False):
    """Sell user a 1-Star invoice (a monthly subscription link with link=True); return the charge id."""
    telegram.add_user(user)
    prices = [types.LabeledPrice("Plan", 1)]
    if link:
        invoice = bot.create_invoice_link("Plan", "30 days", "stars:1", "", "XTR", prices,
                                          subscription_period=2592000)
    else:
        message = bot.send_invoice(user["id"], "Plan", "30 days", "stars:1", "", "XTR", prices)
        invoice = {"chat": {"id": user["id"]}, "message_id": message.message_id}
    query = telegram.pay(user, invoice, drop=True)
    bot.answer_pre_checkout_query(query, ok=True)
    return telegram.pre_checkouts[query]["answer"]["charge_id"]


def test_answer_pre_checkout_query_refuses_as_the_bot_api_does(bot, telegram):
    telegram.add_user(ALICE)
    message = bot.send_invoice(ALICE["id"], "Plan", "30 days", "stars:1", "", "XTR", [types.LabeledPrice("Plan", 1)])
    query = telegram.pay(ALICE, {"chat": {"id": ALICE["id"]}, "message_id": message.message_id})
    # get_required_string_arg, its first letter lowered by fail_query_with_error
    assert call(telegram, "answerPreCheckoutQuery", pre_checkout_query_id=query, ok="false") == \
        (400, 'Bad Request: parameter "error_message" is required')
    assert call(telegram, "answerPreCheckoutQuery", pre_checkout_query_id=query, ok="yes") == (200, True)  # to_bool
    gone = "Bad Request: query is too old and response timeout expired or query ID is invalid"  # QUERY_ID_INVALID
    assert call(telegram, "answerPreCheckoutQuery", pre_checkout_query_id=query, ok="true") == (400, gone)
    assert call(telegram, "answerPreCheckoutQuery", pre_checkout_query_id="777", ok="true") == (400, gone)


def test_get_star_transactions_clamps_offset_and_limit_as_the_bot_api_does(bot, telegram):
    charges = [paid_charge(bot, telegram, {"id": 1100 + n, "first_name": f"U{n}"}) for n in range(3)]
    for offset, limit, want in (("-5", "2", charges[:2]), ("0", "0", charges[:1]), ("1", "500", charges[1:]),
                                ("x", "", charges)):
        status, result = call(telegram, "getStarTransactions", offset=offset, limit=limit)
        assert status == 200 and [t["id"] for t in result["transactions"]] == want, (offset, limit, result)


def test_refund_star_payment_refuses_as_the_bot_api_and_telegram_do(bot, telegram):
    charge = paid_charge(bot, telegram)
    assert call(telegram, "refundStarPayment", telegram_payment_charge_id=charge) == \
        (400, "Bad Request: invalid user_id specified")
    assert call(telegram, "refundStarPayment", user_id=ALICE["id"]) == \
        (400, 'Bad Request: parameter "telegram_payment_charge_id" is required')
    assert call(telegram, "refundStarPayment", user_id=ALICE["id"], telegram_payment_charge_id="nope") == \
        (400, "Bad Request: CHARGE_NOT_FOUND")
    assert call(telegram, "refundStarPayment", user_id=BOB["id"], telegram_payment_charge_id=charge) == \
        (400, "Bad Request: USER_ID_INVALID")
    assert call(telegram, "refundStarPayment", user_id=ALICE["id"], telegram_payment_charge_id=charge) == (200, True)
    assert call(telegram, "refundStarPayment", user_id=ALICE["id"], telegram_payment_charge_id=charge) == \
        (400, "Bad Request: CHARGE_ALREADY_REFUNDED")


def test_edit_user_star_subscription_refuses_as_the_bot_api_and_telegram_do(bot, telegram):
    charge = paid_charge(bot, telegram, link=True)
    assert call(telegram, "editUserStarSubscription", telegram_payment_charge_id=charge, is_canceled="true") == \
        (400, "Bad Request: invalid user_id specified")
    assert call(telegram, "editUserStarSubscription", user_id=ALICE["id"], telegram_payment_charge_id="nope",
                is_canceled="true") == (400, "Bad Request: CHARGE_ID_INVALID")
    assert call(telegram, "editUserStarSubscription", user_id=ALICE["id"], telegram_payment_charge_id=charge,
                is_canceled="true") == (200, True)
    # no is_canceled is false (the Bot API's to_bool of an empty argument): the renewal is resumed
    assert call(telegram, "editUserStarSubscription", user_id=ALICE["id"], telegram_payment_charge_id=charge) == \
        (200, True)
    assert call(telegram, "editUserStarSubscription", user_id=ALICE["id"], telegram_payment_charge_id=charge,
                is_canceled="false") == (400, "Bad Request: SUBSCRIPTION_NOT_MODIFIED")


def test_invoices_are_checked_as_the_bot_api_does_before_telegram_sees_them(bot, telegram):
    telegram.add_user(ALICE)
    good = {"chat_id": ALICE["id"], "title": "Plan", "description": "30 days", "payload": "stars:1",
            "currency": "XTR", "prices": json.dumps([{"label": "Plan", "amount": 1}])}
    for field in ("title", "description", "payload", "currency", "prices"):
        assert call(telegram, "sendInvoice", **{**good, field: ""}) == \
            (400, f'Bad Request: parameter "{field}" is required'), field
    for prices, detail in (("[{", "can't parse prices JSON object"), ("{}", "expected an Array of labeled prices"),
                           ("[]", "there must be at least one price"),
                           ('[{"label": "", "amount": 1}]',
                            "can't parse labeled price: LabeledPrice label must be non-empty")):
        assert call(telegram, "createInvoiceLink", **{**good, "prices": prices}) == (400, "Bad Request: " + detail)
