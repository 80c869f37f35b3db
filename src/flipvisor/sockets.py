"""Binding a generation's listening socket: port 0 gives every generation a fresh port; a fixed
port's socket is kept across a program's generations (``ProgramListener``)."""

from __future__ import annotations

import errno
import ipaddress
import socket

from .config import SocketConfig
from .errors import BindError
from .usable import in_use, listen_error, port_holders


def bind_listener(config: SocketConfig) -> socket.socket:
    """A bound, listening TCP socket for one generation; the caller owns and closes it.

    ``TCP_NODELAY`` is set on the listener so accepted sockets inherit it: without it keep-alive
    clients stall ~40 ms a request (Nagle against delayed ACKs). No ``SO_REUSEPORT``: a fixed
    port is shared by a program's generations through one socket (``ProgramListener``), and
    anything else already listening there is an error, never a silent split of the clients.

    Raises:
        BindError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ipaddress.ip_address(config.host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((config.host, config.port))
        sock.listen(config.backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # say by whom: the operator's next question
            holders = port_holders(config.port)
            raise BindError(in_use(config.host, config.port, holders), in_use=True) from exc
        raise BindError(listen_error(config.host, config.port, exc)) from exc
    return sock


def bound_port(sock: socket.socket) -> int:
    """The port the OS gave ``sock``."""
    return int(sock.getsockname()[1])


class ProgramListener:
    """Hands each generation of one program its listening socket.

    Port 0: a fresh socket per generation (a new port each time, which the proxy follows). A fixed
    port: one socket kept across generations, each getting a duplicate. Its accept queue then
    outlives the generation being drained, and the connections waiting in it are accepted by the
    next generation's workers rather than reset when the old generation's socket closes.

    The kept socket is the serving generation's: a flip to another address binds a socket that
    is only *pending* until its generation is promoted (``promoted``), and let go if the flip
    fails (``let_go_pending``). Until then the old address stays kept, so that a failed flip
    changes nothing the serving generation depends on: a flip back to its address shares its
    socket again (binding it afresh would fail while that generation holds it), and the address
    of the failed flip is free again (left listening, it would take connections nobody accepts).

    A fixed port's socket may also come from another program of ours that leaves it (a reload
    renamed the program: ``adopt_pending``), pending as well until this program's generation
    serves from it.
    """

    def __init__(self) -> None:
        self._kept: socket.socket | None = None
        self._kept_at: tuple[str, int] | None = None  # (host, port)
        # A fixed port's socket bound for a generation not promoted yet, and its address.
        self._pending: socket.socket | None = None
        self._pending_at: tuple[str, int] | None = None

    def for_generation(self, config: SocketConfig) -> socket.socket:
        """A listening socket for a new generation; the generation owns and closes it.

        Raises:
            BindError: the address cannot be bound (for a fixed port that changed: also while
                a generation on an overlapping old address still holds it).
        """
        if self._kept is not None and self.holds(config):
            return self._kept.dup()  # its backlog changes only once this generation serves
        if self._pending is not None and self._pending_at == (config.host, config.port):
            return self._pending.dup()  # adopted from a program that leaves it
        fresh = bind_listener(config)
        if config.port == 0:
            return fresh
        self.let_go_pending()  # one flip at a time: none is left, unless a flip ended unseen
        self._pending, self._pending_at = fresh, (config.host, config.port)
        return fresh.dup()

    def promoted(self, config: SocketConfig) -> None:
        """A generation of ``config`` serves now: its fixed port's socket is the kept one (with
        ``config``'s backlog), and an old address kept until now is let go (the generations that
        still hold it close their duplicates as they drain). Port 0: nothing is kept."""
        at = (config.host, config.port)
        if self._kept is not None and self._kept_at == at:
            self._kept.listen(config.backlog)  # the same socket; the backlog may have changed
            self.let_go_pending()
            return
        self._close_kept()
        if self._pending is not None and self._pending_at == at:
            self._kept, self._kept_at = self._pending, self._pending_at
            self._pending = self._pending_at = None
            # Bound with this backlog, or adopted from another program (a rename) with its own.
            self._kept.listen(config.backlog)
        self.let_go_pending()

    def let_go_pending(self) -> None:
        """Close the socket bound for a generation that was not promoted (its flip failed, timed
        out or was called off): its address is free again once that generation is gone."""
        if self._pending is not None:
            self._pending.close()
            self._pending = self._pending_at = None

    def holds(self, config: SocketConfig) -> bool:
        """Whether a socket on ``config``'s address is kept (a fixed port, bound already)."""
        return self._kept is not None and self._kept_at == (config.host, config.port)

    @property
    def kept_address(self) -> tuple[str, int] | None:
        """The fixed (host, port) of the kept socket (None: none is kept)."""
        return self._kept_at

    def pending_on(self, config: SocketConfig) -> bool:
        """Whether a socket on ``config``'s address waits for a generation to be promoted."""
        return self._pending is not None and self._pending_at == (config.host, config.port)

    def duplicate_kept(self, config: SocketConfig) -> socket.socket | None:
        """A duplicate of the kept socket if it is on ``config``'s fixed address (None if not),
        for another program that takes the address over (``adopt_pending``)."""
        if config.port == 0 or self._kept is None or not self.holds(config):
            return None
        return self._kept.dup()

    def adopt_pending(self, sock: socket.socket, config: SocketConfig) -> None:
        """Take ``sock``, the listening socket on ``config``'s fixed port that a program of ours
        leaving it holds (one a reload removed, renamed to this one), for this program's next
        generation: it accepts from the same queue while that program drains, so no connection
        is refused. Pending like a socket bound for a flip: kept once that generation is
        promoted, let go if it is not, so that a failed start leaves the port to the program
        serving on it (this one holding a copy, nobody would accept once that one is gone)."""
        self.let_go_pending()
        self._pending, self._pending_at = sock, (config.host, config.port)

    def adopt(self, sock: socket.socket, config: SocketConfig) -> None:
        """Keep ``sock``, a listening socket on ``config``'s fixed port taken from workers a
        killed supervisor left (``leftovers.py``), as if a generation of ours had bound it: the
        next generation accepts from the same queue while they drain."""
        self._close_kept()
        self._kept, self._kept_at = sock, (config.host, config.port)

    def close(self) -> None:
        """Let go of every socket held (the program stopped)."""
        self._close_kept()
        self.let_go_pending()

    def _close_kept(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = self._kept_at = None
