"""One buyer against the shop: plan presses in bulk, Crypto Pay answering 429 or hanging; prints figures.

bot.py runs as a process (SQLite in a temp dir) against the loopback fakes of this checkout; the
fake Bot API refuses callback answers later than 15 s, as Telegram does. BENCH_ROOT runs another
checkout's bot.py (e.g. the code before the per-buyer limits) against the same fakes.

    .venv/bin/python bench/buyer_limits.py
    BENCH_ROOT=/tmp/before .venv/bin/python bench/buyer_limits.py
"""
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get('BENCH_ROOT') or HERE).resolve()
sys.path.insert(0, str(HERE / 'tests'))

from fake_cryptopay import FakeCryptoPay  # noqa: E402
from fake_telegram import FakeTelegram  # noqa: E402
from fake_xui import FakePanel  # noqa: E402

BOT_TOKEN = '123456:bench-placeholder-token'
CRYPTOPAY_TOKEN = '4242:BENCH-crypto-token'
PANEL_USER, PANEL_PASSWORD = 'admin', 'bench-panel-pw'


def person(telegram_id, name):
    return {'id': telegram_id, 'first_name': name, 'username': f'{name.lower()}{telegram_id}', 'language_code': 'en'}


def answers(telegram, updates):
    """Return (seconds from press to accepted answer for each answered press, presses never answered in time)."""
    pressed = {query['update_id']: query['pressed'] for query in telegram._queries.values()}
    took = sorted(telegram._answers_by_update[u]['time'] - pressed[u] for u in updates
                  if u in telegram._answers_by_update)
    return took, len(updates) - len(took)


def wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def main():
    scratch = Path(tempfile.mkdtemp(prefix='buyer-limits-'))
    database = scratch / 'bot.db'
    print(f'bot.py from {ROOT}')
    with FakePanel(generation='v3', username=PANEL_USER, password=PANEL_PASSWORD) as panel, \
            FakeCryptoPay(token=CRYPTOPAY_TOKEN) as cryptopay, FakeTelegram(token=BOT_TOKEN) as telegram:
        env = {**os.environ, 'BOT_TOKEN': BOT_TOKEN, 'TELEGRAM_API_URL': telegram.url, 'XUI_URL': panel.url,
               'XUI_USERNAME': PANEL_USER, 'XUI_PASSWORD': PANEL_PASSWORD, 'XUI_INBOUND_ID': str(panel.inbound_id),
               'XUI_SUB_URL': 'https://vpn.example.test/sub/', 'CRYPTOPAY_TOKEN': CRYPTOPAY_TOKEN,
               'CRYPTOPAY_URL': cryptopay.url, 'DATABASE_URL': f'sqlite:///{database}', 'TIMEZONE': 'UTC',
               'PAYMENT_POLL_SECONDS': '3600', 'BACKUP_DIR': str(scratch / 'backups')}
        env.pop('TEST_DATABASE_URL', None)
        with open(scratch / 'bot.log', 'w') as log:
            bot = subprocess.Popen([sys.executable, str(ROOT / 'bot.py')], env=env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            if not wait(lambda: telegram.counts['getUpdates'] > 0, 30):
                raise SystemExit(f'bot.py did not start:\n{(scratch / "bot.log").read_text()}')
            mallory, bob, alice = person(8001, 'Mallory'), person(8002, 'Bob'), person(8003, 'Alice')
            for user in (mallory, bob, alice):
                telegram.add_user(user)

            def menu_of(user, timeout=30):
                telegram.send_text(user, '/start')
                return telegram.wait_for_message(user['id'], contains='Hi', timeout=timeout)

            # A: 60 presses of "1 month" at once, Crypto Pay healthy
            menu = menu_of(mallory)
            with telegram._cond:
                presses = [telegram.press(mallory, menu, 'plan:30', strict=False) for _ in range(60)]
            wait(lambda: all(u in telegram._answers_by_update for u in presses), 60)
            took, late = answers(telegram, presses)
            pending = sqlite3.connect(database).execute(
                "SELECT COUNT(*) FROM payments WHERE status = 'pending'").fetchone()[0]
            print(f'A 60 plan presses at once: createInvoice calls {sum(m == "createInvoice" for m, _ in cryptopay.calls)}, '
                  f'pending invoices {pending}, slowest answer {took[-1] if took else 0:.2f} s, unanswered {late}')

            # B: Crypto Pay answers 429 (Retry-After 30) to everything; 16 presses, then another buyer's /start
            cryptopay.rate_limit_next(10_000, retry_after=30)
            with telegram._cond:
                presses = [telegram.press(mallory, menu, f'plan:{(90, 180, 365)[n % 3]}', strict=False)
                           for n in range(16)]
            time.sleep(0.5)
            started = time.monotonic()
            menu_of(bob, timeout=200)
            start_took = time.monotonic() - started
            wait(lambda: all(u in telegram._answers_by_update for u in presses), 100)
            took, late = answers(telegram, presses)
            print(f'B 16 plan presses while Crypto Pay answers 429: Bob\'s /start answered in {start_took:.2f} s; '
                  f'presses answered in time {len(took)}, refused as too old {late}')
            cryptopay._faults.clear()

            # C: a Check press while Crypto Pay hangs
            alice_menu = menu_of(alice)
            telegram.press(alice, alice_menu, 'buy', strict=False)
            time.sleep(0.5)
            invoice = telegram.press(alice, alice_menu, 'plan:30', strict=False)
            wait(lambda: invoice in telegram._answers_by_update, 30)
            shown = telegram.get_message(alice['id'], alice_menu['message_id'])
            check = next(data for _, data in telegram.buttons(shown) if str(data).startswith('check:'))
            cryptopay.hang_next(10, seconds=60)
            press = telegram.press(alice, shown, check, strict=False)
            started = time.monotonic()
            wait(lambda: press in telegram._answers_by_update or any(
                call.method == 'answerCallbackQuery' and not call.ok for call in list(telegram.sent)[-5:]), 90)
            took, late = answers(telegram, [press])
            print(f'C Check press while Crypto Pay hangs: ' + (f'answered after {took[0]:.2f} s' if took else
                  f'answer refused as too old after {time.monotonic() - started:.2f} s'))
            cryptopay._faults.clear()
        finally:
            bot.terminate()
            bot.wait(15)


if __name__ == '__main__':
    main()
