"""A first start's proxy reload, retried until the proxy takes it.

When nothing serves a program yet (its first generation, at ``run`` or at ``start`` of a stopped
program), a proxy reload that fails has nothing to protect: undoing the promotion would only stop
a ready generation and leave the proxy file naming an earlier run's port. At boot that is the
common case, not a broken release: nginx starts after flipvisor. So the promotion keeps the
generation, its checked file and its keys, and retries the reload (``promotion.py``; the check
first, each time), with a backoff from ``PROXY_RETRY_MIN`` doubling up to ``PROXY_RETRY_MAX``,
for as long as it takes. A failed first *check* is not retried: it rolls the start back, as
the contract says of any flip (a broken template or proxy config is no outage to wait out).
Neither is a reload nginx did not apply (``ProxyReloadNotTaken``, with the proxy's ``pidfile``):
nginx is up and refuses the config with our file in it, which would make it refuse every other
program's reload too while the file stayed; the start is rolled back, the file taken away. A
re-check before a retry that fails is waited out like a failed reload: our file passed its check,
so the rest of the proxy's config broke meanwhile, and rolling back could not reload either. Each
failure is a warning in the log; the wait is in ``status`` (the flip's ``waiting``) and
``events`` (``proxy-waiting``, at the first failure and whenever the reason changes, so a long
outage does not push every other event out of the history; the reason is compared without what
differs between two attempts that failed alike, the timestamp and PID nginx puts before each line
it logs, ``same_reason``). ``start`` retries at once; ``stop``,
a reload's removal and the shutdown end the wait, and a worker that fails the generation ends it
too (the promotion is undone as after a failure).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import anyio

from .errors import ProxyError
from .events import EventLog
from .generation import Generation
from .progress import FlipReport, Step

log = logging.getLogger(__name__)

# Retried after 1 s, then 2, 4, 8, then every 10 s: a proxy started after the supervisor (nginx
# at boot) is taken within seconds, and a long outage costs a check and a reload per 10 s.
PROXY_RETRY_MIN = 1.0
PROXY_RETRY_MAX = 10.0

# nginx's log line prefix, "2026/12/02 06:57:36 [error] 24800#24800: " (and "*12 ", a connection's
# number, after it): the time of the attempt and the PID of the `nginx -s reload` process, new
# at every attempt. Its level stays: an [emerg] is not the [error] it follows.
_NGINX_LOG_PREFIX = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[[a-z]+\]) \d+#\d+: (?:\*\d+ )?")


def same_reason(error: str) -> str:
    """``error`` as the reason of a failed attempt, to compare with the previous attempt's: the
    text without nginx's log prefixes, which differ every time for the same failure."""
    return _NGINX_LOG_PREFIX.sub(r"\1 ", error)


class ProxyPatience:
    """The wait of one promotion for the proxy: its failed attempts, its backoff, its wake-up."""

    def __init__(self, gen: Generation, events: EventLog, report: FlipReport) -> None:
        self.gen = gen
        self.events = events
        self.report = report
        self.failures = 0
        self._delay = PROXY_RETRY_MIN
        self._last_reason: str | None = None  # ``same_reason`` of the last failure
        self._wake = anyio.Event()
        # Set once the attempt after a wake-up is over (``retry_now`` waits for it).
        self._attempted: anyio.Event | None = None

    async def wait(self, failure: ProxyError, step: Step) -> None:
        """After ``failure`` of ``step``: say so, then wait out the backoff, until ``retry_now``
        or until a worker fails the generation (the caller checks ``gen.ensure_whole()``)."""
        self.failures += 1
        delay, self._delay = self._delay, min(PROXY_RETRY_MAX, self._delay * 2)
        error = str(failure)
        program, number = self.gen.program, self.gen.number
        log.warning(
            "program=%s generation %d is ready, but the proxy did not take it (attempt %d): %s; "
            "trying again in %gs",
            program,
            number,
            self.failures,
            error,
            delay,
        )
        if (reason := same_reason(error)) != self._last_reason:
            self.events.emit(
                "proxy-waiting",
                program,
                number,
                f"generation {number} is ready, but the proxy did not take it: {error}; "
                f"tried again every {PROXY_RETRY_MAX:g}s at most until it does "
                f"(`flipvisor start {program}` tries at once, `flipvisor stop {program}` gives up)",
                attempt=self.failures,
            )
            self._last_reason = reason
        step.detail = self.report.waiting = (
            f"waiting for the proxy: attempt {self.failures} failed: {error}; next in {delay:g}s"
        )
        self.report.update(step)
        self._attempt_over()
        async with anyio.create_task_group() as race:

            async def until(event: Callable[[], Awaitable[object]]) -> None:
                await event()
                race.cancel_scope.cancel()

            race.start_soon(until, self._wake.wait)
            race.start_soon(until, self.gen.wait_failed)
            race.start_soon(until, lambda: anyio.sleep(delay))
        self._wake = anyio.Event()

    def over(self) -> None:
        """The step succeeded, or the promotion ended: nothing waits any more."""
        if self.failures:
            log.info(
                "program=%s generation %d: the proxy took it after %d failed attempt(s)",
                self.gen.program,
                self.gen.number,
                self.failures,
            )
        self.report.waiting = None
        self._attempt_over()

    async def retry_now(self) -> None:
        """Cut the backoff short (``start`` while it waits) and return once that attempt is
        over, whatever its outcome."""
        if self._attempted is None:
            self._attempted = anyio.Event()
        attempted = self._attempted
        self._wake.set()
        await attempted.wait()

    def _attempt_over(self) -> None:
        if self._attempted is not None:
            self._attempted.set()
            self._attempted = None
