"""Outside services going away and coming back: one line each way, one admin alert each way, no token anywhere.

Issue 10 items 2, 10, 11 and issue 9 item 5(a).
"""
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import bot
import config
from conftest import BOT_TOKEN, CRYPTOPAY_TOKEN, ROOT, settings_env
from cryptobot import CryptoPayError
from outages import Outage, Watched, cryptopay_unreachable


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_an_outage_logs_one_line_each_way_and_alerts_the_admins_once_each_way(caplog):
    clock = Clock()
    outage = Outage('Crypto Pay', alert_after=300, clock=clock)
    messages, delays = [], []
    with caplog.at_level(logging.INFO, logger='outages'):
        for _ in range(60):  # 20 minutes of failed calls, one every 20 s
            delays.append(outage.failed('Crypto Pay getInvoices: cannot connect (ConnectTimeout)'))
            messages += outage.take_messages()
            clock.now += 20
        outage.ok()
        outage.ok()
        messages += outage.take_messages()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ['Crypto Pay unreachable: Crypto Pay getInvoices: cannot connect (ConnectTimeout)',
                     'Crypto Pay is back after 20 min (60 failed calls)']
    assert delays[:4] == [1, 2, 4, 8] and max(delays) == 300
    assert len(messages) == 2
    assert messages[0].startswith('⚠️ Crypto Pay has been unreachable for 5 min')
    assert messages[1] == '✅ Crypto Pay is back after 20 min.'


def test_the_alert_goes_out_once_the_outage_is_long_enough():
    clock = Clock()
    outage = Outage('Crypto Pay', alert_after=300, clock=clock)
    outage.failed('HTTP 503 SERVICE_UNAVAILABLE')
    clock.now += 299
    assert outage.take_messages() == []
    clock.now += 1
    [alert] = outage.take_messages()
    assert 'Crypto Pay has been unreachable for 5 min' in alert and 'HTTP 503' in alert
    assert outage.take_messages() == []


def test_a_short_blip_tells_the_admins_nothing():
    clock = Clock()
    outage = Outage('Crypto Pay', alert_after=300, clock=clock)
    outage.failed('timeout')
    clock.now += 60
    outage.ok()
    assert outage.take_messages() == []


def test_telegram_news_waits_until_telegram_answers_and_is_one_message():
    clock = Clock()
    outage = Outage('Telegram', alert_after=300, alert_while_down=False, clock=clock)
    outage.failed('ConnectionError (NewConnectionError)')
    clock.now += 900
    assert outage.take_messages() == []  # it could not travel anyway
    outage.ok()
    [news] = outage.take_messages()
    assert 'Telegram was unreachable for 15 min' in news and 'It is back now' in news


def test_watched_client_reports_outages_but_not_refusals():
    outage = Outage('Crypto Pay', clock=Clock())

    class Client:
        def get_me(self, status):
            if status:
                raise CryptoPayError('Crypto Pay getMe failed', status=status if status > 0 else None)
            return {'app_id': 1}

    watched = Watched(Client(), outage, CryptoPayError, cryptopay_unreachable, methods=['get_me'])
    with pytest.raises(CryptoPayError):
        watched.get_me(400)
    assert not outage.is_down
    with pytest.raises(CryptoPayError):
        watched.get_me(-1)  # no reply at all
    assert outage.is_down
    assert watched.get_me(0) == {'app_id': 1} and not outage.is_down


# Telegram unreachable while polling (issue 10 item 11)

def polling_bot(telegram, panel, cryptopay, database):
    settings = config.load(settings_env(panel, cryptopay, database, TELEGRAM_API_URL=telegram.url))
    made = bot.make_bot(settings)
    bot.ShopBot(made, bot.build_shop(settings), settings)
    return made


@contextlib.contextmanager
def polling(made):
    """Run the bot's long polling in a thread for the duration of a with block."""
    poller = threading.Thread(target=made.infinity_polling, kwargs={'timeout': 5, 'long_polling_timeout': 1})
    poller.start()
    try:
        yield
    finally:
        made.stop_polling()
        poller.join(15)
    assert not poller.is_alive()


def test_telegram_unreachable_while_polling_is_one_line_and_back_is_one_more(telegram, panel, cryptopay,
                                                                             database, caplog, capfd):
    made = polling_bot(telegram, panel, cryptopay, database)
    telegram.break_next(1000, 'drop', method='getUpdates')
    with caplog.at_level(logging.INFO):
        with polling(made):
            time.sleep(3)
            polls_while_down = telegram.counts['getUpdates']
            telegram._breaks.clear()
            time.sleep(5)
    problems = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(problems) == 1, [record.getMessage()[:200] for record in problems]
    assert problems[0].getMessage() == 'Telegram unreachable: ConnectionError (RemoteDisconnected)'
    assert polls_while_down <= 3  # 1 s, 2 s, ...: backing off, not 4 polls a second
    assert any('Telegram is back' in record.getMessage() for record in caplog.records)
    assert 'Traceback' not in caplog.text
    out, err = capfd.readouterr()
    assert BOT_TOKEN not in caplog.text + out + err and 'Traceback' not in err


@pytest.mark.parametrize('kind', ['bad_gateway', 'hang'])
def test_telegram_failing_while_polling_backs_off_quietly(telegram, panel, cryptopay, database, caplog, kind):
    made = polling_bot(telegram, panel, cryptopay, database)
    telegram.break_next(1000, kind, method='getUpdates', seconds=10)
    with caplog.at_level(logging.INFO):
        with polling(made):
            time.sleep(3 if kind == 'bad_gateway' else 6)
    problems = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(problems) == 1 and problems[0].startswith('Telegram unreachable: '), problems
    assert 'Traceback' not in caplog.text and BOT_TOKEN not in caplog.text


# Start-up (issue 10 item 2)

def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def start_process(panel, cryptopay, database, tmp_path, telegram_url):
    env = {**os.environ, **settings_env(panel, cryptopay, database, TELEGRAM_API_URL=telegram_url,
                                         BACKUP_DIR=tmp_path / 'backups')}
    env.pop('TEST_DATABASE_URL', None)
    return subprocess.Popen([sys.executable, str(ROOT / 'bot.py')], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def lines_until(process, done, timeout):
    """Read the process's stdout lines until done(lines) or timeout; return them (the reader keeps going).

    The HTTP side's and the job leases' own lines (web.py, leases.py) are left out: these tests are about Telegram's.
    """
    lines, deadline = [], time.monotonic() + timeout
    threading.Thread(target=lambda: [lines.append(line) for line in process.stdout
                                     if ' web: ' not in line and ' leases: ' not in line],
                     daemon=True).start()
    while not done(lines) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    return lines


def stop(process):
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.stderr.read()


def test_telegram_unreachable_at_start_is_one_plain_line_per_try_backing_off(panel, cryptopay, database, tmp_path):
    process = start_process(panel, cryptopay, database, tmp_path, f'http://127.0.0.1:{free_port()}')
    lines = lines_until(process, lambda lines: len(lines) >= 2, timeout=30)
    err = stop(process)
    assert process.returncode == 0 and len(lines) >= 2, (lines, err)
    assert lines[2:] == [] or 'stopping on signal' in lines[2]
    lines = lines[:2]
    for line in lines:
        assert 'cannot reach Telegram at http://127.0.0.1:' in line and 'ConnectionError' in line
    assert 'trying again in 5 s' in lines[0] and 'trying again in 10 s' in lines[1]
    assert err == '' and BOT_TOKEN not in ''.join(lines) and BOT_TOKEN.split(':')[1] not in ''.join(lines)


def test_telegram_hanging_at_getme_is_one_plain_line(telegram, panel, cryptopay, database, tmp_path):
    telegram.break_next(1, 'hang', method='getMe', seconds=30)
    process = start_process(panel, cryptopay, database, tmp_path, telegram.url)
    lines = lines_until(process, lambda lines: any('started' in line for line in lines), timeout=60)
    err = stop(process)
    assert 'cannot reach Telegram at' in lines[0] and 'ReadTimeout' in lines[0], (lines, err)
    assert 'started' in lines[1], lines  # the next try worked
    assert err == '' and BOT_TOKEN not in ''.join(lines)


# Every exit path goes through the redacting logger (issue 9 item 5a)

def test_uncaught_errors_in_threads_and_main_are_logged_redacted(monkeypatch, capfd):
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook)
    monkeypatch.setattr(threading, 'excepthook', threading.excepthook)
    root = logging.getLogger()
    monkeypatch.setattr(root, 'handlers', list(root.handlers))
    bot.setup_logging([BOT_TOKEN, CRYPTOPAY_TOKEN])

    def die():
        raise RuntimeError(f'request to https://api.telegram.org/bot{BOT_TOKEN}/editMessageText failed')

    thread = threading.Thread(target=die, name='broadcast')
    thread.start()
    thread.join()
    try:
        raise ValueError(f'Crypto-Pay-API-Token: {CRYPTOPAY_TOKEN}')
    except ValueError:
        sys.excepthook(*sys.exc_info())
    out, err = capfd.readouterr()
    assert BOT_TOKEN not in out + err and CRYPTOPAY_TOKEN not in out + err
    assert err == ''
    assert 'thread broadcast died' in out and 'bot***/editMessageText' in out
    assert 'ValueError' in out


def test_telebot_logs_only_through_the_redacting_logger(monkeypatch, capfd):
    root = logging.getLogger()
    monkeypatch.setattr(root, 'handlers', list(root.handlers))
    bot.setup_logging([BOT_TOKEN])
    logging.getLogger('TeleBot').error('Threaded polling exception: url /bot%s/getUpdates', BOT_TOKEN)
    out, err = capfd.readouterr()
    assert err == '' and BOT_TOKEN not in out and '/bot***/getUpdates' in out


def test_the_unit_restarts_a_failing_bot_ever_more_slowly():
    unit = (ROOT / 'vpn-bot.service').read_text()
    directives = dict(line.split('=', 1) for line in unit.splitlines() if '=' in line and not line.startswith('#'))
    assert directives['Restart'] == 'always' and directives['RestartSec'] == '5'
    assert int(directives['RestartSteps']) >= 5 and int(directives['RestartMaxDelaySec']) >= 300
