"""A neutral observer of process creation: the Linux proc connector (netlink), which the kernel
tells about every fork, exec and exit with a CLOCK_MONOTONIC timestamp taken as it happens.

Workload (b) uses it to time a supervisor's reaction to a crash without asking the supervisor
anything: polling a control interface every few ms measures the polling, and the status calls
wake the very daemon being timed. Works in the initial user and PID namespaces, for any user
since Linux 6.6 and with CAP_NET_ADMIN (root) before; ``ProcWatch.open`` returns None with the
reason otherwise (it waits, bounded, for the kernel's ack), and (b) falls back to polling.

Only the stdlib: socket.AF_NETLINK and struct, laid out as in <linux/connector.h> and
<linux/cn_proc.h>.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psutil

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_NONE = 0  # also the ack of a listen request
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
SO_RCVBUFFORCE = 33  # as root: past net.core.rmem_max

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # id.idx, id.val, seq, ack, len, flags
EVENT_HEADER = struct.Struct("=IIQ")  # what, cpu, timestamp_ns (aligned 8: header is 16 bytes)
FORK = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
PIDS = struct.Struct("=ii")  # exec / exit: process_pid, process_tgid (exit: then code, signal)
ACK = struct.Struct("=I")  # err

RECV_TIMEOUT = 0.05  # the receive loop checks for close() this often
LISTEN_ACK_TIMEOUT = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class Fork:
    """A new process (not a thread) in the watched tree, at ``ns`` (CLOCK_MONOTONIC)."""

    ns: int
    parent: int  # the forking process's tgid
    child: int


class ProcWatch:
    """Listens from ``open`` until ``close``; records every process forked inside the tree
    rooted at ``root`` (the descendants known at ``open``, then each fork as it arrives), and the
    exit time of every process in that tree. All waits take a timeout."""

    def __init__(self, sock: socket.socket, root: int) -> None:
        self._sock = sock
        self.root = root
        self.tree: set[int] = {root}
        with contextlib.suppress(psutil.Error):
            self.tree.update(p.pid for p in psutil.Process(root).children(recursive=True))
        self.forks: list[Fork] = []
        self.execs: dict[int, int] = {}  # tgid → ns of its latest exec
        self.exits: dict[int, int] = {}  # tgid → ns of its exit
        self.lost = 0  # ENOBUFS: the kernel dropped events (receive buffer full)
        self.error: str | None = None
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="procwatch", daemon=True)
        self._thread.start()

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, root: int) -> tuple[ProcWatch | None, str]:
        """Subscribe to process events; (watch, "") or (None, why it is unavailable)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except (OSError, AttributeError) as exc:
            return None, f"no netlink connector socket: {exc}"
        try:
            for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, 8 * 2**20)
                    break
            sock.bind((0, CN_IDX_PROC))
            sock.settimeout(RECV_TIMEOUT)
            _listen(sock)
        except OSError as exc:
            sock.close()
            return None, f"proc connector refused: {exc}"
        watch = cls(sock, root)
        return watch, ""

    # -- receiving (thread) -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                if not self._closing.is_set():
                    self.error = f"receive failed: {exc}"
                break
            try:
                self._parse(data)
            except struct.error as exc:  # a truncated message: say so rather than die silently
                self.error = f"unparsable message: {exc}"
                break
        with self._changed:
            self._changed.notify_all()

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            length = NLMSGHDR.unpack_from(data, offset)[0]
            if length < NLMSGHDR.size:
                break
            body = offset + NLMSGHDR.size
            idx, val, _, _, size, _ = CN_MSG.unpack_from(data, body)
            event = body + CN_MSG.size
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC) and size >= EVENT_HEADER.size:
                self._event(data, event)
            offset += (length + 3) & ~3  # NLMSG_ALIGN

    def _event(self, data: bytes, offset: int) -> None:
        what, _, ns = EVENT_HEADER.unpack_from(data, offset)
        offset += EVENT_HEADER.size
        if what == PROC_EVENT_FORK:
            _, parent_tgid, child_pid, child_tgid = FORK.unpack_from(data, offset)
            if child_pid != child_tgid or parent_tgid not in self.tree:
                return  # a thread, or outside the tree
            with self._changed:
                self.tree.add(child_tgid)
                self.forks.append(Fork(ns, parent_tgid, child_tgid))
                self._changed.notify_all()
        elif what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT):
            pid, tgid = PIDS.unpack_from(data, offset)
            if tgid not in self.tree or (what == PROC_EVENT_EXIT and pid != tgid):
                return  # outside the tree, or one thread of a process ending
            with self._changed:
                (self.execs if what == PROC_EVENT_EXEC else self.exits)[tgid] = ns
                self._changed.notify_all()

    # -- waiting ------------------------------------------------------------------------
    def _wait(self, found: Callable[[], T | None], timeout: float) -> T | None:
        """``found()`` once it is not None, or None after ``timeout`` s (or if the receiver
        stopped)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = found()
                remaining = deadline - time.monotonic()
                if value is not None or remaining <= 0 or not self._thread.is_alive():
                    return value
                self._changed.wait(min(remaining, RECV_TIMEOUT))

    def exit_ns(self, pid: int, timeout: float) -> int | None:
        """When ``pid`` (a process of the tree) exited, or None if not within ``timeout`` s."""
        return self._wait(lambda: self.exits.get(pid), timeout)

    def first_fork(self, after_ns: int, timeout: float) -> Fork | None:
        """The first process forked in the tree at or after ``after_ns`` (CLOCK_MONOTONIC)."""
        return self._wait(lambda: next((f for f in self.forks if f.ns >= after_ns), None), timeout)

    def forks_after(self, after_ns: int) -> list[Fork]:
        with self._changed:
            return [f for f in self.forks if f.ns >= after_ns]

    def lineage(self, pid: int) -> list[int]:
        """``pid`` and its forking ancestors as seen since ``open`` (youngest first)."""
        with self._changed:
            parents = {f.child: f.parent for f in self.forks}
        chain = [pid]
        while chain[-1] in parents and len(chain) < 64:
            chain.append(parents[chain[-1]])
        return chain

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _listen(sock: socket.socket) -> None:
    """Send PROC_CN_MCAST_LISTEN and wait (bounded) for the kernel's ack: an error in it (no
    CAP_NET_ADMIN before Linux 6.6) or none at all (another PID or user namespace) means that no
    event would ever come."""
    # The ack goes to every listener, with our cn_msg.ack + 1: a random one tells ours apart.
    nonce = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    payload = struct.pack("=I", PROC_CN_MCAST_LISTEN)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, nonce, len(payload), 0) + payload
    header = NLMSGHDR.pack(NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, 0)
    sock.send(header + cn)
    deadline = time.monotonic() + LISTEN_ACK_TIMEOUT
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        offset = 0
        while offset + NLMSGHDR.size + CN_MSG.size + EVENT_HEADER.size <= len(data):
            length = NLMSGHDR.unpack_from(data, offset)[0]
            body = offset + NLMSGHDR.size
            idx, val, _, ack, _, _ = CN_MSG.unpack_from(data, body)
            event = body + CN_MSG.size
            what = EVENT_HEADER.unpack_from(data, event)[0]
            if (idx, val, what, ack) == (CN_IDX_PROC, CN_VAL_PROC, PROC_EVENT_NONE, nonce + 1):
                err = ACK.unpack_from(data, event + EVENT_HEADER.size)[0]
                if err:
                    raise OSError(err, f"listen refused: {os.strerror(err)}")
                return
            if length < NLMSGHDR.size:
                break
            offset += (length + 3) & ~3
    raise OSError(errno.ETIMEDOUT, "no ack to the listen request (events not delivered here)")
