"""A short command run to completion (a check, a reload, an exec probe): bounded by a timeout,
the tail of its output kept, and nothing it started left running once it is done.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .output_pipe import OUTPUT_GRACE, read_available
from .reaper import Reaper
from .spawn import signal_pinned_group, spawn_with_output
from .strays import Strays

OUTPUT_TAIL_BYTES = 64 * 1024
# How long what a command that exited left in its process group gets to leave the group or exit
# before it is killed: a daemon it started (`nginx -s reload || nginx`) forks, its parent exits,
# and only then does the child call setsid, a moment that a loaded host can stretch.
SETSID_GRACE = 1.0
_SETSID_POLL = 0.01
# How long (and in how many rounds) what is killed in the group is waited for, so that what it
# left is found in turn.
_KILL_WAIT = 1.0
_KILL_ROUNDS = 5


@dataclass(frozen=True)
class CommandResult:
    """What a short-lived command did: its return code and the tail of its output."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    timed_out: bool = False
    # SIGKILLed, but the kernel still held it (uninterruptible sleep) when it was given up on.
    still_running: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One paragraph for an error message."""
        what = " ".join(self.argv)
        if self.still_running:
            head = f"`{what}` is still running after SIGKILL (uninterruptible sleep?)"
        elif self.timed_out:
            head = f"`{what}` timed out"
        elif self.returncode < 0:
            head = f"`{what}` was killed by {signal.Signals(-self.returncode).name}"
        else:
            head = f"`{what}` exited with status {self.returncode}"
        tail = self.output.strip()
        return f"{head}: {tail}" if tail else head


async def run_command(
    argv: Sequence[str],
    *,
    reaper: Reaper,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandResult:
    """Run a short command to completion (a check, a reload, an exec probe), bounded by ``timeout``.

    A command that outlives ``timeout`` has its process group killed and is reaped before this
    returns; so is one whose caller is cancelled. What one that exited by itself left in its
    group (re-parented to us) gets ``SETSID_GRACE`` to leave it (a daemon) or exit, then SIGKILL;
    the result of one that exited is returned even if the caller is cancelled meanwhile.

    Raises:
        SpawnError: it could not be started.
    """
    child, read_fd = spawn_with_output(
        argv, reaper=reaper, env=env if env is not None else os.environ, cwd=cwd
    )
    output = bytearray()
    exited = False
    try:
        # One task reads until end of output, then waits for the exit. The scope's deadline is
        # the timeout, and the exit brings it forward: a background process the command left
        # behind may hold its output open, so read what is there, but do not wait for it.
        with anyio.move_on_after(timeout) as scope:

            def on_exit() -> None:
                scope.deadline = min(scope.deadline, anyio.current_time() + OUTPUT_GRACE)

            child.exit.on_exit(on_exit)
            while chunk := await read_available(read_fd):
                output.extend(chunk)
                del output[:-OUTPUT_TAIL_BYTES]
            await child.wait()  # it closed its output; it may still be running
        timed_out = not child.exit.reaped
        exited = not timed_out
    finally:
        child.exit.on_exit(None)
        os.close(read_fd)
        try:
            # None: the kernel still holds it after SIGKILL (logged; ``still_running``).
            returncode = await child.stop(signal.SIGKILL, timeout=5.0)
            # Shielded, as its own bound (SETSID_GRACE + _KILL_WAIT) keeps it short: once the
            # exit is known, a caller's deadline running out meanwhile (an exec probe's
            # readiness timeout) must not turn a command that passed into one that "did not
            # finish", nor a shutdown leave the command's group running.
            with anyio.CancelScope(shield=True):
                await _stop_what_it_left(child.pid, patient=exited)
        finally:
            child.close()
    return CommandResult(
        tuple(argv),
        -signal.SIGKILL if returncode is None else returncode,
        output.decode("utf-8", "replace"),
        timed_out=timed_out,
        still_running=returncode is None,
    )


async def _stop_what_it_left(process_group: int, *, patient: bool) -> None:
    """SIGKILL what the command (the leader of ``process_group``) left running in its group;
    ``patient`` (it exited by itself): only what is still in the group ``SETSID_GRACE`` later,
    as a daemon leaves it only after its parent exited.

    Its members are found as our children (re-parented to us), each held by a pidfd while it
    is looked at (``Strays``), and found again round after round: a member's own children are
    re-parented to us only as it exits. One held and still in the group pins the group's ID,
    so the group is killed whole then, members that are not our children included.
    """
    if patient:
        with anyio.move_on_after(SETSID_GRACE):
            while True:
                with Strays.collect({process_group}) as left:
                    if not left:
                        break
                    with anyio.move_on_after(_SETSID_POLL):
                        await left.wait()
    # Bounded: a member the kernel holds after SIGKILL is not waited for past _KILL_WAIT.
    with anyio.move_on_after(_KILL_WAIT):
        for _ in range(_KILL_ROUNDS):
            with Strays.collect({process_group}) as left:
                if not left.pins(process_group) or not signal_pinned_group(
                    process_group, signal.SIGKILL
                ):
                    return
                await left.wait()
