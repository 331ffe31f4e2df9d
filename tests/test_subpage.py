"""The subscription page: language, escaping, and what a real browser (Chromium) shows, QR code included."""
import os
import shutil
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import subpage

LINK = 'https://shop.example.test/sub/abcdefghijklmnop'
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
ARTIFACTS = Path(os.environ.get('TEST_ARTIFACTS', Path(__file__).resolve().parent.parent / 'test-artifacts'))


def page(accept_language='ru-RU,ru;q=0.9', shop_name='SPN VPN', link=LINK, expires_at=NOW + timedelta(days=10),
         **kwargs):
    args = dict(upload=1536 * 1024 ** 2, download=512 * 1024 ** 2, total=0,
                timezone_info=ZoneInfo('Europe/Moscow'), support_contact='@spn_help', now=NOW)
    args.update(kwargs)
    return subpage.render(shop_name, link, expires_at, accept_language=accept_language, **args).decode()


@pytest.mark.parametrize('header, lang', [
    ('ru-RU,ru;q=0.9,en-US;q=0.8', 'ru'), ('en-US,en;q=0.9,ru;q=0.8', 'en'), ('uk', 'ru'),
    ('de-DE,de;q=0.9', 'en'), ('', 'en'), (None, 'en'), ('en;q=0.5, ru;q=0.7', 'ru'),
    ('ru;q=abc, en', 'en'), ('*', 'en'),
])
def test_the_language_follows_accept_language(header, lang):
    assert subpage.language_of(header) == lang


def test_the_page_says_status_expiry_in_the_shops_zone_traffic_and_support():
    html = page()
    assert 'Активна до 10.12.2026 15:00' in html  # 12:00 UTC is 15:00 in Moscow
    assert 'Осталось дней: 10' in html
    assert 'Трафик: 2.0 GB (без ограничений)' in html
    assert 'Поддержка: @spn_help' in html
    english = page('en-GB', total=10 * 1024 ** 3, expires_at=NOW - timedelta(days=1))
    assert 'Ended 29.11.2026 15:00' in english and 'Days left' not in english
    assert 'Traffic: 2.0 GB of 10.0 GB' in english
    assert 'No subscription yet' in page('en', expires_at=None)


def test_every_app_gets_its_documented_deep_link():
    html = page(shop_name='My VPN')
    assert f'href="hiddify://import/{LINK}#My%20VPN"' in html
    assert 'href="v2rayng://install-sub?url=https%3A%2F%2Fshop.example.test%2Fsub%2Fabcdefghijklmnop&amp;name=My%20VPN"' in html
    assert f'href="happ://add/{LINK}"' in html
    assert f'href="streisand://import/{LINK}#My%20VPN"' in html
    assert 'href="v2box://install-sub?url=https%3A%2F%2Fshop.example.test' in html
    assert '<script' not in html  # works without JavaScript


def test_outside_text_is_escaped():
    html = page(shop_name='<script>alert(1)</script>&Co', support_contact='<a href="x">')
    assert '<script>' not in html and '&lt;script&gt;alert(1)&lt;/script&gt;&amp;Co' in html
    assert '<a href="x">' not in html


# a real browser

def chromium():
    for name in ('chromium', 'chromium-browser'):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture
def browser(tmp_path):
    if not (chromium() and shutil.which('chromedriver')):
        if os.environ.get('CI'):
            pytest.fail('Chromium and chromedriver are missing: scripts/test.sh installs them')
        pytest.skip('Chromium and chromedriver are not installed (scripts/test.sh installs them)')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-dev-shm-usage', '--window-size=480,1400', f'--user-data-dir={tmp_path / "chrome"}'):
        options.add_argument(flag)
    # a Russian-speaking buyer's browser
    options.add_argument('--lang=ru-RU')
    options.add_experimental_option('prefs', {'intl.accept_languages': 'ru-RU,ru,en'})
    driver = webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_page():
    """Serve render() for one buyer on 127.0.0.1, choosing the language by the browser's Accept-Language."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = subpage.render('SPN <VPN> & Co', LINK, NOW + timedelta(days=30), 3 * 1024 ** 3, 1024 ** 3, 0,
                                  ZoneInfo('Europe/Moscow'), '@spn_help', self.headers.get('Accept-Language'),
                                  now=NOW)
            self.send_response(200)
            self.send_header('Content-Type', 'text/html; charset=utf-8')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}/sub/abcdefghijklmnop'
    server.shutdown()
    server.server_close()


def decode_qr(png_path):
    zbarimg = shutil.which('zbarimg')
    if not zbarimg:
        if os.environ.get('CI'):
            pytest.fail('zbarimg is missing: scripts/test.sh installs zbar-tools')
        pytest.skip('zbarimg (zbar-tools) is not installed')
    result = subprocess.run([zbarimg, '--quiet', '--raw', str(png_path)], capture_output=True, text=True,
                            timeout=60)
    return result.stdout.strip()


def test_a_browser_shows_the_page_and_its_qr_code_scans_to_the_link(browser, served_page):
    from selenium.webdriver.common.by import By
    browser.get(served_page)
    assert browser.title == 'SPN <VPN> & Co · Ваша подписка'
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / 'subscription-page.png'))
    assert browser.find_element(By.ID, 'link').text == LINK
    assert browser.find_element(By.ID, 'status').text.startswith('Активна до 30.12.2026')
    apps = browser.find_elements(By.CSS_SELECTOR, '#apps a')
    assert [a.get_attribute('data-app') for a in apps] == ['Hiddify', 'v2rayNG', 'Happ', 'Streisand', 'V2Box']
    qr_png = ARTIFACTS / 'subscription-qr.png'
    qr_png.write_bytes(browser.find_element(By.ID, 'qr').screenshot_as_png)
    assert decode_qr(qr_png) == LINK
