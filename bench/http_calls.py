"""CPU one Bot API call costs the bot, by the way it is sent (the fake Bot API runs in its own process).

    .venv/bin/python bench/http_calls.py [--calls 1000]

Sends the same sendMessage (a 360-character HTML text and the main menu's keyboard) through
telebot: as telebot sends it (parameters in the query string, a requests session per thread),
through tgsender.RequestSender when this checkout has it (urllib3, parameters in a form body,
proxies read once), and through a bare http.client connection, the floor for any client in
Python (plain HTTP only). Prints wall time and this process's CPU per call. --tls serves the
fake over HTTPS with a throwaway CA (bench/tgserver.py --tls), trusted through SSL_CERT_FILE.
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse

import common

import keyboards
import telebot
from telebot import apihelper


class Reply:
    """Just enough of a requests.Response for telebot."""

    def __init__(self, status, reason, body):
        self.status_code, self.reason, self.content = status, reason, body

    @property
    def text(self):
        return self.content.decode('utf-8')

    def json(self):
        return json.loads(self.content)


_local = threading.local()


def http_client_sender(method, url, params=None, files=None, timeout=None, proxies=None):
    """Send a call over one kept-alive http.client connection per thread (no files, no proxies)."""
    parts = urllib.parse.urlsplit(url)
    connection = getattr(_local, 'connection', None)
    if connection is None:
        connection = _local.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request('POST', parts.path, urllib.parse.urlencode(params or {}),
                       {'Content-Type': 'application/x-www-form-urlencoded'})
    response = connection.getresponse()
    return Reply(response.status, response.reason, response.read())


def measure(bot, chat_id, calls):
    text = 'Hello <b>there</b>, this is the benchmark. ' * 8
    markup = keyboards.main_menu('en')
    for _ in range(20):  # warm up: connections, caches
        bot.send_message(chat_id, text, parse_mode='HTML', reply_markup=markup)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        bot.send_message(chat_id, text, parse_mode='HTML', reply_markup=markup)
    return (time.perf_counter() - wall) / calls * 1000, (time.process_time() - cpu) / calls * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=1000)
    parser.add_argument('--tls', action='store_true', help='over HTTPS with a throwaway CA')
    args = parser.parse_args()
    print(f'# http calls: {common.machine_line()}{", TLS" if args.tls else ""}')
    tls_args = []
    if args.tls:
        import tempfile
        tls_dir = tempfile.mkdtemp(prefix='spn-bench-tls-')
        tls_args = ['--tls', tls_dir]
        common.os.environ['SSL_CERT_FILE'] = common.os.environ['REQUESTS_CA_BUNDLE'] = f'{tls_dir}/ca.pem'
    tg, url = common.start_telegram_server('--add-users', 1, *tls_args)
    try:
        apihelper.API_URL = url + '/bot{0}/{1}'
        bot = telebot.TeleBot(common.BOT_TOKEN, threaded=False)
        chat_id = common.USER_BASE
        senders = [('telebot as it comes (query string, requests)', None)]
        try:
            import tgsender
            senders.append(('tgsender (urllib3, form body, proxies once)', tgsender.RequestSender()))
        except ImportError:
            pass
        if not args.tls:
            senders.append(('bare http.client, one connection per thread', http_client_sender))
        for label, sender in senders:
            apihelper.CUSTOM_REQUEST_SENDER = sender
            wall, cpu = measure(bot, chat_id, args.calls)
            print(f'  {label:48} {wall:.3f} ms wall, {cpu:.3f} ms CPU per call')
    finally:
        tg.stop()


if __name__ == '__main__':
    main()
