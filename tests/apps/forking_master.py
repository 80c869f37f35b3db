"""A worker shaped like a pre-fork server's master: it starts a child whenever the test opens a
gate, as a master replaces a worker or a worker spawns a helper.

``forking_master.py MARKERS GATES [--stubborn]``: writes ``START <pid>`` to MARKERS, then for
N = 1, 2, ... waits for the file ``GATES.N`` and forks a child (which execs this file again as
``--child``). The gate's content says what the child is: ``plain`` (the master's environment and
process group), ``scrubbed`` (an empty environment, the master's process group), ``own-group``
(the master's environment, a session of its own) or ``stubborn`` (like ``plain``, ignoring
SIGTERM). Each writes ``CHILD <pid>`` once it runs (after its exec).

On SIGTERM each writes ``TERM <pid>`` and exits 0, unless stubborn (the master with
``--stubborn``). Each exits 1 by itself after a few minutes at most: a test that failed must not
leave them running for long. Stdlib only, and nothing from flipvisor.
"""

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable

LIFETIME = 300.0
POLL = 0.05


def mark(markers: str, word: str) -> None:
    with open(markers, "a") as f:
        f.write(f"{word} {os.getpid()}\n")


def wait_for_term(
    markers: str, *, stubborn: bool, on_tick: Callable[[], None] | None = None
) -> None:
    """Until SIGTERM (blocked: collected here, no handler), or the lifetime, then exit."""
    ends = time.monotonic() + LIFETIME
    while time.monotonic() < ends:
        if signal.sigtimedwait({signal.SIGTERM}, POLL) is not None:
            mark(markers, "TERM")
            if not stubborn:
                sys.exit(0)
        if on_tick is not None:
            on_tick()
    sys.exit(1)


def fork_child(markers: str, kind: str) -> None:
    if os.fork() != 0:
        return
    if kind == "own-group":
        os.setsid()
    env = {} if kind == "scrubbed" else dict(os.environ)
    os.execve(sys.executable, [sys.executable, __file__, "--child", markers, kind], env)


def master(markers: str, gates: str, *, stubborn: bool) -> None:
    mark(markers, "START")
    forked = 0

    def open_gates() -> None:
        nonlocal forked
        gate = f"{gates}.{forked + 1}"
        if os.path.exists(gate):
            with open(gate) as f:
                kind = f.read().strip()
            forked += 1
            fork_child(markers, kind)
        with contextlib.suppress(ChildProcessError):  # reap a child that exited, as a master does
            os.waitpid(-1, os.WNOHANG)

    wait_for_term(markers, stubborn=stubborn, on_tick=open_gates)


def child(markers: str, kind: str) -> None:
    mark(markers, "CHILD")
    wait_for_term(markers, stubborn=kind == "stubborn")


signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited across fork and exec
if sys.argv[1] == "--child":
    child(sys.argv[2], sys.argv[3])
else:
    master(sys.argv[1], sys.argv[2], stubborn="--stubborn" in sys.argv[3:])
