from __future__ import annotations

import socket

from trio_ws.hosting.sockets import set_stall_timeout_on_listeners


def test_listeners_get_tcp_user_timeout_and_accepted_sockets_inherit_it() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    other = socket.socket()  # not listening: left alone
    try:
        assert set_stall_timeout_on_listeners(2.5) >= 1
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert other.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    finally:
        listener.close()
        other.close()


def test_zero_means_leave_the_kernel_default() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert set_stall_timeout_on_listeners(0) == 0
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
