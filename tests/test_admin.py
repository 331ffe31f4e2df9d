"""The admins' commands as plain calls (admin.AdminCommands): a real shop, database and panel, no Telegram.

Through Telegram they are covered by test_e2e.test_admin_commands and test_fuzz (who may run them, any argument).
"""
from types import SimpleNamespace

import pytest

import admin
import models
import stars
from texts import t

ADMIN_ID = 900  # ADMIN_IDS in conftest.settings_env
CHAT = 900


@pytest.fixture
def commands(shop):
    """(run(command, argument, message_id=1) -> the reply texts, the admin's User)."""
    sent = []

    def reply(chat_id, text):
        sent.append((chat_id, text))
        return SimpleNamespace(chat=SimpleNamespace(id=chat_id), message_id=len(sent))

    handlers = admin.AdminCommands(shop, shop.settings, stars.Stars(shop, bot=None), messenger=None, reply=reply)
    me, _ = shop.register(ADMIN_ID, 'boss', 'Boss', 'en')

    def run(command, argument='', message_id=1):
        del sent[:]
        handlers.run(command, CHAT, message_id, me, argument)
        assert {chat for chat, _ in sent} == {CHAT}
        return [text for _, text in sent]

    return run


def test_every_admin_command_has_its_menu_line_and_its_handler():
    assert admin.ADMIN_COMMANDS == ('stats', 'newcode', 'user', 'give', 'broadcast', 'sync', 'panels', 'refund')
    assert all(callable(getattr(admin.AdminCommands, name)) for name in admin.ADMIN_COMMANDS)
    assert all(line for _, line in admin.MENU)


def test_give_credits_once_per_message_and_user_shows_it(commands, shop):
    shop.register(1001, 'alice', 'Alice <&>', 'en')
    [given] = commands('give', '@Alice 5', message_id=7)
    assert given.startswith('Granted 5 days to <code>1001</code>: until ')
    assert commands('give', '@alice 5', message_id=7) == [t('en', 'adm_give_again')]  # the same message again
    commands('give', '1001 2', message_id=8)
    assert sorted(g.days for g in models.Grant.select()) == [2, 5]
    [shown] = commands('user', '1001')
    assert '<b>Alice &lt;&amp;&gt;</b> @alice' in shown and 'Grants: +2d admin, +5d admin' in shown
    assert ' (active)' in shown


@pytest.mark.parametrize('argument', ['', '1001', '1001 0', '1001 3651', '1001 -5', '1001 ５', '@nobody 5',
                                      '1001 5 x'])
def test_give_with_a_bad_argument_answers_usage_and_moves_nothing(commands, shop, argument):
    shop.register(1001, 'alice', 'Alice', 'en')
    assert commands('give', argument) == [t('en', 'adm_give_usage')]
    assert models.Grant.select().count() == 0


def test_newcode_makes_codes_and_refuses_bad_ones(commands):
    assert commands('newcode', '15 3 summer25') == [t('en', 'adm_code_created', code='SUMMER25', days=15, uses=3)]
    assert commands('newcode', '1 1 Summer25') == [t('en', 'adm_code_exists', code='SUMMER25')]
    for bad in ('0 1', '5 1 ab', '3651', '1 0', '1 1 CODE-123', '1 1 ABCDEF extra', '² 1'):
        assert commands('newcode', bad) == [t('en', 'adm_newcode_usage')], bad
    [made] = commands('newcode')
    assert 'Promo code <code>' in made and ': 7 days, 1 uses.' in made
    assert models.PromoCode.select().count() == 2


def test_user_refund_and_broadcast_usage(commands):
    assert commands('user') == [t('en', 'adm_user_usage')]
    assert commands('user', '@nobody') == [t('en', 'adm_user_unknown')]
    assert commands('refund') == [t('en', 'adm_refund_usage')]
    assert commands('refund', 'a b') == [t('en', 'adm_refund_usage')]
    assert commands('refund', 'stxNOSUCHCHARGE') == [t('en', 'adm_refund_unknown')]
    assert commands('broadcast') == [t('en', 'adm_broadcast_usage')]


def test_stats_panels_and_sync_answer_in_one_message(commands, shop):
    [stats] = commands('stats')
    assert '<b>Users</b>: 1' in stats and 'none' in stats  # no revenue yet
    [panels] = commands('panels')
    assert 'answers' in panels
    [sync] = commands('sync')
    assert sync
