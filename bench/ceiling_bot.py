"""The ceiling: a bot that makes the same Bot API calls per update kind as bot.py, with no database and no logic.

    TELEGRAM_API_URL=... BOT_TOKEN=... WORKER_THREADS=16 python bench/ceiling_bot.py

Same TeleBot, threads, long poll and HTTP client as bot.py (tgsender.RequestSender from the
checkout in BENCH_ROOT, telebot's default where that checkout has none), so bench/throughput.py
can give our updates/s as a fraction of what this stack allows on the same machine, in the
same run. Per update kind, as bot.py calls them (bench/tgserver.py's mix):
  /start, other text:   sendMessage (HTML text, inline keyboard)
  /promo CODE:          sendMessage
  menu presses:         editMessageText, answerCallbackQuery
  My subscription:      editMessageText, sendPhoto (a PNG upload the first time in a chat,
                        its file_id afterwards, as bot.py does), answerCallbackQuery
"""
import io
import logging
import os
import signal
import sys
from pathlib import Path

ROOT = Path(os.environ.get('BENCH_ROOT') or Path(__file__).resolve().parent.parent).resolve()
sys.path.insert(0, str(ROOT))

import telebot  # noqa: E402
from telebot import apihelper, types  # noqa: E402

TEXT = ('<b>SPN VPN</b> — fast and private.\n\nChoose what to do: buy or renew a subscription, see yours, '
        'get a free trial or invite friends. 👋 Привет, &lt;друг&gt;!')
MARKUP = types.InlineKeyboardMarkup(row_width=1)
MARKUP.add(*[types.InlineKeyboardButton(text, callback_data=data) for text, data in (
    ('🛒 Buy a subscription', 'buy'), ('📱 My subscription', 'sub'), ('🎁 Free trial', 'gift'),
    ('🎟 Promo code', 'promo'), ('👥 Invite friends', 'invite'), ('❓ Help', 'help'))])
BACK = types.InlineKeyboardMarkup()
BACK.add(types.InlineKeyboardButton('⬅️ Menu', callback_data='menu'))


def qr_bytes():
    """A QR PNG as bot.py sends it (its own renderer when importable, else any PNG of similar size)."""
    try:
        from bot import qr_png
        return qr_png('https://vpn.example.test:2096/sub/sub0000000000001')
    except Exception:  # noqa: BLE001 - a checkout without it still gets a PNG to upload
        return (Path(__file__).resolve().parent.parent / 'tests' / 'fake_telegram.py').read_bytes()[:600]


def main():
    apihelper.API_URL = os.environ['TELEGRAM_API_URL'] + '/bot{0}/{1}'
    apihelper.CONNECT_TIMEOUT = 10
    apihelper.READ_TIMEOUT = 30
    try:
        import tgsender
        apihelper.CUSTOM_REQUEST_SENDER = tgsender.RequestSender()
    except ImportError:
        pass
    png = qr_bytes()
    file_ids = {}  # chat -> file_id of its QR photo
    bot = telebot.TeleBot(os.environ['BOT_TOKEN'], threaded=True, num_threads=int(os.environ.get('WORKER_THREADS', 16)),
                          skip_pending=False)

    @bot.message_handler(content_types=['text'])
    def on_text(message):
        bot.send_message(message.chat.id, TEXT, parse_mode='HTML', reply_markup=MARKUP, disable_web_page_preview=True)

    @bot.callback_query_handler(func=lambda call: True)
    def on_button(call):
        chat_id = call.message.chat.id
        bot.edit_message_text(TEXT, chat_id, call.message.message_id, parse_mode='HTML', reply_markup=BACK,
                              disable_web_page_preview=True)
        if call.data == 'sub':
            known = file_ids.get(chat_id)
            sent = bot.send_photo(chat_id, known or io.BytesIO(png).read(), caption='Scan it in your VPN app')
            file_ids[chat_id] = sent.photo[-1].file_id
        bot.answer_callback_query(call.id)

    signal.signal(signal.SIGTERM, lambda *_: (bot.stop_polling(), sys.exit(0)))
    bot.infinity_polling(timeout=25, long_polling_timeout=25, logger_level=logging.WARNING)


if __name__ == '__main__':
    main()
