"""The buyer's subscription page: what a browser gets at /sub/{subId} (status, QR code, one-tap import).

Plain HTML from a Jinja2 template with autoescaping; no JavaScript. Russian or English by Accept-Language.
The import buttons use each app's documented deep-link scheme (see APPS).
"""
import base64
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import jinja2

from qr import qr_png

RUSSIAN_REGION = {'ru', 'uk', 'be', 'kk', 'ky', 'uz', 'tg', 'tk', 'hy', 'az', 'ka'}

# (name, deep link builder, platforms): the apps' own documented URL schemes —
# Hiddify: hiddify://import/<link>#<name> (hiddify.com docs, URL-Scheme); v2rayNG and V2Box:
# install-sub?url=…&name=…; Streisand: streisand://import/<link>#<name>; Happ: happ://add/<link>.
APPS = (
    ('Hiddify', lambda link, name: f'hiddify://import/{link}#{quote(name, safe="")}', 'Android · iOS · Windows · macOS'),
    ('v2rayNG', lambda link, name: f'v2rayng://install-sub?url={quote(link, safe="")}&name={quote(name, safe="")}', 'Android'),
    ('Happ', lambda link, name: f'happ://add/{link}', 'iOS · Android'),
    ('Streisand', lambda link, name: f'streisand://import/{link}#{quote(name, safe="")}', 'iOS · macOS'),
    ('V2Box', lambda link, name: f'v2box://install-sub?url={quote(link, safe="")}&name={quote(name, safe="")}', 'iOS · Android'),
)

TEXTS = {
    'ru': {
        'title': 'Ваша подписка', 'active': 'Активна до {date}', 'expired': 'Закончилась {date}',
        'none': 'Подписки пока нет', 'days_left': 'Осталось дней: {days}',
        'traffic': 'Трафик: {used}', 'of_total': ' из {total}', 'unlimited': ' (без ограничений)',
        'link': 'Ваша ссылка-подписка', 'scan': 'Отсканируйте QR-код в приложении или нажмите кнопку:',
        'add_to': 'Добавить в {app}', 'steps_title': 'Как подключиться',
        'steps': [('Android', 'Установите v2rayNG или Hiddify, нажмите кнопку выше или добавьте подписку по ссылке.'),
                  ('iPhone / iPad', 'Установите Streisand, V2Box или Happ из App Store и нажмите кнопку выше.'),
                  ('Windows / macOS', 'Установите Hiddify, выберите «Новый профиль» → «Добавить из буфера» и вставьте ссылку.')],
        'support': 'Поддержка: {contact}', 'renew': 'Продлить подписку можно в боте.',
    },
    'en': {
        'title': 'Your subscription', 'active': 'Active until {date}', 'expired': 'Ended {date}',
        'none': 'No subscription yet', 'days_left': 'Days left: {days}',
        'traffic': 'Traffic: {used}', 'of_total': ' of {total}', 'unlimited': ' (unlimited)',
        'link': 'Your subscription link', 'scan': 'Scan the QR code in your app, or tap a button:',
        'add_to': 'Add to {app}', 'steps_title': 'How to connect',
        'steps': [('Android', 'Install v2rayNG or Hiddify, tap a button above or add the link as a subscription.'),
                  ('iPhone / iPad', 'Install Streisand, V2Box or Happ from the App Store and tap a button above.'),
                  ('Windows / macOS', 'Install Hiddify, choose New profile → Add from clipboard and paste the link.')],
        'support': 'Support: {contact}', 'renew': 'Renew your subscription in the bot.',
    },
}

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / 'templates'),
    autoescape=True, undefined=jinja2.StrictUndefined)


def language_of(accept_language):
    """Pick 'ru' or 'en' from an Accept-Language header, by its q-values (Russian region → 'ru')."""
    best, best_q = 'en', -1.0
    for position, part in enumerate((accept_language or '').split(',')):
        tag, _, params = part.strip().partition(';')
        quality = 1.0
        if params.strip().startswith('q='):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                continue
        base = tag.strip().split('-')[0].lower()
        language = 'ru' if base in RUSSIAN_REGION else 'en' if base in ('en', '*') else None
        # the first of equal weights wins, as browsers list them in order of preference
        if language and quality > best_q:
            best, best_q = language, quality
    return best


def qr_data_uri(link):
    """Render the link as a PNG QR code in a data: URI (error correction M: scans from a phone screen)."""
    return 'data:image/png;base64,' + base64.b64encode(qr_png(link, scale=6)).decode()


def human_bytes(count):
    """Write a byte count the way apps do: 1.5 GB, 320 MB (powers of 1024)."""
    value = float(count)
    for unit in ('B', 'KB', 'MB', 'GB'):
        if value < 1024:
            return f'{value:.0f} {unit}' if unit in ('B', 'KB') else f'{value:.1f} {unit}'
        value /= 1024
    return f'{value:.1f} TB'


def render(shop_name, link, expires_at, upload, download, total, timezone_info, support_contact,
           accept_language, now=None):
    """Return the page as UTF-8 bytes.

    :param expires_at: the buyer's expiry (naive UTC as stored, or aware), None for never bought
    :param upload, download, total: bytes, summed over panels; total 0 = unlimited
    """
    lang = language_of(accept_language)
    text = TEXTS[lang]
    now = now or datetime.now(timezone.utc)
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=timezone.utc)
    if expires_at is None:
        status, active, days_left = text['none'], False, 0
    else:
        shown = expires_at.astimezone(timezone_info).strftime('%d.%m.%Y %H:%M')
        active = expires_at > now
        status = (text['active'] if active else text['expired']).format(date=shown)
        days_left = max(0, (expires_at - now).days)
    traffic = text['traffic'].format(used=human_bytes(upload + download)) + (
        text['of_total'].format(total=human_bytes(total)) if total else text['unlimited'])
    apps = [{'name': name, 'href': build(link, shop_name), 'platforms': platforms,
             'label': text['add_to'].format(app=name)} for name, build, platforms in APPS]
    page = _templates.get_template('subpage.html').render(
        lang=lang, t=text, shop_name=shop_name, status=status, active=active, days_left=days_left,
        traffic=traffic, link=link, qr=qr_data_uri(link), apps=apps,
        support=text['support'].format(contact=support_contact) if support_contact else '')
    return page.encode('utf-8')
