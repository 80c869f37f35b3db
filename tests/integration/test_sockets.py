"""A program's listening sockets: a fresh port per generation for port 0; for a fixed port one
socket kept across generations, whose accept queue outlives the generation that is drained."""

from __future__ import annotations

import socket
import sys

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
    listener.promoted(config)
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
    listener.promoted(config)
    following = SocketConfig(port=free_port() if change == "another port" else 0)
    fresh = listener.for_generation(following)
    listener.promoted(following)
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
    listener.promoted(SocketConfig(port=port, backlog=16))
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    new = listener.for_generation(SocketConfig(port=port, backlog=64))
    listener.promoted(SocketConfig(port=port, backlog=64))
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
    listener.promoted(SocketConfig(port=port))
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


def backlog_of(sock: socket.socket) -> int:
    """The backlog a listening socket was given: ``tcpi_sacked`` of its ``TCP_INFO`` (Linux
    reports the listen backlog there for a listening socket)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[28:32], sys.byteorder)


@pytest.mark.parametrize("change", ["another port", "port 0"])
def test_a_flip_to_another_address_that_fails_leaves_the_kept_socket_as_it_was(
    change: str,
) -> None:
    """The flip's generation is discarded before it is promoted: the serving generation's
    socket stays the kept one (the flip back to its address shares its queue, where binding it
    afresh would fail on the serving generation's duplicate), and the other port is let go."""
    serving_config = SocketConfig(port=free_port())
    listener = ProgramListener()
    serving = listener.for_generation(serving_config)
    listener.promoted(serving_config)
    try:
        failing_config = SocketConfig(port=free_port() if change == "another port" else 0)
        failing = listener.for_generation(failing_config)
        failing_port = bound_port(failing)
        failing.close()  # the failed generation is gone
        listener.let_go_pending()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", failing_port), timeout=5).close()
        client = socket.create_connection(("127.0.0.1", serving_config.port), timeout=5)
        following = listener.for_generation(serving_config)
        with following:
            following.settimeout(5)
            accepted, _address = following.accept()  # the serving generation's queue
            accepted.close()
        client.close()
    finally:
        serving.close()
        listener.close()


def test_a_backlog_change_takes_effect_only_once_its_generation_is_promoted() -> None:
    port = free_port()
    listener = ProgramListener()
    serving = listener.for_generation(SocketConfig(port=port, backlog=16))
    listener.promoted(SocketConfig(port=port, backlog=16))
    try:
        listener.for_generation(SocketConfig(port=port, backlog=64)).close()
        listener.let_go_pending()  # that flip failed
        assert backlog_of(serving) == 16
        listener.for_generation(SocketConfig(port=port, backlog=64)).close()
        listener.promoted(SocketConfig(port=port, backlog=64))
        assert backlog_of(serving) == 64  # one socket: the serving generation's copy too
    finally:
        serving.close()
        listener.close()


def test_an_adopted_fixed_port_shares_its_queue_and_is_kept_once_promoted() -> None:
    """A rename: ``api`` takes ``web``'s socket (one queue, nothing bound afresh: that would
    fail while web holds it); web then lets go of its own, and the port stays api's."""
    config = SocketConfig(port=free_port())
    web, api = ProgramListener(), ProgramListener()
    web_gen = web.for_generation(config)
    web.promoted(config)
    try:
        assert web.kept_address == ("127.0.0.1", config.port)
        assert web.duplicate_kept(SocketConfig(port=free_port())) is None  # another address
        shared = web.duplicate_kept(config)
        assert shared is not None
        api.adopt_pending(shared, config)
        assert api.pending_on(config) and not api.holds(config)
        api_gen = api.for_generation(config)
        client = socket.create_connection(("127.0.0.1", config.port), timeout=5)
        api.promoted(config)
        web_gen.close()  # web drained
        web.close()
        with api_gen:
            api_gen.settimeout(5)
            accepted, _address = api_gen.accept()  # queued before web let go
            accepted.close()
        client.close()
        assert api.holds(config)
        socket.create_connection(("127.0.0.1", config.port), timeout=5).close()  # still listens
    finally:
        web_gen.close()
        web.close()
        api.close()


def test_an_adopted_fixed_port_takes_the_new_program_s_backlog_once_promoted() -> None:
    """A rename to a program with another ``socket.backlog``: the adopted socket kept the old
    program's for as long as the new one served (QA finding)."""
    port = free_port()
    web, api = ProgramListener(), ProgramListener()
    web.for_generation(SocketConfig(port=port, backlog=1024)).close()
    web.promoted(SocketConfig(port=port, backlog=1024))
    smaller = SocketConfig(port=port, backlog=64)
    try:
        shared = web.duplicate_kept(smaller)
        assert shared is not None and backlog_of(shared) == 1024
        api.adopt_pending(shared, smaller)
        api.for_generation(smaller).close()
        api.promoted(smaller)
        web.close()
        assert backlog_of(shared) == 64
    finally:
        web.close()
        api.close()


def test_a_fixed_port_adopted_for_a_generation_that_fails_is_let_go() -> None:
    """``api``'s first generation fails: its copy of web's socket goes, so that once web is gone
    the port is refused, not left listening in the supervisor with nobody accepting."""
    config = SocketConfig(port=free_port())
    web, api = ProgramListener(), ProgramListener()
    web_gen = web.for_generation(config)
    web.promoted(config)
    shared = web.duplicate_kept(config)
    assert shared is not None
    api.adopt_pending(shared, config)
    api.for_generation(config).close()  # the failed generation is gone
    api.let_go_pending()
    assert not api.pending_on(config) and not api.holds(config)
    web_gen.close()
    web.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", config.port), timeout=5).close()
