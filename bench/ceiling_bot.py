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


def screens():
    """Return {(lang, data): (text, markup)}: what bot.py shows for each press of the bench's mix, rendered once.

    The same texts and keyboards as bot.py sends for a buyer's language (texts.t and keyboards from BENCH_ROOT,
    with a typical buyer's values where bot.py fills in their own), so the ceiling sends the same bytes. A
    checkout without those modules gets one English-and-Russian screen for every press, as before."""
    try:
        import config
        import keyboards
        import texts
        from markup import html
        from texts import t
        settings = config.load()
        texts.configure(settings.shop_name, settings.texts)
    except Exception:  # noqa: BLE001 - an older checkout: the fixed screen
        return {}
    shown = {}
    for lang in ('en', 'ru'):
        menu = keyboards.main_menu(lang, gift_enabled=bool(settings.channel_id))
        back = keyboards.back_to_menu(lang)
        contact = settings.support_contact
        support = t(lang, 'help_support', contact=html(contact)) if contact else ''
        shown[lang, 'menu'] = t(lang, 'menu'), menu
        shown[lang, 'help'] = t(lang, 'help', support=support), back
        shown[lang, 'buy'] = t(lang, 'choose_plan'), keyboards.plans(lang, settings.plans, settings.currency,
                                                                    settings.stars_plans)
        shown[lang, 'invite'] = t(lang, 'invite', bonus=settings.referral_bonus_days, joined=0, paid=0,
                                  link='https://t.me/spn_bench_bot?start=AbCdEfGh23'), back
        shown[lang, 'start'] = t(lang, 'welcome', name='User 1'), menu
        link = 'https://vpn.example.test:2096/sub/sub0000000000001'
        shown[lang, 'sub'] = '\n\n'.join([
            t(lang, 'sub_active', expiry='31.12.2026', days=30), t(lang, 'sub_traffic', used='1.2 GB', limit=''),
            t(lang, 'sub_link', link=link), t(lang, 'sub_howto')]), back
    return shown


def qr_bytes():
    """A QR PNG as bot.py sends it (its own renderer when importable, else any PNG of similar size)."""
    try:
        from qr import qr_png
        return qr_png('https://vpn.example.test:2096/sub/sub0000000000001')
    except Exception:  # noqa: BLE001 - a checkout without it still gets a PNG to upload
        return (Path(__file__).resolve().parent.parent / 'tests' / 'fake_telegram.py').read_bytes()[:600]


def language_of():
    """Return user -> the buyer's language, as shop.language_for picks it (an older checkout: 'ru' or 'en')."""
    try:
        from shop import language_for
    except ImportError:
        return lambda user: 'ru' if (user.language_code or '').startswith('ru') else 'en'
    return lambda user: language_for(user.language_code)


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
    shown, language = screens(), language_of()
    file_ids = {}  # chat -> file_id of its QR photo
    bot = telebot.TeleBot(os.environ['BOT_TOKEN'], threaded=True, num_threads=int(os.environ.get('WORKER_THREADS', 16)),
                          skip_pending=False)

    @bot.message_handler(content_types=['text'])
    def on_text(message):
        text, markup = shown.get((language(message.from_user), 'start'), (TEXT, MARKUP))
        bot.send_message(message.chat.id, text, parse_mode='HTML', reply_markup=markup, disable_web_page_preview=True)

    @bot.callback_query_handler(func=lambda call: True)
    def on_button(call):
        chat_id = call.message.chat.id
        text, markup = shown.get((language(call.from_user), call.data), (TEXT, BACK))
        bot.edit_message_text(text, chat_id, call.message.message_id, parse_mode='HTML', reply_markup=markup,
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
