"""The CLI's side of the control socket: plain blocking sockets, so a status call stays quick.

A client finds its supervisor on the socket of the ``state_dir`` its config file names. When the
file cannot be read (an edit under way: a YAML error) or nothing listens there (its ``state_dir``
changed, which takes effect when the supervisor restarts), the supervisor's run record
(``runrecord.py``) says where the supervisor of that file listens: ``reach`` uses it, with a notice
for the operator. A recorded supervisor that runs but does not answer on its socket (the file was
removed) is said to be so, with what brings its socket back: not "start one with `flipvisor run`",
which it would refuse.

Every request through ``reach`` names the file's real path (``config_file``): a supervisor refuses
a request for another file than its own, whatever the command. Otherwise a file whose state_dir
was edited to name another supervisor's (a copy-paste slip) would have ``stop``, ``shutdown`` and
the rest act on that other supervisor's programs.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ControlUnreachable
from .locate import Locations, locate
from .protocol import MAX_LINE, Request, decode

if TYPE_CHECKING:
    from .runrecord import RunRecord

STATUS_TIMEOUT = 30.0  # a status is built at once: longer means the supervisor is stuck
# How much of the answer one read takes: a status of 200 programs (60-80 KB) in one recv. With
# the default 8 KiB, readline reads it in eight or more, each through Python-level socket code:
# about 40 µs of the round trip on the benchmark machine.
READ_BUFFER = 256 * 1024


class NotListening(ControlUnreachable):
    """Nothing listens on the control socket: no socket file, or its supervisor is gone (or
    runs, its socket file removed)."""


@dataclass
class Reached:
    """A connection to the supervisor of a config file, where that supervisor keeps its files,
    and, when it was found through its run record, what the operator should be told.
    ``config_file`` is the file's real path, sent with every request (``converse``)."""

    connection: socket.socket
    locations: Locations
    notice: str | None = None
    config_file: str | None = None


def connect(path: Path, timeout: float | None = None) -> socket.socket:
    """A connection to the supervisor listening on ``path`` (``timeout`` applies to it).

    Raises:
        NotListening: nothing listens on ``path``.
        ControlUnreachable: this user may not connect to it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise NotListening(
            f"no supervisor is listening on {path} (start one with `flipvisor run`)"
        ) from exc
    except PermissionError as exc:
        sock.close()
        raise ControlUnreachable(
            f"permission denied on {path}: {exc.strerror}; run flipvisor as the user that "
            "runs the supervisor (or root)"
        ) from exc
    except OSError as exc:
        sock.close()
        if exc.errno is not None:
            raise
        # Python's own "AF_UNIX path too long" (no errno: refused before any system call),
        # which `check` says of the config file; no supervisor can have listened there.
        raise NotListening(
            f"no supervisor can listen on {path}: {exc} ({len(os.fsencode(path))} bytes); "
            "choose a shorter state_dir (`flipvisor check` says how long it may be)"
        ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def reach(config_path: Path, timeout: float | None = None) -> Reached:
    """Connect to the supervisor of ``config_path``: on the socket of the state_dir the file
    names; if the file cannot be read, or nothing listens there, on the one its run record names
    (with a notice saying why).

    Raises:
        ConfigError: the file cannot be read, and no supervisor of it is recorded as running.
        ControlUnreachable: no supervisor of the file answers (NotListening: saying so of a
            recorded one that runs), or this user may not connect to it.
    """
    # Resolved as the supervisor resolves its own (symlinks, a relative path): both name the
    # file the same way (``Commands._same_file``).
    config_file = os.path.realpath(config_path)
    try:
        where = locate(config_path)
    except ConfigError as broken:
        try:
            found = _through_record(config_path, timeout)
        except NotListening as deaf:
            raise NotListening(f"{broken}; {deaf}") from deaf
        if found is None:
            raise
        connection, record = found
        notice = (
            f"{broken}; the supervisor of {config_path} (pid {record.pid}, listening on "
            f"{record.socket_path}) runs on with the config it last read"
        )
        return Reached(connection, Locations(record.state_dir, frozenset()), notice, config_file)
    try:
        return Reached(connect(where.socket_path, timeout), where, config_file=config_file)
    except NotListening:
        found = _through_record(config_path, timeout)
        if found is None:
            raise
    connection, record = found
    if record.state_dir == where.state_dir:  # it started listening meanwhile
        return Reached(connection, where, config_file=config_file)
    moved = _moved(config_path, record, where)
    return Reached(connection, Locations(record.state_dir, where.programs), moved, config_file)


def logs_locations(config_path: Path) -> tuple[Locations, str | None]:
    """Where the supervisor of ``config_path`` keeps its logs, and a notice: the state_dir the
    file names, unless the file cannot be read or no supervisor ever listened there (no socket
    file) while the file's recorded supervisor runs, with a state_dir of its own.

    Raises:
        ConfigError: the file cannot be read, and no supervisor of it is recorded as running.
    """
    from .runrecord import read_record

    try:
        where = locate(config_path)
    except ConfigError as broken:
        if (record := read_record(config_path)) is None:
            raise
        notice = (
            f"{broken}; the supervisor of {config_path} (pid {record.pid}) runs on with the "
            f"config it last read, and writes its logs in {record.state_dir}"
        )
        return Locations(record.state_dir, frozenset()), notice
    if where.socket_path.exists():  # a stat: the usual case reads no record
        return where, None
    record = read_record(config_path)
    if record is None or record.state_dir == where.state_dir:
        return where, None
    return Locations(record.state_dir, where.programs), _moved(config_path, record, where)


def _through_record(
    config_path: Path, timeout: float | None
) -> tuple[socket.socket, RunRecord] | None:
    """A connection to the supervisor the run record of ``config_path`` names, if it runs
    (None: no record, or a stale one).

    Raises:
        NotListening: it runs, but nothing answers on its socket (the file was removed).
    """
    from .runrecord import read_record, unreachable

    record = read_record(config_path)
    if record is None:
        return None
    try:
        return connect(record.socket_path, timeout), record
    except NotListening as exc:
        # It runs (its PID, start tick and boot id): "start one" would be refused.
        raise NotListening(unreachable(config_path, record)) from exc


def _moved(config_path: Path, record: RunRecord, where: Locations) -> str:
    return (
        f"the supervisor of {config_path} (pid {record.pid}) listens on {record.socket_path}; "
        f"the file's state_dir changed to {where.state_dir}, which takes effect when that "
        "supervisor restarts"
    )


def converse(
    target: Path | Reached,
    request: Request,
    timeout: float | None = None,
    on_waiting: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Send ``request`` to the supervisor listening on ``target`` (a socket path, or the
    connection ``reach`` made, which this closes: the request then names its config file) and
    yield each message of the answer, the final ``result`` last.

    ``waiting`` lines (the supervisor is still starting; ``timeout`` counts from the last of
    them) go to ``on_waiting`` instead.

    Raises:
        ControlUnreachable: nothing listens on ``target`` (NotListening), it went away
            mid-answer, or it did not answer within ``timeout`` seconds.
    """
    sock, path, request = _connection_for(target, request, timeout)
    try:
        try:
            sock.sendall(request.encode())
        except ConnectionError as exc:  # not a BrokenPipeError of stdout's (cli.py)
            raise ControlUnreachable(f"the supervisor on {path} closed the connection") from exc
        reader = sock.makefile("rb", buffering=READ_BUFFER)
        with reader:
            while True:
                message = decode(_answer_line(reader, path, timeout))
                if message.get("type") == "waiting":
                    if on_waiting is not None:
                        on_waiting(str(message.get("message", "")))
                    continue
                yield message
                if message.get("type") == "result":
                    return
    finally:
        sock.close()


def _connection_for(
    target: Path | Reached, request: Request, timeout: float | None
) -> tuple[socket.socket, Path, Request]:
    """``converse``'s connection to ``target`` and the socket's path, and the request to send on
    it (naming the config file ``reach`` was given).

    Raises:
        ControlUnreachable: nothing listens on ``target`` (a socket path).
    """
    if isinstance(target, Reached):
        sock = target.connection
        sock.settimeout(timeout)
        if target.config_file is not None:
            request = replace(request, args={**request.args, "config_file": target.config_file})
        return sock, target.locations.socket_path, request
    return connect(target, timeout), target, request


def _answer_line(reader: io.IOBase, path: Path, timeout: float | None) -> bytes:
    """The next line of the supervisor's answer.

    Raises:
        ControlUnreachable: it went away (before the end of a line, too), or did not answer
            within ``timeout`` seconds.
    """
    try:
        line = reader.readline(MAX_LINE)
    except TimeoutError as exc:
        raise ControlUnreachable(
            f"the supervisor on {path} did not answer within {timeout:g} s (it may "
            "be stuck: its log says what it is doing)"
        ) from exc
    except ConnectionError as exc:  # reset: it died with bytes of ours unread
        raise ControlUnreachable(f"the supervisor on {path} closed the connection") from exc
    if not line or (not line.endswith(b"\n") and len(line) < MAX_LINE):
        # Nothing, or the start of a line it died while writing: gone, not malformed.
        raise ControlUnreachable(f"the supervisor on {path} closed the connection")
    return line


def call(
    target: Path | Reached,
    request: Request,
    timeout: float | None = STATUS_TIMEOUT,
    on_waiting: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Send ``request`` and return only the final ``result`` message.

    Raises:
        ControlUnreachable: nothing listens on ``target``.
    """
    final: dict[str, Any] = {}
    for message in converse(target, request, timeout, on_waiting):
        final = message
    return final
