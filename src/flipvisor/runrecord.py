"""Where the supervisor of a config file listens, recorded under that file's real path.

The CLI finds its supervisor through the ``state_dir`` that the config file names. That fails while
the file is being edited (a YAML error), and once its ``state_dir`` changed, which takes effect only
when the supervisor restarts: every command said that no supervisor listens, and the ``flipvisor
run`` it suggested started a second supervisor for the same file. So ``run``, once its control
socket listens, records where: ``<runtime folder>/<hash of the config's real path>.json`` holds
the socket's path, the supervisor's PID, its start tick and boot id (``starttime.Identity``:
they do not move when the wall clock is stepped, as its start time does; that is kept too, for
people), and the config's real path; written atomically, mode 0600, removed when the supervisor
exits. A supervisor that was killed leaves its record behind: a record is believed only while its
PID names the live process of its start tick and boot id (not a zombie, which keeps both until its
parent reaps it). A client also needs its socket to answer (it
connects to it); ``run`` refuses whenever the recorded supervisor runs, answering or not (a busy
or stopped one is still the supervisor of the file), and replaces a stale record.

The runtime folder is ``$FLIPVISOR_RUNTIME_DIR`` if set; else ``/run/flipvisor`` for root; for
another user ``$XDG_RUNTIME_DIR/flipvisor`` and ``<temp dir>/flipvisor-<uid>`` (``run`` writes
to the first, clients read both: a service manager's supervisor may have no XDG_RUNTIME_DIR, the
operator's shell has one). A folder that another user can write to is never used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shlex
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import durable, json_text
from .starttime import Identity, Recorded, is_process, recorded_now

RUNTIME_ENV = "FLIPVISOR_RUNTIME_DIR"
ROOT_RUNTIME_DIR = Path("/run/flipvisor")
# How long ``answers`` waits for a connection to be accepted: a unix socket's connect returns at
# once unless the listener's backlog is full.
ANSWER_TIMEOUT = 5.0
MAX_RECORD_BYTES = 64 * 1024  # a record is ~200 bytes: anything longer is not one


@dataclass(frozen=True)
class RunRecord:
    """A supervisor: the config file it runs (its real path) and where it listens."""

    config: str
    socket_path: Path
    pid: int
    identity: Identity
    started: float  # its start time, for people: a clock step moves it (``starttime.py``)

    @property
    def state_dir(self) -> Path:
        """Its ``state_dir``: its socket is ``<state_dir>/flipvisor.sock`` (the contract)."""
        return self.socket_path.parent

    def encode(self) -> bytes:
        # The process as a generation record's entries name one (``pid``, ``ticks``, ``boot_id``,
        # ``started``); ``parse_record`` requires every one of them.
        process = Recorded(self.pid, self.identity, self.started).to_json()
        document = {"config": self.config, "socket": str(self.socket_path), **process}
        return json.dumps(document).encode()


def runtime_dirs(environ: Mapping[str, str] | None = None, euid: int | None = None) -> list[Path]:
    """The folders records may be in, the one ``run`` writes to first."""
    env = os.environ if environ is None else environ
    if override := env.get(RUNTIME_ENV):
        return [Path(override)]
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return [ROOT_RUNTIME_DIR]
    import tempfile  # only here: ``status`` reads no record when the file leads to its supervisor

    fallback = Path(tempfile.gettempdir()) / f"flipvisor-{uid}"
    xdg = env.get("XDG_RUNTIME_DIR")
    return [Path(xdg) / "flipvisor", fallback] if xdg else [fallback]


def real_config_path(config_path: Path) -> str:
    """The config file's real path (symlinks resolved; a file deleted since still has one): what
    a record is named by and names."""
    return os.path.realpath(config_path)


def record_path(folder: Path, config: str) -> Path:
    """The record of the supervisor of the config file whose real path is ``config``."""
    digest = hashlib.sha256(os.fsencode(config)).hexdigest()[:32]
    return folder / f"{digest}.json"


def private_folder(folder: Path) -> bool:
    """Whether ``folder`` is a folder of this user's that no other user can write to (so what is
    in it was written by this user or root). Under the shared temp dir, another user could have
    made it first and put a record there naming a socket of theirs."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def parse_record(data: bytes, config: str) -> RunRecord | None:
    """The record ``data`` holds, if it is a record of the config file whose real path is
    ``config``; None for anything else (not JSON, a field missing or of the wrong type, another
    file's record, one written before records held a start tick and boot id).

    Stricter than ``starttime.recorded_from_json``, which takes what older flipvisors and other
    writers put in a generation record (a PID or a start time as a string, no start tick):
    flipvisor alone writes this file, with every field.
    """
    try:
        document = json_text.loads(data)
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(document, dict) or document.get("config") != config:
        return None
    pid, started, sock = document.get("pid"), document.get("started"), document.get("socket")
    ticks, boot = document.get("ticks"), document.get("boot_id")
    if type(pid) is not int or pid <= 0:  # not a bool either
        return None
    if type(ticks) is not int or ticks < 0 or not isinstance(boot, str) or not boot:
        return None
    if (
        not isinstance(started, int | float)
        or isinstance(started, bool)
        or not math.isfinite(started)
    ):
        return None
    if not isinstance(sock, str) or not os.path.isabs(sock):
        return None
    return RunRecord(config, Path(sock), pid, Identity(ticks, boot), float(started))


def _bytes_of(path: Path) -> bytes | None:
    """A record file's content (None: unreadable, or too long to be one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_RECORD_BYTES + 1)
        except OSError:
            return None
    return data if len(data) <= MAX_RECORD_BYTES else None


def _read(path: Path, config: str) -> RunRecord | None:
    data = _bytes_of(path)
    return parse_record(data, config) if data is not None else None


def read_record(config_path: Path) -> RunRecord | None:
    """The record of the supervisor of ``config_path`` whose process still runs (its PID names
    the process of its start tick and boot id), or None: no record, or only stale ones. Whether
    its socket answers is the caller's to find out (a client connects to it anyway; ``run``
    refuses either way)."""
    config = real_config_path(config_path)
    for folder in runtime_dirs():
        if not private_folder(folder):
            continue
        record = _read(record_path(folder, config), config)
        if record is not None and is_process(record.pid, record.identity):
            return record
    return None


def record_listening_on(socket_path: Path, *, besides: int | None = None) -> RunRecord | None:
    """The record of a running supervisor, of whatever config file, that listens on
    ``socket_path`` (its state_dir is that one's), or did until its socket file was removed;
    None if none is recorded (or only stale ones). ``besides``: a PID whose record is left out (a
    supervisor that cannot listen on its path again, ``ControlServer``, asks who took it: not
    itself).

    For ``check`` and ``run`` of a file whose state_dir another file's supervisor uses: they name
    that file, and how to stop its supervisor. Reads every record in the runtime folders (one per
    running supervisor of this user's).
    """
    wanted = os.path.realpath(socket_path)
    for folder in runtime_dirs():
        if not private_folder(folder):
            continue
        try:
            names = [entry.name for entry in os.scandir(folder) if entry.name.endswith(".json")]
        except OSError:
            continue
        for name in sorted(names):
            data = _bytes_of(folder / name)
            try:
                config = json_text.loads(data or b"null").get("config")
            except (ValueError, AttributeError):  # not JSON, or not an object
                continue
            if not isinstance(config, str) or record_path(folder, config).name != name:
                continue  # not a record, or not under its file's name
            record = parse_record(data or b"", config)
            if (
                record is not None
                and record.pid != besides
                and os.path.realpath(record.socket_path) == wanted
                and is_process(record.pid, record.identity)
            ):
                return record
    return None


def answers(socket_path: Path, timeout: float = ANSWER_TIMEOUT) -> bool:
    """Whether something accepts connections on the unix socket ``socket_path`` (the supervisor
    takes a connection that ends without a request in silence). A unix socket's connect returns
    at once unless the listener's backlog is full: then it is alive, only busy."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(socket_path))
    except (BlockingIOError, TimeoutError):
        return True  # its backlog is full: alive
    except OSError:  # no such file, refused (a dead socket), not a socket
        return False
    finally:
        probe.close()
    return True


def unreachable(config_path: Path, record: RunRecord) -> str:
    """What is wrong, and what to do, when the supervisor ``record`` names runs but nothing
    answers on its socket path: the file there was removed (by hand, by a temp cleaner) or is not
    its own any more. SIGHUP makes it listen there again (``ControlServer.relisten``)."""
    gone = (
        "is gone (removed by hand, or by a temp cleaner?)"
        if not os.path.lexists(record.socket_path)
        else "does not answer (the file there is not its own: replaced?)"
    )
    return (
        f"the supervisor of {config_path} runs (pid {record.pid}), but its control socket "
        f"{record.socket_path} {gone}. `kill -HUP {record.pid}` makes it listen there again "
        f"(it also re-reads {config_path}, as `flipvisor reload` would); a second `flipvisor run` "
        "is refused while it runs"
    )


def listening_already(
    socket_path: Path, record: RunRecord | None, *, answering: bool = True
) -> str:
    """What keeps a supervisor from listening on ``socket_path``, where another supervisor (that
    of another config file: ``record``, if recorded) listens, and what to do. Not ``answering``:
    ``record``'s socket file was removed (or replaced), so that nothing answers there now."""
    if record is None:
        return (
            f"a supervisor is already listening on {socket_path} (not recorded as this user's: "
            "another user's, or one that could not record where it listens); stop it (`flipvisor "
            "-c <its config file> shutdown`, or SIGTERM), or give this file another state_dir"
        )
    if not answering:
        # Binding the path would work, and two supervisors would share the logs, the history.
        stop = f"flipvisor -c {shlex.quote(record.config)} shutdown"
        return (
            f"{unreachable(Path(record.config), record)}. This file's state_dir is that "
            f"file's too: once it listens again, stop it (`{stop}`), or give this file a "
            "state_dir of its own"
        )
    return (
        f"the supervisor of {record.config} (pid {record.pid}) already listens on "
        f"{socket_path}: this file's state_dir is that file's too. Stop it first: `flipvisor -c "
        f"{shlex.quote(record.config)} shutdown`, or give this file a state_dir of its own"
    )


def write_record(config_path: Path, socket_path: Path) -> Path:
    """Record that this process, the supervisor of ``config_path``, listens on ``socket_path``
    (replacing a stale record); returns the record's path, for ``remove_record``.

    Raises:
        OSError: the runtime folder cannot be created, another user can write to it, or the
            record cannot be written.
    """
    folder = runtime_dirs()[0]
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not private_folder(folder):
        raise PermissionError(
            errno.EPERM, "not a folder of this user's that only it can write to", str(folder)
        )
    pid = os.getpid()
    me = recorded_now(pid)  # its start tick, boot id and start time, from one read
    if me is None or me.identity is None or me.started is None:
        raise FileNotFoundError(errno.ENOENT, "cannot read this process's start tick", "/proc")
    config = real_config_path(config_path)
    record = RunRecord(config, Path(os.path.abspath(socket_path)), pid, me.identity, me.started)
    path = record_path(folder, config)
    # A record of this file's that a kill tore: only its supervisor writes it, and that is us
    # (the folder is shared by every config's supervisor: their temporaries are theirs).
    durable.remove_torn(folder, of=lambda name: name == path.name)
    # Written beside it and renamed into place, durably: a reader never sees half a record,
    # and a crash never leaves an empty one.
    durable.write_atomic(path, record.encode(), 0o600)
    return path


def remove_record(path: Path) -> None:
    """Remove the record at ``path`` if it is still this process's (a ``run`` that found this
    supervisor not answering may have replaced it since). Best effort: a record left behind is
    stale once this process is gone."""
    with contextlib.suppress(OSError, ValueError):  # gone already, or not a record
        document = json_text.loads(path.read_bytes())
        if isinstance(document, dict) and document.get("pid") == os.getpid():
            path.unlink()
