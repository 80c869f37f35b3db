"""Which listening socket on a fixed address something of ours that is leaving the address
leaves to the program that takes it over, so that the new program accepts from the same queue
instead of binding the address and failing ("in use", by our own worker).

Leaving the address: a program a reload removed (serving on until its successor serves, or
draining), an old generation of a program that moved to another address (draining on it), a
program whose flip under way moves it away (waited for first), or a killed supervisor's program
that the config no longer has (``Predecessor.stray_socket``).

``SocketsLeft`` is a part of its ``Supervisor`` (``supervisor.sockets_left``); its
``socket_left`` is the ``Runtime.socket_left`` that a flip asks before it binds a fixed address.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from .config import SocketConfig

if TYPE_CHECKING:
    from .program import Program
    from .supervisor import Supervisor


class SocketsLeft:
    """One supervisor's answer to "is this fixed address being left to me?"."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        # The programs whose flip waits in ``socket_left`` for another's flip away from an
        # address: not waited for in turn (two programs swapping ports would wait for each
        # other forever; each binds instead, and fails, as without the wait).
        self._awaiting_address: set[str] = set()

    async def socket_left(
        self, name: str, config: SocketConfig
    ) -> tuple[socket.socket, str] | None:
        """A duplicate of the socket on ``config``'s fixed address that something of ours
        leaving it holds, for ``name``, which takes the address over, and what held it; None if
        nothing does. While a flip moves another program away from the address, that flip is
        waited for first."""
        while (moving := self._moving_from(name, config)) is not None:
            if moving.name in self._awaiting_address:
                break  # it waits for this one's address: a swap
            report = moving.current_flip
            assert report is not None
            self._awaiting_address.add(name)
            try:
                await report.wait()
                await moving.wait_settled()
            finally:
                self._awaiting_address.discard(name)
            if moving.current_flip is report:
                break  # not over yet (a stop's turn): leave the address to the bind
        if (left := self._left_by_ours(name, config)) is not None:
            return left
        return await self.supervisor.predecessor.stray_socket(config)

    def _left_by_ours(self, name: str, config: SocketConfig) -> tuple[socket.socket, str] | None:
        """A duplicate of the listening socket on ``config``'s fixed address that a program
        other than ``name`` is leaving, and which program that is; None if none is. Left: the
        kept socket of a program a reload removed (serving on until the one that takes it over
        serves, or draining), or the socket an old generation of another program still drains
        on (its program flipped to another address, or was removed in a flip to this one).
        Only the program of the config on that address asks: no two have one
        (``config_consistency.py``)."""
        leaving = self.supervisor.reloads.leaving()
        for program in leaving:
            if (sock := program.listener.duplicate_kept(config)) is not None:
                return sock, f"{program.name}, removed from the config"
        for program in [*self.supervisor.programs.values(), *leaving]:
            if program.name == name or program.listener.holds(config):
                continue  # still its own program's kept socket: see ``_moving_from``
            for gen in program.generations:
                at = (gen.config.socket.host, gen.config.socket.port)
                # A generation's socket is closed once its drain is over.
                if at == (config.host, config.port) and gen.socket.fileno() != -1:
                    return gen.socket.dup(), f"{program.name}'s generation {gen.number}"
        return None

    def _moving_from(self, name: str, config: SocketConfig) -> Program | None:
        """A configured program other than ``name`` whose kept socket is on ``config``'s fixed
        address while a flip of it moves it to another address (a reload shifted programs along
        fixed ports): the address is left to ``name`` once that flip is over. None if none."""
        for program in self.supervisor.programs.values():
            target = program.flips.target  # what a flip under way deploys
            if (
                program.name == name
                or program.current_flip is None
                or target is None
                or not program.listener.holds(config)
            ):
                continue
            if (target.socket.host, target.socket.port) != (config.host, config.port):
                return program
        return None
