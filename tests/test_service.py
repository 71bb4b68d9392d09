"""Service plumbing that no endpoint shows directly."""

from __future__ import annotations

import socket

import pytest

from batmon.service import ServiceError, bind_socket


def test_http_socket_is_tcp_so_responses_are_not_held_by_nagle() -> None:
    # asyncio turns on TCP_NODELAY for accepted sockets only when proto is TCP; without
    # it every keep-alive response waited ~40 ms for the client's delayed ACK.
    sock = bind_socket("127.0.0.1", 0, "HTTP")
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname()[:2])
        sock.setblocking(True)
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_busy_port_is_a_service_error_naming_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port, "HTTP")
