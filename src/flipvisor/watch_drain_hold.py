"""When a ``drain_pid`` drain may go ahead: once the template entries have applied every earlier
change, and ``RELOAD_SETTLE`` after their last reload (or a failed template's hold is over).

What is drained, and whether it may be, is ``watch_drain.py``'s; this module only waits.

Why a drain also waits ``RELOAD_SETTLE`` seconds after the templates' last reload: "the reload
has finished" cannot mean "``reload_cmd`` returned". ``nginx -s reload`` returns once it has sent
SIGHUP; the master then re-reads its configuration, starts new workers, and only then tells the
old workers to stop accepting. Until they do, they keep sending new requests to the old upstream,
and a process drained at that moment refuses them (a 502 for each). The e2e test of the seed's
self-registering service under load saw a third or more of its requests fail that way with no wait
at all. A flip waits on evidence instead (the proxy's ``pidfile``: its pre-reload workers gone),
and so does a template entry with a ``pidfile`` (an addition to the contract's ``watch:`` keys).
Without one, the watcher waits a fixed grace that covers the master's reconfiguration with a wide
margin; the drained process then finishes the requests it already accepted. The grace only delays
drains (measured: 0.05 s still failed requests, 0.2 s did not); renders and reloads never wait for
it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from .starttime import Recorded, pid_still_names
from .watch_template import TemplateWatch

# The drain entry's log lines, under the name they always had.
log = logging.getLogger("flipvisor.watch_drain")

CATCH_UP_TIMEOUT = 60.0  # longest a drain waits for slow templates; a failed one holds it
# After the templates' last reload, before a drain: the proxy's reconfiguration (module docstring).
RELOAD_SETTLE = 2.0


async def wait_for_reloads(
    key: str, folder: str, templates: Sequence[TemplateWatch], targets: Sequence[Recorded]
) -> None:
    """Wait until every template applied the changes so far of ``folder``, then
    ``RELOAD_SETTLE`` after the last reload any of them ran (the proxy's old workers stop routing
    to the old PID), for the drain of ``targets`` by the entry on ``key``.

    A template that is merely slow is given ``CATCH_UP_TIMEOUT``, then the drain goes on
    anyway. One whose last attempt failed holds the drain until an attempt succeeds: the
    proxy may route to nothing but the targets then, and draining them would be an outage;
    unless they are gone by then (their program was stopped, say, which withdrew the key
    that template waits for): there is nothing left to hold.
    """
    pids = ",".join(map(str, sorted({target.pid for target in targets})))
    while True:
        with anyio.move_on_after(CATCH_UP_TIMEOUT) as scope:
            for template in templates:
                await template.caught_up(folder)
        if not scope.cancelled_caught:
            break
        held = [t for t in templates if t.holds(folder)]
        if held and not any(pid_still_names(target) for target in targets):
            log.info(
                "drain_pid %s: pid=%s gone already while watch %s held the drain",
                key,
                pids,
                ", ".join(str(t.dest) for t in held),
            )
            break
        if not held:
            log.warning(
                "drain_pid %s: templates did not catch up within %g s; draining anyway",
                key,
                CATCH_UP_TIMEOUT,
            )
            break
        for template in held:
            _say_held(key, template, pids)
    await _settle(templates)


def _say_held(key: str, template: TemplateWatch, pids: str) -> None:
    """The error of a drain of ``pids`` that ``template`` holds, and why it holds it."""
    if template.failure is None:
        log.error(
            "drain_pid %s: not draining pid=%s: watch %s is waiting for keys %s, "
            "so its file still routes as its last render did (held until they "
            "exist again and it applies)",
            key,
            pids,
            template.dest,
            ", ".join(template.entry.keys),
        )
        return
    log.error(
        "drain_pid %s: not draining pid=%s: watch %s failed: %s "
        "(held until it applies: it is retried, and at each change)",
        key,
        pids,
        template.dest,
        template.failure,
    )


async def _settle(templates: Sequence[TemplateWatch]) -> None:
    """Wait ``RELOAD_SETTLE`` after the templates' last reload (the module docstring says
    why)."""
    # An entry with a pidfile already waited for its proxy's old workers (caught_up covers
    # it): only the others need the fixed grace.
    reloads = [
        t.reloaded_at for t in templates if t.reloaded_at is not None and t.entry.pidfile is None
    ]
    if reloads:
        await anyio.sleep_until(max(reloads) + RELOAD_SETTLE)
