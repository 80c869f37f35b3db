"""The supervisor's config reloads (SIGHUP, ``flipvisor reload``): programs the file gained are
added and started, those whose section changed are flipped (or their flip deferred, as
reload_changes.py decides), and removed ones drained in the supervisor's task group (listed by
status until they are gone) or, when another program takes their proxy file or fixed port over
(``handover.py``), handed over to it; a change to the settings read once at start is reported
with how to restart. Which socket on a fixed address a removed program leaves to the one taking
it over is ``sockets_left.py``'s.

``Reloads`` is a part of its ``Supervisor`` (``supervisor.reloads``), not an owner of its own:
it adds to and removes from the supervisor's programs, in its task group.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import anyio
from anyio import CancelScope

from .config import Config, ProgramConfig
from .config_consistency import addresses_overlap
from .config_file import load_config
from .control import Send
from .errors import ConfigError, FlipvisorError, UsageError
from .handover import Handover, find_handovers, say_kept
from .program import Program
from .reload_changes import changed_programs, deploy_all_changed, forget_superseded
from .usable import host_port

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

# How often a reload waiting for its turn says so to its client (``Reloads._take_turn``).
WAIT_HEARTBEAT = 1.0

# Top-level settings read once, at start: the control socket, registry connection, metrics
# listener, log settings and watches are built from them. A reload reports a change to them.
RESTART_ONLY = ("state_dir", "registry", "metrics", "logs", "watch")


class Reloads:
    """One supervisor's config reloads, and the programs they remove."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        config = supervisor.config
        self._started_with = {key: getattr(config, key) for key in RESTART_ONLY}
        self.lock = anyio.Lock()  # one reload at a time (SIGHUP and `flipvisor reload`)
        # Removed by a reload, draining in the supervisor's task group (``_drain_removed``),
        # listed by status until their workers are gone: name -> the program, and an event set
        # once it is.
        self.removing: dict[str, tuple[Program, anyio.Event]] = {}
        # Removed by a reload, serving on until the program that takes their proxy file or fixed
        # port over serves: while the reload waits for that (``_hand_over``), and once it gave
        # up waiting (``kept``: a `start` or `flip` of that program releases them).
        self.handing_over: dict[str, Handover] = {}
        self.kept: dict[str, Handover] = {}

    def _remove_program(self, name: str, *, unroute: bool = True) -> anyio.Event:
        """Begin to stop a program the config no longer has, and return at once: it drains in
        the supervisor's task group (``_drain_removed``), so that a reload starts and flips the
        others meanwhile. ``unroute``: take its proxy file out first (not when another program's
        file has replaced it). Returns an event set once it has left the proxy (the drain
        begins then)."""
        program = self.supervisor.programs.pop(name)
        self.kept.pop(name, None)
        self.handing_over.pop(name, None)
        program.removing = True
        unrouted, gone = anyio.Event(), anyio.Event()
        self.removing[name] = (program, gone)
        scope = self.supervisor._scopes.pop(name)
        self.supervisor.task_group().start_soon(
            self._drain_removed, program, scope, unroute, unrouted, gone
        )
        return unrouted

    async def _drain_removed(
        self,
        program: Program,
        scope: CancelScope,
        unroute: bool,
        unrouted: anyio.Event,
        gone: anyio.Event,
    ) -> None:
        """Stop a removed program, then end its task (``scope``) and forget it."""
        try:
            await program.stop(unroute=unroute, unrouted=unrouted)
        except Exception:
            # The boundary of one removal: the supervisor goes on (its workers' own tasks still
            # stop them as its scope is cancelled below).
            log.exception("program=%s: stopping it after its removal failed", program.name)
        finally:
            scope.cancel()
            del self.removing[program.name]
            unrouted.set()  # nobody waits for what will not happen
            gone.set()

    def leaving(self) -> list[Program]:
        """The programs a reload removed that still hold what they had: serving on until their
        successor serves (``handing_over``, ``kept``), or draining (``removing``)."""
        programs = self.supervisor.programs
        handing = [programs.get(name) for name in [*self.handing_over, *self.kept]]
        return [
            *(program for program in handing if program is not None),
            *(program for program, _ in self.removing.values()),
        ]

    async def _hand_over(self, old: str, handover: Handover) -> str | None:
        """Remove ``old`` once its successor serves in its place (from its proxy file, which the
        successor's promotion rewrote and which is left in place; on its fixed port, whose
        socket the successor shares); if the successor does not serve, keep ``old`` serving: the
        old is never given up for a new one that is broken. Returns why ``old`` was kept (None:
        removed)."""
        try:
            return await self._wait_for_successor(old, handover)
        finally:
            self.handing_over.pop(old, None)  # removed, kept, or left to the shutdown

    async def _wait_for_successor(self, old: str, handover: Handover) -> str | None:
        successor, what = handover.successor, handover.what()
        program = self.supervisor.programs.get(successor)
        if program is None:  # not added: the supervisor began shutting down meanwhile
            return f"{successor}, which takes over {what}, was not added"
        report = program.current_flip
        if report is None and program.serving is None and program.config.autostart:
            try:
                report = program.start_flip(kind="start")
            except FlipvisorError:
                report = None  # stopping: nothing to wait for
        if report is not None:
            await report.wait()
            await program.wait_settled()  # answered early (--timeout): serving only after that
        if handover.served_by(self.supervisor.programs):
            log.info("%s took over %s of %s, which the config no longer has", successor, what, old)
            self._remove_program(old, unroute=handover.unroutes())
            return None
        if self.supervisor._shutdown.is_set():
            # It stops `old` too: nothing serves on, and nothing is to be started.
            why = f"not handed over to {successor}: the supervisor is shutting down"
            log.info("%s: %s", old, why)
            return why
        why = (
            f"removed from the config, but serving on: {handover.not_served(report)}, or "
            f"{handover.undo_hint()} and `flipvisor reload` to remove it"
        )
        self.kept[old] = handover
        self.supervisor.programs[old].kept_after_removal = why
        say_kept(self.supervisor.events, old, why)
        return why

    async def release_kept(self) -> None:
        """Remove the kept programs (``_hand_over``) whose successor now serves in their place."""
        async with self.lock:
            for old, handover in list(self.kept.items()):
                if old in self.supervisor.programs and handover.served_by(self.supervisor.programs):
                    self._remove_program(old, unroute=handover.unroutes())

    async def reload_on_signal(self) -> None:
        """SIGHUP's reload: whatever goes wrong is logged, and the supervisor keeps running."""
        try:
            await self.reload()
        except ConfigError:
            pass  # reload() logged every problem; the old config stays
        except UsageError as exc:  # shutting down
            log.warning("SIGHUP ignored: %s", exc)
        except Exception:
            # The boundary of one reload: a failure here must not end every program with it.
            log.exception("SIGHUP: reloading the config failed")

    async def reload(self, send: Send | None = None) -> dict[str, Any]:
        """Re-read the config file: start added programs, flip changed ones and begin to drain
        removed ones, all at once; leave the rest untouched. One at a time. Returns without
        waiting for the drains, except that of a program added back while it still drains
        (``send`` hears about that wait).

        Raises:
            ConfigError: the file is invalid; nothing changed.
            UsageError: the supervisor is shutting down.
        """
        await self._take_turn(send)
        try:
            return await self._reload(send)
        finally:
            self.lock.release()

    async def _take_turn(self, send: Send | None) -> None:
        """Acquire ``lock``; while another reload holds it, say so at once and then every
        ``WAIT_HEARTBEAT`` (the client's read timeout measures silence, and that reload may wait
        long: for a drain, or for a program's start)."""
        while True:
            if self.lock.locked() and send is not None:
                await send(
                    {
                        "type": "waiting",
                        "message": "another reload is under way: this one begins once it is over",
                    }
                )
            with anyio.move_on_after(WAIT_HEARTBEAT):
                await self.lock.acquire()
                return

    async def _reload(self, send: Send | None) -> dict[str, Any]:
        """``reload``'s work, its turn taken: the file read, then its programs removed, added,
        flipped and handed over, in that order. Returns the outcome ``flipvisor reload`` shows."""
        supervisor = self.supervisor
        programs = supervisor.programs
        if supervisor._shutdown.is_set():
            raise UsageError("the supervisor is shutting down; the config was not reloaded")
        try:
            new = load_config(supervisor.config_path)
        except ConfigError as exc:
            log.error("config not reloaded, the running config stays: %s", exc)
            raise
        added = [name for name in new.programs if name not in programs]
        removed = [name for name in programs if name not in new.programs]
        forget_superseded(programs, new)
        changed = changed_programs(programs, supervisor.config, new)
        handovers = find_handovers(programs, removed, new)
        self._unkeep_those_back(new)
        leaving = self._remove_all(removed, handovers)
        # Added once a removal still draining is over (below): see ``_waiting_for_removal``.
        returning = self._waiting_for_removal(added, new)
        for name in added:
            if name not in returning:
                await self._start_added(name, new.programs[name])
        flipping, not_flipped, deferred = deploy_all_changed(programs, changed, new)
        supervisor.config = new
        # Answered once nothing routes to the removed programs any more, as before the drains
        # went their own way: a script that reloads may rely on it.
        for unrouted in leaving:
            await unrouted.wait()
        kept = await self._hand_over_all(handovers, returning, new, send)
        log.info("config reloaded: added %s, removed %s", added or "none", removed or "none")
        needs_restart, hint = self._needs_restart(new)
        return {
            "added": added,
            "removed": removed,
            "changed": flipping,
            "not_flipped": not_flipped,
            "deferred": deferred,
            "restart_hint": hint,
            "needs_restart": needs_restart,
            "kept": kept,
        }

    def _unkeep_those_back(self, new: Config) -> None:
        """The kept programs (``_hand_over``) that ``new`` has again are no longer kept after a
        removal: they are configured programs like the others."""
        for name in [name for name in self.kept if name in new.programs]:
            del self.kept[name]
            self.supervisor.programs[name].kept_after_removal = None

    def _remove_all(self, removed: list[str], handovers: dict[str, Handover]) -> list[anyio.Event]:
        """Begin to remove the programs the file lost, except those handed over to a program
        that takes their proxy file or fixed port (one of them that does not serve, or whose
        port a program of the new file cannot bind while it serves, is removed here, and
        dropped from ``handovers``; its successor takes the socket it may still drain on, or
        starts once it is gone). Returns an event per program leaving the proxy, set once it
        has."""
        # Removals first: each takes its turn of the proxy lock to leave the proxy before an
        # added program's promotion takes its own. Their drains are not waited for.
        leaving = []
        for name in removed:
            if name not in handovers:
                leaving.append(self._remove_program(name))
            elif (
                self.supervisor.programs[name].serving is None
                or handovers[name].blocked_by is not None
            ):
                # Nothing of it to keep serving, or a program that cannot start while it serves
                # (``_waiting_for_removal``: it starts once this one's drain is over). Its file
                # is another program's now: leave it in place, naming the port that program
                # comes to serve (if blocked) rather than nothing. (One that serves is handed
                # over below, its successor first; it serves on meanwhile.)
                self._remove_program(name, unroute=handovers.pop(name).unroutes())
            else:
                self.handing_over[name] = handovers[name]
        return leaving

    def _waiting_for_removal(self, added: list[str], new: Config) -> dict[str, str]:
        """The added programs that start only once a removal still draining is over, each with
        the removed program it waits for: one of its own name (added back: the two would share
        its log, its proxy file and a fixed port), or one holding an address that the added
        program's fixed port overlaps but cannot share (another host on that port: 0.0.0.0
        for 127.0.0.1, say), which the added program could not bind while that one drains."""
        waiting = {name: name for name in added if name in self.removing}
        for name in added:
            wanted = new.programs[name].socket
            if name in waiting or wanted.port == 0:
                continue
            for program, _gone in self.removing.values():
                held = program.listener.kept_address
                if held is None or held == (wanted.host, wanted.port):
                    continue  # the same address: its socket is taken over (``sockets_left``)
                if held[1] == wanted.port and addresses_overlap(held[0], wanted.host):
                    waiting[name] = program.name
                    break
        return waiting

    async def _hand_over_all(
        self,
        handovers: dict[str, Handover],
        returning: dict[str, str],
        new: Config,
        send: Send | None,
    ) -> dict[str, str]:
        """Each removed program handed over to its successor (``_hand_over``), and each program
        waiting for a removal (``_waiting_for_removal``) added once that is over (a successor
        among them first). Returns why each removed program that serves on was kept."""
        kept = {}
        for name, handover in handovers.items():
            successor = handover.successor
            if successor in returning:  # renamed back while its earlier removal drains
                after = returning.pop(successor)
                await self._add_when_removed(successor, new.programs[successor], after, send)
            if (why := await self._hand_over(name, handover)) is not None:
                kept[name] = why
        for name, after in returning.items():
            await self._add_when_removed(name, new.programs[name], after, send)
        return kept

    def _needs_restart(self, new: Config) -> tuple[list[str], str | None]:
        """The settings read once at start that ``new`` changes, logged, and how to restart the
        supervisor for them (None: none changed)."""
        needs_restart = [
            key for key in RESTART_ONLY if getattr(new, key) != self._started_with[key]
        ]
        if not needs_restart:
            return needs_restart, None
        hint = restart_hint(needs_restart, recorded=self.supervisor._record is not None)
        log.warning(
            "config reloaded, but %s changed: that takes effect only when the supervisor "
            "restarts (%s)",
            ", ".join(needs_restart),
            hint,
        )
        return needs_restart, hint

    async def _start_added(self, name: str, section: ProgramConfig) -> None:
        """Add a program the config gained, and start it (with ``autostart``), unless the
        shutdown began meanwhile."""
        try:
            program = await self.supervisor._add_program(name, section)
        except UsageError as exc:  # the shutdown began: nothing more is added
            log.info("%s", exc)
            return
        if section.autostart:
            try:
                program.start_flip(kind="start")
            except UsageError as exc:  # stopped for good while it was being added
                log.info("%s", exc)

    async def _add_when_removed(
        self, name: str, section: ProgramConfig, after: str, send: Send | None
    ) -> None:
        """Add ``name``, a program the config gained, once the removal of ``after`` (``name``
        itself, added back; or one on an address its fixed port overlaps) is over."""
        if (removal := self.removing.get(after)) is not None:
            program, gone = removal
            draining = program.describe_drain(list(program.generations))
            if after == name:
                why = f"{name} is added back while its removal still drains it ({draining})"
            else:
                host, port = section.socket.host, section.socket.port
                why = (
                    f"{name} listens on {host_port(host, port)}, which {after}, removed from the "
                    f"config, holds on another address while its removal drains it ({draining})"
                )
            why += ": it starts once that is over"
            log.info("%s", why)
            if send is not None:
                await send({"type": "waiting", "message": why})
            await gone.wait()
        await self._start_added(name, section)


def restart_hint(needs_restart: list[str], *, recorded: bool) -> str:
    """How to restart the supervisor so that ``needs_restart`` takes effect (``recorded``: the
    supervisor recorded where it listens, so the CLI finds it whatever state_dir the file names)."""
    if "state_dir" in needs_restart and not recorded:
        # The CLI looks for the supervisor in the file's state_dir only, which names another.
        return (
            f"stop this supervisor with SIGTERM to pid {os.getpid()} (the CLI looks for it in "
            "the new state_dir now), then `flipvisor run`"
        )
    return "`flipvisor shutdown`, then `flipvisor run`"
