"""The steps of a promotion (``promotion.py``), each made together with its undo: the proxy file
(the new generation's put in place and checked, the replaced generation's taken away with it, or
removed when the new config has no proxy section), the registry's keys swapped to name the new
generation, and the proxy reloaded (with a ``Pause``, again after each failure until a reload
takes). A step appends its undo to the promotion's list as soon as the change it undoes is made,
so that a failure of the very next line is undone too; ``promotion_undo.py`` runs the list. What a
proxy file held is also recorded in the promotion's journal before the file changes
(``proxy_journal.py``): the undo list dies with a killed supervisor, the journal does not.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .config import ProgramConfig, ProxyConfig
from .errors import (
    ProxyError,
    ProxyReloadFailed,
    ProxyReloadNotTaken,
    RegistryConflict,
    RegistryError,
)
from .generation import Generation
from .progress import FlipReport, Step
from .proxy import Routing
from .proxy_file import Installed
from .proxy_template import flip_context, render_template
from .published_keys import serving_snapshot
from .registry import Registry, Snapshot
from .starttime import Recorded

log = logging.getLogger(__name__)

# One step's undo: it puts back what that step changed.
Undo = Callable[[], Awaitable[None]]

# Waits for the proxy after a failed file or reload step (with the proxy lock let go), then
# raises if a worker failed the generation meanwhile: ``promote`` with ``patience``.
Pause = Callable[[ProxyError, Step], Awaitable[None]]


async def proxy_file_step(
    gen: Generation,
    route: Routing,
    *,
    config: ProgramConfig,
    replaced_proxy: ProxyConfig | None,
    report: FlipReport,
    undo: list[Undo],
) -> None:
    """The ``proxy`` step: ``gen``'s proxy file in place and checked or, when ``config`` has no
    proxy section, the replaced generation's file removed and the proxy checked without it.

    ``replaced_proxy`` is the proxy section of the generation ``gen`` replaces: when its
    ``dest`` differs, that file is removed with the new one's install (nginx would load both),
    and put back by the undo. When ``config`` has no proxy section at all, the replaced file is
    removed, checked without, and the proxy reloaded with the replaced section's commands: nothing
    may go on routing to a generation that is about to drain.
    """
    if config.proxy is not None:
        # A failed check is never waited out: as the contract has it, it puts the previous
        # file back and rolls the flip back (a first start's too: a broken template or
        # config is no proxy outage).
        with report.step("proxy", str(config.proxy.dest)):
            await _replace_file(gen, route, config.proxy, replaced_proxy=replaced_proxy, undo=undo)
    elif replaced_proxy is not None:
        with report.step("proxy", f"remove {replaced_proxy.dest}"):
            taken = await route.remove(replaced_proxy)
            if taken is not None:
                undo.append(_restorer(taken))


async def _replace_file(
    gen: Generation,
    route: Routing,
    proxy: ProxyConfig,
    *,
    replaced_proxy: ProxyConfig | None,
    undo: list[Undo],
) -> None:
    """Put ``gen``'s checked proxy file in place, and remove the replaced generation's if its
    ``dest`` differs; each change's undo goes on ``undo`` as it is made."""
    if replaced_proxy is not None and replaced_proxy.dest != proxy.dest:
        # Before the check: nginx -t would see both files (a duplicate upstream).
        taken = await route.take_away(replaced_proxy)
        if taken is not None:
            undo.append(_restorer(taken))
    installed = await _install_file(gen, route, proxy)
    undo.append(_restorer(installed))


def _restorer(installed: Installed) -> Undo:
    async def restore() -> None:
        await installed.restore_off_loop()

    return restore


async def _install_file(gen: Generation, route: Routing, proxy: ProxyConfig) -> Installed:
    """Render ``gen``'s proxy file, put it in place and check it (put back if the check fails)."""
    context = flip_context(
        program=route.program, generation=gen.number, host=gen.host, port=gen.port, pids=gen.pids
    )
    content = render_template(proxy.template, {**proxy.vars, **context})
    return await route.install(proxy, content)


async def registry_step(
    gen: Generation,
    *,
    program: str,
    registry: Registry,
    optional: bool,
    report: FlipReport,
    undo: list[Undo],
) -> tuple[Snapshot, bool]:
    """The ``registry`` step: ``program``'s keys swapped to name ``gen``; returns the keys
    published, and whether the swap was deferred (``optional``, and the registry unreachable:
    nothing to undo then)."""
    with report.step("registry") as step:
        expected, published, unreachable = await _swap_keys(
            gen, program=program, registry=registry, optional=optional
        )
        deferred = unreachable is not None
        if deferred:
            step.detail = f"deferred until the registry is back: {unreachable}"

    async def restore_keys() -> None:
        try:
            await registry.swap(program, published, expected)
        except RegistryError as exc:
            log.warning("program=%s restoring registry keys: %s; retrying later", program, exc)
            await registry.publish(program, expected)

    if not deferred:
        undo.append(restore_keys)
    return published, deferred


async def _swap_keys(
    gen: Generation, *, program: str, registry: Registry, optional: bool
) -> tuple[Snapshot, Snapshot, RegistryError | None]:
    """Swap ``program``'s keys to name ``gen``, in one transaction; returns the keys replaced,
    the keys published, and, if the swap was deferred (``optional`` and unreachable), why.

    Raises:
        RegistryError: the registry refused or could not be reached (and not ``optional``).
    """
    # A first start does not wait another request timeout for a registry that just failed to
    # answer (the search for leftovers at start-up, say): it goes on as it would after this
    # attempt failed. A flip still tries, and fails without the registry.
    if optional and (unanswered := registry.unanswered()) is not None:
        return _deferred(gen, program, unanswered)
    try:
        expected = await registry.snapshot(program)
        published = serving_snapshot(gen, expected)
        await registry.swap(program, expected, published)
    except RegistryConflict:
        raise
    except RegistryError as exc:
        if not optional:
            raise
        return _deferred(gen, program, exc)
    return expected, published, None


def _deferred(
    gen: Generation, program: str, why: RegistryError
) -> tuple[Snapshot, Snapshot, RegistryError]:
    """A first start's registration left for ``registration.py`` to write once the registry
    answers: the keys ``gen`` would publish over none."""
    log.warning("program=%s registry unreachable, registering later: %s", program, why)
    published = serving_snapshot(gen, Snapshot())
    return published, published, why


@dataclass
class Reloading:
    """The reload step's outcome so far: whether the proxy may have reloaded towards the new
    generation (an undo then reloads it back), whether nginx refused that reload (it confirmed
    nothing, and no earlier attempt may have reloaded: it routes as before unless it applies
    the reload late), and, once it reloaded, its workers from before the reload."""

    may_have_reloaded: bool = False
    refused: bool = False
    old_proxy_workers: frozenset[Recorded] = frozenset()


async def reload_step(
    proxy: ProxyConfig,
    route: Routing,
    *,
    reloading: Reloading,
    pause: Pause | None,
    report: FlipReport,
) -> None:
    """The ``reload`` step: the proxy reloaded (see ``_reload_until_taken``). Its undo is no
    entry on the list but ``reloading``: only a reload that may have taken effect is undone."""
    with report.step("reload") as step:
        await _reload_until_taken(proxy, route, reloading=reloading, pause=pause, step=step)


async def _reload_until_taken(
    proxy: ProxyConfig,
    route: Routing,
    *,
    reloading: Reloading,
    pause: Pause | None,
    step: Step,
) -> None:
    """Reload the proxy, confirmed with its ``pidfile`` (``proxy.reload``: a reload nginx did not
    apply fails); with ``pause``, again after each failure (checked first: the rest of its config
    may have changed meanwhile, and an unchecked config is never reloaded) until a reload
    succeeds, except one nginx did not apply (``ProxyReloadNotTaken``).

    That one is not waited out even on a first start: it proves nginx runs and rejects the
    config with our file in it (a ``listen`` on a port something else holds), like a failed
    check, and nothing a wait brings changes that. Kept in place meanwhile, the file would make
    nginx refuse every other program's reload too, and an nginx restart fail to bind; so it
    fails the promotion, whose undo puts the previous file back and reloads.
    """
    assert proxy.reload_cmd is not None
    retried = False
    while True:
        try:
            if retried:
                await route.check(proxy)
            # From here the proxy may route to gen: a reload that failed or was cut short (by
            # the flip's --timeout or its own) may have taken effect before it ended (a wrapper
            # that runs `nginx -s reload`, then fails a later step), and is undone like one that
            # finished; so is one nginx showed no sign of applying (with a pidfile: no new
            # worker), as it may yet. Only a command that could not start is not, unless an
            # earlier attempt may have reloaded.
            before, reloading.may_have_reloaded = reloading.may_have_reloaded, True
            try:
                reloading.old_proxy_workers = await route.reload(proxy)
            except ProxyError as exc:
                reloading.may_have_reloaded = before or isinstance(exc, ProxyReloadFailed)
                reloading.refused = not before and isinstance(exc, ProxyReloadNotTaken)
                raise
        except ProxyError as exc:
            if pause is None or isinstance(exc, ProxyReloadNotTaken):
                raise
            await pause(exc, step)
            retried = True
        else:
            step.detail = ""
            return
