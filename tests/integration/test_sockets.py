"""A program's listening sockets: a fresh port per generation for port 0; for a fixed port one
socket kept across generations, whose accept queue outlives the generation that is drained."""

from __future__ import annotations

import socket

import pytest

from flipvisor.config import SocketConfig
from flipvisor.errors import BindError
from flipvisor.sockets import ProgramListener, bound_port
from tests.fixtures.nginx import free_port


def test_port_0_gives_every_generation_a_fresh_port() -> None:
    listener = ProgramListener()
    first = listener.for_generation(SocketConfig())
    second = listener.for_generation(SocketConfig())
    try:
        assert bound_port(first) != bound_port(second)
    finally:
        first.close()
        second.close()
        listener.close()


def test_a_fixed_port_keeps_its_queue_when_the_old_generation_closes_its_socket() -> None:
    config = SocketConfig(port=free_port())
    listener = ProgramListener()
    old = listener.for_generation(config)
    new = listener.for_generation(config)
    try:
        # Clients connect while the old generation still serves; then the old one closes its
        # socket, as a drained generation does. Every connection is still there for the new
        # one. (Sockets of their own, bound with SO_REUSEPORT, had the kernel queue about half of
        # them on the old one, and reset them when it closed.)
        clients = [
            socket.create_connection(("127.0.0.1", config.port), timeout=5) for _ in range(8)
        ]
        old.close()
        for client in clients:
            client.sendall(b"ping")
        new.settimeout(5)
        for _ in clients:
            accepted, _address = new.accept()
            with accepted:
                assert accepted.recv(4) == b"ping"
        for client in clients:
            client.close()
    finally:
        new.close()
        listener.close()


def test_a_stopped_program_lets_go_of_its_fixed_port() -> None:
    config = SocketConfig(port=free_port())
    listener = ProgramListener()
    listener.for_generation(config).close()  # the generation is gone
    listener.close()
    with socket.create_server(("127.0.0.1", config.port)):  # nobody else holds it: binds
        pass


@pytest.mark.parametrize("change", ["another port", "port 0"])
def test_a_changed_socket_config_lets_go_of_the_kept_socket(change: str) -> None:
    config = SocketConfig(port=free_port())
    listener = ProgramListener()
    listener.for_generation(config).close()
    following = SocketConfig(port=free_port() if change == "another port" else 0)
    fresh = listener.for_generation(following)
    try:
        with socket.create_server(("127.0.0.1", config.port)):  # the old port is free again
            pass
    finally:
        fresh.close()
        listener.close()


def test_a_changed_backlog_keeps_the_socket_and_its_queue() -> None:
    port = free_port()
    listener = ProgramListener()
    old = listener.for_generation(SocketConfig(port=port, backlog=16))
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    new = listener.for_generation(SocketConfig(port=port, backlog=64))
    try:
        old.close()
        new.settimeout(5)
        accepted, _address = new.accept()  # queued before the change, still there after it
        accepted.close()
    finally:
        client.close()
        new.close()
        listener.close()


def test_another_program_cannot_listen_on_a_fixed_port_in_use() -> None:
    """No SO_REUSEPORT: a second listener is refused, not handed half of the clients."""
    config = SocketConfig(port=free_port())
    first, second = ProgramListener(), ProgramListener()
    held = first.for_generation(config)
    try:
        with pytest.raises(BindError, match="in use"):
            second.for_generation(config)
    finally:
        held.close()
        first.close()
        second.close()


def test_a_host_change_that_cannot_bind_keeps_the_old_socket_for_the_next_flip() -> None:
    """A flip to a wildcard host on the same port fails while the serving generation holds the
    port; the flip back to the old address must still work (it reuses the kept socket)."""
    port = free_port()
    listener = ProgramListener()
    serving = listener.for_generation(SocketConfig(port=port))
    try:
        with pytest.raises(BindError):
            listener.for_generation(SocketConfig(host="0.0.0.0", port=port))
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        following = listener.for_generation(SocketConfig(port=port))
        serving.close()
        following.settimeout(5)
        accepted, _address = following.accept()  # the same queue: the kept socket
        accepted.close()
        client.close()
        following.close()
    finally:
        serving.close()
        listener.close()
