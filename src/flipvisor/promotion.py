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
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass

import anyio

from .config import ProgramConfig, ProxyConfig
from .errors import (
    ProxyError,
    ProxyReloadFailed,
    RegistryConflict,
    RegistryError,
)
from .generation import Generation
from .progress import FlipReport, Step
from .proxy import (
    Installed,
    check,
    install,
    proxy_workers,
    reload,
    remove,
    take_away,
    wait_workers_gone,
)
from .proxy_patience import ProxyPatience
from .proxy_template import flip_context, render_template
from .published_keys import serving_snapshot
from .reaper import Reaper
from .registry import Registry, Snapshot
from .starttime import Recorded

log = logging.getLogger(__name__)

UNDO_TIMEOUT = 30.0

# Waits for the proxy after a failed file or reload step (with the proxy lock let go), then
# raises if a worker failed the generation meanwhile: ``promote`` with ``patience``.
Pause = Callable[[ProxyError, Step], Awaitable[None]]


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
    proxy_lock: anyio.Lock,
    registry_optional: bool = False,
    replaced_proxy: ProxyConfig | None = None,
    patience: ProxyPatience | None = None,
) -> Promotion:
    """Route traffic to ``gen``. When it returns, ``gen`` is routed to and nothing is undone any
    more; the caller waits for the proxy's old workers (``wait_for_proxy``) before it drains the
    generation ``gen`` replaced.

    ``replaced_proxy`` is the proxy section of the generation ``gen`` replaces: when its
    ``dest`` differs, that file is removed with the new one's install (nginx would load both),
    and put back by the undo. When ``config`` has no proxy section at all, the replaced file is
    removed, checked without, and the proxy reloaded with the replaced section's commands: nothing
    may go on routing to a generation that is about to drain.

    With ``registry_optional`` (nothing serves yet, so there is nothing to protect), an
    unreachable registry does not stop the promotion: the step is deferred and the caller
    registers the generation once the registry is back.

    With ``patience`` (nothing serves yet, and ``config`` has a proxy section), a failed reload
    is not undone but retried until it succeeds (``proxy_patience.py``): the checked file and
    the keys naming ``gen`` stay in place, so a proxy that starts meanwhile loads them. Only a
    cancellation (a stop, the shutdown, ``--timeout``) or a worker that fails ``gen`` ends the
    wait, undone then as after any failure. A failed check is not retried: it puts the previous
    file back and rolls the flip back, as the contract says (a broken template or proxy config
    is no outage to wait out).

    ``proxy_lock`` is held from writing the proxy file until the reload (or the undo) finished:
    programs behind one nginx share its whole config, so another program's reload must never
    load a file that is not yet checked, nor one that is about to be put back. A wait for the
    proxy lets it go meanwhile: the file it leaves in place passed its check.

    Raises:
        ProxyError, RegistryError: a step failed; everything before it was undone.
    """
    proxy = config.proxy or replaced_proxy  # whose commands route (see above)
    pause: Pause | None = None
    if patience is not None and config.proxy is not None:
        waiting = patience

        async def pause(failure: ProxyError, step: Step) -> None:
            proxy_lock.release()  # other programs' proxy steps go on while this one waits
            try:
                await waiting.wait(failure, step)
            finally:
                # Shielded: cancelled while it waits for the lock, the `async with` below would
                # release a lock this task does not hold; the undo needs it anyway.
                with anyio.CancelScope(shield=True):
                    await proxy_lock.acquire()
            gen.ensure_whole()

    try:
        async with proxy_lock if proxy is not None else nullcontext():
            published, old_proxy_workers, deferred = await _route(
                gen,
                program=program,
                config=config,
                registry=registry,
                reaper=reaper,
                report=report,
                registry_optional=registry_optional,
                replaced_proxy=replaced_proxy,
                pause=pause,
            )
    finally:
        if patience is not None:
            patience.over()
    return Promotion(gen, published, deferred, proxy, old_proxy_workers)


async def wait_for_proxy(promotion: Promotion, *, program: str, report: FlipReport) -> None:
    """Drain on evidence: the replaced generation keeps serving until every proxy worker that
    might still hold a connection to it has exited (at most ``proxy.timeout``)."""
    proxy, workers = promotion.proxy, promotion.old_proxy_workers
    if proxy is None or not workers:
        return
    noun = "worker" if len(workers) == 1 else "workers"
    with report.step("proxy-drain", f"{len(workers)} old proxy {noun}"):
        if not await wait_workers_gone(workers, proxy.timeout):
            log.warning(
                "program=%s old proxy workers still running after %ss; draining anyway",
                program,
                proxy.timeout,
            )


async def _route(
    gen: Generation,
    *,
    program: str,
    config: ProgramConfig,
    registry: Registry,
    reaper: Reaper,
    report: FlipReport,
    registry_optional: bool,
    replaced_proxy: ProxyConfig | None,
    pause: Pause | None,
) -> tuple[Snapshot, frozenset[Recorded], bool]:
    """The file, registry and reload steps, each with its undo; returns the published keys,
    the proxy workers that predate the reload, and whether the registry step was deferred.
    With ``pause``, a failed reload is retried after it (see ``promote``)."""
    undo: list[Callable[[], Awaitable[None]]] = []
    proxy = config.proxy or replaced_proxy
    reloading = _Reloading()
    try:
        if config.proxy is not None:
            # A failed check is never waited out: as the contract has it, it puts the previous
            # file back and rolls the flip back (a first start's too: a broken template or
            # config is no proxy outage).
            with report.step("proxy", str(config.proxy.dest)):
                await _replace_file(
                    gen,
                    program=program,
                    proxy=config.proxy,
                    replaced_proxy=replaced_proxy,
                    reaper=reaper,
                    undo=undo,
                )
        elif replaced_proxy is not None:
            with report.step("proxy", f"remove {replaced_proxy.dest}"):
                taken = await remove(
                    replaced_proxy.dest,
                    check_cmd=replaced_proxy.check_cmd,
                    reaper=reaper,
                    timeout=replaced_proxy.timeout,
                )
                if taken is not None:
                    undo.append(_restorer(taken))
        gen.ensure_whole()
        with report.step("registry") as registry_step:
            expected, published, unreachable = await _swap_keys(
                gen, program=program, registry=registry, optional=registry_optional
            )
            deferred = unreachable is not None
            if deferred:
                registry_step.detail = f"deferred until the registry is back: {unreachable}"

        async def restore_keys() -> None:
            try:
                await registry.swap(program, published, expected)
            except RegistryError as exc:
                log.warning("program=%s restoring registry keys: %s; retrying later", program, exc)
                await registry.publish(program, expected)

        if not deferred:
            undo.append(restore_keys)
        gen.ensure_whole()
        if proxy is not None and proxy.reload_cmd is not None:
            with report.step("reload") as reload_step:
                await _reload_until_taken(
                    proxy, reaper=reaper, reloading=reloading, pause=pause, step=reload_step
                )
            # The proxy routes to gen now, but the old generation still runs: a worker lost
            # during the reload still undoes the flip, at the cost of a reload back.
            gen.ensure_whole()
        gen.routed()
    except BaseException as exc:
        await _undo(
            exc,
            undo,
            reloading.may_have_reloaded,
            gen=gen,
            program=program,
            proxy=proxy,
            reaper=reaper,
            report=report,
        )
        raise
    return published, reloading.old_proxy_workers, deferred


@dataclass
class _Reloading:
    """The reload step's outcome so far: whether the proxy may have reloaded towards the new
    generation (an undo then reloads it back), and its workers from before the reload."""

    may_have_reloaded: bool = False
    old_proxy_workers: frozenset[Recorded] = frozenset()


async def _reload_until_taken(
    proxy: ProxyConfig,
    *,
    reaper: Reaper,
    reloading: _Reloading,
    pause: Pause | None,
    step: Step,
) -> None:
    """Reload the proxy; with ``pause``, again after each failure (checked first: the rest of
    its config may have changed meanwhile, and an unchecked config is never reloaded) until a
    reload succeeds."""
    assert proxy.reload_cmd is not None
    retried = False
    while True:
        if proxy.pidfile is not None:
            reloading.old_proxy_workers = proxy_workers(proxy.pidfile)
        try:
            if retried:
                await check(proxy.check_cmd, proxy.dest, reaper=reaper, timeout=proxy.timeout)
            # From here the proxy may route to gen: a reload that failed or was cut short (by
            # the flip's --timeout or its own) may have taken effect before it ended (a wrapper
            # that runs `nginx -s reload`, then fails a later step), and is undone like one that
            # finished. Only a command that could not start is not, unless an earlier attempt
            # may have reloaded.
            before, reloading.may_have_reloaded = reloading.may_have_reloaded, True
            try:
                await reload(proxy.reload_cmd, reaper=reaper, timeout=proxy.timeout)
            except ProxyError as exc:
                reloading.may_have_reloaded = before or isinstance(exc, ProxyReloadFailed)
                raise
        except ProxyError as exc:
            if pause is None:
                raise
            await pause(exc, step)
            retried = True
        else:
            step.detail = ""
            return


async def _undo(
    failure: BaseException,
    steps: list[Callable[[], Awaitable[None]]],
    reloaded: bool,
    *,
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
    ``report.stranded`` says so and what the operator must do.

    Raises:
        ProxyError: a step failed too; the message names both failures (a cancellation is
            left to propagate as it is).
    """
    failed = []
    files_restored, routed_back = True, False
    with anyio.CancelScope(shield=True), anyio.move_on_after(UNDO_TIMEOUT):
        for step in reversed(steps):
            try:
                await step()
            except (ProxyError, RegistryError) as exc:
                log.error("program=%s undoing a failed promotion: %s", program, exc)
                failed.append(str(exc))
                files_restored = files_restored and not isinstance(exc, ProxyError)
        # Keys that could not be swapped back are retried by the registry; the proxy must not
        # wait for them. A proxy file that could not be put back must not be loaded, though.
        if reloaded and files_restored:
            assert proxy is not None  # it reloaded
            try:
                await _reload_back(gen, program=program, proxy=proxy, reaper=reaper, report=report)
                routed_back = True
            except ProxyError as exc:
                report.stranded = f"reloading the proxy back failed too: {exc}"
    if reloaded and not routed_back and report.stranded is None:
        assert proxy is not None  # it reloaded
        report.stranded = (
            f"the proxy may still route to generation {gen.number}: it was not reloaded back, "
            "as its files could not be put back"
            if not files_restored
            else f"the proxy may still route to generation {gen.number}: reloading it back did "
            f"not finish within {UNDO_TIMEOUT:g}s; run {_command(proxy)}"
        )
    if failed and isinstance(failure, Exception):
        raise ProxyError(
            f"{failure}; undoing it failed too: {'; '.join(failed)}; the proxy's files are as "
            "that left them: put them right by hand, check and reload the proxy"
        ) from failure


async def _replace_file(
    gen: Generation,
    *,
    program: str,
    proxy: ProxyConfig,
    replaced_proxy: ProxyConfig | None,
    reaper: Reaper,
    undo: list[Callable[[], Awaitable[None]]],
) -> None:
    """Put ``gen``'s checked proxy file in place, and remove the replaced generation's if its
    ``dest`` differs; each change's undo goes on ``undo`` as it is made."""
    if replaced_proxy is not None and replaced_proxy.dest != proxy.dest:
        # Before the check: nginx -t would see both files (a duplicate upstream).
        taken = await take_away(replaced_proxy.dest)
        if taken is not None:
            undo.append(_restorer(taken))
    installed = await _install_file(gen, program=program, proxy=proxy, reaper=reaper)
    undo.append(_restorer(installed))


def _restorer(installed: Installed) -> Callable[[], Awaitable[None]]:
    async def restore() -> None:
        installed.restore()

    return restore


async def _install_file(
    gen: Generation, *, program: str, proxy: ProxyConfig, reaper: Reaper
) -> Installed:
    """Render ``gen``'s proxy file, put it in place and check it (put back if the check fails)."""
    context = flip_context(
        program=program, generation=gen.number, host=gen.host, port=gen.port, pids=gen.pids
    )
    content = render_template(proxy.template, {**proxy.vars, **context})
    return await install(
        proxy.dest, content, check_cmd=proxy.check_cmd, reaper=reaper, timeout=proxy.timeout
    )


async def _swap_keys(
    gen: Generation, *, program: str, registry: Registry, optional: bool
) -> tuple[Snapshot, Snapshot, RegistryError | None]:
    """Swap ``program``'s keys to name ``gen``, in one transaction; returns the keys replaced,
    the keys published, and, if the swap was deferred (``optional`` and unreachable), why.

    Raises:
        RegistryError: the registry refused or could not be reached (and not ``optional``).
    """
    try:
        expected = await registry.snapshot(program)
        published = serving_snapshot(gen, expected)
        await registry.swap(program, expected, published)
    except RegistryConflict:
        raise
    except RegistryError as exc:
        if not optional:
            raise
        log.warning("program=%s registry unreachable, registering later: %s", program, exc)
        published = serving_snapshot(gen, Snapshot())
        return published, published, exc
    return expected, published, None


async def _reload_back(
    gen: Generation, *, program: str, proxy: ProxyConfig, reaper: Reaper, report: FlipReport
) -> None:
    """Check the proxy's config with its file put back, and reload the proxy once more, so
    that it routes to the old generation again; with a pidfile, wait until the proxy workers
    that routed to ``gen`` are gone, so that the failed flip ends with the proxy on the old
    generation. A step of its own in the flip's report.

    Raises:
        ProxyError: the check or the reload failed; the message says that the proxy may still
            route to ``gen``, and what to do (it is logged too: the flip's own error stays the
            reason).
    """
    with report.step("reload-back", f"the proxy, away from generation {gen.number}") as step:
        try:
            # The file put back passed its check once, but the rest of the proxy's config may
            # have changed since; an unchecked config is never reloaded, here neither.
            await check(proxy.check_cmd, proxy.dest, reaper=reaper, timeout=proxy.timeout)
            routing_to_gen = proxy_workers(proxy.pidfile) if proxy.pidfile else frozenset()
            await reload(proxy.reload_cmd, reaper=reaper, timeout=proxy.timeout)
        except ProxyError as exc:
            once = (
                f" once its config passes `{shlex.join(proxy.check_cmd)}`"
                if proxy.check_cmd
                else ""
            )
            step.detail = (
                f"{exc}; the proxy may still route to generation {gen.number} until it reloads: "
                f"run {_command(proxy)}{once}, or reload it by other means (the previous proxy "
                "file is back in place)"
            )
            log.error("program=%s could not reload the proxy back: %s", program, step.detail)
            raise ProxyError(step.detail) from exc
        if not await wait_workers_gone(routing_to_gen, proxy.timeout):
            log.warning(
                "program=%s proxy workers still running %ss after reloading back",
                program,
                proxy.timeout,
            )


def _command(proxy: ProxyConfig) -> str:
    """``proxy``'s reload command, quoted for a message the operator may paste into a shell."""
    return f"`{shlex.join(proxy.reload_cmd or ())}`"
