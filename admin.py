"""The admins' chat commands (/stats, /panels, /refund, /newcode, /user, /give, /broadcast, /sync).

Each command reads its argument, calls Shop, Stars, the Messenger or the jobs, and answers through a reply
function, so tests can run it without Telegram. Who may run them (ADMIN_IDS) is decided by bot.py.
"""
import re
import threading

from peewee import IntegrityError

import jobs
import models
import stars
from markup import MAX_MESSAGE, Html, clip_plain, html
from texts import show_date, t

# (command, its line in the admins' command menu), in menu order
MENU = (('stats', 'Shop figures'),
        ('newcode', '[days] [uses] [CODE] — new promo code'),
        ('user', '<id|@username> — look a customer up'),
        ('give', '<id|@username> <days> — extend by hand'),
        ('broadcast', '<text> — message every user'),
        ('sync', 'Compare the panels with the ledger'),
        ('panels', 'Each panel: answers, clients, pending pushes'),
        ('refund', '<telegram_payment_charge_id> — refund a Stars payment'))
ADMIN_COMMANDS = tuple(command for command, _ in MENU)


def pending_panels(user):
    """Say (plain text) which panels still wait for the user's days (' · panel update pending: Germany'), or ''."""
    names = [name for (name,) in models.PanelClient.select(models.PanelClient.panel)
             .where(models.PanelClient.user == user.id, models.PanelClient.dirty == True).tuples()]  # noqa: E712
    return f' · panel update pending: {", ".join(sorted(names))}' if names else ''


class AdminCommands:
    """Answer the admins' commands.

    reply(chat_id, text) sends Telegram HTML (from t()) and returns the sent message (its .chat.id and
    .message_id: /broadcast edits it with its progress). stars is the shop's stars.Stars, messenger the
    Messenger that /broadcast sends through.
    """

    def __init__(self, shop, settings, stars, messenger, reply):
        self.shop = shop
        self.settings = settings
        self.stars = stars
        self.messenger = messenger
        self.reply = reply

    def run(self, command, chat_id, message_id, user, argument):
        """Answer one of ADMIN_COMMANDS sent by the admin user (our User) as message message_id in chat_id."""
        getattr(self, command)(chat_id, message_id, user, argument)

    def date(self, moment):
        return show_date(moment, self.settings.timezone)

    def stats(self, chat_id, message_id, user, _):
        stats = self.shop.stats()
        revenue = self.stars.revenue()
        lines = ', '.join(f'{count} · {total} {"⭐" if currency == stars.XTR else currency}'
                          for currency, (count, total) in sorted(revenue.items())) or 'none'
        text = t(user.language, 'adm_stats', **stats)
        if len(self.shop.panels) > 1:
            text = Html(text + t(user.language, 'adm_stats_panels', panels=', '.join(
                f'{name} {count}' for name, count in stats['panel_clients'].items())))
        self.reply(chat_id, Html(text + '\n' + t(user.language, 'adm_revenue', lines=lines)))

    def panels(self, chat_id, message_id, user, _):
        blocks = []
        for row in self.shop.panel_report(probe=True):
            if not row['enabled']:
                state = 'disabled in PANELS_FILE (never touched)'
            elif row['reachable']:
                state = 'answers, ' + ('v3.1+ clients API' if row['generation'] == 'v3' else 'inbounds API (≤ v3.0)')
            else:
                state = f'does not answer: {row["error"]}'
            last_error = f'\nLast push error: {row["last_error"]}' if row['last_error'] else ''
            blocks.append(t(user.language, 'adm_panel', name=row['name'], state=state, clients=row['clients'],
                            pending=row['pending'], last_error=last_error))
        self.reply(chat_id, Html('\n\n'.join(blocks)))

    def refund(self, chat_id, message_id, user, argument):
        lang = user.language
        if not argument or len(argument.split()) != 1:
            self.reply(chat_id, t(lang, 'adm_refund_usage'))
            return
        result = self.stars.refund(argument)
        if result.outcome == 'refunded':
            customer = models.User.get_by_id(result.payment.user_id)
            self.reply(chat_id, t(lang, 'adm_refunded', amount=int(result.payment.amount), id=customer.telegram_id,
                                  days=result.payment.plan_days, expiry=self.date(customer.expires_at)))
        elif result.outcome == 'refused':
            self.reply(chat_id, t(lang, 'adm_refund_refused', reason=result.detail))
        else:
            self.reply(chat_id, t(lang, f'adm_refund_{result.outcome}'))

    def newcode(self, chat_id, message_id, user, argument):
        lang = user.language
        parts = argument.split()
        try:
            days = int(parts[0]) if len(parts) > 0 else 7
            uses = int(parts[1]) if len(parts) > 1 else 1
        except ValueError:  # int() takes only what a person would type as a number; '²' fails here
            days = uses = 0
        code = parts[2] if len(parts) > 2 else None
        if not (1 <= days <= 3650 and 1 <= uses <= 1_000_000) or len(parts) > 3 or \
                (code is not None and not (6 <= len(code) <= 32 and code.isascii() and code.isalnum())):
            self.reply(chat_id, t(lang, 'adm_newcode_usage'))
            return
        try:
            promo = self.shop.create_promo(user.telegram_id, days, uses, code)
        except ValueError:  # create_promo's own check, the same as above
            self.reply(chat_id, t(lang, 'adm_newcode_usage'))
            return
        except IntegrityError:
            self.reply(chat_id, t(lang, 'adm_code_exists', code=code.upper()))
            return
        self.reply(chat_id, t(lang, 'adm_code_created', code=promo.code, days=days, uses=uses))

    def user(self, chat_id, message_id, user, argument):
        lang = user.language
        customer = self.shop.find_user(argument)
        if customer is None:
            self.reply(chat_id, t(lang, 'adm_user_unknown' if argument else 'adm_user_usage'))
            return
        payments = list(customer.payments.order_by(models.Payment.created_at.desc()).limit(5))
        grants = list(customer.grants.order_by(models.Grant.id.desc()).limit(5))
        flags = ''.join(flag for flag, on in ((' (active)', customer.is_active()),
                                              (' · blocked the bot', customer.blocked)) if on) + pending_panels(customer)
        self.reply(chat_id, t(
            lang, 'adm_user', name=customer.first_name, username=customer.username or '-', id=customer.telegram_id,
            language=customer.language, expiry=self.date(customer.expires_at) if customer.expires_at else 'none',
            flags=flags, registered=self.date(customer.created_at), invited=customer.referrer_id is not None,
            payments=', '.join(f'{p.provider} {p.provider_id or "#" + str(p.id)} '
                               f'{int(p.amount) if p.currency == stars.XTR else p.amount} {p.currency} {p.status}'
                               + (f' (subscription until {self.date(p.subscription_until)}, renewal '
                                  f'{"canceled" if p.renewal_canceled else "on"})' if p.subscription_until else '')
                               for p in payments) or 'none',
            grants=', '.join(f'+{g.days}d {g.reason}' for g in grants) or 'none'))

    def give(self, chat_id, message_id, user, argument):
        lang = user.language
        parts = argument.split()
        customer = self.shop.find_user(parts[0]) if len(parts) == 2 else None
        days = int(parts[1]) if len(parts) == 2 and re.fullmatch('[0-9]{1,4}', parts[1]) else 0
        if customer is None or not 1 <= days <= 3650:
            self.reply(chat_id, t(lang, 'adm_give_usage'))
            return
        try:  # the message identifies the grant, so a re-delivered update cannot credit twice
            expiry = self.shop.admin_give(user.telegram_id, customer, days, f'{chat_id}:{message_id}')
        except IntegrityError:
            self.reply(chat_id, t(lang, 'adm_give_again'))
            return
        provisioned = self.shop.provision(customer.id)
        self.reply(chat_id, t(lang, 'adm_given' if provisioned else 'adm_given_panel_down', days=days,
                              id=customer.telegram_id, expiry=self.date(expiry)))

    def broadcast(self, chat_id, message_id, user, argument):
        lang = user.language
        if not argument:
            self.reply(chat_id, t(lang, 'adm_broadcast_usage'))
            return
        status = self.reply(chat_id, t(lang, 'adm_broadcast_started'))
        # cut the plain text to Telegram's visible limit first, then escape it: '&' is one character to Telegram
        text = html(clip_plain(argument, MAX_MESSAGE))

        def say(report, key):
            counts = dict(delivered=report.delivered, blocked=report.blocked, failed=report.failed)
            if key == 'adm_broadcast_done' and report.error:
                return t(lang, 'adm_broadcast_stopped', error=report.error, **counts)
            return t(lang, key, **counts)

        threading.Thread(target=self.messenger.run_broadcast, args=(text, status.chat.id, status.message_id),
                         kwargs={'progress_text': lambda report: say(report, 'adm_broadcast_progress'),
                                 'final_text': lambda report: say(report, 'adm_broadcast_done')},
                         name='broadcast', daemon=True).start()

    def sync(self, chat_id, message_id, user, _):
        self.reply(chat_id, '\n\n'.join(report.text(user.language) for report in jobs.reconcile_all(self.shop)))
