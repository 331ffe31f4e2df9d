"""The fake Bot API (tests/fake_telegram.py) in its own process, feeding bot.py a benchmark mix and timing it.

    python bench/tgserver.py --port 0 --total 5000 --batch 100 --mix start:25,menu:40,sub:15,promo:20

prints its URL, then serves until SIGTERM (HTTPS with --tls DIR: a CA made now, written to
DIR/ca.pem, that the bot trusts through SSL_CERT_FILE, or REQUESTS_CA_BUNDLE for requests). Updates come from seeded users (bench/common.py):
/start from brand-new users, menu presses (help, buy, menu, invite), My subscription presses
(edit + QR photo + answer) and /promo attempts (half a valid code, half an unknown one). Each
update has a chat of its own while in flight, so every call the bot makes is tied to its update.

For each update it keeps: when the getUpdates reply carrying it had been written (receipt), when
its terminal call arrived (answerCallbackQuery for a press, sendMessage for a text), and how many
the time the API spent on the calls before that one (its added latency included).
Own time = terminal - receipt - API time.

GET /_bench/stats: progress; GET /_bench/results: per-update records and broadcast sends;
POST /_bench/send {"user": {...}, "text": ...}: queue a message (e.g. an admin's /broadcast).
"""
import argparse
import itertools
import json
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))

from fake_telegram import FakeTelegram, TelegramError, _as_user, throwaway_tls  # noqa: E402

USER_BASE = 600_000_000  # as bench/common.py seeds them
NEW_BASE = 800_000_000
MENU_DATA = ('help', 'buy', 'menu', 'invite')
PLACEHOLDER_MARKUP = {'inline_keyboard': [[{'text': 'Menu', 'callback_data': 'menu'}]]}


def seeded_user(i):
    tid = USER_BASE + i
    return {'id': tid, 'first_name': f'User {i}', 'username': f'user{tid}', 'language_code': 'ru' if i % 3 else 'en'}


def pools(users):
    """Split seeded users as common.user_class does: active (sub / promo) and the rest (menu presses)."""
    active = [i for i in range(users) if i % 10 < 4]
    others = [i for i in range(users) if i % 10 >= 4 and i % 50 != 49]  # not the blocked ones
    return {'sub': active[0::2], 'promo': active[1::2], 'menu': others}


class BenchTelegram(FakeTelegram):
    def __init__(self, args):
        tls = throwaway_tls(args.tls)[0] if args.tls else None
        super().__init__(token=args.token, port=args.port, record=False, history=4, tls=tls)
        self.latency = args.latency
        self.args = args
        self.mix = self._parse_mix(args.mix)
        self.pools = pools(args.users) if args.users else {}
        self.cursor = {kind: args.offset for kind in ('sub', 'promo', 'menu')}
        self.new_ids = itertools.count(NEW_BASE + args.offset * 10)
        self.made = 0
        self.done = 0
        self.track = {}  # update_id -> record
        self.by_chat = {}  # chat_id -> update_id in flight
        self.by_query = {}  # callback_query_id -> update_id
        self.sends = []  # (arrival, chat_id, status) of sendMessage to seeded users (broadcasts)
        self.flood_count = 0
        self.local = threading.local()
        if args.max_sends:
            self.max_sends_per_second = args.max_sends
        for i in range(args.add_users):
            self.add_user(seeded_user(i))
        if args.rate:
            threading.Thread(target=self._paced, daemon=True).start()

    @staticmethod
    def _parse_mix(text):
        if not text:
            return []
        mix = []
        for part in text.split(','):
            kind, _, weight = part.partition(':')
            mix += [kind] * int(weight)
        return mix

    # -- generating updates --------------------------------------------------

    def _next(self, kind):
        pool = self.pools[kind]
        i = pool[self.cursor[kind] % len(pool)]
        self.cursor[kind] += 1
        return seeded_user(i)

    def _make_one(self):
        kind = self.mix[(self.made * 7) % len(self.mix)]  # 7 is coprime with 100: an even spread
        n = self.made
        if kind == 'start':
            tid = next(self.new_ids)
            user = {'id': tid, 'first_name': f'New {tid}', 'username': f'new{tid}',
                    'language_code': 'ru' if n % 3 else 'en'}
            update_id = self.send_text(user, '/start')
        elif kind == 'promo':
            user = self._next('promo')
            code = self.args.promo if n % 2 else f'NOPE{n:06d}'
            update_id = self.send_text(user, f'/promo {code}')
        else:
            user = self._next(kind)
            chat = self._private_chat(_as_user(user))
            message = self._new_message(chat, self.bot_user, text='·', reply_markup=PLACEHOLDER_MARKUP)
            data = 'sub' if kind == 'sub' else MENU_DATA[n % len(MENU_DATA)]
            update_id = self.press(user, message, data, strict=False)
            self.by_query[self._last_query_id] = update_id
        self.track[update_id] = {'kind': kind, 'chat': user['id'], 'made': time.monotonic(), 'delivered': None,
                                 'done': None, 'calls': 0, 'api': 0.0,
                                 'errors': 0}
        self.by_chat[user['id']] = update_id
        self.made += 1

    def press(self, user, message, callback_data, strict=True):
        update_id = super().press(user, message, callback_data, strict=strict)
        self._last_query_id = next(reversed(self._queries))  # press() just stored it; we hold the lock
        return update_id

    def _make_synthetic(self):
        if self.args.rate or not self.mix:
            return
        outstanding = self.made - self.done
        while (not self.args.total or self.made < self.args.total) and outstanding + 1 <= self.args.window \
                and len(self._updates) < self.args.batch:
            self._make_one()
            outstanding += 1

    def _paced(self):
        """Queue `batch` updates every batch/rate seconds, on schedule, whatever the bot does."""
        interval = self.args.batch / self.args.rate
        next_at = time.monotonic() + 0.5
        while not self._closing and (not self.args.total or self.made < self.args.total):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._cond:
                if self.polling_started:
                    for _ in range(min(self.args.batch, (self.args.total or 10 ** 9) - self.made)):
                        self._make_one()
            next_at += interval

    @property
    def polling_started(self):
        return self._poll_generation > 0

    # -- timing --------------------------------------------------------------

    def _long_poll(self, params, generation):
        batch = super()._long_poll(params, generation)
        self.local.batch = [update['update_id'] for update in batch]
        return batch

    def _serve(self, handler):
        path = urlsplit(handler.path).path
        if path.startswith('/_bench/'):
            self._bench(handler, path)
            return
        self.local.batch = None
        self.local.counted = None
        self.local.arrival = time.monotonic()
        super()._serve(handler)
        written = time.monotonic()
        batch, counted = self.local.batch, self.local.counted
        if counted is not None:
            with self._cond:
                counted['api'] += written - self.local.arrival
        if batch:
            with self._cond:
                for update_id in batch:
                    record = self.track.get(update_id)
                    if record is not None and record['delivered'] is None:
                        record['delivered'] = written

    def _throttle(self, method):
        if self.args.flood_every and method == 'sendMessage':
            self.flood_count += 1
            if self.flood_count % self.args.flood_every == 0:
                raise self._too_many(self.args.flood_retry_after)
        super()._throttle(method)

    def _log(self, method, params, files, status, result, description):
        arrival = self.local.arrival
        if method == 'sendMessage' and str(params.get('chat_id', '')).lstrip('-').isdigit() \
                and USER_BASE <= int(params['chat_id']) < NEW_BASE:
            self.sends.append((arrival, int(params['chat_id']), status))
        if method == 'answerCallbackQuery':
            update_id = self.by_query.get(str(params.get('callback_query_id')))
        else:
            chat = str(params.get('chat_id', ''))
            update_id = self.by_chat.get(int(chat)) if chat.lstrip('-').isdigit() else None
        record = self.track.get(update_id)
        if record is None or record['done'] is not None:
            return
        if status != 200:
            record['errors'] += 1
        terminal = method == 'answerCallbackQuery' if record['kind'] in ('menu', 'sub') else method == 'sendMessage'
        if terminal:
            record['done'] = arrival
            self.done += 1
            self.by_chat.pop(record['chat'], None)
            self._cond.notify_all()
        else:
            record['calls'] += 1
            self.local.counted = record  # _serve adds the time this call spent in the API

    # -- control -------------------------------------------------------------

    def _bench(self, handler, path):
        body = handler.rfile.read(int(handler.headers.get('Content-Length') or 0))
        with self._cond:
            if path == '/_bench/stats':
                payload = {'polling': self.polling_started, 'made': self.made, 'done': self.done,
                           'pending': len(self._updates), 'calls': dict(self.counts), 'sends': len(self.sends),
                           'now': time.monotonic()}
            elif path == '/_bench/results':
                payload = {'latency': self.latency, 'updates': list(self.track.values()), 'sends': self.sends,
                           'calls': dict(self.counts), 'now': time.monotonic()}
            elif path == '/_bench/send':
                request = json.loads(body)
                payload = {'update_id': self.send_text(request['user'], request['text'])}
            else:
                payload = {'error': 'no such bench route'}
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header('Content-Type', 'application/json')
        handler.send_header('Content-Length', str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, default=0)
    parser.add_argument('--token', default='123456:bench-placeholder-token', help='the bot token to accept')
    parser.add_argument('--latency', type=float, default=0.0, help='seconds added to every Bot API call')
    parser.add_argument('--mix', default='', help='kind:weight,... of start, menu, sub, promo')
    parser.add_argument('--total', type=int, default=0, help='updates to make (0: no end)')
    parser.add_argument('--batch', type=int, default=100, help='most updates per getUpdates reply')
    parser.add_argument('--window', type=int, default=200, help='most updates made but not yet answered')
    parser.add_argument('--rate', type=float, default=0.0, help='make updates at this rate instead (paced)')
    parser.add_argument('--users', type=int, default=0, help='seeded users in the database')
    parser.add_argument('--offset', type=int, default=0, help='where in the user pools to start')
    parser.add_argument('--promo', default='BENCHCODE', help='a valid promo code')
    parser.add_argument('--add-users', type=int, default=0, help='open chats with the first N seeded users')
    parser.add_argument('--max-sends', type=int, default=0, help="answer 429 past N sends a second (Telegram's)")
    parser.add_argument('--flood-every', type=int, default=0, help='answer every Nth sendMessage with 429')
    parser.add_argument('--flood-retry-after', type=int, default=1)
    parser.add_argument('--tls', default='', metavar='DIR',
                        help='serve HTTPS with a throwaway CA written to DIR/ca.pem (trust it with SSL_CERT_FILE)')
    args = parser.parse_args(argv)
    fake = BenchTelegram(args)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(fake.url, flush=True)
    stop.wait()
    fake.close()


if __name__ == '__main__':
    sys.exit(main())
