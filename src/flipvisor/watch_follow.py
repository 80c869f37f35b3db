"""Following registry keys for a ``watch:`` entry: one read, then every change, for ever.

An outage of the registry is retried with backoff (logged once per outage, and once when it
answers again); a watch whose history was compacted or replaced starts over with a fresh read,
which holds every change up to its revision, so nothing is missed. What the keys mean is the
entry's (``KeyFollower``): a template's (``watch_template.py``) or a drain's (``watch_drain.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import aclosing

import anyio

from .errors import RegistryError
from .registry import KeyRange, WatchableRegistry, WatchEvent, WatchLost

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.1, 2.0  # reconnecting to the registry


class KeyFollower:
    """A watch entry: told the keys' values once, then every change."""

    async def run(self) -> None:
        raise NotImplementedError

    async def started(self, start: KeyRange) -> None:
        raise NotImplementedError

    async def changed(self, batch: list[WatchEvent]) -> None:
        raise NotImplementedError


async def follow_keys(
    registry: WatchableRegistry, patterns: Sequence[str], what: str, watcher: KeyFollower
) -> None:
    """Read ``patterns``, hand the values to ``watcher``, then every change; forever.

    Outages are retried with backoff; a watch whose history was compacted starts over with a
    fresh read (nothing is missed: the read holds every change up to its revision).
    """
    delay, failing_since = RETRY_MIN, None
    while True:
        try:
            start = await registry.read_keys(patterns)
            if failing_since is not None:
                log.info(
                    "%s: the registry answers again, after %.0f s",
                    what,
                    anyio.current_time() - failing_since,
                )
                failing_since = None
            await watcher.started(start)
            async with aclosing(registry.watch(patterns, since=start)) as events:
                async for batch in events:
                    delay = RETRY_MIN
                    await watcher.changed(batch)
        except WatchLost as exc:
            log.warning("%s: %s; reading the keys again", what, exc)
        except RegistryError as exc:
            # Once per outage (each entry retries, and would say so every RETRY_MAX seconds);
            # the registry layer and `status` report the outage too.
            if failing_since is None:
                log.warning(
                    "%s: %s; retrying until it answers (check that the registry is up and "
                    "reachable: registry.endpoints)",
                    what,
                    exc,
                )
                failing_since = anyio.current_time()
            else:
                log.debug("%s: %s; retrying", what, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
