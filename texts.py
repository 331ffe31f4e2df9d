"""Every user-facing string, in Russian and English, and the helpers that format dates and plans."""
from datetime import timezone
from html import escape

TEXTS = {
    'en': {
        'welcome': '👋 Hi, {name}!\n\nThis is <b>SPN VPN</b>: fast VPN that works in v2rayNG, Hiddify, Streisand, V2Box and Happ.\nChoose below.',
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
        'invite': '👥 Invite friends and get <b>{bonus} days</b> for each friend’s first payment.\n\nYour link:\n{link}\n\nJoined: {joined} · paid: {paid}',
        'help': '<b>How to connect</b>\n1. Install an app: v2rayNG or Hiddify (Android), Streisand, V2Box or Happ (iPhone/Mac), Hiddify (Windows).\n2. Buy a plan or take the free gift.\n3. Copy your link from “My subscription” and add it in the app.\n\nApps: https://github.com/2dust/v2rayNG/releases · https://hiddify.com · https://apps.apple.com/app/streisand/id6450534064{support}',
        'help_support': '\n\nSupport: {contact}',
        'cancelled': 'Cancelled.',
        'unknown': 'I did not understand that. Press /start for the menu.',
        'stale': 'This button is no longer valid.',
        'reminder_3': '⏰ Your VPN expires in 3 days ({expiry}). Renew to keep it working.',
        'reminder_1': '⏰ Your VPN expires tomorrow ({expiry}). Renew to keep it working.',
        'reminder_0': '⛔ Your VPN has expired. Renew to turn it back on.',
        'error': 'Something went wrong. Please try again in a minute.',
        'busy': 'The service is busy right now. Please try again in a minute.',
        'cmd_start': 'Main menu', 'cmd_promo': 'Enter a promo code', 'cmd_help': 'How to connect',
        'cmd_cancel': 'Cancel the current input',
    },
    'ru': {
        'welcome': '👋 Привет, {name}!\n\nЭто <b>SPN VPN</b>: быстрый VPN для v2rayNG, Hiddify, Streisand, V2Box и Happ.\nВыберите ниже.',
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
        'invite': '👥 Приглашайте друзей и получайте <b>{bonus} дн.</b> за первую оплату каждого.\n\nВаша ссылка:\n{link}\n\nПришло: {joined} · оплатили: {paid}',
        'help': '<b>Как подключиться</b>\n1. Установите приложение: v2rayNG или Hiddify (Android), Streisand, V2Box или Happ (iPhone/Mac), Hiddify (Windows).\n2. Купите тариф или получите подарок.\n3. Скопируйте ссылку в «Моя подписка» и добавьте её в приложение.\n\nПриложения: https://github.com/2dust/v2rayNG/releases · https://hiddify.com · https://apps.apple.com/app/streisand/id6450534064{support}',
        'help_support': '\n\nПоддержка: {contact}',
        'cancelled': 'Отменено.',
        'unknown': 'Не понял. Нажмите /start, чтобы открыть меню.',
        'stale': 'Эта кнопка больше не действует.',
        'reminder_3': '⏰ Ваш VPN истекает через 3 дня ({expiry}). Продлите, чтобы он продолжал работать.',
        'reminder_1': '⏰ Ваш VPN истекает завтра ({expiry}). Продлите, чтобы он продолжал работать.',
        'reminder_0': '⛔ Срок вашего VPN истёк. Продлите, чтобы снова включить его.',
        'error': 'Что-то пошло не так. Попробуйте через минуту.',
        'busy': 'Сервис сейчас занят. Попробуйте через минуту.',
        'cmd_start': 'Главное меню', 'cmd_promo': 'Ввести промокод', 'cmd_help': 'Как подключиться',
        'cmd_cancel': 'Отменить ввод',
    },
}


def t(lang, key, **values):
    """Return the text for key in lang ('ru' or 'en'), formatted with values."""
    table = TEXTS.get(lang, TEXTS['en'])
    return table[key].format(**values) if values else table[key]


def plan_name(lang, days):
    """Name a plan by its length: '1 month', '3 months', '7 days' / '1 мес.'."""
    if days in (365, 366):
        months = 12
    elif days % 30 == 0:
        months = days // 30
    else:
        return t(lang, 'plan_days', n=days)
    one, many = t(lang, 'plan_months').split('|')
    return (one if months == 1 else many).format(n=months)


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


def html(text):
    """Escape text that came from a user for HTML parse mode."""
    return escape(text or '', quote=False)
