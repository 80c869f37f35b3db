"""The programs a killed supervisor served that the config no longer has (removed from the file
while no supervisor ran), found at start-up, and stopped as a reload stops a program it removes:
out of the proxy, registry keys withdrawn, then drained (at once: nothing replaces them).

They are found two ways. By their processes' environment (``lineage.py``), after an unclean
exit. And by their deploy history in the state_dir (``history.py``: every program a run of this
state_dir deployed) together with their ``generation/current`` record, still naming a dead
supervisor of this host: their workers may have died with it, or since, but their proxy file
still routes to the dead port and their keys still name the dead workers. A program that a run
stopped or removed itself had its keys withdrawn then: its history alone (of a file that may be
another's now) is no reason to touch anything.

This run has no section for such a program. What it needs is read where the killed supervisor
left it: the proxy section from the program's deploy history (private to this user, and what the
proxy file was rendered with), the keys' owner from the registry's ``generation/current`` record,
which the withdrawal compares with (the keys are withdrawn only while they still name that
record: not if another writer promoted the program since). The record is not where the proxy
section is looked for: the registry is shared with other tools and hosts, and a ``reload_cmd``
or a ``dest`` read from it would let whoever can write a key have this supervisor run a command
or remove a file. A proxy file that the config now has another writer for (a program's
``proxy.dest``, a watch entry's ``dest``: a rename, by the look of it) is left to that writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import anyio

from .config import Config, DrainConfig
from .config_fields import MAX_PROGRAM_NAME, PROGRAM_NAME_RE
from .current_record import HOSTNAME
from .errors import RegistryError
from .history import History
from .leftover_records import dead_supervisors_record
from .leftovers import Leftovers
from .program import Runtime
from .registry import WatchableRegistry, program_key
from .unroute import unroute

log = logging.getLogger(__name__)


def removed_programs(state_dir: Path, configured: Collection[str]) -> list[str]:
    """The programs with a deploy history in ``state_dir`` that the config no longer has
    (``configured``): deployed by a previous run, stopped or removed since, or left routed by a
    killed supervisor (which ``recorded_leftovers`` with ``even_if_gone`` tells by their registry
    records)."""
    try:
        entries = sorted(os.listdir(state_dir / "history"))
    except OSError:  # none yet, or unreadable: nothing known to have been deployed
        return []
    names = (entry.removesuffix(".json") for entry in entries if entry.endswith(".json"))
    return [name for name in names if _program_name(name) and name not in configured]


def proxy_writers(config: Config) -> dict[str, str]:
    """The proxy files ``config`` has a writer for, by real path: its programs' ``proxy.dest``
    (the program's name) and its watch entries' ``dest`` ("watch entry N")."""
    writers = {
        os.path.realpath(entry.dest): f"watch entry {index}"
        for index, entry in enumerate(config.watch)
        if entry.dest is not None
    }
    for name, section in config.programs.items():
        if section.proxy is not None:
            writers[os.path.realpath(section.proxy.dest)] = name
    return writers


def _writer_of(dest: Path, proxy_files: Mapping[str, str]) -> str | None:
    """Who writes ``dest`` in the config (``proxy_writers``), however it is spelled."""
    return proxy_files.get(os.path.realpath(dest))


def _program_name(name: str) -> bool:
    """Whether ``name`` is one a config could hold (what a process's environment or a file
    name says is not necessarily one)."""
    return bool(PROGRAM_NAME_RE.fullmatch(name)) and len(name) <= MAX_PROGRAM_NAME


async def stop_stray_program(
    stray: Leftovers,
    *,
    runtime: Runtime,
    registry: WatchableRegistry,
    prefix: str,
    proxy_files: Mapping[str, str],
    hurry: anyio.Event,
) -> None:
    """Take ``stray``'s program out of the proxy and withdraw its registry keys, then drain
    its leftovers (SIGTERM, SIGKILL after the default drain timeout, or as soon as ``hurry`` is
    set: a shutdown's drains are done). ``proxy_files``: the proxy files the config has a writer
    for (``proxy_writers``): one of them is left in place, its new writer's now.

    Processes that name no program, or no name a config could hold (their environment is
    theirs to set), have no proxy file or keys of ours: they are only drained.
    """
    name = stray.program
    if _program_name(name):
        # Read again, not ``stray.record``: a stray kept until its successor serves stops long
        # after it was found, and another writer may have promoted the program since.
        record = await _dead_supervisors_record(stray, registry, prefix)
        await _unroute(name, runtime, proxy_files, routed=record is not None)
        if record is not None:
            # As a stop does: the keys stop naming the workers before they are signalled, so
            # that scripts reading `pid/current` never find PIDs that are gone, then reused.
            await registry.withdraw(name, taken_over=record)
    drain = DrainConfig()
    if killed := await stray.drain(drain, delay=False, hurry=hurry):
        why = (
            f"still running at shutdown, {drain.signal.name} at start-up"
            if hurry.is_set()
            else f"still running {drain.timeout:g}s after {drain.signal.name}"
        )
        runtime.events.emit("killed", name, None, why, pids=killed)


async def _dead_supervisors_record(
    stray: Leftovers, registry: WatchableRegistry, prefix: str
) -> str | None:
    """The program's ``generation/current`` record if a supervisor of this host that no longer
    runs wrote it (None: the keys are not ours to withdraw, or cannot be read: logged)."""
    name = stray.program
    key = program_key(prefix, name, "generation/current")
    try:
        values = (await registry.read_keys([key])).values
    except RegistryError as exc:
        where = program_key(prefix, name, "")
        log.warning(
            "program=%s is no longer in the config, but its registry keys cannot be read: %s; "
            "they are not withdrawn: once the registry answers, if %spid/current still names "
            "%s, delete %s{port,pid,generation}/current by hand",
            name,
            exc,
            where,
            stray.describe(),
            where,
        )
        return None
    return dead_supervisors_record(name, values.get(key), HOSTNAME)


async def _unroute(
    name: str, runtime: Runtime, proxy_files: Mapping[str, str], *, routed: bool
) -> None:
    """Remove the program's proxy file, check, reload and wait for the proxy's old workers
    (``unroute.py``), with the proxy section it was last deployed with."""
    history = History(runtime.state_dir / "history" / f"{name}.json")
    deployed = history.current
    if deployed is None:
        log.warning(
            "program=%s is no longer in the config, and its proxy section is not known (no "
            "deploy history in %s: written by an older flipvisor, or lost): if it had a proxy "
            "file, delete that file and reload the proxy by hand",
            name,
            history.path,
        )
        return
    proxy = deployed.proxy
    if proxy is None:
        return
    if (writer := _writer_of(proxy.dest, proxy_files)) is not None:
        # Renamed, by the look of it: the new writer's promotion rewrites the file; removing it
        # meanwhile would take the new program out of the proxy.
        log.info(
            "program=%s is no longer in the config; its proxy file %s is left to %s, which "
            "writes it now",
            name,
            proxy.dest,
            writer,
        )
        return
    if await unroute(
        name,
        proxy,
        reaper=runtime.reaper,
        proxy_lock=runtime.proxy_lock,
        state_dir=runtime.state_dir,
        routed=routed,
        events=runtime.events,
    ):
        runtime.events.emit("unrouted", name, None, f"removed {proxy.dest}")
