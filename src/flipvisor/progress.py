"""The live report of one flip: its steps with their durations, and its outcome.

The flip runs in its program's task group; whoever asked for it (the CLI through the control
socket, or ``run`` at start-up) follows the report, so a client that goes away does not cancel
a deploy half-way. The report can finish before the flip does: a flip whose ``--timeout`` ran
out after the promotion answers then (with a ``warning``), and drains the old generation on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .proxy_lock import ProxyHolder

log = logging.getLogger(__name__)

UPDATE_BUFFER = 64
SHOWN_PIDS = 5  # in a step's detail: 400 workers' PIDs wrapped to ~40 lines, each time shown


def pid_list(pids: Iterable[int]) -> str:
    """``101, 102, 103, 104, 105 +395 more``: a step's PIDs, the first few ("-" if none);
    `status` lists them all."""
    pids = list(pids)
    shown = ", ".join(map(str, pids[:SHOWN_PIDS])) or "-"
    return shown + (f" +{len(pids) - SHOWN_PIDS} more" if len(pids) > SHOWN_PIDS else "")


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the event loop's cancellation (never, outside one: a step timed in
    plain code)."""
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except anyio.NoEventLoopError:
        return False


@dataclass(frozen=True)
class Rollback:
    """What began a flip's rollback: ``cause``, a failure's message (None: a cancellation, the
    flip's --timeout or a stop), at ``at`` (anyio's clock: before the flip's deadline, a
    cancellation was a stop's)."""

    cause: str | None
    at: float

    def by_a_stop(self, deadline: float) -> bool:
        """Whether a stop's cancellation began it (the flip's ``deadline`` had not come)."""
        return self.cause is None and self.at < deadline


@dataclass
class Step:
    """One step of a flip: ``spawn``, ``probe``, ``proxy``, ``registry``, ``reload``, ``drain``."""

    name: str
    detail: str = ""
    status: str = "running"  # running | ok | failed | skipped | cancelled (a stop called it off)
    started: float = field(default_factory=time.monotonic)
    duration: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "detail": self.detail,
            "duration": None if self.duration is None else round(self.duration, 4),
        }


class FlipReport:
    """Steps so far, a stream of updates for one follower, and the outcome once finished."""

    def __init__(self, program: str, kind: str = "flip") -> None:
        self.program = program
        self.kind = kind
        self.generation: int | None = None
        self.steps: list[Step] = []
        self.error: str | None = None
        self.warning: str | None = None  # it succeeded, but not all of it is done
        # Said with its success, in ``warning``: what the flip undid (a restart: a rollback).
        self.caution: str | None = None
        self.output: list[str] = []
        # Set when a failed flip could not reload the proxy back away from the new generation:
        # why, and what the operator must do. The flip's outcome must not then claim that the
        # previous generation keeps serving: the proxy may still send requests to the new one.
        self.stranded: str | None = None
        # Rolled back because the operator stopped the program (or the supervisor), not because
        # the flip failed: not counted, nor announced, as a failure.
        self.abandoned = False
        # Set when a stop (a reload's removal, the shutdown) calls the flip off: the step its
        # cancellation cuts short is ``cancelled``, not ``failed`` (a --timeout's still fails it).
        self.calling_off = False
        # Set when a --timeout cut the flip short in its probe: what the probe had learned (the
        # generation's last answer), the one fact that says what to fix.
        self.cut_short: str | None = None
        # Set when a cancellation (--timeout, a stop) cut a step short: the step that ran then,
        # for the flip's message; and, for its wait for the proxy, who held the proxy.
        self.interrupted: Step | None = None
        self.held_up_by: ProxyHolder | None = None
        # Set when a failed promotion's undo has put the proxy file and the keys back and goes
        # on to reload the proxy back: what is back, for a client answered before that ends.
        self.undone: str | None = None
        # Set when the flip begins to roll back (``rolling_back``): what began it, for a client
        # answered while the rollback runs (``flip_outcome.answer_rolling_back_at``).
        self.rollback: Rollback | None = None
        # Set once the routing steps succeeded: the new generation is promoted, never rolled
        # back, even if what completes the promotion (its journal's record removed) runs late.
        self.routed = False
        # Set when the client was answered while the rollback ran: how it ended is an event.
        self.answered_rolling_back = False
        # Set while a first start's promotion waits for the proxy (``proxy_patience.py``): why,
        # and when it tries again; in ``status``. Or while a flip waits for the proxy lock: who
        # holds it, read each time ``status`` asks (it may change hands meanwhile).
        self.waiting: str | Callable[[], str] | None = None
        self.started = time.monotonic()
        self.duration: float | None = None
        self._done = anyio.Event()
        self._send, self.updates = anyio.create_memory_object_stream[Step](UPDATE_BUFFER)

    @property
    def ok(self) -> bool:
        return self._done.is_set() and self.error is None

    @property
    def finished(self) -> bool:
        """Whether the outcome is out (its follower was answered)."""
        return self._done.is_set()

    def rolling_back(self, cause: str | None) -> None:
        """The flip begins to roll back after ``cause`` (None: a cancellation). The first call
        names what began it: a later one (the discard after a failed promotion) adds nothing."""
        if self.rollback is None:
            self.rollback = Rollback(cause, anyio.current_time())

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[Step]:
        """Time a step; it is ``failed`` if the block raises, ``cancelled`` if a stop calling
        the flip off (``calling_off``) cut it short."""
        current = Step(name, detail)
        self.steps.append(current)
        self._publish(current)
        try:
            yield current
        except BaseException as exc:
            cancelled = _is_cancellation(exc)
            current.status = "cancelled" if self.calling_off and cancelled else "failed"
            if self.interrupted is None and cancelled:
                self.interrupted = current  # the innermost step: the one the cancellation hit
            raise
        else:
            current.status = "ok"
        finally:
            current.duration = time.monotonic() - current.started
            self._publish(current)

    @property
    def running_step(self) -> str | None:
        """The name of the innermost step still running (a ``proxy-wait`` that ended inside a
        retried ``reload`` leaves the ``reload``), if one is."""
        running = (step for step in reversed(self.steps) if step.status == "running")
        return next((step.name for step in running), None)

    @property
    def current_step(self) -> str:
        """The name of the step under way: the running one (``running_step``), else the last."""
        if (running := self.running_step) is not None:
            return running
        return self.steps[-1].name if self.steps else "starting"

    def update(self, step: Step) -> None:
        """Send a running step again, its detail changed (a wait that goes on)."""
        self._publish(step)

    def _publish(self, step: Step) -> None:
        # Nobody follows, or too slowly: the final report still has every step.
        with contextlib.suppress(
            anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
        ):
            self._send.send_nowait(Step(**vars(step)))

    def finish(
        self,
        error: str | None = None,
        output: list[str] | None = None,
        *,
        warning: str | None = None,
    ) -> None:
        """The outcome: ``error`` if the flip failed; ``warning`` if it succeeded but left
        something under way, after its ``caution`` if any (steps after this are still recorded,
        not sent). Once only: a second outcome is ignored, as the follower has the first (a
        flip answered at its --timeout ends later)."""
        if self.finished:
            log.debug("program=%s: the flip's outcome is out already: %s", self.program, error)
            return
        self.error = error
        # A promoted flip that failed after (retiring what it replaced) still deployed what the
        # caution is about: it is said with the error. One not promoted deployed nothing.
        caution = self.caution if error is None or self.routed else None
        self.warning = "; ".join(said for said in (caution, warning) if said) or None
        self.output = output or []
        self.duration = time.monotonic() - self.started
        self._send.close()
        self._done.set()

    def fail_late(self, error: str, output: list[str] | None = None) -> None:
        """The flip failed after its outcome was out (answered at its --timeout, pending): its
        follower has the first answer, but its record (``record_flip``: events, counters) says
        it failed."""
        self.error = error
        self.output = output or []
        self.duration = time.monotonic() - self.started

    async def wait(self) -> None:
        await self._done.wait()

    def close(self) -> None:
        self.updates.close()

    def progress(self) -> dict[str, Any]:
        """Where a running flip is, for ``status``."""
        return {
            "kind": self.kind,
            "generation": self.generation,
            "step": self.current_step,
            "elapsed": round(time.monotonic() - self.started, 3),
            "waiting": self.waiting() if callable(self.waiting) else self.waiting,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "program": self.program,
            "kind": self.kind,
            "generation": self.generation,
            "ok": self.error is None,
            # Not ok, but no failure: rolled back because a stop (a reload's removal, the
            # shutdown) called it off.
            "abandoned": self.abandoned,
            "error": self.error,
            "warning": self.warning,
            "output": self.output,
            "duration": None if self.duration is None else round(self.duration, 4),
            "steps": [step.to_json() for step in self.steps],
        }


__all__ = ["FlipReport", "MemoryObjectReceiveStream", "Step"]
