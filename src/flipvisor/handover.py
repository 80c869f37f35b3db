"""What a program a reload removes hands over to the program of the new config that takes its
place (a rename, by the look of it): its proxy file (the same ``proxy.dest``) or its fixed port's
listening socket (the same ``socket`` host and port), and whether that program serves in its
place yet. ``reload.py`` removes the old program only once it does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .events import EventLog
from .program import Program
from .progress import FlipReport


@dataclass(frozen=True)
class Handover:
    """A removed program's proxy file and/or fixed address, taken over by ``successor``."""

    successor: str
    dest: Path | None = None  # the proxy file the successor writes
    address: tuple[str, int] | None = None  # the fixed (host, port) the successor listens on

    def what(self) -> str:
        """What the successor takes over: "its proxy file", "its port 127.0.0.1:8000"."""
        parts = []
        if self.dest is not None:
            parts.append("proxy file")
        if self.address is not None:
            parts.append(f"port {self.address[0]}:{self.address[1]}")
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
        if self.dest is not None and (config.proxy is None or config.proxy.dest != self.dest):
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
    """The removed programs whose proxy file a program of ``new`` writes, or whose fixed
    address (the socket their listener keeps) one listens on, each with what it takes over. Two
    programs of one config share neither (``config_consistency.py``), so each has one taker."""
    writers = {section.proxy.dest: name for name, section in new.programs.items() if section.proxy}
    listeners = {
        (section.socket.host, section.socket.port): name
        for name, section in new.programs.items()
        if section.socket.port != 0
    }
    handovers = {}
    for name in removed:
        program = programs[name]
        proxy, address = program.config.proxy, program.listener.kept_address
        by_file = writers.get(proxy.dest) if proxy is not None else None
        by_port = listeners.get(address) if address is not None else None
        if by_file is not None:
            assert proxy is not None
            # Its port taken by another program than its file (two renames at once): that one
            # takes the socket all the same (``Reloads.socket_left``) while this one serves on.
            handovers[name] = Handover(
                by_file, dest=proxy.dest, address=address if by_port == by_file else None
            )
        elif by_port is not None:
            handovers[name] = Handover(by_port, address=address)
    return handovers


def say_kept(events: EventLog, program: str, why: str) -> None:
    """Say once that ``program``, no longer in the config, serves on for its successor
    (``kept-serving``): a removed program a reload keeps, or a killed supervisor's stray."""
    events.emit("kept-serving", program, None, why)  # a warning in the log: ``events.WARNINGS``
