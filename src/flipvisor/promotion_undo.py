"""A failed promotion undone (``promotion.py``): each step's undo run, last first, inside a
bounded shield, then the proxy reloaded back if its reload may have taken effect, all before the
caller stops the new generation. What could not be undone is said: an error naming both
failures, and ``FlipReport.stranded`` when the proxy may still route to the new generation. A
flip's ``--timeout`` may answer its client while the proxy is reloaded back (``flip_outcome``:
what is back is ``FlipReport.undone``); how the rollback ended is an event then
(``flip_outcome.conclude``), once the new generation is discarded too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from .config import ProxyConfig
from .errors import ProxyError, RegistryError
from .generation import Generation
from .progress import FlipReport
from .promotion_steps import Undo
from .proxy import Routing, how_to_reload, pasteable
from .proxy_file import Journal
from .proxy_workers import wait_workers_gone
from .reaper import Reaper

log = logging.getLogger(__name__)

# The least a failed promotion's undo is given, however short the proxy's and the registry's
# timeouts (see ``undo_bound``).
UNDO_TIMEOUT = 30.0


def undo_bound(proxy: ProxyConfig | None, registry_timeout: float) -> float:
    """How long a failed promotion's undo may take before it gives up (and says what is left):
    enough for the keys to be put back (a swap, then a publish if it failed: each within
    ``registry_timeout``), then for the reload back (a check, the reload command, and with a
    pidfile its confirmation: each within ``proxy.timeout``), and at least ``UNDO_TIMEOUT``.

    Derived, not fixed: a fixed bound shorter than those steps cut a slow reload back short (a
    refused one read as "did not finish within 30s"), and forced the reload's confirmation under
    a cap of its own, so that an nginx taking longer to load a large config had every flip rolled
    back, whatever ``proxy.timeout`` the operator set.
    """
    reload_back = 3 * proxy.timeout if proxy is not None else 0.0
    return max(UNDO_TIMEOUT, 2 * registry_timeout + reload_back)


@dataclass
class _Undoing:
    """What the undo did so far, kept as it goes: its ``bound`` may cut it short anywhere."""

    bound: float  # seconds (``undo_bound``)
    failed: list[str] = field(default_factory=list)  # the undo steps' errors
    files_restored: bool = True  # no proxy file failed to be put back
    steps_done: bool = False  # every undo step ran (the reload back comes after them)
    routed_back: bool = False  # the proxy was reloaded back
    back_failed: ProxyError | None = None  # why the reload back failed


@dataclass(frozen=True)
class _ReloadBack:
    """What a reload back needs: the proxy may have reloaded towards ``gen`` with ``proxy``'s
    commands (unless nginx ``refused`` it), and ``report`` shows the step."""

    gen: Generation
    proxy: ProxyConfig
    refused: bool
    report: FlipReport


async def undo_promotion(
    failure: BaseException,
    steps: list[Undo],
    reloaded: bool,
    *,
    refused: bool = False,
    journal: Journal | None = None,
    registry_timeout: float = 0.0,
    gen: Generation,
    program: str,
    proxy: ProxyConfig | None,
    reaper: Reaper,
    report: FlipReport,
) -> None:
    """After ``failure``: run each undo step, last first, all of them even if one fails (a file
    that cannot be put back must not keep the registry's keys from being restored), then, if the
    proxy may have ``reloaded`` towards ``gen``, reload it back once its files are put back.

    All of it before returning, so before the caller stops ``gen``: until the reload back, the
    proxy may still send ``gen`` requests. If the proxy may still route to ``gen`` after all
    (the reload back failed, or was not tried because a file could not be put back),
    ``report.stranded`` says so and what the operator must do. All of it within ``undo_bound``
    (``registry_timeout``: the registry's request timeout). Unless nginx ``refused`` the
    reload towards ``gen`` (with the proxy's pidfile: no new worker started): it routes as
    before then, and a reload back that fails or is not tried is said as that (nginx could
    still apply the refused reload late; the reload back, sent after it, is what undoes that).
    Once every proxy file is put back (and the proxy reloaded back, if it may have reloaded),
    ``journal``'s record of them is removed; one that could not be is left to the next start
    (``proxy_recovery.py``), which tries again (and reloads the proxy).

    Raises:
        ProxyError: a step failed too; the message names both failures (a cancellation is
            left to propagate as it is).
    """
    route = Routing(program, reaper, journal)
    undoing = _Undoing(bound=undo_bound(proxy, registry_timeout))
    back = None
    if reloaded:
        assert proxy is not None  # it reloaded
        back = _ReloadBack(gen, proxy, refused, report)
    await _undo_within_bound(steps, route, back, undoing)
    if back is not None and not undoing.routed_back:
        _say_not_routed_back(back, program, undoing)
    if undoing.failed and isinstance(failure, Exception):
        raise ProxyError(
            f"{failure}; undoing it failed too: {'; '.join(undoing.failed)}; the proxy's files "
            "are as that left them: put them right by hand, check and reload the proxy"
        ) from failure


async def _undo_within_bound(
    steps: list[Undo], route: Routing, back: _ReloadBack | None, undoing: _Undoing
) -> None:
    """Shielded (a cancelled flip is undone all the same) and cut short at ``undoing.bound``:
    the undo steps, then the reload ``back`` if one is due; ``undoing`` says how far it got.
    The journal's record is dropped once every file is back and the proxy no longer routes to
    the new generation (reloaded back, or never reloaded towards it): until then, a supervisor
    killed (or a reload back that failed) leaves it to the next start, which reloads the proxy
    (``proxy_recovery.py``)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(undoing.bound):
        await _run_undo_steps(steps, program=route.program, undoing=undoing)
        undoing.steps_done = True
        if undoing.files_restored and back is None:
            await route.settle()
        # Keys that could not be swapped back are retried by the registry; the proxy must not
        # wait for them. A proxy file that could not be put back must not be loaded, though.
        if back is not None and undoing.files_restored:
            back.report.undone = _what_is_back(undoing)
            try:
                await _reload_back(route, back, undoing)
            except ProxyError as exc:
                undoing.back_failed = exc
    if (
        back is not None
        and undoing.steps_done
        and undoing.files_restored
        and not undoing.routed_back
    ):
        # Failed, or cut short by the bound: kept for the next start, which reloads the proxy,
        # and marked as kept on purpose (not said as left by a supervisor killed). Outside the
        # bound, which may be over by now.
        with anyio.CancelScope(shield=True):
            await route.reload_back_failed()


async def _run_undo_steps(steps: list[Undo], *, program: str, undoing: _Undoing) -> None:
    """Run each of ``steps``, last first, going on past a failure; ``undoing`` keeps count."""
    for step in reversed(steps):
        try:
            await step()
        except (ProxyError, RegistryError) as exc:
            log.error("program=%s undoing a failed promotion: %s", program, exc)
            undoing.failed.append(str(exc))
            undoing.files_restored = undoing.files_restored and not isinstance(exc, ProxyError)


def _what_is_back(undoing: _Undoing) -> str:
    """What the undo steps put back, once the reload back is next (``FlipReport.undone``)."""
    if not undoing.failed:
        return "the proxy file and the registry keys are as before"
    return (
        "the proxy file is as before; putting the registry keys back failed "
        f"({'; '.join(undoing.failed)}), retried by the registry"
    )


def _say_not_routed_back(back: _ReloadBack, program: str, undoing: _Undoing) -> None:
    """The proxy may have reloaded towards the new generation and was not reloaded back: in
    ``report.stranded``, what to do, unless nginx ``refused`` that reload (then it routes as
    before, and a warning says why it was not reloaded back, if the reload back did not fail:
    that one said so itself, in ``_reload_back``)."""
    gen, proxy, back_failed = back.gen, back.proxy, undoing.back_failed
    if not back.refused:
        back.report.stranded = (
            f"reloading the proxy back failed too: {back_failed}"
            if back_failed is not None
            else _not_routed_back(gen, proxy, undoing)
        )
    elif back_failed is None:
        log.warning(
            "program=%s nginx refused the reload to generation %d, so it routes as before "
            "(unless it applies that reload late); it was not reloaded back: %s",
            program,
            gen.number,
            _not_routed_back(gen, proxy, undoing),
        )


def _not_routed_back(gen: Generation, proxy: ProxyConfig, undoing: _Undoing) -> str:
    """``report.stranded`` for a proxy that may have reloaded towards ``gen`` and was not
    reloaded back, though no reload back failed: why not, and what to do."""
    if not undoing.files_restored:
        return (
            f"the proxy may still route to generation {gen.number}: it was not reloaded back, "
            "as its files could not be put back"
        )
    if not undoing.steps_done:
        return (
            f"the proxy may still route to generation {gen.number}: undoing the promotion did "
            f"not finish within {undoing.bound:g}s, so it was not reloaded back; see that "
            f"{proxy.dest} is the previous file again, check the proxy's config and run "
            f"{pasteable(proxy.reload_cmd)}"
        )
    return (
        f"the proxy may still route to generation {gen.number}: reloading it back did "
        f"not finish within {undoing.bound:g}s; run {pasteable(proxy.reload_cmd)}"
    )


async def _reload_back(route: Routing, back: _ReloadBack, undoing: _Undoing) -> None:
    """Check the proxy's config with its file put back, and reload the proxy once more, so
    that it routes to the old generation again; with a pidfile, wait until the proxy workers
    that routed to ``back.gen`` are gone, so that the failed flip ends with the proxy on the old
    generation. A step of its own in the flip's report; ``undoing.routed_back`` once the reload
    is done, before that wait.

    Raises:
        ProxyError: the check or the reload failed; the message says where the proxy may
            route (``_failed_back``; it is logged too: the flip's own error stays the reason).
    """
    gen, proxy = back.gen, back.proxy
    with back.report.step("reload-back", f"the proxy, away from generation {gen.number}") as step:
        try:
            # The file put back passed its check once, but the rest of the proxy's config may
            # have changed since; an unchecked config is never reloaded, here neither.
            await route.check(proxy)
            # Confirmed with a pidfile, as the reload forward: one nginx did not apply leaves
            # it on whatever it ran, perhaps generation gen.
            routing_to_gen = await route.reload(proxy)
        except ProxyError as exc:
            step.detail = _failed_back(back, exc, recorded=route.recorded)
            log.error("program=%s could not reload the proxy back: %s", route.program, step.detail)
            raise ProxyError(step.detail) from exc
        # Routed back once the reload is done (and confirmed): the bound cutting the wait
        # for the old workers short must not report a reload back that "did not finish".
        undoing.routed_back = True
        await route.reloaded_back()
        if not await wait_workers_gone(routing_to_gen, proxy.timeout):
            log.warning(
                "program=%s proxy workers still running %ss after reloading back",
                route.program,
                proxy.timeout,
            )


def _failed_back(back: _ReloadBack, failure: ProxyError, *, recorded: bool) -> str:
    """What a reload back that failed with ``failure`` leaves: where the proxy may route (to
    ``back.gen``, or as before if nginx ``refused`` the reload towards it), what to run now, and,
    if the flip's proxy step was ``recorded`` (its proxy-undo record is kept), that the next
    start checks and reloads the proxy."""
    gen, proxy = back.gen, back.proxy
    if back.refused:
        where = (
            f"nginx refused the reload to generation {gen.number}, so it routes as before, "
            "unless it applies that reload late; to be sure it runs the previous file"
        )
    else:
        where = f"the proxy may still route to generation {gen.number} until it reloads"
    then = (
        "; else the next start of the supervisor checks the proxy's config and reloads it (the "
        "flip's proxy-undo record is kept for that)"
        if recorded
        else ""
    )
    return (
        f"{failure}; {where}: run {how_to_reload(proxy)} now, or reload it by other "
        f"means (the previous proxy file is in place){then}"
    )
