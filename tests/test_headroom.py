"""The loopback fakes keep up with bursts while the machine is loaded (issue 9 item 11)."""
import socket

import pytest

from fake_cryptopay import FakeCryptoPay
from fake_telegram import FakeTelegram
from fake_xui import FakePanel

BURST = 60  # the fault tests open 50 connections at once


@pytest.mark.parametrize('make', [lambda: FakeCryptoPay(), lambda: FakeTelegram(),
                                  lambda: FakePanel(generation='v3')], ids=['cryptopay', 'telegram', 'xui'])
def test_a_burst_of_connections_is_queued_while_the_fake_is_not_accepting(make):
    """A loaded machine may not run the accept loop for a while: the kernel must queue the burst meanwhile.

    With socketserver's default backlog of 5, the 7th connect got no answer (its SYN dropped) and the
    client waited for a retransmission: the ConnectTimeout of test_fifty_concurrent_checks_settle_once.
    """
    with make() as fake:
        server = fake._server
        server.shutdown()  # the socket keeps listening, nobody accepts: the accept loop is starved
        connected = burst(server.server_address)
    assert connected == BURST


def burst(address):
    """Connect BURST sockets at once; return how many connected within half a second each."""
    sockets, connected = [], 0
    try:
        for _ in range(BURST):
            sock = socket.socket()
            sock.settimeout(0.5)
            sockets.append(sock)
            try:
                sock.connect(address)
                connected += 1
            except OSError:
                pass
    finally:
        for sock in sockets:
            sock.close()
    return connected
