"""A short command run to completion (a check, a reload, an exec probe): bounded by a timeout,
the tail of its output kept, and nothing it started left running once it is done.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from . import spawn
from .output_pipe import OUTPUT_GRACE, read_available
from .reaper import Reaper
from .spawn import Child, spawn_with_output
from .strays import Strays

log = logging.getLogger(__name__)

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
            how = "timed out and is still" if self.timed_out else "is still"
            head = f"`{what}` {how} running after SIGKILL (uninterruptible sleep?)"
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
    group (re-parented to us) gets ``SETSID_GRACE`` to leave it (a daemon) or exit, then SIGKILL.
    Once its exit was seen, its result is returned even if the caller is cancelled while what
    it left is stopped; a caller cancelled before that (while its last output is read, up to
    ``OUTPUT_GRACE`` after the exit) gets the cancellation, though the command is stopped all
    the same.

    Raises:
        SpawnError: it could not be started.
    """
    child, read_fd = spawn_with_output(
        argv, reaper=reaper, env=env if env is not None else os.environ, cwd=cwd
    )
    output = bytearray()
    exited = False  # by itself, seen before any cancellation
    try:
        await _read_until_exit(child, read_fd, output, timeout)
        timed_out = not child.exit.reaped
        exited = not timed_out
    finally:
        child.exit.on_exit(None)
        os.close(read_fd)
        try:
            returncode = await _stop(child, argv, patient=exited)
        finally:
            child.close()
    return CommandResult(
        tuple(argv),
        -signal.SIGKILL if returncode is None else returncode,
        output.decode("utf-8", "replace"),
        timed_out=timed_out,
        still_running=returncode is None,
    )


async def _read_until_exit(child: Child, read_fd: int, output: bytearray, timeout: float) -> None:
    """Keep the tail of ``child``'s output in ``output`` until it exited, or ``timeout``.

    One task reads until end of output, then waits for the exit. The scope's deadline is the
    timeout, and the exit brings it forward: a background process the command left behind may
    hold its output open, so read what is there, but do not wait for it.
    """
    with anyio.move_on_after(timeout) as scope:

        def on_exit() -> None:
            scope.deadline = min(scope.deadline, anyio.current_time() + OUTPUT_GRACE)

        child.exit.on_exit(on_exit)
        while chunk := await read_available(read_fd):
            output.extend(chunk)
            del output[:-OUTPUT_TAIL_BYTES]
        await child.wait()  # it closed its output; it may still be running


async def _stop(child: Child, argv: Sequence[str], *, patient: bool) -> int | None:
    """SIGKILL the command's group (if it still runs) and what it left there; its return code,
    None if the kernel still holds it after SIGKILL (said here: no event reports it)."""
    returncode = await child.stop(signal.SIGKILL, timeout=5.0)
    if returncode is None:
        log.warning(
            "`%s` (pid=%d) is still running %gs after SIGKILL (uninterruptible sleep?); "
            "no longer waited for",
            " ".join(argv),
            child.pid,
            spawn.KILL_GRACE,
        )
    # Shielded, as its own bound (SETSID_GRACE + _KILL_WAIT) keeps it short: a caller's deadline
    # running out meanwhile (an exec probe's readiness timeout) must not turn a command that
    # passed into one that "did not finish". A cancellation (a shutdown) is only held up by as
    # much: it goes on once what the command left is killed.
    with anyio.CancelScope(shield=True):
        await _stop_what_it_left(child.pid, patient=patient)
    return returncode


async def _stop_what_it_left(process_group: int, *, patient: bool) -> None:
    """SIGKILL what the command (the leader of ``process_group``) left running in its group;
    ``patient`` (it exited by itself): only what is still in the group ``SETSID_GRACE`` later,
    as a daemon leaves it only after its parent exited.

    Its members are found as our children (re-parented to us), held by pidfds from the first
    look on, right after the command was reaped, and found again round after round: a
    member's own children are re-parented to us only as it exits. The group is killed whole
    (members that are not our children included) only while one of those held is still
    running in it (``Strays.signal_group``).
    """
    with Strays.collect({process_group}) as held:
        if patient:
            with anyio.move_on_after(SETSID_GRACE):
                while held.keep_only_in(process_group, also_found=True):
                    with anyio.move_on_after(_SETSID_POLL):
                        await held.wait()
            held.keep_only_in(process_group, also_found=True)  # as the grace ran out
        # Bounded: a member the kernel holds after SIGKILL is not waited for past _KILL_WAIT.
        with anyio.move_on_after(_KILL_WAIT):
            for _ in range(_KILL_ROUNDS):
                if not held.signal_group(process_group, signal.SIGKILL):
                    return
                await held.wait()
                held.keep_only_in(process_group, also_found=True)
        if held.keep_only_in(process_group):  # given up on: the wait or the rounds ran out
            log.warning(
                "process group %d: pid %s still running %gs after SIGKILL (uninterruptible "
                "sleep?); no longer waited for",
                process_group,
                ",".join(map(str, held.pids)),
                _KILL_WAIT,
            )
