"""What a run takes over at start-up from the supervisor before it, if that one was killed: the
output pipes its keeper kept (logged from the moment they are taken over), its leftover workers
by program (``leftovers.py``: given to the configured programs, drained after their first
promotion), and the programs it served that the config no longer has (``stray_programs.py``:
stopped in the background, and SIGKILLed once a shutdown's drains are done; the socket of a fixed
port of theirs that a configured program listens on is taken first, for that program).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from .config import Config, SocketConfig
from .keeper_handover import KeptOutput
from .kept_outputs import OutputKeeper
from .leftover_records import read_records, recorded_leftovers
from .leftovers import Leftovers
from .lineage import Lineage, processes_of
from .logs_capture import capture
from .progress import FlipReport
from .published_keys import HOSTNAME
from .registry.base import WatchableRegistry
from .stray_programs import proxy_writers, recorded_strays, removed_programs, stop_stray_program

if TYPE_CHECKING:
    from .program import Program, Runtime

log = logging.getLogger(__name__)


class Predecessor:
    """What a killed supervisor before this run left it, and the stops of its programs the config
    no longer has."""

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        registry: WatchableRegistry,
        keeper: OutputKeeper,
        programs: Mapping[str, Program],
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.registry = registry
        self.keeper = keeper
        # The supervisor's configured programs (the live mapping, as reloads change it).
        self.programs = programs
        # The leftovers of programs no longer in the config, being stopped since start-up
        # (``_stop_strays``): set once they are gone (None: there were none). A shutdown sets
        # ``hurry`` once its drains are done, and they are SIGKILLed then.
        self._strays_gone: anyio.Event | None = None
        # The listening sockets on a configured fixed address that those leftovers held, taken
        # before they are stopped, for the program now configured on it (``stray_socket``): a
        # rename while no supervisor ran. Closed once they are gone.
        self._stray_sockets: dict[tuple[str, int], tuple[socket.socket, str]] = {}
        self._stray_ports: set[int] = set()
        # The configured program (and its fixed address) whose socket a stray's was taken for,
        # by the stray's program: that stray serves on until that program serves there.
        self._successors: dict[str, tuple[str, tuple[str, int]]] = {}
        # Set when the shutdown begins: the strays kept for a successor are stopped then.
        self.shutting_down = anyio.Event()
        self.hurry = anyio.Event()

    async def read_kept(self, kept: KeptOutput) -> None:
        """Log what a killed supervisor's worker writes (its keeper handed the pipe over) until
        it and what it started are gone, or the shutdown; held by our keeper meanwhile.

        From the moment the pipe is taken over, not once the programs are added (finding
        leftovers may wait for the registry's timeout): a chatty worker would block on its full
        pipe meanwhile, and a run killed then would take the only read ends with it."""
        log_ = self.runtime.program_log(kept.program)  # the one its program writes, if any
        try:
            self.keeper.hold(kept.fd, log_, kept.prefix)
            await capture(kept.fd, log_, prefix=kept.prefix, pending=kept.pending)
        finally:
            self.keeper.release(kept.fd)
            os.close(kept.fd)
            if kept.program not in self.programs:  # no longer in the config: nobody else writes
                log_.close()

    async def find_leftovers(self, *, unclean: bool, tg: TaskGroup) -> dict[str, Leftovers]:
        """What a killed supervisor left running, by program (``leftovers.py``). The programs it
        served that the config no longer has (``stray_programs.py``) are stopped now, in ``tg``:
        those its registry records name (``removed_programs``: any left in the deploy history),
        and, after an unclean exit, those its processes name that no record does."""
        programs, state_dir = self.config.programs, self.config.state_dir
        removed = removed_programs(state_dir, programs)
        records = await read_records(
            self.registry, self.config.registry.prefix, [*programs, *removed]
        )
        # What they start from now on is looked for whenever they are signalled.
        found = {
            name: replace(left, lineage=Lineage(state_dir, name))
            for name, left in recorded_leftovers(records, programs, HOSTNAME).items()
        }
        strays = {
            name: replace(left, lineage=Lineage(state_dir, name))
            for name, left in recorded_strays(records, removed, HOSTNAME).items()
        }
        for name, processes in (processes_of(state_dir) if unclean else {}).items():
            lineage = Lineage(state_dir, name)
            into = found if name in programs else strays
            left = into.get(name) or Leftovers(name or "?", None, None, (), lineage=lineage)
            into[name] = left.with_workers(processes)
        if strays:
            self._take_stray_sockets(list(strays.values()))
        for stray in strays.values():
            what = "stopping" if stray.workers else "taking it out of the proxy and the registry"
            if (taken := self._successors.get(stray.program)) is not None:
                successor, (host, port) = taken
                what = f"stopping it once {successor} serves on {host}:{port} in its place"
            self.runtime.events.emit(
                "leftovers", stray.program, None, f"{stray.describe()}: not in the config; {what}"
            )
        if strays:
            self._strays_gone = anyio.Event()
            tg.start_soon(self._stop_strays, list(strays.values()), self._strays_gone)
        return found

    async def _stop_strays(self, strays: list[Leftovers], gone: anyio.Event) -> None:
        """Stop the leftovers of programs no longer in the config as a reload's removal would
        (``stray_programs.py``: out of the proxy, keys withdrawn, then SIGTERM, SIGKILL after
        the default drain timeout), or SIGKILL them once a shutdown's drains are done
        (``hurry``)."""
        stop = partial(
            stop_stray_program,
            runtime=self.runtime,
            registry=self.registry,
            prefix=self.config.registry.prefix,
            proxy_files=proxy_writers(self.config),
            hurry=self.hurry,
        )

        async def stop_once_replaced(stray: Leftovers) -> None:
            if (taken := self._successors.get(stray.program)) is not None:
                await self._serve_until_replaced(stray, *taken)
            await stop(stray)

        try:
            async with anyio.create_task_group() as each:
                for stray in strays:
                    each.start_soon(stop_once_replaced, stray)
        finally:
            for sock, _ in self._stray_sockets.values():
                sock.close()  # the programs that took the address over hold duplicates
            self._stray_sockets.clear()
            self._stray_ports.clear()
            gone.set()

    def _take_stray_sockets(self, strays: list[Leftovers]) -> None:
        """Before the strays are stopped: take the socket a stray listens on at a fixed address
        that a configured program listens on (the port's queue then outlives the stray, and
        that program accepts from it), for ``stray_socket``."""
        for name, section in self.config.programs.items():
            wanted = section.socket
            if wanted.port == 0:
                continue
            for stray in strays:
                if (sock := stray.take_socket(wanted)) is not None:
                    what = f"{stray.describe()}, not in the config"
                    address = (wanted.host, wanted.port)
                    self._stray_sockets[address] = (sock, what)
                    self._successors[stray.program] = (name, address)
                    break
                if stray.port == wanted.port:
                    self._stray_ports.add(stray.port)  # held, it may be, but not handed over

    async def _serve_until_replaced(
        self, stray: Leftovers, successor: str, address: tuple[str, int]
    ) -> None:
        """Return once ``successor`` serves on ``address`` (the stray's socket, shared) or the
        shutdown begins. Until then the stray serves on: as a reload keeps a renamed program
        whose successor does not serve (``reload.py``), it is never given up for a program whose
        start fails; that is said once (``kept-serving``)."""
        async with anyio.create_task_group() as either:

            async def until_replaced() -> None:
                await self._wait_for_successor(stray, successor, address)
                either.cancel_scope.cancel()

            either.start_soon(until_replaced)
            await self.shutting_down.wait()
            either.cancel_scope.cancel()

    async def _wait_for_successor(
        self, stray: Leftovers, successor: str, address: tuple[str, int]
    ) -> None:
        waited: FlipReport | None = None  # the last flip of it waited for
        warned = False
        # Any event may mean that it was added, started or promoted: each is a cue to look.
        async with self.runtime.events.subscribe() as events:
            while not self._serves_on(successor, address):
                program = self.programs.get(successor)
                report = program.current_flip if program is not None else None
                if program is not None and report is not None and report is not waited:
                    waited = report
                    await report.wait()
                    await program.wait_settled()  # answered early (--timeout): serving after
                    continue
                if program is not None and not warned:
                    warned = True
                    self._warn_kept(stray, successor, address, waited)
                try:
                    await events.receive()
                except anyio.EndOfStream:  # the event log closed: the supervisor exits
                    return

    def _serves_on(self, name: str, address: tuple[str, int]) -> bool:
        """Whether configured program ``name`` serves from a generation listening on
        ``address``."""
        program = self.programs.get(name)
        serving = program.serving if program is not None else None
        return serving is not None and (serving.config.socket.host, serving.config.socket.port) == (
            address
        )

    def _warn_kept(
        self,
        stray: Leftovers,
        successor: str,
        address: tuple[str, int],
        report: FlipReport | None,
    ) -> None:
        failure = (
            f"its start failed: {report.error}"
            if report is not None and report.error
            else "it is not started"
        )
        why = (
            f"{stray.describe()}, not in the config, serves on: {successor}, which takes over "
            f"its port {address[0]}:{address[1]}, does not serve ({failure}); "
            f"`flipvisor start {successor}` replaces it"
        )
        self.runtime.events.emit("kept-serving", stray.program, None, why)
        log.warning("%s: %s", stray.program, why)

    async def stray_socket(self, config: SocketConfig) -> tuple[socket.socket, str] | None:
        """A duplicate of the socket a stray held on ``config``'s fixed address, and what that
        stray is; None if none did. One that listens on that port, but whose socket could not
        be taken, is waited for until it is gone (binding the port would fail meanwhile)."""
        if (taken := self._stray_sockets.get((config.host, config.port))) is not None:
            sock, what = taken
            return sock.dup(), what
        if config.port in self._stray_ports and self._strays_gone is not None:
            await self._strays_gone.wait()
        return None

    async def wait_strays(self, timeout: float | None) -> None:
        """Wait until the leftovers ``_stop_strays`` stops are gone (at most ``timeout``)."""
        if self._strays_gone is not None:
            with anyio.move_on_after(timeout):
                await self._strays_gone.wait()
