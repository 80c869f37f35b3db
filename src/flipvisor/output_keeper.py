"""The output keeper: a small process that holds the read end of every worker's output pipe for
its supervisor, so that the workers of a supervisor that was killed do not die at their next write.

Without it, a SIGKILLed (or OOM-killed) supervisor takes the only read end of each pipe with it:
the workers' next write to stdout or stderr fails with EPIPE, and SIGPIPE's default action ends
any program that does not ignore it (a Go binary, a shell). The keeper is the pattern of
s6-fdholder and systemd's fd store: a process that outlives the one reading.

``flipvisor run`` starts one (``kept_outputs.OutputKeeper``; none as PID 1: ``why_no_keeper``),
with one end of a SOCK_SEQPACKET socket pair on fd 3. Each message is a JSON object; a ``hold``
carries the pipe's read end (SCM_RIGHTS) and what its lines are logged as, a ``release`` names one
given up, ``exit`` means the supervisor is exiting cleanly. While the supervisor runs, the keeper
only holds: the supervisor reads. At end of file without ``exit`` the supervisor is gone, and the
keeper reads every pipe it holds into its program's log (``ProgramLog``, the same format and
rotation) until its writers are all gone, or until the next ``run`` connects to
``<state_dir>/keeper.sock``: it is then handed every pipe, with what each is logged as and the
start of the line its worker is in the middle of, and the keeper exits. SIGTERM, SIGINT, SIGHUP and
SIGQUIT are ignored while the supervisor runs (it says when to exit) and end the keeper once it is
orphaned.

Only the standard library and ``logs``/``log_lines``/``file_identity`` are imported, and it runs
without ``site`` (``-S``; its ``PYTHONPATH`` names this flipvisor): it is one more process on the
host for as long as the supervisor runs, so it stays small (about 13 MiB resident, 8 of them the
interpreter's own).
"""

from __future__ import annotations

import array
import binascii
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from .file_identity import identity_of, unlink_if_ours
from .log_lines import split_lines, split_long
from .logs import ProgramLog

CONTROL_FD = 3  # the keeper's end of the socket pair (``spawn_process``'s listen_fd)
HANDOVER_SOCKET = "keeper.sock"  # in state_dir: shorter than the control socket's name
MAX_MESSAGE = 4096  # a message's JSON; the tags are a program name, a path and a prefix
# At a handover, the start of the line a worker is in the middle of goes with its pipe (base64
# in the ``hold``), so that the next run logs the line whole; a longer start is logged here, cut.
MAX_HANDED_LINE = 32 * 1024
HANDOVER_MESSAGE = 64 * 1024  # a handover's message: a tag and up to MAX_HANDED_LINE in base64
HANDOVER_TIMEOUT = 5.0  # a client that stops reading cannot hold the keeper forever
READ_SIZE = 256 * 1024
END = b'{"op": "end"}'  # the last message of a handover


# Plain classes, not dataclasses: importing dataclasses (and inspect with it) costs the keeper
# about a megabyte for as long as it runs.
class LogLimits(NamedTuple):
    """``logs.LogLimits`` as a ``hold`` message gives them."""

    max_bytes: int
    backups: int


class Held:
    """One pipe's read end and what its lines are logged as."""

    __slots__ = ("fd", "pending", "tag")

    def __init__(self, fd: int, tag: dict[str, Any]) -> None:
        self.fd = fd
        self.tag = tag  # program, log, prefix, max_bytes, backups: sent back at a handover
        self.pending = b""  # the start of a line not ended yet (read only once orphaned)


def send_with_fd(sock: socket.socket, message: bytes, fd: int | None) -> None:
    """Send one message, with ``fd`` attached (SCM_RIGHTS) when given.

    Raises:
        OSError: as ``socket.sendmsg`` (BlockingIOError on a full non-blocking socket).
    """
    rights = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([message], rights)


def receive_with_fds(sock: socket.socket, size: int = MAX_MESSAGE) -> tuple[bytes, list[int]]:
    """One message (cut at ``size`` bytes) and the descriptors attached to it (close-on-exec);
    (b"", []) at end of file.

    Raises:
        OSError: as ``socket.recvmsg``.
    """
    fds = array.array("i")
    data, ancillary, _flags, _address = sock.recvmsg(
        size, socket.CMSG_SPACE(16 * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return data, list(fds)


class Keeper:
    """The keeper's state: the pipes it holds, and whether its supervisor is gone."""

    def __init__(self, control: socket.socket, handover_path: Path, supervisor: int) -> None:
        self.control: socket.socket | None = control
        self.handover_path = handover_path
        self.supervisor = supervisor
        self.held: dict[int, Held] = {}  # by the supervisor's key
        self.logs: dict[str, ProgramLog] = {}  # by path, once orphaned
        self._noted: set[str] = set()  # the logs told that the keeper writes them
        self.listener = self._listen()
        self._bound = identity_of(handover_path)
        # Once handed over, the path is the new run's to remove: it does, before its own keeper
        # binds there; removed from here, it could be that new keeper's socket already.
        self._handed_over = False

    def _listen(self) -> socket.socket:
        """Bind the handover socket (replacing a stale one: only our supervisor starts us, after
        it took over from whatever keeper was there)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.handover_path.unlink(missing_ok=True)
        listener.bind(os.fsencode(self.handover_path))
        listener.listen(4)
        return listener

    def run(self) -> int:
        """Hold, then read once orphaned, until nothing is left or a handover; the exit code."""
        # A process of its own, without an event loop: a plain handler is its signal reader.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)  # noqa: TID251
        try:
            while self.control is not None or self.held:
                self._wait_and_handle()
            return 0
        except _Done:
            return 0
        finally:
            if not self._handed_over:
                self._forget_handover_path()
            for log in self.logs.values():
                log.close()

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        """While the supervisor runs, it says when to exit: a SIGTERM sent to everything at
        once (systemd's control-group stop) must not take the pipes from the workers it drains.
        Once orphaned, a stop signal is the operator's: the keeper exits."""
        if self.control is None:
            raise _Done

    def _wait_and_handle(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        by_fd: dict[int, int] = {}  # the pipes read, once orphaned
        if self.control is not None:
            poller.register(self.control, select.POLLIN)
        else:
            by_fd = {held.fd: key for key, held in self.held.items()}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
        ready = [fd for fd, _events in poller.poll()]
        # Every message the supervisor sent before anything else: its end of file may be among
        # them (a keeper slow to run hears of its death and of the next run at once), and that
        # run must then be handed the pipes, not refused as while the supervisor lives.
        while self.control is not None and _readable(self.control):
            self._control_message()
        if self.listener.fileno() in ready:
            self._hand_over()
        for fd in ready:
            if fd in by_fd:
                self._read(by_fd[fd])

    def _control_message(self) -> None:
        """Handle one message of the supervisor. One that is not as ``kept_outputs`` sends them
        (a bug, or a message cut at ``MAX_MESSAGE``) is said in the errors file (our stderr) and
        changes nothing: the socket keeps each message whole (SOCK_SEQPACKET), so the next one
        is read as it was sent. Only the socket itself failing ends the keeper (a traceback
        there; the supervisor starts another one)."""
        assert self.control is not None
        data, fds = receive_with_fds(self.control)
        if not data:  # the supervisor is gone, and never said it exits: keep its workers'
            self.control.close()
            self.control = None
            self._orphaned()
            return
        try:
            problem = self._obey(data, fds)
        finally:
            for fd in fds:  # those not held: never leak one
                os.close(fd)
        if problem is not None:
            say(f"ignored a message of the supervisor ({problem}): {data[:200]!r}")

    def _obey(self, data: bytes, fds: list[int]) -> str | None:
        """Carry out one message (a descriptor held is taken out of ``fds``); what is wrong with
        it, if anything (then nothing changed; but a hold with more than one descriptor holds
        the first, as before)."""
        try:
            message = json.loads(data)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            return "not JSON"
        if not isinstance(message, dict):
            return "not a JSON object"
        op, key = message.get("op"), message.get("key")
        if op == "exit":
            raise _Done
        if op not in ("hold", "release"):
            return f"unknown op {op!r:.40}"
        if not isinstance(key, int) or isinstance(key, bool):
            return f"{op} of key {key!r:.40}, not an integer"
        if op == "release":
            if (gone := self.held.pop(key, None)) is not None:
                os.close(gone.fd)
            return None
        if (problem := tag_problem(message.get("tag"))) is not None:
            return problem
        if not fds:
            return "a hold without a descriptor"
        previous = self.held.pop(key, None)
        if previous is not None:
            os.close(previous.fd)
        self.held[key] = Held(fds.pop(0), message["tag"])
        return f"a hold with {len(fds) + 1} descriptors; held the first" if fds else None

    def _orphaned(self) -> None:
        """Say in each log that the keeper now writes it, and until when."""
        for held in self.held.values():
            log = self._log_of(held)
            if log is not None and held.tag["log"] not in self._noted:
                self._noted.add(held.tag["log"])
                log.note(
                    f"the supervisor (pid {self.supervisor}) is gone: its workers' output is "
                    f"logged by its output keeper (pid {os.getpid()}) until the next "
                    "`flipvisor run` takes it over"
                )

    def _log_of(self, held: Held) -> ProgramLog | None:
        path = held.tag["log"]
        if path not in self.logs:
            limits = LogLimits(int(held.tag["max_bytes"]), int(held.tag["backups"]))
            try:
                self.logs[path] = ProgramLog(Path(path), limits)
            except OSError:  # its folder is gone: the output is read (the writers live) and lost
                return None
        return self.logs[path]

    def _read(self, key: int) -> None:
        held = self.held[key]
        log = self._log_of(held)
        try:
            chunk = os.read(held.fd, READ_SIZE)
        except BlockingIOError:
            return
        if chunk:
            lines, held.pending = split_lines(held.pending, chunk)
        else:  # every writer closed it
            lines, held.pending = ([held.pending] if held.pending else []), b""
            os.close(held.fd)
            del self.held[key]
        if lines and log is not None:
            log.write_lines(held.tag["prefix"], split_long(lines))
            log.flush()

    def _hand_over(self) -> None:
        """Give every pipe to the ``run`` that connected, and exit; refused while our own
        supervisor runs (it reads them)."""
        connection, _address = self.listener.accept()
        with connection:
            uid = struct_ucred_uid(connection)
            if self.control is not None or uid not in (os.getuid(), 0):
                return
            connection.settimeout(HANDOVER_TIMEOUT)
            # A message can be as long as the send buffer: room for a hold with its line's start
            # even where the default buffer is small (the kernel caps this at wmem_max).
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * HANDOVER_MESSAGE)
            for held in self.held.values():
                log = self._log_of(held)
                if len(held.pending) > MAX_HANDED_LINE:  # too long to send: logged, cut here
                    if log is not None:
                        log.write_lines(held.tag["prefix"], [held.pending])
                    held.pending = b""
                if log is not None:
                    log.flush()
            try:
                for held in self.held.values():
                    send_with_fd(connection, _handed_hold(held), held.fd)
                connection.sendall(END)
            except OSError:
                # The new run went away: it has nothing. Hold on as before, on the listener and
                # path we had all along (never given up before the handover is done: a re-bind
                # would remove whatever is there then, a newer keeper's socket maybe), so that
                # the run after it, queued on this listener already maybe, reaches us.
                return
        self._handed_over = True  # the run that took the pipes removes the path
        raise _Done

    def _forget_handover_path(self) -> None:
        """Unlink the handover socket if it is still ours (a new keeper may have bound it; a stat
        and an unlink are two calls: only for exits that no new keeper follows at once)."""
        unlink_if_ours(self.handover_path, self._bound)


def _handed_hold(held: Held) -> bytes:
    """The ``hold`` that hands ``held`` over: its tag, and the start of the line its worker is
    in the middle of (the next run prepends it to what it reads)."""
    message: dict[str, Any] = {"op": "hold", "tag": held.tag}
    if held.pending:
        message["pending"] = binascii.b2a_base64(held.pending, newline=False).decode("ascii")
    return json.dumps(message).encode()


def tag_problem(tag: object) -> str | None:
    """What is wrong with a ``hold``'s tag (what its pipe is logged as, and handed over with),
    if anything: held as it is, a tag missing a field would end the keeper once orphaned."""
    if not isinstance(tag, dict):
        return "a hold without a tag"
    for field in ("program", "log", "prefix"):
        if not isinstance(tag.get(field), str) or not tag[field]:
            return f"a tag without its {field}"
    for field, least in (("max_bytes", 1), ("backups", 0)):
        value = tag.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"a tag whose {field} is {value!r:.40}"
    return None


def say(text: str) -> None:
    """A line in the errors file (our stderr: ``kept_outputs`` opens it), with the time."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"{when} output keeper (pid {os.getpid()}): {text}", file=sys.stderr, flush=True)


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has a message (or its end of file) to receive now."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def struct_ucred_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    _pid, uid, _gid = array.array("i", creds)
    return uid


class _Done(Exception):
    """The keeper's work is over: its supervisor exited cleanly, or a handover took the pipes."""


def main(argv: list[str] | None = None) -> int:
    """``python -m flipvisor.output_keeper STATE_DIR SUPERVISOR_PID``, started by ``run``."""
    args = sys.argv[1:] if argv is None else argv
    state_dir, supervisor = Path(args[0]), int(args[1])
    control = socket.socket(fileno=CONTROL_FD)
    return Keeper(control, state_dir / HANDOVER_SOCKET, supervisor).run()


if __name__ == "__main__":
    sys.exit(main())
