"""Entry point and Telegram handlers: `python bot.py`, `python bot.py check`, `python bot.py restore FILE`.

Handlers decode the update, call a plain Shop method and format the reply.
"""
import concurrent.futures
import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import sys
import threading
from datetime import datetime, timezone

from peewee import InterfaceError, OperationalError
from telebot import apihelper
from telebot.apihelper import ApiTelegramException
from telebot.types import BotCommand, BotCommandScopeChat, BotCommandScopeDefault, CallbackQuery

import admin
import config
import jobs
import keyboards
import models
import panels
import stars
import web
from admin import ADMIN_COMMANDS
from cryptobot import CryptoPayClient, CryptoPayError
from logs import RedactSecrets, secrets_of, setup_logging
from messenger import Messenger
from outages import Outage, Watched, cryptopay_unreachable
from polling import make_bot, start_telegram
from qr import qr_png
from shop import InvoiceInProgress, Shop, TooManyInvoices, language_for as shop_language
import texts
from markup import (MAX_CALLBACK_ANSWER, MAX_CAPTION, MAX_DESCRIPTION, MAX_MESSAGE, MAX_SHORT_DESCRIPTION, clip_html,
                    clip_plain, html, visible)
from texts import human_bytes, plain, plan_name, show_date, t
from xui import XuiClient

log = logging.getLogger('bot')

MEMBER_STATUSES = ('member', 'administrator', 'creator')
# A button press must be answered within ~15 s (Telegram then refuses the answer): inside handlers each
# outside call is tried once, with these timeouts; only the jobs retry with backoff.
HANDLER_TIMEOUT = (3.05, 5)


def limit_malloc_arenas(arenas=2):
    """Cap glibc's malloc arenas at `arenas`, as MALLOC_ARENA_MAX=2 in the environment does (which wins when set).

    glibc gives each busy thread an arena of its own, up to 8 per core, and the pages freed in them stay
    resident: with 16 handler threads the bot held 84.9 MB after 20,000 updates, 76.3 MB with 2 arenas
    (bench/memory.py). Threads then share arenas; the bot's threads spend their time in Python with the
    interpreter lock, so they rarely contend for malloc. A C library without mallopt is left as it is.
    """
    if os.environ.get('MALLOC_ARENA_MAX'):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.mallopt(-8, arenas)  # M_ARENA_MAX, from glibc's malloc.h
    except (OSError, AttributeError):
        pass


def command_argument(text):
    """Return what follows the command word of a message ('' if nothing)."""
    parts = (text or '').split(maxsplit=1)
    return parts[1].strip() if len(parts) > 1 else ''


def pressed_in_private(call):
    """Tell whether a button press came from a message in the presser's own private chat with the bot."""
    message = call.message
    return message is not None and message.chat.type == 'private' and message.chat.id == call.from_user.id


class ShopBot:
    """The Telegram side of the shop: registers handlers on a TeleBot and answers updates."""

    def __init__(self, bot, shop, settings):
        self.bot = bot
        self.shop = shop
        self.settings = settings
        self.messenger = Messenger(bot)
        self.username = None
        texts.configure(settings.shop_name, settings.texts)
        # The shop works only in private chats: in a group a reply (a link, a QR code, a customer's data)
        # would be seen by every member, so group messages get no handler and register nobody.
        private = ['private']
        bot.register_message_handler(self.guarded(self.on_command), content_types=['text'], chat_types=private,
                                     func=lambda message: (message.text or '').startswith('/'))
        bot.register_message_handler(self.guarded(self.on_text), content_types=['text'], chat_types=private)
        bot.register_message_handler(self.guarded(self.on_other), chat_types=private, content_types=[
            'audio', 'photo', 'voice', 'video', 'document', 'location', 'contact', 'sticker', 'animation',
            'video_note', 'poll', 'dice', 'venue'])
        bot.register_callback_query_handler(self.guarded(self.on_button), func=pressed_in_private)
        bot.register_callback_query_handler(self.on_button_elsewhere, func=lambda call: True)
        # Telegram Stars: the payment arrives as a message; a pre-checkout query must be answered within 10 s,
        # so it skips the handler threads' queue and is answered on threads of its own.
        self.stars = stars.Stars(shop, bot)
        bot.register_message_handler(self.guarded(self.on_successful_payment), content_types=['successful_payment'],
                                     chat_types=private)
        self.checkout_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix='checkout')
        bot.process_new_pre_checkout_query = self.on_pre_checkout_queries
        self.admin = admin.AdminCommands(shop, settings, self.stars, self.messenger, self.reply)

    # Plumbing

    def guarded(self, handler):
        """Run a handler with a database connection; say 'busy' instead of crashing while the database is down."""
        def wrapper(update):
            try:
                with models.connection():
                    return handler(update)
            except ApiTelegramException as exc:  # e.g. the user blocked the bot mid-conversation
                log.warning('telegram refused a reply user=%s: %s', update.from_user.id, exc.description)
            except (OperationalError, InterfaceError) as exc:
                log.error('database unavailable user=%s: %s', update.from_user.id, type(exc).__name__)
                busy = plain(shop_language(update.from_user.language_code), 'busy')
                try:
                    if isinstance(update, CallbackQuery):
                        self.bot.answer_callback_query(update.id, clip_plain(busy, MAX_CALLBACK_ANSWER))
                    else:
                        self.bot.send_message(update.chat.id, clip_plain(busy, MAX_MESSAGE))
                except ApiTelegramException as exc:
                    log.warning('busy notice not sent user=%s: %s', update.from_user.id, exc.description)
        # Named like the handler but without __wrapped__: telebot reads each handler's signature on every update,
        # and following __wrapped__ to a bound method costs ~3% of a menu press (py-spy, bench/throughput.py).
        functools.update_wrapper(wrapper, handler, updated=())
        del wrapper.__wrapped__
        return wrapper

    def user_of(self, tg_user, invite_code=None):
        """Register (or refresh) the Telegram user and return our User."""
        user, _ = self.shop.register(tg_user.id, tg_user.username, tg_user.first_name, tg_user.language_code,
                                     invite_code=invite_code)
        return user

    def is_admin(self, telegram_id):
        return telegram_id in self.settings.admin_ids

    def reply(self, chat_id, text, markup=None):
        return self.bot.send_message(chat_id, clip_html(text), parse_mode='HTML', reply_markup=markup,
                                     disable_web_page_preview=True)

    def show(self, call, text, markup=None):
        """Replace the pressed message with text (send a new one when it cannot be edited)."""
        message = call.message
        try:
            self.bot.edit_message_text(clip_html(text), message.chat.id, message.message_id, parse_mode='HTML',
                                       reply_markup=markup, disable_web_page_preview=True)
            return message
        except ApiTelegramException as exc:
            if 'not modified' in (exc.description or ''):
                return message
            return self.reply(message.chat.id, text, markup)

    def set_commands(self):
        """Publish the bot's profile: its description (with SHOP_NAME) and command menu for everyone in English
        and Russian, plus the admin commands in each admin's chat."""
        for lang in ('en', 'ru'):
            language_code = None if lang == 'en' else 'ru'
            commands = [BotCommand(name, plain(lang, f'cmd_{name}')) for name in ('start', 'promo', 'help', 'cancel')]
            self.bot.set_my_commands(commands, scope=BotCommandScopeDefault(), language_code=language_code)
            try:
                self.bot.set_my_description(clip_plain(plain(lang, 'bot_description'), MAX_DESCRIPTION),
                                            language_code=language_code)
                self.bot.set_my_short_description(
                    clip_plain(plain(lang, 'bot_short_description'), MAX_SHORT_DESCRIPTION),
                    language_code=language_code)
            except ApiTelegramException as exc:  # a profile without a description still sells
                log.warning('bot description not set lang=%s: %s', lang, exc.description)
        admin_commands = [BotCommand('start', 'Main menu')] + [BotCommand(name, line) for name, line in admin.MENU]
        for admin_id in self.settings.admin_ids:
            try:
                self.bot.set_my_commands(admin_commands, scope=BotCommandScopeChat(admin_id))
            except ApiTelegramException as exc:  # the admin never opened the bot
                log.warning('admin commands not set admin=%s: %s', admin_id, exc.description)

    # Messages

    def on_command(self, message):
        command, _, mention = message.text.split(maxsplit=1)[0][1:].partition('@')
        if mention and self.username and mention.lower() != self.username.lower():
            return
        command = command.lower()
        argument = command_argument(message.text)
        # only a brand-new user's first /start records the inviter
        user = self.user_of(message.from_user, invite_code=argument if command == 'start' else None)
        if command == 'start':
            self.start(message, user)
        elif command == 'help':
            self.reply(message.chat.id, self.help_text(user.language), keyboards.back_to_menu(user.language))
        elif command in ('cancel', 'menu'):
            self.shop.set_awaiting(user, None)
            self.reply(message.chat.id, t(user.language, 'cancelled' if command == 'cancel' else 'menu'),
                       self.main_menu(user.language))
        elif command == 'promo':
            if argument:
                self.shop.set_awaiting(user, None)
                self.redeem(message.chat.id, user, argument)
            else:
                self.shop.set_awaiting(user, 'promo')
                self.reply(message.chat.id, t(user.language, 'promo_ask'))
        elif command in ADMIN_COMMANDS and self.is_admin(user.telegram_id):
            self.admin.run(command, message.chat.id, message.message_id, user, argument)
        else:
            self.reply(message.chat.id, t(user.language, 'unknown'))

    def on_text(self, message):
        user = self.user_of(message.from_user)
        if user.awaiting == 'promo':
            self.shop.set_awaiting(user, None)
            self.redeem(message.chat.id, user, message.text)
        else:
            self.reply(message.chat.id, t(user.language, 'unknown'), self.main_menu(user.language))

    def on_other(self, message):
        user = self.user_of(message.from_user)
        self.reply(message.chat.id, t(user.language, 'unknown'))

    def start(self, message, user):
        self.shop.set_awaiting(user, None)
        self.reply(message.chat.id, t(user.language, 'welcome', name=html(user.first_name) or '👋'),
                   self.main_menu(user.language))

    def main_menu(self, lang):
        return keyboards.main_menu(lang, gift_enabled=bool(self.settings.channel_id))

    def help_text(self, lang):
        contact = self.settings.support_contact
        support = t(lang, 'help_support', contact=html(contact)) if contact else ''
        return t(lang, 'help', support=support)

    def redeem(self, chat_id, user, code):
        outcome, promo = self.shop.redeem_promo(user, code)
        if outcome == 'locked':
            self.reply(chat_id, t(user.language, 'promo_locked', minutes=self.shop.promo_lock_minutes(user)),
                       self.main_menu(user.language))
            return
        if outcome != 'ok':
            self.reply(chat_id, t(user.language, f'promo_{outcome}'), self.main_menu(user.language))
            return
        user = self.shop.get_user(user.telegram_id)
        self.shop.provision(user.id)
        self.reply(chat_id, t(user.language, 'promo_ok', days=promo.days, expiry=self.date(user.expires_at),
                              link=self.shop.subscription_link(user)), self.main_menu(user.language))

    def date(self, moment):
        return show_date(moment, self.settings.timezone)

    # Buttons

    def on_button(self, call):
        try:
            user = self.user_of(call.from_user)
            action, number = keyboards.parse_callback(call.data)
            if action is None or call.message is None:
                notice = t(user.language, 'stale')
            else:
                notice = getattr(self, f'button_{action}')(call, user, number)
        except (OperationalError, InterfaceError):
            raise  # the database is down: guarded answers the press with the busy notice (a press is answered once)
        except BaseException:
            self.answer(call, None)  # stop the spinner; the error goes on to the log
            raise
        self.answer(call, notice)

    def on_button_elsewhere(self, call):
        """Stop the spinner of a press outside the presser's private chat; show nothing, register nobody."""
        self.answer(call, t(shop_language(call.from_user.language_code), 'private_only'))

    def answer(self, call, notice):
        """Answer a press; notice (Telegram HTML from t(), or None) is shown as its visible text."""
        if notice:
            notice = clip_plain(visible(notice), MAX_CALLBACK_ANSWER)
        try:
            self.bot.answer_callback_query(call.id, notice)
        except ApiTelegramException as exc:  # too old to answer: nothing more to do
            log.info('callback not answered user=%s: %s', call.from_user.id, exc.description)

    def button_menu(self, call, user, _):
        self.shop.set_awaiting(user, None)
        self.show(call, t(user.language, 'menu'), self.main_menu(user.language))

    def button_buy(self, call, user, _):
        self.show(call, t(user.language, 'choose_plan'),
                  keyboards.plans(user.language, self.settings.plans, self.settings.currency, self.settings.stars_plans))

    def button_plan(self, call, user, days):
        lang = user.language
        crypto, in_stars = self.settings.plan(days), self.settings.stars_plan(days)
        if crypto is not None and in_stars is not None:
            self.show(call, t(lang, 'choose_method', plan=plan_name(lang, days)), keyboards.pay_methods(lang, days))
            return None
        if in_stars is not None:
            return self.button_stars(call, user, days)
        return self.button_crypto(call, user, days)

    def button_stars(self, call, user, days):
        lang = user.language
        if self.settings.stars_plan(days) is None:
            return t(lang, 'stale')
        payment = self.stars.offer(user, days)
        if self.stars.recurring(days):
            try:
                link = self.stars.subscription_link(user, payment)
            except ApiTelegramException as exc:
                log.warning('stars subscription link not made user=%s: %s', user.telegram_id, exc.description)
                return t(lang, 'service_down')
            self.show(call, t(lang, 'stars_subscribe', amount=int(payment.amount)),
                      keyboards.subscribe(lang, link, int(payment.amount)))
            return None
        self.show(call, t(lang, 'stars_invoice_sent', plan=plan_name(lang, days), amount=int(payment.amount)),
                  keyboards.back_to_menu(lang))
        try:
            self.stars.send_invoice(user, payment, call.message.chat.id)
        except ApiTelegramException as exc:
            log.warning('stars invoice not sent user=%s: %s', user.telegram_id, exc.description)
            return t(lang, 'service_down')
        return None

    def on_pre_checkout_queries(self, queries):
        """Answer each pre-checkout query on the checkout threads, never behind busy handler threads."""
        for query in queries:
            self.checkout_pool.submit(self.answer_pre_checkout, query)

    def answer_pre_checkout(self, query):
        """ok only for our pending Stars payment of that user and amount; otherwise a reason the buyer reads."""
        lang = shop_language(query.from_user.language_code)
        try:
            with models.connection():
                reason = self.stars.pre_checkout(query.from_user.id, query.currency, query.total_amount,
                                                 query.invoice_payload)
        except Exception as exc:  # noqa: BLE001 — the buyer must get an answer, never silence
            log.error('pre-checkout not judged user=%s: %s', query.from_user.id, type(exc).__name__)
            reason = 'stars_refuse_busy'
        try:
            if reason is None:
                self.bot.answer_pre_checkout_query(query.id, ok=True)
            else:
                self.bot.answer_pre_checkout_query(query.id, ok=False, error_message=plain(lang, reason))
            log.info('pre-checkout answered user=%s payload=%.40s ok=%s', query.from_user.id,
                     query.invoice_payload, reason is None)
        except apihelper.ApiException as exc:
            log.warning('pre-checkout answer failed user=%s: %s', query.from_user.id, exc)

    def on_successful_payment(self, message):
        """Settle a Stars payment once by its charge id; the buyer gets the link (the jobs retry the panel)."""
        paid = message.successful_payment
        until = (datetime.fromtimestamp(paid.subscription_expiration_date, timezone.utc).replace(tzinfo=None)
                 if paid.subscription_expiration_date else None)
        result = self.stars.settle(message.from_user.id, paid.invoice_payload, paid.telegram_payment_charge_id,
                                   paid.currency, paid.total_amount, subscription_until=until)
        if result.outcome == 'settled':
            if not self.stars.deliver(result.payment, self.messenger):
                user = self.shop.get_user(message.from_user.id)
                self.reply(message.chat.id, t(user.language, 'paid_wait_panel'))
        elif result.outcome == 'foreign':
            log.error('stars payment not ours, not credited: charge=%s user=%s: %s',
                      paid.telegram_payment_charge_id, message.from_user.id, result.detail)

    def button_crypto(self, call, user, days):
        if self.settings.plan(days) is None:
            return t(user.language, 'stale')
        try:
            payment = self.shop.create_invoice(user, days)
        except CryptoPayError as exc:
            log.warning('invoice not created user=%s: %s', user.telegram_id, exc)
            return t(user.language, 'service_down')
        except TooManyInvoices:
            return t(user.language, 'too_many_invoices')
        except InvoiceInProgress:
            return t(user.language, 'invoice_in_progress')
        text = t(user.language, 'invoice', plan=plan_name(user.language, days), amount=payment.amount,
                 currency=payment.currency)
        shown = self.show(call, text, keyboards.invoice(user.language, payment))
        self.shop.attach_message(payment, shown.chat.id, shown.message_id)
        return None

    def button_check(self, call, user, invoice_id):
        lang = user.language
        try:
            result = self.shop.check_payment(user.telegram_id, invoice_id)
        except CryptoPayError as exc:
            log.warning('payment check failed user=%s invoice=%s: %s', user.telegram_id, invoice_id, exc)
            return t(lang, 'service_down')
        if result.status == 'not_found':
            return t(lang, 'payment_not_found')
        if result.status == 'mismatch':
            jobs.alert_mismatches(self.shop, self.messenger)
            return t(lang, 'payment_mismatch')
        if result.status == 'pending':
            return t(lang, 'payment_pending')
        if result.status == 'expired':
            self.show(call, t(lang, 'invoice_expired'), keyboards.back_to_menu(lang))
            return None
        self.show(call, self.paid_text(user, result.provisioned), keyboards.back_to_menu(lang))
        return None

    def paid_text(self, user, provisioned):
        user = self.shop.get_user(user.telegram_id)
        if not provisioned:
            return t(user.language, 'paid_wait_panel')
        return t(user.language, 'paid_link', expiry=self.date(user.expires_at),
                 link=self.shop.subscription_link(user))

    def button_sub(self, call, user, _):
        lang = user.language
        if user.expires_at is None:
            self.show(call, t(lang, 'sub_none'), self.main_menu(lang))
            return None
        if user.is_active():
            days_left = (user.expires_at - models.utcnow()).days
            lines = [t(lang, 'sub_active', expiry=self.date(user.expires_at), days=days_left)]
        else:
            lines = [t(lang, 'sub_expired', expiry=self.date(user.expires_at))]
        traffic = self.shop.traffic(user)
        if traffic is None:
            lines.append(t(lang, 'sub_traffic_unknown'))
        else:
            limit = t(lang, 'sub_traffic_limit', limit=human_bytes(traffic['total'])) if traffic['total'] else ''
            lines.append(t(lang, 'sub_traffic', used=human_bytes(traffic['up'] + traffic['down']), limit=limit))
        link = self.shop.subscription_link(user)
        lines += [t(lang, 'sub_link', link=link), t(lang, 'sub_howto')]
        markup = keyboards.renew(lang) if not user.is_active() else keyboards.back_to_menu(lang)
        renewing = self.stars.subscription(user)
        if renewing is not None:  # a monthly Stars subscription: its state and the button that flips it
            lines.insert(1, t(lang, 'stars_renewal_off' if renewing.renewal_canceled else 'stars_renews',
                              date=self.date(renewing.subscription_until)))
            keyboards.add_renewal_button(markup, lang, canceled=bool(renewing.renewal_canceled))
        self.show(call, '\n\n'.join(lines), markup)
        self.send_qr(user.telegram_id, user, link, clip_plain(plain(lang, 'qr_caption'), MAX_CAPTION))
        return None

    def button_renoff(self, call, user, _):
        return self.flip_renewal(call, user, canceled=True)

    def button_renon(self, call, user, _):
        return self.flip_renewal(call, user, canceled=False)

    def flip_renewal(self, call, user, canceled):
        lang = user.language
        try:
            root = self.stars.set_renewal(user, canceled)
        except stars.StarsError as exc:
            log.warning('stars renewal not changed user=%s: %s', user.telegram_id, exc)
            return t(lang, 'service_down')
        self.show(call, t(lang, 'stars_renewal_off' if canceled else 'stars_renews',
                          date=self.date(root.subscription_until)), keyboards.back_to_menu(lang))
        return None

    def send_qr(self, chat_id, user, link, caption):
        """Send the QR code of link: by Telegram's file_id when this link was uploaded before, else as a PNG."""
        if user.qr_file_id and user.qr_link == link:
            try:
                self.bot.send_photo(chat_id, user.qr_file_id, caption=caption)
                return
            except ApiTelegramException as exc:  # e.g. the file_id of another bot token: upload anew
                if exc.error_code != 400:
                    raise
                log.info('stored QR photo refused user=%s: %s', user.telegram_id, exc.description)
        sent = self.bot.send_photo(chat_id, qr_png(link), caption=caption)
        models.User.update(qr_link=link, qr_file_id=sent.photo[-1].file_id).where(
            models.User.id == user.id).execute()

    def button_gift(self, call, user, _):
        lang, settings = user.language, self.settings
        if not settings.channel_id:
            return t(lang, 'gift_off')
        if models.Gift.select().where(models.Gift.telegram_id == user.telegram_id).exists():
            return t(lang, 'gift_taken')
        try:
            member = self.bot.get_chat_member(settings.channel_id, user.telegram_id)
        except ApiTelegramException as exc:
            log.warning('channel check failed user=%s: %s', user.telegram_id, exc.description)
            return t(lang, 'gift_check_failed')
        joined = member.status in MEMBER_STATUSES or (member.status == 'restricted' and member.is_member)
        if not joined:
            self.show(call, t(lang, 'gift_not_member', days=settings.trial_days, url=html(settings.channel_url)),
                      keyboards.gift_refused(lang, settings.channel_url))
            return None
        if not self.shop.claim_gift(user):
            return t(lang, 'gift_taken')
        self.shop.provision(user.id)
        user = self.shop.get_user(user.telegram_id)
        self.show(call, t(lang, 'gift_granted', days=settings.trial_days, expiry=self.date(user.expires_at),
                          link=self.shop.subscription_link(user)), keyboards.back_to_menu(lang))
        return None

    def button_promo(self, call, user, _):
        self.shop.set_awaiting(user, 'promo')
        self.show(call, t(user.language, 'promo_ask'), keyboards.back_to_menu(user.language))

    def button_invite(self, call, user, _):
        joined, paid = self.shop.referral_counts(user)
        link = f'https://t.me/{self.username}?start={user.invite_code}'
        self.show(call, t(user.language, 'invite', bonus=self.settings.referral_bonus_days, link=link,
                          joined=joined, paid=paid), keyboards.back_to_menu(user.language))

    def button_help(self, call, user, _):
        self.show(call, self.help_text(user.language), keyboards.back_to_menu(user.language))


def build_shop(settings, for_jobs=False, cryptopay_outage=None):
    """Create a Shop with its panels' and Crypto Pay clients (Crypto Pay's calls watched for outages).

    The handlers' shop tries each outside call once within HANDLER_TIMEOUT, so a button is answered in time
    and no handler thread sleeps; the jobs' shop (for_jobs) retries with backoff and honours Retry-After.
    """
    retry = {} if for_jobs else {'timeout': HANDLER_TIMEOUT, 'retries': 0}
    cryptopay = CryptoPayClient(settings.cryptopay_token, settings.cryptopay_url, **retry)
    outage = cryptopay_outage or Outage('Crypto Pay', alert_after=settings.outage_alert_minutes * 60)
    watched = Watched(cryptopay, outage, CryptoPayError, cryptopay_unreachable,
                      methods=('get_me', 'create_invoice', 'get_invoices', 'delete_invoice'))
    return Shop(settings, panels.connect(settings.panels, lambda config: panel_client(config, **retry)), watched)


def panel_client(config, **retry):
    """Make the XuiClient of one panel."""
    return XuiClient(config.url, config.inbound_id, config.sub_url, username=config.username or None,
                     password=config.password or None, api_token=config.api_token or None, **retry)


def run(settings):
    """Run the bot: long polling plus the jobs thread, until SIGTERM; return the exit code."""
    stop_jobs = threading.Event()
    bot = None

    def stop(signum, frame):
        log.info('stopping on signal %s', signum)
        stop_jobs.set()
        if bot is not None:
            bot.stop_polling()
        raise SystemExit(0)  # leave the long poll now; unconfirmed updates come again on the next start

    signal.signal(signal.SIGTERM, stop)
    try:
        models.connect_database(settings.database_url, settings.db_pool_size)
        models.create_schema()
    except (OperationalError, InterfaceError) as exc:
        log.error('database unreachable (check DATABASE_URL): %s', exc)
        return 1
    alert_after = settings.outage_alert_minutes * 60
    telegram = Outage('Telegram', alert_after=alert_after, alert_while_down=False)
    cryptopay = Outage('Crypto Pay', alert_after=alert_after)
    shop = build_shop(settings, cryptopay_outage=cryptopay)
    bot = make_bot(settings, telegram)
    shop_bot = ShopBot(bot, shop, settings)
    server = web.start(settings, shop, shop_bot)
    shop_bot.messenger.outage = telegram
    if not start_telegram(bot, shop_bot, settings):
        return 1
    jobs.start(build_shop(settings, for_jobs=True, cryptopay_outage=cryptopay), shop_bot.messenger, settings,
               stop=stop_jobs, outages=(telegram, cryptopay), redact=RedactSecrets(secrets_of(settings)).redact)
    log.info('bot @%s started', shop_bot.username)
    return web.receive_updates(bot, settings, server)


def main(argv):
    """Dispatch the command line; return the exit code."""
    os.umask(0o077)  # the SQLite file and the backups hold buyers' subIds (their VPN credentials): 0600
    try:
        settings = config.load()
    except config.SettingError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    setup_logging(secrets_of(settings))
    command = argv[1] if len(argv) > 1 else 'run'
    if command == 'run':
        limit_malloc_arenas()  # before any thread starts
        return run(settings)
    if command == 'check':
        import doctor
        return doctor.main(settings)
    if command == 'restore' and len(argv) >= 3:
        import backup
        return backup.restore_command(settings, argv[2], force='--force' in argv[3:])
    print('usage: python bot.py [check | restore FILE [--force]]', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv))
