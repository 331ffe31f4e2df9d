"""Every user-facing string, in Russian and English, and the helpers that format and measure them.

Texts are Telegram HTML (https://core.telegram.org/bots/api#html-style). t() escapes every value it is given,
so nothing from outside (a name, a panel email, an error) can break a message; plain() gives the visible text
for places without formatting (buttons, command lists, callback answers). The operator may override any text
per language with a TOML file (TEXTS_FILE, see load_overrides) and name the shop (SHOP_NAME, `{shop}`).
"""
import string
import tomllib
from datetime import timezone
from pathlib import Path

from markup import Html, check_html, html, visible

DEFAULT_SHOP_NAME = 'SPN VPN'
TEXTS = {
    'en': {
        'welcome': '👋 Hi, {name}!\n\nThis is <b>{shop}</b>: fast VPN that works in v2rayNG, Hiddify, Streisand, V2Box and Happ.\nChoose below.',
        'menu': 'Main menu — choose below.',
        'btn_buy': '💳 Buy / renew', 'btn_sub': '📱 My subscription', 'btn_gift': '🎁 Free gift',
        'btn_promo': '🏷 Promo code', 'btn_invite': '👥 Invite friends', 'btn_help': '❓ Help / how to connect',
        'btn_back': '« Menu', 'btn_pay': '💳 Pay {amount} {currency}', 'btn_check': '🔄 Check payment',
        'btn_renew': '💳 Renew', 'btn_check_again': '🔄 I joined — check again', 'btn_join': '📢 Open the channel',
        'choose_plan': 'Choose a plan:',
        'plan_months': '{n} month|{n} months', 'plan_days': '{n} days',
        'invoice': 'Plan: <b>{plan}</b>\nPrice: <b>{amount} {currency}</b> (pay in USDT, TON, BTC…)\n\nPress <b>Pay</b>, pay in CryptoBot, then press <b>Check payment</b>.',
        'invoice_expired': 'This invoice has expired. Choose a plan again to get a new one.',
        'payment_pending': 'The payment has not arrived yet. Pay in CryptoBot, then press Check again.',
        'payment_not_found': 'This invoice is not yours or does not exist.',
        'paid_link': '✅ Payment received! Your subscription is active until <b>{expiry}</b>.\n\nYour link:\n<code>{link}</code>\n\nOpen “My subscription” for the QR code and setup help.',
        'paid_wait_panel': '✅ Payment received. Your VPN link is being prepared and will arrive here shortly.',
        'link_ready': '✅ Your VPN is ready, active until <b>{expiry}</b>.\n\nYour link:\n<code>{link}</code>',
        'link_changed': '🔗 Your subscription now has a new link that covers all our servers:\n<code>{link}</code>\n\nAdd it in your app instead of the old one (the old link keeps working for its server).',
        'service_down': '⚠️ The payment service is not answering right now. Please try again in a minute.',
        'too_many_invoices': 'You already have 3 unpaid invoices. Pay one of them, or wait until they expire.',
        'invoice_in_progress': 'Your invoice is being created. Please wait a moment.',
        'payment_mismatch': '⚠️ We could not confirm this payment automatically. The shop admins have been told and will sort it out.',
        'sub_none': 'You have no subscription yet. Buy one, or take the free gift.',
        'sub_active': '✅ Active until <b>{expiry}</b> ({days} days left).',
        'sub_expired': '⛔ Expired on <b>{expiry}</b>. Renew to continue.',
        'sub_traffic': 'Traffic used: <b>{used}</b>{limit}',
        'sub_traffic_limit': ' of {limit}',
        'sub_traffic_unknown': 'Traffic used: unknown right now.',
        'sub_link': 'Your link:\n<code>{link}</code>',
        'sub_howto': '<b>How to connect</b>: copy the link, open your app and add a subscription from the clipboard.\n• Android: v2rayNG, Hiddify\n• iPhone/Mac: Streisand, V2Box, Happ\n• Windows: Hiddify',
        'qr_caption': 'Scan this in your VPN app.',
        'gift_off': 'There is no free gift right now.',
        'gift_not_member': 'Join our channel to get {days} free days, then press the button again:\n{url}',
        'gift_granted': '🎁 {days} free days added! Active until <b>{expiry}</b>.\n\nYour link:\n<code>{link}</code>',
        'gift_taken': 'You have already received the free gift.',
        'gift_check_failed': 'Could not check the channel right now. Please try again in a minute.',
        'promo_ask': 'Send your promo code in the next message (or /cancel).',
        'promo_ok': '🏷 Code accepted: +{days} days. Active until <b>{expiry}</b>.\n\nYour link:\n<code>{link}</code>',
        'promo_invalid': 'That does not look like a promo code: it is 4–32 letters and digits.',
        'promo_unknown': 'There is no such promo code.',
        'promo_expired': 'This promo code has expired.',
        'promo_used_up': 'This promo code has been used up.',
        'promo_already': 'You have already used this promo code.',
        'promo_locked': 'Too many wrong codes: 5 in 10 minutes. Please try again in {minutes} min.',
        'invite': '👥 Invite friends and get <b>{bonus} days</b> for each friend’s first payment.\n\nYour link:\n{link}\n\nJoined: {joined} · paid: {paid}',
        'help': '<b>How to connect</b>\n1. Install an app: v2rayNG or Hiddify (Android), Streisand, V2Box or Happ (iPhone/Mac), Hiddify (Windows).\n2. Buy a plan or take the free gift.\n3. Copy your link from “My subscription” and add it in the app.\n\nApps: https://github.com/2dust/v2rayNG/releases · https://hiddify.com · https://apps.apple.com/app/streisand/id6450534064{support}',
        'help_support': '\n\nSupport: {contact}',
        'cancelled': 'Cancelled.',
        'unknown': 'I did not understand that. Press /start for the menu.',
        'stale': 'This button is no longer valid.',
        'private_only': 'I work only in a private chat: open me and press /start there.',
        'reminder_3': '⏰ Your VPN expires in 3 days ({expiry}). Renew to keep it working.',
        'reminder_1': '⏰ Your VPN expires tomorrow ({expiry}). Renew to keep it working.',
        'reminder_0': '⛔ Your VPN has expired. Renew to turn it back on.',
        'error': 'Something went wrong. Please try again in a minute.',
        'busy': '⚠️ The shop is temporarily unavailable. Please try again in a minute.',
        'cmd_start': 'Main menu', 'cmd_promo': 'Enter a promo code', 'cmd_help': 'How to connect',
        'cmd_cancel': 'Cancel the current input',
        'bot_description': '{shop}: a fast VPN for v2rayNG, Hiddify, Streisand, V2Box and Happ. Buy or renew in a minute, pay with crypto, get your link here. Press Start.',
        'bot_short_description': '{shop}: VPN in a minute. Buy, renew and get your link here.',
        # Admin messages (English in both languages unless the texts file says otherwise)
        'adm_stats': '<b>Users</b>: {users} (today +{new_today}, 7 days +{new_week})\n<b>Active subscriptions</b>: {active} · trials given: {trials}\n<b>Paid invoices</b>: today {paid_today}, 30 days {paid_month}, all {paid_total}\n<b>Revenue</b> ({currency}): today {revenue_today}, 30 days {revenue_month}, all {revenue_total}\n<b>Pending invoices</b>: {pending}\n<b>Promo redemptions</b>: {redemptions} · <b>referrals</b>: {referrals} ({referrals_paid} paid) · admin grants: {grants_admin}',
        'adm_newcode_usage': 'Usage: /newcode [days 1..3650] [uses ≥ 1] [CODE: 6–32 letters and digits; shorter codes can be guessed]',
        'adm_code_exists': 'Code {code} already exists.',
        'adm_code_created': 'Promo code <code>{code}</code>: {days} days, {uses} uses.',
        'adm_user_usage': 'Usage: /user &lt;id|@username&gt;',
        'adm_user_unknown': 'No such user. Usage: /user &lt;id|@username&gt;',
        'adm_user': '<b>{name}</b> @{username} id <code>{id}</code> lang {language}\nExpires: {expiry}{flags}\nRegistered: {registered} · invited: {invited}\nPayments: {payments}\nGrants: {grants}',
        'adm_give_usage': 'Usage: /give &lt;id|@username&gt; &lt;days 1..3650&gt; (the user must have started the bot)',
        'adm_give_again': 'Already granted.',
        'adm_given': 'Granted {days} days to <code>{id}</code>: until {expiry}.',
        'adm_given_panel_down': 'Granted {days} days to <code>{id}</code>: until {expiry}. The panel is down: it will be updated when it is back.',
        'adm_broadcast_usage': 'Usage: /broadcast &lt;text&gt;',
        'adm_broadcast_started': 'Broadcast started…',
        'adm_broadcast_progress': 'Broadcast: delivered {delivered}, blocked {blocked}, failed {failed}…',
        'adm_broadcast_done': 'Broadcast finished: delivered {delivered}, blocked {blocked}, failed {failed}.',
        'adm_broadcast_stopped': 'Broadcast stopped early ({error}): delivered {delivered}, blocked {blocked}, failed {failed}.',
        'adm_sync': 'Sync: {checked} active users checked, {fixed} fixed, {failed} not fixed.\nMissing on the panel: {missing}\nWrong expiry: {wrong_expiry}\nDisabled while paid: {disabled}\nPanel ahead of the ledger: {ahead}\nUnknown panel clients (left alone): {unknown}',
        'adm_sync_failed': 'Sync failed: {error}',
        'adm_panel': '<b>{name}</b>: {state}\nClients: {clients} · pending pushes: {pending}{last_error}',
        'adm_stats_panels': '\n<b>Clients per panel</b>: {panels}',
        'adm_invoice_mismatch': '⚠️ Crypto Pay called invoice {invoice} (user {user}, {days} days, {amount} {currency}) paid, but its answer does not match what we created: {detail}. Nothing was settled. Check the invoice in @CryptoBot and CRYPTOPAY_URL.',
    },
    'ru': {
        'welcome': '👋 Привет, {name}!\n\nЭто <b>{shop}</b>: быстрый VPN для v2rayNG, Hiddify, Streisand, V2Box и Happ.\nВыберите ниже.',
        'menu': 'Главное меню — выберите ниже.',
        'btn_buy': '💳 Купить / продлить', 'btn_sub': '📱 Моя подписка', 'btn_gift': '🎁 Подарок',
        'btn_promo': '🏷 Промокод', 'btn_invite': '👥 Пригласить друзей', 'btn_help': '❓ Помощь / подключение',
        'btn_back': '« Меню', 'btn_pay': '💳 Оплатить {amount} {currency}', 'btn_check': '🔄 Проверить оплату',
        'btn_renew': '💳 Продлить', 'btn_check_again': '🔄 Я подписался — проверить', 'btn_join': '📢 Открыть канал',
        'choose_plan': 'Выберите тариф:',
        'plan_months': '{n} мес.|{n} мес.', 'plan_days': '{n} дн.',
        'invoice': 'Тариф: <b>{plan}</b>\nЦена: <b>{amount} {currency}</b> (оплата в USDT, TON, BTC…)\n\nНажмите <b>Оплатить</b>, оплатите в CryptoBot, затем нажмите <b>Проверить оплату</b>.',
        'invoice_expired': 'Срок счёта истёк. Выберите тариф снова, чтобы получить новый.',
        'payment_pending': 'Оплата ещё не поступила. Оплатите в CryptoBot и нажмите «Проверить» ещё раз.',
        'payment_not_found': 'Этот счёт не ваш или не существует.',
        'paid_link': '✅ Оплата получена! Подписка активна до <b>{expiry}</b>.\n\nВаша ссылка:\n<code>{link}</code>\n\nQR-код и инструкции — в «Моя подписка».',
        'paid_wait_panel': '✅ Оплата получена. Ссылка на VPN готовится и скоро придёт сюда.',
        'link_ready': '✅ Ваш VPN готов, активен до <b>{expiry}</b>.\n\nВаша ссылка:\n<code>{link}</code>',
        'link_changed': '🔗 У вашей подписки новая ссылка, в ней все наши серверы:\n<code>{link}</code>\n\nДобавьте её в приложение вместо старой (старая продолжит работать для своего сервера).',
        'service_down': '⚠️ Платёжный сервис сейчас не отвечает. Попробуйте через минуту.',
        'too_many_invoices': 'У вас уже 3 неоплаченных счёта. Оплатите один из них или дождитесь, пока они истекут.',
        'invoice_in_progress': 'Ваш счёт создаётся. Подождите немного.',
        'payment_mismatch': '⚠️ Не удалось автоматически подтвердить эту оплату. Администраторы магазина уже знают и разберутся.',
        'sub_none': 'У вас пока нет подписки. Купите её или получите подарок.',
        'sub_active': '✅ Активна до <b>{expiry}</b> (осталось дней: {days}).',
        'sub_expired': '⛔ Истекла <b>{expiry}</b>. Продлите, чтобы продолжить.',
        'sub_traffic': 'Использовано трафика: <b>{used}</b>{limit}',
        'sub_traffic_limit': ' из {limit}',
        'sub_traffic_unknown': 'Трафик сейчас неизвестен.',
        'sub_link': 'Ваша ссылка:\n<code>{link}</code>',
        'sub_howto': '<b>Как подключиться</b>: скопируйте ссылку, откройте приложение и добавьте подписку из буфера.\n• Android: v2rayNG, Hiddify\n• iPhone/Mac: Streisand, V2Box, Happ\n• Windows: Hiddify',
        'qr_caption': 'Отсканируйте в VPN-приложении.',
        'gift_off': 'Сейчас подарков нет.',
        'gift_not_member': 'Подпишитесь на наш канал, чтобы получить {days} дн. бесплатно, затем нажмите кнопку ещё раз:\n{url}',
        'gift_granted': '🎁 Добавлено {days} дн. бесплатно! Активна до <b>{expiry}</b>.\n\nВаша ссылка:\n<code>{link}</code>',
        'gift_taken': 'Вы уже получили подарок.',
        'gift_check_failed': 'Не удалось проверить подписку на канал. Попробуйте через минуту.',
        'promo_ask': 'Отправьте промокод следующим сообщением (или /cancel).',
        'promo_ok': '🏷 Промокод принят: +{days} дн. Активна до <b>{expiry}</b>.\n\nВаша ссылка:\n<code>{link}</code>',
        'promo_invalid': 'Это не похоже на промокод: он состоит из 4–32 букв и цифр.',
        'promo_unknown': 'Такого промокода нет.',
        'promo_expired': 'Срок действия промокода истёк.',
        'promo_used_up': 'Промокод уже использован максимальное число раз.',
        'promo_already': 'Вы уже использовали этот промокод.',
        'promo_locked': 'Слишком много неверных кодов: 5 за 10 минут. Попробуйте снова через {minutes} мин.',
        'invite': '👥 Приглашайте друзей и получайте <b>{bonus} дн.</b> за первую оплату каждого.\n\nВаша ссылка:\n{link}\n\nПришло: {joined} · оплатили: {paid}',
        'help': '<b>Как подключиться</b>\n1. Установите приложение: v2rayNG или Hiddify (Android), Streisand, V2Box или Happ (iPhone/Mac), Hiddify (Windows).\n2. Купите тариф или получите подарок.\n3. Скопируйте ссылку в «Моя подписка» и добавьте её в приложение.\n\nПриложения: https://github.com/2dust/v2rayNG/releases · https://hiddify.com · https://apps.apple.com/app/streisand/id6450534064{support}',
        'help_support': '\n\nПоддержка: {contact}',
        'cancelled': 'Отменено.',
        'unknown': 'Не понял. Нажмите /start, чтобы открыть меню.',
        'stale': 'Эта кнопка больше не действует.',
        'private_only': 'Я работаю только в личном чате: откройте меня и нажмите /start там.',
        'reminder_3': '⏰ Ваш VPN истекает через 3 дня ({expiry}). Продлите, чтобы он продолжал работать.',
        'reminder_1': '⏰ Ваш VPN истекает завтра ({expiry}). Продлите, чтобы он продолжал работать.',
        'reminder_0': '⛔ Срок вашего VPN истёк. Продлите, чтобы снова включить его.',
        'error': 'Что-то пошло не так. Попробуйте через минуту.',
        'busy': '⚠️ Магазин временно недоступен. Попробуйте через минуту.',
        'cmd_start': 'Главное меню', 'cmd_promo': 'Ввести промокод', 'cmd_help': 'Как подключиться',
        'cmd_cancel': 'Отменить ввод',
        'bot_description': '{shop}: быстрый VPN для v2rayNG, Hiddify, Streisand, V2Box и Happ. Купите или продлите за минуту, оплата криптовалютой, ссылка придёт сюда. Нажмите «Запустить».',
        'bot_short_description': '{shop}: VPN за минуту. Покупка, продление и ссылка — здесь.',
    },
}

# Telegram Stars (stars.py)
TEXTS['en'].update({
    'choose_method': 'Plan: <b>{plan}</b>. How would you like to pay?',
    'btn_crypto': 'CryptoBot (USDT, TON, BTC)', 'btn_stars': '⭐ Telegram Stars',
    'stars_title': 'VPN: {plan}', 'stars_description': '{shop} VPN subscription: {plan}. Paid in Telegram Stars.',
    'stars_invoice_sent': 'Plan: <b>{plan}</b>, <b>{amount} ⭐</b>. Press <b>Pay</b> on the invoice below.',
    'stars_refuse_unknown': 'This invoice is not valid. Please choose a plan again.',
    'stars_refuse_not_yours': 'This invoice is not yours: open the bot and choose a plan yourself.',
    'stars_refuse_amount': 'The price of this invoice has changed. Please choose a plan again.',
    'stars_refuse_paid': 'This invoice is already paid. Open “My subscription”.',
    'stars_refuse_closed': 'This invoice can no longer be paid. Please choose a plan again.',
    'stars_refuse_expired': 'This invoice has expired. Please choose a plan again.',
    'stars_refuse_busy': 'The shop cannot take payments this minute. Please try again shortly.',
    'stars_foreign': '⚠️ {count} Stars payment(s) with an invoice we never issued: not credited.',
    'adm_refund_usage': 'Usage: /refund &lt;telegram_payment_charge_id&gt;',
    'adm_refunded': 'Refunded {amount} ⭐ to <code>{id}</code>; {days} days taken back, now until {expiry}.',
    'adm_refund_already': 'This charge is already refunded: nothing changed.',
    'adm_refund_crypto': 'This is a CryptoBot payment: it cannot be refunded with /refund (refund it in CryptoBot yourself).',
    'adm_refund_unknown': 'No Stars payment with this charge id.',
    'adm_refund_refused': 'Telegram refused the refund, nothing changed: {reason}',
    'adm_revenue': '<b>By currency</b> (paid, revenue): {lines}',
    'stars_subscribe': 'Monthly subscription: <b>{amount} ⭐</b> a month, renewed by Telegram until you cancel it (in “My subscription”).',
    'btn_subscribe': '⭐ Subscribe: {amount} ⭐ a month', 'btn_cancel_renewal': '⏹ Cancel renewal',
    'btn_resume': '▶️ Resume renewal',
    'stars_renews': '🔁 Renews on <b>{date}</b> (Telegram Stars).',
    'stars_renewal_off': '⏹ Renewal canceled: paid until <b>{date}</b>.',
})
TEXTS['ru'].update({
    'choose_method': 'Тариф: <b>{plan}</b>. Как хотите оплатить?',
    'btn_crypto': 'CryptoBot (USDT, TON, BTC)', 'btn_stars': '⭐ Telegram Stars',
    'stars_title': 'VPN: {plan}', 'stars_description': 'Подписка {shop} VPN: {plan}. Оплата в Telegram Stars.',
    'stars_invoice_sent': 'Тариф: <b>{plan}</b>, <b>{amount} ⭐</b>. Нажмите <b>Оплатить</b> в счёте ниже.',
    'stars_refuse_unknown': 'Этот счёт недействителен. Выберите тариф снова.',
    'stars_refuse_not_yours': 'Этот счёт не ваш: откройте бота и выберите тариф сами.',
    'stars_refuse_amount': 'Цена в этом счёте изменилась. Выберите тариф снова.',
    'stars_refuse_paid': 'Этот счёт уже оплачен. Откройте «Моя подписка».',
    'stars_refuse_closed': 'Этот счёт больше нельзя оплатить. Выберите тариф снова.',
    'stars_refuse_expired': 'Срок этого счёта истёк. Выберите тариф снова.',
    'stars_refuse_busy': 'Магазин сейчас не может принять оплату. Попробуйте чуть позже.',
    'stars_foreign': '⚠️ Платежи в Stars со счётом, который мы не выставляли ({count}): не зачислены.',
    'stars_subscribe': 'Ежемесячная подписка: <b>{amount} ⭐</b> в месяц, Telegram продлевает её, пока вы её не отмените (в «Моя подписка»).',
    'btn_subscribe': '⭐ Подписаться: {amount} ⭐ в месяц', 'btn_cancel_renewal': '⏹ Отменить продление',
    'btn_resume': '▶️ Возобновить продление',
    'stars_renews': '🔁 Продлится <b>{date}</b> (Telegram Stars).',
    'stars_renewal_off': '⏹ Продление отменено: оплачено до <b>{date}</b>.',
})


_shop_name = DEFAULT_SHOP_NAME
_overrides = {}


def configure(shop_name=DEFAULT_SHOP_NAME, overrides=None):
    """Set the shop's name and the operator's texts ({lang: {key: template}}, see load_overrides)."""
    global _shop_name, _overrides
    _shop_name, _overrides = shop_name, overrides or {}


def template(lang, key):
    """Return the template for key in lang: the operator's, then ours; English when lang has none."""
    lang = lang if lang in TEXTS else 'en'
    for table in (_overrides.get(lang, {}), TEXTS[lang], _overrides.get('en', {}), TEXTS['en']):
        if key in table:
            return table[key]
    raise KeyError(key)


def t(lang, key, **values):
    """Return the text for key in lang ('ru' or 'en') as Telegram HTML, each value escaped unless it is Html."""
    values = {name: value if isinstance(value, Html) else html(str(value)) for name, value in values.items()}
    return Html(template(lang, key).format_map({'shop': html(_shop_name), **values}))


def plain(lang, key, **values):
    """Return the visible text of t(lang, key, ...), for buttons, command lists and callback answers."""
    return visible(t(lang, key, **values))


def placeholders(text):
    """Return the placeholder names of a template.  :raises ValueError: on a malformed one."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def load_overrides(path):
    """Read the operator's texts file: TOML with [en] and [ru] tables of key = "template".

    Each key must be one of TEXTS, each template use only its placeholders (and {shop}) and be HTML that
    Telegram accepts. Returns {lang: {key: template}}.
    :raises ValueError: with one line saying what is wrong and where.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding='utf-8'))
    except OSError as exc:
        raise ValueError(f'cannot read {path} ({exc.strerror})') from None
    except UnicodeDecodeError:
        raise ValueError(f'{path} is not UTF-8 text') from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f'not valid TOML: {exc}') from None
    for lang, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"put '{lang}' under [en] or [ru]")
        if lang not in TEXTS:
            raise ValueError(f'unknown language [{lang}] (use [en] and [ru])')
        for key, text in table.items():
            default = TEXTS[lang].get(key, TEXTS['en'].get(key))
            if default is None:
                raise ValueError(f"unknown key '{key}' in [{lang}]")
            if not isinstance(text, str):
                raise ValueError(f'[{lang}] {key} must be a string')
            problem = _template_problem(text, placeholders(default) | {'shop'})
            if problem:
                raise ValueError(f'[{lang}] {key}: {problem}')
            if key == 'plan_months' and text.count('|') != 1:
                raise ValueError(f'[{lang}] {key}: write the singular and the plural as "one|many"')
    return data


def _template_problem(text, allowed):
    try:
        names = placeholders(text)
    except ValueError as exc:
        return f'bad placeholder ({exc})'
    unknown = sorted(names - allowed)
    if unknown:
        return (f'unknown placeholder {{{unknown[0]}}} (it may use '
                f'{", ".join("{" + name + "}" for name in sorted(allowed))})')
    try:
        sample = text.format_map({name: 'x' for name in names})
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        return f'bad placeholder ({exc})'
    return check_html(sample)


def plan_name(lang, days):
    """Name a plan by its length: '1 month', '3 months', '7 days' / '1 мес.' (visible text)."""
    if days in (365, 366):
        months = 12
    elif days % 30 == 0:
        months = days // 30
    else:
        return plain(lang, 'plan_days', n=days)
    one, many = template(lang, 'plan_months').split('|')
    return visible((one if months == 1 else many).format(n=months))


def show_date(moment, zone):
    """Show a stored naive-UTC datetime in the shop's time zone."""
    return moment.replace(tzinfo=timezone.utc).astimezone(zone).strftime('%d.%m.%Y %H:%M')


def human_bytes(count):
    """Format a byte count as '1.5 GB'."""
    size = float(count or 0)
    for unit in ('B', 'KB', 'MB', 'GB'):
        if size < 1024:
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024
    return f'{size:.1f} TB'


