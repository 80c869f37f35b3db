"""Whether a folder, a file or a listen address the config names can be used on this host, said
in a sentence.

Shared by ``flipvisor check`` (before anything runs: it creates, writes and binds nothing that
lasts) and by the run-time errors (after a create, a write or a bind failed), so that both name
the real problem: "File exists" from a ``mkdir`` whose parent is a file, or "choose a free port"
for an address that does not exist, sent operators to the wrong place.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from pathlib import Path

import psutil

SHOWN_HOLDERS = 3  # a gunicorn on the port is a master and its workers: name a few


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def this_user() -> str:
    """``this user (alice, uid 1000)``: whom a permission refers to (``check`` may be run by
    another user than ``run``)."""
    uid = os.geteuid()
    try:
        return f"this user ({pwd.getpwuid(uid).pw_name}, uid {uid})"
    except KeyError:
        return f"this user (uid {uid})"


def closed_folder(path: Path, *, itself: bool = False) -> Path | None:
    """The first folder on the way to ``path`` (from / down; ``itself``: ``path`` too, a
    folder to work in) that this user may not enter, or None. A folder that does not exist
    ends the search: what is missing is another problem.

    ``os.stat`` of a folder inside one that may not be entered fails with EACCES, so the
    closed one is found by asking each in turn (``os.access``, with the real uid).
    """
    path = Path(os.path.abspath(path))
    on_the_way = [*reversed(path.parents), *([path] if itself else [])]
    for folder in on_the_way:
        try:
            mode = os.stat(folder).st_mode
        except PermissionError:
            return folder  # reached through a link whose own way is closed
        except OSError:
            return None
        if not stat.S_ISDIR(mode):
            return None
        if not os.access(folder, os.X_OK):
            return folder
    return None


def closed_folder_problem(folder: Path) -> str:
    """``this user (alice, uid 1000) may not enter FOLDER (permission denied)``."""
    return f"{this_user()} may not enter {folder} (permission denied)"


def _not_writable(folder: Path) -> str:
    return f"{folder} is not writable by this user (uid {os.geteuid()})"


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be created (with its parents) and written into, or None.

    ``os.access`` asks the kernel with the real uid: root passes mode bits, but not a read-only
    file system.
    """
    if (closed := closed_folder(folder)) is not None:
        return f"cannot create or write into {folder}: {closed_folder_problem(closed)}"
    if os.path.lexists(folder):
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return _not_writable(folder)
        return None
    ancestor = _nearest_existing(folder)
    if not ancestor.is_dir():
        return f"cannot create {folder}: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {folder}: {_not_writable(ancestor)}"
    return None


def file_problem(path: Path) -> str | None:
    """Why a file cannot be written to ``path`` atomically (a temporary file in its folder,
    renamed over it; missing folders created), or None."""
    if (closed := closed_folder(path)) is not None:
        return f"cannot write {path}: {closed_folder_problem(closed)}"
    if path.is_dir():
        return f"{path} is a folder; name a file"
    return folder_problem(path.parent)


def host_port(host: str, port: int) -> str:
    """``host:port`` for a message, an IPv6 address bracketed (``[::]:8080``, not ``:::8080``,
    where the port could not be told from the address): ``parse_listen`` reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:9100`` (or ``[::1]:9100``, ``http://`` accepted) as host and port."""
    rest = listen.removeprefix("http://").removeprefix("https://")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def listen_error(host: str, port: int, exc: OSError) -> str:
    """What a failed listen on ``host:port`` means, and what to do, by its cause."""
    where = f"cannot listen on {host_port(host, port) if port else host}"
    if isinstance(exc, socket.gaierror):
        return (
            f"{where}: {host!r} is not an address ({exc.strerror}); use an IP address of this "
            "host, such as 127.0.0.1"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this host; use one of its own, or 0.0.0.0"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use; choose a free port, or stop what holds this one"
    if exc.errno == errno.EACCES:
        return f"{where}: a port below 1024 needs root; choose a port >= 1024"
    return f"{where}: {exc.strerror or exc}"


def listen_addresses(host: str) -> list[str]:
    """The addresses a listener on the name ``host`` binds (``localhost``: 127.0.0.1 and ::1);
    none if it does not resolve (``listen_problem`` says so)."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({str(address[0]).partition("%")[0] for *_, address in found})


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None: the address must resolve and be this
    host's. The port itself is not bound (the running supervisor may hold it), so a port in use
    is found only when ``run`` binds it."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return listen_error(host, port, exc)
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind((address[0], 0, *address[2:]))  # port 0: nothing to collide with
            except OSError as exc:
                return listen_error(host, port, exc)
    return None


def port_holders(port: int) -> dict[int, str]:
    """The processes (PID -> name) listening on TCP ``port`` that this user can see (root sees
    every one; another user's come without a PID, and are left out)."""
    try:
        found = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return {}
    holders: dict[int, str] = {}
    for conn in found:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if conn.pid is None or conn.pid in holders:
            continue
        try:
            holders[conn.pid] = psutil.Process(conn.pid).name()
        except psutil.Error:
            continue  # gone meanwhile
    return holders


def in_use(host: str, port: int, holders: dict[int, str]) -> str:
    """``cannot listen on host:port: the port is in use by pid N (name)``, the holders named."""
    if not holders:
        return (
            f"cannot listen on {host_port(host, port)}: the port is in use by a process this user "
            "cannot see"
        )
    shown = [f"pid {pid} ({name})" for pid, name in sorted(holders.items())[:SHOWN_HOLDERS]]
    more = len(holders) - SHOWN_HOLDERS
    return f"cannot listen on {host_port(host, port)}: the port is in use by {', '.join(shown)}" + (
        f" and {more} more" if more > 0 else ""
    )
