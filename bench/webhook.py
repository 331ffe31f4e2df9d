"""Webhook mode figures: updates/s with 1-3 bot processes, Crypto Pay webhook → link latency, /healthz and /metrics CPU.

    .venv/bin/python bench/webhook.py                       # all three parts, PostgreSQL
    .venv/bin/python bench/webhook.py --processes 1,2 --seconds 20 --skip-latency --skip-cost

Updates/s: the fake Bot API (tests/fake_telegram.py, its own process) POSTs synthetic /start
messages from 1,000 users to a round-robin proxy (tests/rrproxy.py, its own process) in front of N
bot.py processes on one throwaway PostgreSQL; the rate is the bot's sendMessage replies per second
over a window that starts once every process is healthy. RSS is each bot's VmRSS at the end.

Latency: one bot.py; for each of --payments invoices, pay it in the fake Crypto Pay and time the
signed webhook POST to /cryptopay: its 200 comes only after the settlement is committed and the
link message was accepted by the Bot API, so the POST time bounds "webhook → link".

Cost: the bot's CPU seconds (/proc utime+stime) over --requests GET /healthz and GET /metrics,
per request (waitress's own work included).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests

from common import (CRYPTOPAY_TOKEN, PYTHON, ROOT, Postgres, Process, bind, bot_env, busy_seconds, children,
                    cpu_seconds, free_port, log, rss_mb, start_fakes)


def wait_healthy(ports, bots, timeout=60):
    deadline = time.monotonic() + timeout
    for port, bot in zip(ports, bots):
        while True:
            if bot.process.poll() is not None:
                raise RuntimeError(f'bot.py exited {bot.process.returncode}:\n{bot.output()[-3000:]}')
            try:
                if requests.get(f'http://127.0.0.1:{port}/healthz', timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f'bot on {port} not healthy:\n{bot.output()[-3000:]}')
            time.sleep(0.2)


def sends(telegram_url):
    return requests.get(telegram_url + '/_fake/stats', timeout=10).json()['calls'].get('sendMessage', 0)


def updates_per_second(pg, panel, cryptopay, processes, seconds, tmp):
    url = pg.fresh(f'webhook{processes}')
    telegram = Process([PYTHON, str(ROOT / 'tests' / 'fake_telegram.py'), '--port', '0', '--token', BOT_TOKEN_,
                        '--synthetic', '200', '--users', '1000', '--webhook-senders', '16'], first_line=True)
    ports = [free_port() for _ in range(processes)]
    proxy = Process([PYTHON, str(ROOT / 'tests' / 'rrproxy.py'), *map(str, ports)], first_line=True)
    bots = []
    try:
        for n, port in enumerate(ports):
            env = bot_env(url, panel, cryptopay, telegram.first, Path(tmp) / 'backups', HTTP_PORT=port,
                          WEBHOOK_URL=proxy.first, BOT_TOKEN=BOT_TOKEN_)
            bots.append(Process([PYTHON, str(ROOT / 'bot.py')], env=env, log_path=Path(tmp) / f'bot{processes}-{n}.log'))
        wait_healthy(ports, bots)
        time.sleep(3)  # warm-up: every process is taking updates
        postmaster = int((pg.dir / 'data' / 'postmaster.pid').read_text().split()[0])
        parts = {'bots': lambda: [bot.pid for bot in bots], 'postgres': lambda: [postmaster, *children(postmaster)],
                 'fake Bot API': lambda: [telegram.pid], 'proxy': lambda: [proxy.pid]}
        before, started = sends(telegram.first), time.monotonic()
        cpu_before = {name: cpu_seconds(pids()) for name, pids in parts.items()}
        busy_before = busy_seconds()
        time.sleep(seconds)
        after, elapsed = sends(telegram.first), time.monotonic() - started
        handled = max(after - before, 1)
        per_update = {name: (cpu_seconds(pids()) - cpu_before[name]) / handled * 1000 for name, pids in parts.items()}
        per_update['whole machine'] = (busy_seconds() - busy_before) / handled * 1000
        rss = [rss_mb(bot.pid) for bot in bots]
        return (after - before) / elapsed, rss, per_update
    finally:
        for bot in bots:
            bot.stop()
        proxy.process.terminate()
        telegram.stop()


def webhook_latency(pg, panel, cryptopay, payments, tmp):
    """Return POST /cryptopay → 200 times (ms) for paid invoices of registered buyers."""
    import config
    from conftest import make_shop, settings_env
    from fake_telegram import FakeTelegram
    url = pg.fresh('latency')
    with FakeTelegram(token=BOT_TOKEN_) as telegram:
        port = free_port()
        env = bot_env(url, panel, cryptopay, telegram.url, Path(tmp) / 'backups', HTTP_PORT=port,
                      BOT_TOKEN=BOT_TOKEN_, PAYMENT_POLL_SECONDS=3600)
        bot = Process([PYTHON, str(ROOT / 'bot.py')], env=env, log_path=Path(tmp) / 'latency.log')
        try:
            telegram.wait_polling(timeout=30)
            bind(url)
            settings = config.load({**settings_env(panel, cryptopay, url), 'CRYPTOPAY_TOKEN': CRYPTOPAY_TOKEN})
            shop = make_shop(settings)
            times = []
            for n in range(payments):
                buyer = {'id': 900_000_000 + n, 'first_name': f'Buyer {n}', 'username': f'b{n}', 'language_code': 'ru'}
                telegram.add_user(buyer)
                user, _ = shop.register(buyer['id'], buyer['username'], buyer['first_name'], 'ru')
                payment = shop.create_invoice(user, 30)
                cryptopay.pay(payment.invoice_id)
                started = time.perf_counter()
                status = cryptopay.post_webhook(f'http://127.0.0.1:{port}/cryptopay', payment.invoice_id)
                times.append((time.perf_counter() - started) * 1000)
                assert status == 200, status
            linked = sum(1 for n in range(payments)
                         if any('vpn.example.test' in (m.get('text') or '') for m in telegram.messages_to(900_000_000 + n)))
            return times, linked
        finally:
            bot.stop()


def endpoint_cost(pg, panel, cryptopay, requests_count, tmp, spaced=20):
    """Return {path: (CPU ms per request back to back, CPU ms per request spaced past metrics.CACHE_SECONDS)}.

    The bot first handles a few messages and button presses, so /metrics carries the series a running
    shop has. Back to back, the database and /proc are read once per metrics.CACHE_SECONDS; spaced
    (`spaced` requests, each after the cache ran out, as Prometheus scrapes), every request reads them:
    the bot's idle CPU over the same time is measured first and taken off.
    """
    import metrics
    from fake_telegram import FakeTelegram
    url = pg.fresh('cost')
    with FakeTelegram(token=BOT_TOKEN_) as telegram:
        port = free_port()
        env = bot_env(url, panel, cryptopay, telegram.url, Path(tmp) / 'backups', HTTP_PORT=port, BOT_TOKEN=BOT_TOKEN_)
        bot = Process([PYTHON, str(ROOT / 'bot.py')], env=env, log_path=Path(tmp) / 'cost.log')
        try:
            telegram.wait_polling(timeout=30)
            for n in range(5):  # messages and callback queries handled: their series exist
                user = {'id': 700_000_000 + n, 'first_name': f'Reader {n}', 'language_code': 'en'}
                telegram.add_user(user)
                telegram.send_text(user, '/start')
                menu = telegram.wait_for_message(user['id'], timeout=30)
                telegram.press(user, menu, next(data for _, data in telegram.buttons(menu)
                                                if data and not data.startswith('http')), strict=False)
            time.sleep(2)
            session = requests.Session()
            out = {}
            pause = metrics.CACHE_SECONDS + 0.1
            started = time.monotonic()
            before = cpu_seconds([bot.pid])
            time.sleep(spaced * pause)
            idle = cpu_seconds([bot.pid]) - before
            log(f'bench: bot idle CPU {idle * 1000:.1f} ms over {time.monotonic() - started:.0f} s')
            for path in ('/healthz', '/metrics'):
                for _ in range(50):
                    session.get(f'http://127.0.0.1:{port}{path}', timeout=5)
                before = cpu_seconds([bot.pid])
                for _ in range(requests_count):
                    session.get(f'http://127.0.0.1:{port}{path}', timeout=5)
                back_to_back = (cpu_seconds([bot.pid]) - before) / requests_count * 1000
                before = cpu_seconds([bot.pid])
                for _ in range(spaced):
                    time.sleep(pause)
                    session.get(f'http://127.0.0.1:{port}{path}', timeout=5)
                out[path] = back_to_back, (cpu_seconds([bot.pid]) - before - idle) / spaced * 1000
            return out
        finally:
            bot.stop()


BOT_TOKEN_ = '123456:TEST-token-not-real'  # the token tests/conftest.py's settings use


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--processes', default='1,2,3')
    parser.add_argument('--seconds', type=float, default=30)
    parser.add_argument('--payments', type=int, default=200)
    parser.add_argument('--requests', type=int, default=2000)
    parser.add_argument('--skip-rate', action='store_true')
    parser.add_argument('--skip-latency', action='store_true')
    parser.add_argument('--skip-cost', action='store_true')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='spn-bench-webhook.') as tmp, Postgres() as pg:
        panel, cryptopay = start_fakes()
        try:
            if not args.skip_rate:
                base = None
                for n in map(int, args.processes.split(',')):
                    rate, rss, per_update = updates_per_second(pg, panel, cryptopay, n, args.seconds, tmp)
                    base = base or rate
                    print(f'webhook mode, {n} process(es): {rate:.0f} updates/s ({rate / base:.2f}x one), '
                          f'{per_update["bots"]:.2f} ms bot CPU per update, RSS {", ".join(f"{r:.0f}" for r in rss)} MB; '
                          f'CPU ms per update: {", ".join(f"{k} {v:.2f}" for k, v in per_update.items())} '
                          f'(2 cores = {2000 / rate:.2f} ms per update at this rate)', flush=True)
            if not args.skip_latency:
                times, linked = webhook_latency(pg, panel, cryptopay, args.payments, tmp)
                cuts = statistics.quantiles(times, n=100)
                print(f'Crypto Pay webhook POST → 200 (link already sent): p50 {cuts[49]:.0f} ms, '
                      f'p99 {cuts[98]:.0f} ms, max {max(times):.0f} ms over {len(times)} payments; '
                      f'{linked} buyers got the link', flush=True)
            if not args.skip_cost:
                for path, (ms, spaced) in endpoint_cost(pg, panel, cryptopay, args.requests, tmp).items():
                    print(f'GET {path}: {ms:.3f} ms of bot CPU per request back to back ({args.requests} requests), '
                          f'{spaced:.2f} ms each when spaced past the cache', flush=True)
        finally:
            panel.stop()
            cryptopay.stop()
        log('bench: done')


if __name__ == '__main__':
    main()
