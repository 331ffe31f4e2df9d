"""What a buyer and an admin read when they hit a per-buyer limit, through the real handlers."""
from conftest import settings_env  # noqa: F401 (fixtures come from conftest)
from models import Payment, PromoCode
from test_button_clock import Chat, telegram  # noqa: F401 (the fixture)
from test_e2e import person


def test_promo_lockout_is_said_plainly(settings, telegram, cryptopay):
    chat, mallory = Chat(telegram, settings), person(7201)
    for n in range(5):
        assert 'no such promo code' in chat.say(mallory, f'/promo WRONG{n:03d}')['text']
    answer = chat.say(mallory, '/promo WRONG999')['text']
    assert 'Too many wrong codes: 5 in 10 minutes' in answer and 'try again in 10 min' in answer


def test_fourth_pending_invoice_refused_with_a_clear_answer(settings, telegram, cryptopay):
    chat, mallory = Chat(telegram, settings), person(7202)
    menu = chat.say(mallory, '/start')
    chat.press(mallory, menu, 'buy')
    for days in (30, 90, 180):
        answer, _ = chat.press(mallory, menu, f'plan:{days}')
        assert answer['text'] is None
    answer, _ = chat.press(mallory, menu, 'plan:365')
    assert 'already have 3 unpaid invoices' in answer['text']
    answer, _ = chat.press(mallory, menu, 'plan:30')  # the same plan again: the same invoice, shown again
    assert answer['text'] is None and Payment.select().count() == 3


def test_newcode_refuses_short_codes(settings, telegram):
    chat, admin = Chat(telegram, settings), person(900, name='Admin')
    assert 'Usage: /newcode' in chat.say(admin, '/newcode 7 1 ABCDE')['text']
    assert 'ABCDEF' in chat.say(admin, '/newcode 7 1 abcdef')['text']
    assert [promo.code for promo in PromoCode.select()] == ['ABCDEF']
