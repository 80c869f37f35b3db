"""What holds a generation's socket, found by ``/proc/PID/fd``: a child of ours given it, not one
without it; a worker's (``claimed``) left to its generation's drain."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from flipvisor import socket_holders
from flipvisor.socket_holders import (
    SocketHolders,
    holders_anywhere,
    holders_out_of_reach,
    holds_socket,
    socket_inode,
)

WAIT_FOR_STDIN = [sys.executable, "-c", "import sys; sys.stdin.read()"]


@contextmanager
def child(*pass_fds: int) -> Iterator[subprocess.Popen[bytes]]:
    """A child of ours that runs until the block ends, holding ``pass_fds``."""
    process = subprocess.Popen(WAIT_FOR_STDIN, stdin=subprocess.PIPE, pass_fds=pass_fds)
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)


def test_the_child_holding_the_socket_is_its_holder_and_the_other_is_not() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        inode = socket_inode(sock)
        assert inode is not None
        with child(sock.fileno()) as holder, child() as other:
            assert holds_socket(holder.pid, inode)
            assert not holds_socket(other.pid, inode)
            # Neither this process, its owner, nor its child: a drain reaches those.
            assert holders_anywhere(inode) == []
            assert SocketHolders(inode, claimed=lambda pid: False).pids() == [holder.pid]
            # In a worker's process group: its generation's drain stops it, not this.
            assert SocketHolders(inode, claimed=lambda pid: pid == holder.pid).pids() == []
            # A previous supervisor's worker sharing the socket (recorded): not ours to stop.
            known = frozenset({holder.pid})
            assert SocketHolders(inode, lambda pid: False, known).pids() == []
        assert holders_anywhere(inode) == []
    assert socket_inode(sock) is None


# Forks a grandchild of the test that holds the fd argv[1] and runs until its stdin (the test's
# pipe) closes; prints its PID. Its parent (our child) waits for it, so it is never ours.
HOLDING_GRANDCHILD = """
import os, sys
pid = os.fork()
if pid == 0:
    sys.stdin.read()
    os._exit(0)
os.close(int(sys.argv[1]))
print(pid, flush=True)
os.waitpid(pid, 0)
"""


def test_what_holds_the_socket_out_of_reach_is_named_but_our_children_and_known_ones_not() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        inode = socket_inode(sock)
        assert inode is not None
        with (
            child(sock.fileno()) as ours,
            subprocess.Popen(
                [sys.executable, "-c", HOLDING_GRANDCHILD, str(sock.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(sock.fileno(),),
            ) as keeper,
        ):
            assert keeper.stdout is not None
            grandchild = int(keeper.stdout.readline())
            try:
                assert holds_socket(ours.pid, inode) and holds_socket(grandchild, inode)
                out_of_reach = SocketHolders(inode, claimed=lambda pid: False)
                assert anyio.run(holders_out_of_reach, out_of_reach) == [grandchild]
                known = SocketHolders(inode, lambda pid: False, known=frozenset({grandchild}))
                assert anyio.run(holders_out_of_reach, known) == []
            finally:
                assert keeper.stdin is not None
                keeper.stdin.close()
                keeper.wait(timeout=10)


def test_the_scan_runs_off_the_event_loop_and_gives_up_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading every process's descriptors may take long on a busy host: never on the loop (the
    reaper, every program wait on it); past ``SCAN_DEADLINE`` nothing is named."""
    loop_thread = threading.get_ident()
    scanned_in: list[int] = []
    release = threading.Event()

    def slow_scan(inode: int, known: frozenset[int]) -> list[int]:
        scanned_in.append(threading.get_ident())
        release.wait(timeout=30)  # until the test is done with it
        return [1]

    monkeypatch.setattr(socket_holders, "holders_anywhere", slow_scan)
    monkeypatch.setattr(socket_holders, "SCAN_DEADLINE", 0.2)
    try:
        assert anyio.run(holders_out_of_reach, SocketHolders(1, lambda pid: False)) == []
    finally:
        release.set()
    assert scanned_in and scanned_in[0] != loop_thread
