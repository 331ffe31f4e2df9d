"""Inline keyboards and the callback data they carry (data is parsed back by parse_callback)."""
import re

from telebot.types import InlineKeyboardButton, InlineKeyboardMarkup

from texts import plain, plan_name

MENU_ACTIONS = ('menu', 'buy', 'sub', 'gift', 'promo', 'invite', 'help', 'renoff', 'renon')
MAX_CALLBACK_DATA = 64  # bytes, Telegram's limit
CALLBACK_PATTERN = re.compile(r'^(?P<action>[a-z]{3,8})(?::(?P<number>\d{1,19}))?$')


def parse_callback(data):
    """Return (action, number or None) for well-formed button data, or (None, None)."""
    match = CALLBACK_PATTERN.match(data or '')
    if not match:
        return None, None
    action, number = match['action'], match['number']
    if action in MENU_ACTIONS and number is None:
        return action, None
    if action in ('plan', 'check', 'crypto', 'stars') and number is not None and int(number) < 2 ** 63:
        return action, int(number)
    return None, None


def button(text, data):
    if not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
        raise ValueError(f'callback data must be 1-{MAX_CALLBACK_DATA} bytes: {data!r}')
    return InlineKeyboardButton(text, callback_data=data)


def main_menu(lang, gift_enabled=True):
    markup = InlineKeyboardMarkup(row_width=2)
    markup.row(button(plain(lang, 'btn_buy'), 'buy'), button(plain(lang, 'btn_sub'), 'sub'))
    if gift_enabled:
        markup.row(button(plain(lang, 'btn_gift'), 'gift'), button(plain(lang, 'btn_promo'), 'promo'))
    else:
        markup.row(button(plain(lang, 'btn_promo'), 'promo'))
    markup.row(button(plain(lang, 'btn_invite'), 'invite'), button(plain(lang, 'btn_help'), 'help'))
    return markup


def back_to_menu(lang):
    return InlineKeyboardMarkup().row(button(plain(lang, 'btn_back'), 'menu'))


def plans(lang, plan_list, currency, stars_plans=()):
    """One button per plan length, priced by each method that sells it (e.g. '1 month — 100 RUB · 250 ⭐')."""
    markup = InlineKeyboardMarkup()
    crypto = {plan.days: plan.price for plan in plan_list}
    stars = {plan.days: plan.price for plan in stars_plans}
    for days in sorted(crypto.keys() | stars.keys()):
        prices = ([f'{crypto[days]} {currency}'] if days in crypto else []) + \
            ([f'{stars[days]} ⭐'] if days in stars else [])
        markup.row(button(f'{plan_name(lang, days)} — {" · ".join(prices)}', f'plan:{days}'))
    markup.row(button(plain(lang, 'btn_back'), 'menu'))
    return markup


def pay_methods(lang, days):
    """The choice of how to pay for a plan priced by both methods."""
    markup = InlineKeyboardMarkup()
    markup.row(button(plain(lang, 'btn_crypto'), f'crypto:{days}'))
    markup.row(button(plain(lang, 'btn_stars'), f'stars:{days}'))
    markup.row(button(plain(lang, 'btn_back'), 'buy'))
    return markup


def invoice(lang, payment):
    """The one message's buttons: Pay (the invoice URL) and Check payment."""
    markup = InlineKeyboardMarkup()
    markup.row(InlineKeyboardButton(plain(lang, 'btn_pay', amount=payment.amount, currency=payment.currency),
                                    url=payment.pay_url))
    markup.row(button(plain(lang, 'btn_check'), f'check:{payment.invoice_id}'))
    markup.row(button(plain(lang, 'btn_back'), 'menu'))
    return markup


def subscribe(lang, link, amount):
    """The Subscribe button of a monthly Stars subscription (its invoice link)."""
    markup = InlineKeyboardMarkup()
    markup.row(InlineKeyboardButton(plain(lang, 'btn_subscribe', amount=amount), url=link))
    markup.row(button(plain(lang, 'btn_back'), 'menu'))
    return markup


def add_renewal_button(markup, lang, canceled):
    """Add 'Cancel renewal' (or 'Resume renewal') above a keyboard's rows."""
    markup.keyboard.insert(0, [button(plain(lang, 'btn_resume' if canceled else 'btn_cancel_renewal'),
                                      'renon' if canceled else 'renoff')])
    return markup


def gift_refused(lang, channel_url):
    markup = InlineKeyboardMarkup()
    if channel_url:
        markup.row(InlineKeyboardButton(plain(lang, 'btn_join'), url=channel_url))
    markup.row(button(plain(lang, 'btn_check_again'), 'gift'))
    markup.row(button(plain(lang, 'btn_back'), 'menu'))
    return markup


def renew(lang):
    return InlineKeyboardMarkup().row(button(plain(lang, 'btn_renew'), 'buy'))
