"""What a run takes over at start-up from the supervisor before it, if that one was killed: the
temporary files of its writes a kill tore (``remove_torn_writes``), the output pipes its keeper kept
(logged from the moment they are taken over), the proxy steps it left unfinished
(``proxy_recovery.py``: each proxy file made to agree with the registry keys, before anything else
is routed), its leftover workers by program (``leftovers.py``: given to the configured programs,
drained after their first promotion), and the programs it served that the config no longer has
(``stray_programs.py``: stopped in the background, and SIGKILLed once a shutdown's drains are done;
the socket of a fixed port of theirs that a configured program listens on is taken first, for that
program).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from .config import Config, SocketConfig
from .current_record import HOSTNAME
from .durable import remove_torn
from .handover import Handover, say_kept
from .keeper_handover import KeptOutput
from .kept_outputs import OutputKeeper
from .leftover_records import read_records, recorded_leftovers
from .leftovers import Leftovers
from .lineage import Lineage, processes_of
from .logs_capture import capture
from .progress import FlipReport
from .proxy_recovery import ProxyAccess, finish_proxy_steps, unfinished_proxy_steps
from .registry.base import WatchableRegistry
from .registry.local_file import FILE_NAME as REGISTRY_FILE
from .stray_programs import proxy_writers, removed_programs, stop_stray_program
from .usable import host_port

if TYPE_CHECKING:
    from .program import Program, Runtime

log = logging.getLogger(__name__)

# How often a stray kept for its successor looks again whether that one is still configured.
RECHECK_INTERVAL = 1.0


def remove_torn_writes(state_dir: Path) -> None:
    """Remove the temporary files that a supervisor killed mid-write left beside the deploy
    histories (``history/<program>.json``) and the local registry file (``registry.json``);
    the proxy-undo records' are ``proxy_record.pending``'s. Before anything of this run writes
    those files: a file written meanwhile would lose its temporary (blocking)."""
    remove_torn(state_dir / "history", of=lambda name: name.endswith(".json"))
    remove_torn(state_dir, of=lambda name: name == REGISTRY_FILE)


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
        # Each stray's own, by its program: set once that one is stopped (``stray_socket``
        # waits for those on a port only, not for one kept for another program).
        self._stray_gone: dict[str, anyio.Event] = {}
        # The listening sockets on a configured fixed address that those leftovers held, taken
        # before they are stopped, for the program now configured on it (``stray_socket``): a
        # rename while no supervisor ran. Each closed once its stray is stopped.
        self._stray_sockets: dict[tuple[str, int], tuple[socket.socket, str]] = {}
        # The strays that may listen on a configured fixed address whose socket could not be
        # taken (their recorded port, or none recorded), by address: waited for before a bind.
        self._holders: dict[tuple[str, int], list[Leftovers]] = {}
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
        and, after an unclean exit, those its processes name that no record does. First, the
        proxy steps it left unfinished are kept or undone, as those records say
        (``proxy_recovery.py``): its proxy files then name the generation its keys do."""
        programs, state_dir = self.config.programs, self.config.state_dir
        await anyio.to_thread.run_sync(remove_torn_writes, state_dir)
        removed = removed_programs(state_dir, programs)
        unfinished = await unfinished_proxy_steps(state_dir)
        journalled = [step.about.program for step in unfinished]
        read = await read_records(
            self.registry,
            self.config.registry.prefix,
            [*programs, *removed, *journalled],
            unclean=unclean,
        )
        access = ProxyAccess(programs, self.runtime.reaper, self.runtime.proxy_lock)
        await finish_proxy_steps(unfinished, read, self.runtime.events, access)
        records = read if read is not None else {}
        # What they start from now on is looked for whenever they are signalled.
        found = _with_lineage(recorded_leftovers(records, programs, HOSTNAME), state_dir)
        # Removed from the config: found even with no worker left (its keys and proxy file stay).
        gone = recorded_leftovers(records, removed, HOSTNAME, even_if_gone=True)
        strays = _with_lineage(gone, state_dir)
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
                what = (
                    f"stopping it once {successor} serves on {host_port(host, port)} in its place"
                )
            self.runtime.events.emit(
                "leftovers", stray.program, None, f"{stray.describe()}: not in the config; {what}"
            )
        if strays:
            self._stray_gone = {name: anyio.Event() for name in strays}
            self._strays_gone = anyio.Event()
            tg.start_soon(self._stop_strays, list(strays.values()), self._strays_gone)
        return found

    async def _stop_strays(self, strays: list[Leftovers], gone: anyio.Event) -> None:
        """Stop the leftovers of programs no longer in the config as a reload's removal would
        (``stray_programs.py``: out of the proxy, keys withdrawn, then SIGTERM, SIGKILL after
        the default drain timeout), or SIGKILL them once a shutdown's drains are done
        (``hurry``)."""

        async def stop_once_replaced(stray: Leftovers) -> None:
            taken = self._successors.get(stray.program)
            try:
                if taken is not None:
                    await self._serve_until_replaced(stray, *taken)
                # The proxy files written now (a reload may have changed them meanwhile).
                await stop_stray_program(
                    stray,
                    runtime=self.runtime,
                    registry=self.registry,
                    prefix=self.config.registry.prefix,
                    proxy_files=proxy_writers(self._live_config()),
                    hurry=self.hurry,
                )
            finally:
                if taken is not None and (held := self._stray_sockets.pop(taken[1], None)):
                    held[0].close()  # the program that took the address over holds a duplicate
                self._stray_gone[stray.program].set()

        try:
            async with anyio.create_task_group() as each:
                for stray in strays:
                    each.start_soon(stop_once_replaced, stray)
        finally:
            for sock, _ in self._stray_sockets.values():
                sock.close()
            self._stray_sockets.clear()
            self._holders.clear()
            gone.set()

    def _live_config(self) -> Config:
        """The config as reloads left it: the start-up one with the sections of the programs
        configured now (what else a reload changes, such as the watches, takes a restart). The
        start-up programs stay in: they may not be added yet, and the proxy file of one that a
        reload removed is that removal's to take out."""
        live = {name: program.config for name, program in self.programs.items()}
        return self.config.model_copy(update={"programs": {**self.config.programs, **live}})

    def _take_stray_sockets(self, strays: list[Leftovers]) -> None:
        """Before the strays are stopped: take the socket a stray listens on at a fixed address
        that a configured program listens on (the port's queue then outlives the stray, and
        that program accepts from it), for ``stray_socket``."""
        fixed = {
            name: section.socket
            for name, section in self.config.programs.items()
            if section.socket.port != 0
        }
        for name, wanted in fixed.items():
            for stray in strays:
                if (sock := stray.take_socket(wanted)) is not None:
                    what = f"{stray.describe()}, not in the config"
                    address = (wanted.host, wanted.port)
                    self._stray_sockets[address] = (sock, what)
                    self._successors[stray.program] = (name, address)
                    break
        # Held, it may be, but not handed over: found only by their environment, strays have no
        # recorded port (``takeover.free_port_of_leftovers``). One whose socket was taken for
        # another address listens there, and is kept for that program: not waited for.
        for wanted in fixed.values():
            address = (wanted.host, wanted.port)
            if address in self._stray_sockets:
                continue
            self._holders[address] = [
                stray
                for stray in strays
                if stray.program not in self._successors and stray.port in (None, wanted.port)
            ]

    async def _serve_until_replaced(
        self, stray: Leftovers, successor: str, address: tuple[str, int]
    ) -> None:
        """Return once ``successor`` serves on ``address`` (the stray's socket, shared), a reload
        removes it or moves it off ``address`` (nothing takes the stray's place then), or the
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
            seen = False  # added yet: its absence after that is a reload's removal
            while not Handover(successor, address=address).served_by(self.programs):
                program = self.programs.get(successor)
                seen = seen or program is not None
                if seen and (program is None or not self._listens_on(program, address)):
                    # A reload removed it, or moved it to another address: nothing takes this
                    # stray's place, and it is stopped.
                    log.info(
                        "%s: not in the config, stopped: %s no longer listens on %s:%d",
                        stray.program,
                        successor,
                        *address,
                    )
                    return
                report = program.current_flip if program is not None else None
                if program is not None and report is not None and report is not waited:
                    waited = report
                    await report.wait()
                    await program.wait_settled()  # answered early (--timeout): serving after
                    continue
                if program is not None and not warned:
                    warned = True
                    self._warn_kept(stray, successor, address, waited)
                # Looked at once a second too: a reload that removes it, or stores a section on
                # another address for it while stopped, emits no event.
                with anyio.move_on_after(RECHECK_INTERVAL):
                    try:
                        await events.receive()
                    except anyio.EndOfStream:  # the event log closed: the supervisor exits
                        return

    @staticmethod
    def _listens_on(program: Program, address: tuple[str, int]) -> bool:
        """Whether ``program``'s config (as reloads left it) listens on ``address``."""
        return (program.config.socket.host, program.config.socket.port) == address

    def _warn_kept(
        self,
        stray: Leftovers,
        successor: str,
        address: tuple[str, int],
        report: FlipReport | None,
    ) -> None:
        handover = Handover(successor, address=address)
        why = f"{stray.describe()}, not in the config, serves on: {handover.not_served(report)}"
        say_kept(self.runtime.events, stray.program, why)

    async def stray_socket(self, config: SocketConfig) -> tuple[socket.socket, str] | None:
        """A duplicate of the socket a stray held on ``config``'s fixed address, and what that
        stray is; None if none did. One that listens on that port, but whose socket could not
        be taken, is waited for until it is stopped (binding the port would fail meanwhile); a
        stray kept for another program is not."""
        address = (config.host, config.port)
        if (taken := self._stray_sockets.get(address)) is not None:
            sock, what = taken
            return sock.dup(), what
        for stray in self._holders.get(address, []):
            if not (gone := self._stray_gone[stray.program]).is_set():
                log.warning(
                    "%s:%d: cannot take it over from %s, not in the config; binding it once "
                    "that is stopped",
                    *address,
                    stray.describe(),
                )
                await gone.wait()
        return None

    async def wait_strays(self, timeout: float | None) -> None:
        """Wait until the leftovers ``_stop_strays`` stops are gone (at most ``timeout``)."""
        if self._strays_gone is not None:
            with anyio.move_on_after(timeout):
                await self._strays_gone.wait()


def _with_lineage(found: Mapping[str, Leftovers], state_dir: Path) -> dict[str, Leftovers]:
    """``found``, each looking for what its processes start from now on (``Lineage``)."""
    return {name: replace(left, lineage=Lineage(state_dir, name)) for name, left in found.items()}
