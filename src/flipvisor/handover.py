"""What a program a reload removes hands over to the program of the new config that takes its
place (a rename, by the look of it): its proxy file (the same ``proxy.dest``, however spelled) or
its fixed port's listening socket (the same ``socket`` host and port), and whether that program
serves in its place yet. ``reload.py`` removes the old program only once it does.

A program of the new config whose fixed port overlaps the removed one's address without being it
(0.0.0.0 for 127.0.0.1 on that port) can neither share its socket nor bind the port while it
serves: the removed one is not kept for a successor then, it drains first (``blocked_by``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .config_consistency import addresses_overlap
from .events import EventLog
from .program import Program
from .progress import FlipReport
from .proxy_file import same_file
from .usable import host_port


@dataclass(frozen=True)
class Handover:
    """A removed program's proxy file and/or fixed address, taken over by ``successor``."""

    successor: str
    dest: Path | None = None  # the proxy file the successor writes
    address: tuple[str, int] | None = None  # the fixed (host, port) the successor listens on
    # A program of the new config on the removed one's port with another host that overlaps it
    # (``find_handovers``): it cannot bind the port before the removed one is gone, so waiting
    # for a successor to serve first would keep the removed one for good.
    blocked_by: str | None = None

    def what(self) -> str:
        """What the successor takes over: "its proxy file", "its port 127.0.0.1:8000"."""
        parts = []
        if self.dest is not None:
            parts.append("proxy file")
        if self.address is not None:
            parts.append(f"port {host_port(*self.address)}")
        return "its " + " and ".join(parts)

    def undo_hint(self) -> str:
        """The edit that makes a reload no longer hand it over (and so remove it)."""
        taken = (("proxy.dest", self.dest), ("socket", self.address))
        keys = [key for key, value in taken if value is not None]
        return f"change {self.successor}'s {' and '.join(keys)}"

    def served_by(self, programs: Mapping[str, Program]) -> bool:
        """Whether the successor serves from a generation with that proxy file and address."""
        program = programs.get(self.successor)
        serving = program.serving if program is not None else None
        if serving is None:
            return False
        config = serving.config
        if self.dest is not None and (
            config.proxy is None or not same_file(config.proxy.dest, self.dest)
        ):
            return False
        return self.address is None or (config.socket.host, config.socket.port) == self.address

    def not_served(self, report: FlipReport | None) -> str:
        """Why the program it is taken from serves on: the successor does not serve (after
        ``report``, its last flip, if any), and what replaces it."""
        failure = (
            f"its start failed: {report.error}"
            if report is not None and report.error
            else "it is not started"
        )
        return (
            f"{self.successor}, which takes over {self.what()}, does not serve ({failure}); "
            f"`flipvisor start {self.successor}` replaces it"
        )

    def unroutes(self) -> bool:
        """Whether the removed program's proxy file is to be taken out (its successor does not
        write it: a fixed port's handover only)."""
        return self.dest is None


def find_handovers(
    programs: dict[str, Program], removed: list[str], new: Config
) -> dict[str, Handover]:
    """The removed programs whose proxy file a program of ``new`` writes (compared by real path:
    ``a/../a/x.conf`` or a symlinked folder is the same file), or whose fixed address (the
    socket their listener keeps) one listens on, each with what it takes over. Two programs of
    one config share neither (``config_consistency.py``), so each has one taker.

    A watch entry's ``dest`` takes nothing over: a reload does not start the watches a file
    adds (they run from the next start, ``RESTART_ONLY``), so nothing would rewrite the file;
    the removed program leaves the proxy as any other."""
    writers = {
        os.path.realpath(section.proxy.dest): name
        for name, section in new.programs.items()
        if section.proxy
    }
    listeners = {
        (section.socket.host, section.socket.port): name
        for name, section in new.programs.items()
        if section.socket.port != 0
    }
    handovers = {}
    for name in removed:
        program = programs[name]
        proxy, address = program.config.proxy, program.listener.kept_address
        by_file = writers.get(os.path.realpath(proxy.dest)) if proxy is not None else None
        by_port = listeners.get(address) if address is not None else None
        if by_file is not None:
            assert proxy is not None
            # Its port taken by another program than its file (two renames at once): that one
            # takes the socket all the same (``SocketsLeft.socket_left``) while this one serves on.
            handovers[name] = Handover(
                by_file,
                dest=proxy.dest,
                address=address if by_port == by_file else None,
                blocked_by=_overlapping(address, listeners) if by_port is None else None,
            )
        elif by_port is not None:
            handovers[name] = Handover(by_port, address=address)
    return handovers


def _overlapping(
    address: tuple[str, int] | None, listeners: Mapping[tuple[str, int], str]
) -> str | None:
    """The program of ``listeners`` on ``address``'s port whose host overlaps it (another
    host: the same address would take its socket over), if any."""
    if address is None:
        return None
    host, port = address
    for (other_host, other_port), name in listeners.items():
        if other_port == port and other_host != host and addresses_overlap(host, other_host):
            return name
    return None


def say_kept(events: EventLog, program: str, why: str) -> None:
    """Say once that ``program``, no longer in the config, serves on for its successor
    (``kept-serving``): a removed program a reload keeps, or a killed supervisor's stray."""
    events.emit("kept-serving", program, None, why)  # a warning in the log: ``events.WARNINGS``
