"""What is wrong across the sections of a config whose keys are each valid: two programs on one
fixed port, two writers of one proxy file, unix socket paths too long to bind, ``watch:`` entries
acting on a program the same config runs; and ``check``'s warnings about what is valid but likely a
mistake (those ``watch:`` entries, a drain by SIGKILL).

Each problem is placed at the line of the key it is about (``ConfigFile.problem``).
"""

from __future__ import annotations

import ipaddress
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from .problems import Problem, nearest_line
from .usable import host_port, listen_addresses, parse_listen

if TYPE_CHECKING:
    from .config_file import ConfigFile

# The bytes of a unix socket's path (sun_path without its NUL): the control and notify sockets.
MAX_SOCKET_PATH = 107
# Digits of a generation number (restarting at 1 with the supervisor) allowed for in a notify
# socket's name (``<program>-<N>.sock``).
GENERATION_DIGITS = 4


def problems_across_keys(parsed: ConfigFile) -> list[Problem]:
    """The errors across ``parsed``'s sections (not in the file's order)."""
    return [
        *_shared_fixed_ports(parsed),
        *_shared_proxy_files(parsed),
        *_long_socket_paths(parsed),
        *_watched_programs(parsed, warnings=False),
    ]


def sigkill_warnings(parsed: ConfigFile) -> list[Problem]:
    """``check``'s warnings about a drain by SIGKILL (``drain.signal``, ``drain_pid.signal``).

    Allowed, since it does stop the workers (an app that handles no signal, whose requests all
    end within ``drain.delay``, loses nothing), but it cannot be handled: whatever a worker still
    holds after the delay is cut off, and the timeout's graceful window is never used."""
    said = (
        "SIGKILL cannot be handled: {what} killed at once, with the requests {holder} still "
        "holds; SIGTERM lets {holder} finish them, and SIGKILL follows at the timeout"
    )
    workers = said.format(what="the workers are, after drain.delay,", holder="each")
    found = [
        parsed.problem(("programs", name, "drain", "signal"), workers, warning=True)
        for name, program in parsed.config.programs.items()
        if program.drain.signal == signal.SIGKILL
    ]
    found += [
        parsed.problem(
            ("watch", str(index), "drain_pid", "signal"),
            said.format(what="the process is", holder="it"),
            warning=True,
        )
        for index, entry in enumerate(parsed.config.watch)
        if entry.drain_pid is not None and entry.drain_pid.signal == signal.SIGKILL
    ]
    return found


def watch_warnings(parsed: ConfigFile) -> list[Problem]:
    """``check``'s warnings about ``watch:`` entries that act on a program of ``programs:``."""
    return _watched_programs(parsed, warnings=True)


def _watched_programs(parsed: ConfigFile, *, warnings: bool) -> list[Problem]:
    """``watch:`` entries on the keys of a program the same config runs (``warnings``: those
    that are warnings, else the errors).

    A ``drain_pid`` on its ``pid/previous`` is an error with ``rollback_window``: the replaced
    generation is kept running on purpose, and the watcher would kill it (the program then
    goes fatal, and the rollback has nothing to go back to). Without one it is a warning: the
    supervisor drains the replaced generation itself, after its proxy's reload, while the
    watcher's drain waits only for the watch's own templates. A template entry rendering the
    program's keys when the program has no ``proxy:`` is a warning: a flip waits for its
    ``proxy:`` (check, reload, the proxy's old workers gone) before it drains, but not for a
    watch entry's render, check and reload, so a slow check routes to a drained generation.
    """
    config, problems = parsed.config, []
    prefix = config.registry.prefix
    for index, entry in enumerate(config.watch):
        for name, program in config.programs.items():
            folder = f"{prefix}/{name}/"
            found = None
            if entry.drain_pid is not None and entry.keys[0] == folder + "pid/previous":
                with_window = program.rollback_window > 0
                if with_window != warnings:  # an error with a window, else a warning
                    found = _drains_a_program(parsed, index, name, with_window=with_window)
            elif (
                warnings
                and entry.template is not None
                and program.proxy is None
                and any(pattern.startswith(folder) for pattern in entry.keys)
            ):
                found = _renders_a_program(parsed, index, name)
            if found is not None:
                problems.append(found)
    return problems


def _drains_a_program(parsed: ConfigFile, index: int, name: str, *, with_window: bool) -> Problem:
    """Watch entry ``index``'s ``drain_pid`` drains program ``name``'s replaced generations: an
    error ``with_window`` (its ``rollback_window``), else a warning."""
    said = f"drains programs.{name}'s replaced generations, which the supervisor drains itself"
    if with_window:
        said += (
            ": with its rollback_window the generation kept warm for a rollback "
            "would be killed (and the program go fatal)"
        )
    else:
        said += " (after its proxy's reload; this entry waits only for the watch's)"
    return parsed.problem(
        ("watch", str(index), "drain_pid"),
        f"{said}; remove this entry (drain_pid is for services flipvisor does not run)",
        warning=not with_window,
    )


def _renders_a_program(parsed: ConfigFile, index: int, name: str) -> Problem:
    """Watch entry ``index``'s template renders the keys of program ``name``, which has no
    ``proxy:`` section: a warning."""
    return parsed.problem(
        ("watch", str(index), "template"),
        f"renders programs.{name}'s keys, but a flip of {name} does not wait "
        "for this entry's render, check and reload before it drains the old "
        f"generation (after drain.delay): give programs.{name} a proxy: "
        "section instead, which a flip waits for",
        warning=True,
    )


def _long_socket_paths(parsed: ConfigFile) -> list[Problem]:
    """Unix sockets the supervisor would create in state_dir whose path is too long to bind: the
    control socket (``run`` could not start), a program's notify socket (its flips would fail)."""
    config, problems = parsed.config, []
    control = config.socket_path
    if len(os.fsencode(control)) > MAX_SOCKET_PATH:
        problems.append(
            parsed.problem(
                ("state_dir",),
                f"{config.state_dir} is too long: the control socket {control} would be "
                f"{len(os.fsencode(control))} bytes, and a unix socket's path holds "
                f"{MAX_SOCKET_PATH}; choose a shorter state_dir",
            )
        )
    for name, program in config.programs.items():
        if program.readiness is None or not program.readiness.notify:
            continue
        notify = config.state_dir / "notify" / f"{name}-{'9' * GENERATION_DIGITS}.sock"
        if len(os.fsencode(notify)) > MAX_SOCKET_PATH:
            problems.append(
                parsed.problem(
                    ("programs", name, "readiness", "notify"),
                    f"the notify socket {notify.parent}/{name}-<generation>.sock would be longer "
                    f"than the {MAX_SOCKET_PATH} bytes a unix socket's path holds; choose a "
                    "shorter state_dir or program name",
                )
            )
    return problems


def _shared_fixed_ports(parsed: ConfigFile) -> list[Problem]:
    """Programs given the same fixed port (the same host, or either on a wildcard address), or
    the port ``metrics.listen`` takes. Only one could bind it, so the other would fail at every
    start (the supervisor binds the metrics endpoint first): said here, for ``check``."""
    problems = []
    # Port -> (the key that takes it, host): the metrics endpoint first, as `run` binds it.
    taken: dict[int, list[tuple[str, str]]] = {}
    if (metrics := parsed.config.metrics) is not None:
        host, port = parse_listen(metrics.listen)
        taken[port] = [("metrics.listen", host)]
    for name, program in parsed.config.programs.items():
        host, port = program.socket.host, program.socket.port
        if port == 0:
            continue
        clash = next(
            ((key, other) for key, other in taken.get(port, []) if addresses_overlap(host, other)),
            None,
        )
        if clash is not None:
            owner, owner_host = clash
            why = (
                "the supervisor's metrics endpoint listens there"
                if owner == "metrics.listen"
                else "each fixed port belongs to one program"
            )
            # Each address said as whose it is: the program's `::` is not the metrics endpoint's.
            ours, theirs = host_port(host, port), host_port(owner_host, port)
            taken_how = (
                f"is {owner}'s already" if ours == theirs else f"overlaps {owner}'s {theirs}"
            )
            problems.append(
                parsed.problem(("programs", name, "socket", "port"), f"{ours} {taken_how} ({why})")
            )
        taken.setdefault(port, []).append((f"programs.{name}", host))
    return problems


def _shared_proxy_files(parsed: ConfigFile) -> list[Problem]:
    """Files written by two writers: programs' ``proxy.dest`` and watch entries' ``dest``, however
    spelled (``a/../a/x.conf``, a symlinked folder). Each writer rewrites the whole file for
    itself (a program at every flip, a watch entry at every change of its keys), so the other's
    routing would be lost, and removing a program would leave the file naming a drained port.
    The writer further down the file is the one reported.

    This compares the programs of one file; a reload that removes one program and adds another
    with the same dest (a rename) is a handover between two files, and allowed."""
    config, lines = parsed.config, parsed.lines
    writers: list[tuple[tuple[str, ...], Path]] = [
        (("programs", name, "proxy", "dest"), program.proxy.dest)
        for name, program in config.programs.items()
        if program.proxy is not None
    ]
    writers += [
        (("watch", str(index), "dest"), entry.dest)
        for index, entry in enumerate(config.watch)
        if entry.dest is not None
    ]
    writers.sort(key=lambda writer: nearest_line(writer[0], lines) or 0)
    problems = []
    owners: dict[str, tuple[str, ...]] = {}
    for loc, dest in writers:
        # realpath, not Path.resolve: it never raises (a symlink loop stays as spelled).
        real = os.path.realpath(dest)
        owner = owners.setdefault(real, loc)
        if owner == loc:
            continue
        spelled = str(dest) if str(dest) == real else f"{dest} (that is {real})"
        if owner[0] == loc[0] == "programs":
            why = "each proxy file belongs to one program, which rewrites all of it at every flip"
            fix = "give each program its own dest"
        else:
            why = (
                "a file has one writer: a program rewrites all of it at every flip, a watch entry "
                "at every change of its keys"
            )
            fix = "give each its own dest"
        problems.append(
            parsed.problem(loc, f"{spelled} is {'.'.join(owner)} already ({why}); {fix}")
        )
    return problems


def addresses_overlap(host: str, other: str) -> bool:
    """Whether listening on both addresses (on one port) would collide. A name (``localhost``
    in ``metrics.listen``) stands for every address it resolves to (as its listener binds)."""
    if host == other:
        return True
    return any(_collide(a, b) for a in _addresses(host) for b in _addresses(other))


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _addresses(host: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return [ipaddress.ip_address(found) for found in listen_addresses(host)]


def _collide(a: IPAddress, b: IPAddress) -> bool:
    if a == b:
        return True
    if a.version == b.version:
        return a.is_unspecified or b.is_unspecified
    # `::` takes the IPv4 port too: a program's socket is dual-stack (no IPV6_V6ONLY).
    v6 = a if a.version == 6 else b
    return v6.is_unspecified
