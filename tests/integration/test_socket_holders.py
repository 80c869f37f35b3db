"""What holds a generation's socket, found by ``/proc/PID/fd``: a child of ours given it, not one
without it; a worker's (``claimed``) left to its generation's drain."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from flipvisor.socket_holders import SocketHolders, holders_anywhere, holds_socket, socket_inode

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
            assert holders_anywhere(inode) == [holder.pid]  # not this process, its owner
            assert SocketHolders(inode, claimed=lambda pid: False).pids() == [holder.pid]
            # In a worker's process group: its generation's drain stops it, not this.
            assert SocketHolders(inode, claimed=lambda pid: pid == holder.pid).pids() == []
        assert holders_anywhere(inode) == []
    assert socket_inode(sock) is None
