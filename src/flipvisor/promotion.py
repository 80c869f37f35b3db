"""Promotion of a ready generation, in the contract's order, each step paired with its undo:

write + check the proxy file → registry transaction → reload the proxy (``promote``), then wait
for the proxy's old workers (``wait_for_proxy``). A failure until the reload finished undoes what
was done, in reverse order, inside a bounded shield: the proxy file and the registry keys end as
they were, and the proxy routes to the old generation (it is reloaded back if its reload may have
taken effect: one that failed, as a wrapper that reloads and then fails a later step does, one cut
short by a timeout, or one followed by a worker's exit), before the caller stops the new
generation. If that reload back fails, the report says so (``FlipReport.stranded``): the proxy may
still route to the new generation. Between the steps, a worker that exited fails the promotion:
without a readiness probe, that is the only sign that a release is broken. Once ``promote``
returned, the new generation is routed to and nothing is undone: the wait for the proxy's old
workers is the first step of retiring the old generation, kept apart so that a flip's
``--timeout`` can end at the promotion. A first start with nothing serving retries a failed
reload instead (``proxy_patience.py``): the proxy is down, and there is nothing to go back to.

What the proxy step replaces is recorded in the promotion's journal (``proxy_journal.py``)
before any file changes; the record is removed once the promotion is complete (routed, the reload
done) or undone, so that one left behind tells the next ``run`` that a supervisor was killed
in between (``proxy_recovery.py``).

This module holds the order, the proxy lock and the wait; the steps with their undos are
``promotion_steps.py``, and undoing them after a failure is ``promotion_undo.py``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import anyio

from .config import ProgramConfig, ProxyConfig
from .errors import ProxyError
from .generation import Generation
from .printable import count
from .progress import FlipReport, Step
from .promotion_steps import (
    Pause,
    Reloading,
    Undo,
    proxy_file_step,
    registry_step,
    reload_step,
)
from .promotion_undo import undo_promotion
from .proxy import Routing
from .proxy_journal import ProxyJournal
from .proxy_lock import Describe, ProxyLock
from .proxy_lock_wait import flip_holder, holding_proxy, retake
from .proxy_patience import ProxyPatience
from .proxy_workers import wait_workers_gone
from .reaper import Reaper
from .registry import Registry, Snapshot
from .starttime import Recorded
from .states import GenerationState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Promotion:
    """What a completed promotion leaves to its caller: the generation now routed to, the keys
    it published (``deferred``: not yet, the registry was unreachable), and the proxy workers
    that may still route to the replaced generation (see ``wait_for_proxy``)."""

    gen: Generation
    published: Snapshot
    deferred: bool
    proxy: ProxyConfig | None
    old_proxy_workers: frozenset[Recorded]


async def promote(
    gen: Generation,
    *,
    program: str,
    config: ProgramConfig,
    registry: Registry,
    reaper: Reaper,
    report: FlipReport,
    proxy_lock: ProxyLock,
    journal: ProxyJournal,
    registry_optional: bool = False,
    replaced_proxy: ProxyConfig | None = None,
    patience: ProxyPatience | None = None,
) -> Promotion:
    """Route traffic to ``gen``. When it returns, ``gen`` is routed to and nothing is undone any
    more; the caller waits for the proxy's old workers (``wait_for_proxy``) before it drains the
    generation ``gen`` replaced. ``journal`` records what the proxy step replaces, until the
    promotion is complete or undone.

    ``replaced_proxy`` is the proxy section of the generation ``gen`` replaces: its file goes
    when the new one's ``dest`` differs or ``config`` has none (``proxy_file_step``), and with no
    proxy section of its own, the proxy is reloaded with the replaced section's commands.

    With ``registry_optional`` (nothing serves yet, so there is nothing to protect), an
    unreachable registry does not stop the promotion: the step is deferred and the caller
    registers the generation once the registry is back. With ``patience`` (nothing serves yet,
    and ``config`` has a proxy section), a failed reload is not undone but retried until it
    succeeds (see ``_pause``).

    ``proxy_lock`` is held from writing the proxy file until the reload (or the undo) finished:
    programs behind one nginx share its whole config, so another program's reload must never
    load a file that is not yet checked, nor one that is about to be put back. A wait for the
    proxy lets it go meanwhile: the file it leaves in place passed its check. Held by someone
    else, it is waited for in a step of its own that says by whom (``proxy_lock_wait.py``).

    Raises:
        ProxyError, RegistryError: a step failed; everything before it was undone.
    """
    holder = partial(flip_holder, report)
    pause = _pause(patience, gen, proxy_lock, holder, report) if config.proxy is not None else None
    steps = _Steps(config, replaced_proxy, registry, registry_optional, pause)
    try:
        async with holding_proxy(proxy_lock, holder, report, gen) if steps.proxy else nullcontext():
            published, old_workers, deferred = await _route(
                gen, Routing(program, reaper, journal), steps, report
            )
    finally:
        if patience is not None:
            patience.over()
    return Promotion(gen, published, deferred, steps.proxy, old_workers)


def _pause(
    patience: ProxyPatience | None,
    gen: Generation,
    proxy_lock: ProxyLock,
    holder: Describe,
    report: FlipReport,
) -> Pause | None:
    """With ``patience``: what a failed reload does instead of failing, a wait for the proxy
    with ``proxy_lock`` let go, then ``gen`` checked for a worker lost meanwhile.

    The reload is then retried until it succeeds (``proxy_patience.py``): the checked file and
    the keys naming ``gen`` stay in place, so a proxy that starts meanwhile loads them. Only a
    cancellation (a stop, the shutdown, ``--timeout``) or a worker that fails ``gen`` ends the
    wait, undone then as after any failure. A failed first check is not retried: it puts the
    previous file back and rolls the flip back, as the contract says (a broken template or proxy
    config is no outage to wait out), and neither is a reload nginx did not apply (it runs, and
    refuses the config with our file in it); a retry's re-check that fails is waited out
    (``proxy_patience.py``).
    """
    if patience is None:
        return None

    async def pause(failure: ProxyError, step: Step) -> None:
        proxy_lock.release()  # other programs' proxy steps go on while this one waits
        try:
            await patience.wait(failure, step)
        finally:
            # Shielded: cancelled while it waits for the lock, the `async with` in `promote` would
            # release a lock this task does not hold; the undo needs it anyway. Held by another
            # program's proxy step, it is waited for in a `proxy-wait` step.
            with anyio.CancelScope(shield=True):
                await retake(proxy_lock, holder, report)
        gen.ensure_whole()

    return pause


async def wait_for_proxy(promotion: Promotion, *, program: str, report: FlipReport) -> None:
    """Drain on evidence: the replaced generation keeps serving until every proxy worker that
    might still hold a connection to it has exited (at most ``proxy.timeout``).

    The reload was confirmed by then (``proxy.reload``: the master started new workers), so
    old workers still running after ``proxy.timeout`` are only finishing long-lived
    connections (keep-alive, websockets): the drain goes ahead, and those connections end."""
    proxy, workers = promotion.proxy, promotion.old_proxy_workers
    if proxy is None or not workers:
        return
    with report.step("proxy-drain", count(len(workers), "old proxy worker")):
        if not await wait_workers_gone(workers, proxy.timeout):
            log.warning(
                "program=%s old proxy workers still running after %ss; draining anyway",
                program,
                proxy.timeout,
            )


@dataclass(frozen=True)
class _Steps:
    """What ``promote`` was asked to route with, for its steps (see ``promote``): the new
    generation's ``config`` and the ``replaced_proxy`` section, the ``registry`` (its step
    deferred when unreachable if ``registry_optional``), and the ``pause`` after a failed
    reload."""

    config: ProgramConfig
    replaced_proxy: ProxyConfig | None
    registry: Registry
    registry_optional: bool
    pause: Pause | None

    @property
    def proxy(self) -> ProxyConfig | None:
        """The section whose commands route: the new one's, else the replaced one's."""
        return self.config.proxy or self.replaced_proxy


async def _route(
    gen: Generation, route: Routing, steps: _Steps, report: FlipReport
) -> tuple[Snapshot, frozenset[Recorded], bool]:
    """The file, registry and reload steps (``promotion_steps.py``), undone if one fails or a
    worker exits between them; returns the published keys, the proxy workers that predate the
    reload, and whether the registry step was deferred. With ``steps.pause``, a failed reload
    is retried after it (see ``promote``)."""
    undo: list[Undo] = []
    reloading = Reloading()
    try:
        published, deferred = await _take_steps(
            gen, route, steps, report, undo=undo, reloading=reloading
        )
    except BaseException as exc:
        # For a client answered while the undo runs (its --timeout): what began it.
        report.rolling_back(None if isinstance(exc, anyio.get_cancelled_exc_class()) else str(exc))
        if not gen.was_serving and gen.state is GenerationState.PROMOTING:
            # A new generation goes once its promotion is undone (a warm one is warm again):
            # `promoting` would read as a deploy under way while the undo runs on (--timeout).
            gen.transition(GenerationState.DRAINING, "its promotion is being rolled back")
        await undo_promotion(
            exc,
            undo,
            reloading.may_have_reloaded,
            refused=reloading.refused,
            journal=route.journal,
            registry_timeout=steps.registry.request_timeout,
            gen=gen,
            program=route.program,
            proxy=steps.proxy,
            reaper=route.reaper,
            report=report,
        )
        raise
    # Routed: from here on the flip is promoted, whenever what follows ends (``FlipReport``).
    report.routed = True
    # Complete: routed and reloaded. A supervisor killed before this line leaves the record,
    # and the next start keeps the file, as the keys name gen (``proxy_recovery.py``).
    await route.promoted()
    return published, reloading.old_proxy_workers, deferred


async def _take_steps(
    gen: Generation,
    route: Routing,
    steps: _Steps,
    report: FlipReport,
    *,
    undo: list[Undo],
    reloading: Reloading,
) -> tuple[Snapshot, bool]:
    """The steps in their order, each one's undo put on ``undo`` (the reload's: ``reloading``)
    as its change is made, ``gen`` checked for a lost worker between them; returns the
    published keys and whether the registry step was deferred."""
    config, replaced_proxy = steps.config, steps.replaced_proxy
    await proxy_file_step(
        gen, route, config=config, replaced_proxy=replaced_proxy, report=report, undo=undo
    )
    gen.ensure_whole()
    await route.before_registry_step()  # a record without this mark was never promoted
    published, deferred = await registry_step(
        gen,
        program=route.program,
        registry=steps.registry,
        optional=steps.registry_optional,
        report=report,
        undo=undo,
    )
    gen.ensure_whole()
    proxy = steps.proxy
    if proxy is not None and proxy.reload_cmd is not None:
        await reload_step(proxy, route, reloading=reloading, pause=steps.pause, report=report)
        # The proxy routes to gen now, but the old generation still runs: a worker lost
        # during the reload still undoes the flip, at the cost of a reload back.
        gen.ensure_whole()
    gen.routed()
    return published, deferred
