"""Following etcd keys: a Watch stream on the registry's connection, resumed after the last
delivered revision across outages (each pattern from where it was), with the changes etcd replays
at a watch's creation told apart from live ones. A history etcd no longer has (compacted, or its
revision went back: restored from a backup, a new empty data dir) ends it with ``WatchLost``, and
the caller reads the keys again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import anyio
import grpc  # type: ignore[import-untyped]
from aetcd import rpc

from flipvisor.errors import RegistryError

from .base import KeyRange, WatchEvent, WatchLost
from .etcd_client import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    EtcdConnection,
    range_of,
    readable_text,
)
from .etcd_errors import describe_rpc_error

log = logging.getLogger(__name__)

# The registry's connection, connecting if there is none, held open while in the block.
Use = Callable[[], AbstractAsyncContextManager[EtcdConnection]]


async def watch_keys(
    use: Use, patterns: Sequence[str], since: KeyRange | None = None
) -> AsyncGenerator[list[WatchEvent], None]:
    """Changes of keys matching ``patterns`` after the read ``since`` (from its revision + 1;
    None: from now), one list per etcd response (a transaction's changes together),
    resuming after the last delivered revision across outages.
    Each pattern's changes arrive in revision order; after a resume, lists of different
    patterns may interleave out of order. Close it with ``contextlib.aclosing``.

    Raises:
        WatchLost: the history to resume from was compacted or replaced (etcd's revision
            went back), or etcd refused the watch.
    """
    start = since.revision + 1 if since is not None else None
    next_revision: list[int | None] = [start] * len(patterns)
    delay, failing = MIN_BACKOFF, False
    while True:
        try:
            async with use() as conn:
                call = conn.open_watch()
                try:
                    stream = _watch_stream(call, patterns, next_revision)
                    async with aclosing(stream):
                        async for index, events in stream:
                            delay, failing = MIN_BACKOFF, False
                            next_revision[index] = events[-1].revision + 1
                            yield events
                    problem = f"etcd at {conn.endpoint} closed the watch stream"
                except grpc.aio.AioRpcError as exc:
                    problem = str(describe_rpc_error(exc, conn.endpoint, conn.timeout))
                finally:
                    call.cancel()
                await conn.retire()
                log.warning("watch: %s; resuming", problem)
        except WatchLost:
            raise
        except RegistryError as exc:
            # Logged once per outage: ``run`` (or the caller's own checks) report the rest.
            (log.debug if failing else log.warning)("watch: %s; retrying", exc)
            failing = True
        await anyio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


async def _watch_stream(
    call: Any, patterns: Sequence[str], next_revision: list[int | None]
) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
    """(pattern index, events) from one Watch stream until it ends.

    Raises:
        WatchLost: etcd cancelled a watch (compaction, permissions), or its revision went
            back behind one this watch had seen.
        grpc.aio.AioRpcError: the stream broke.
    """
    for pattern, revision in zip(patterns, next_revision, strict=True):
        key, range_end = range_of(pattern)
        create = rpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=revision or 0)
        await call.write(rpc.WatchRequest(create_request=create))
    indexes: dict[int, int] = {}  # etcd's watch id -> pattern index, in creation order
    # etcd's revision when each watch was created: changes up to it are replayed history.
    created_at: dict[int, int] = {}
    while (reply := await call.read()) is not grpc.aio.EOF:
        if reply.created:
            index = indexes[reply.watch_id] = len(indexes)
            created_at[reply.watch_id] = reply.header.revision
            _check_created(reply, next_revision, index)
        if reply.canceled:
            raise _cancelled(reply)
        events = [
            WatchEvent(
                readable_text(ev.kv.key),
                readable_text(ev.kv.value) if ev.type == rpc.Event.PUT else None,
                ev.kv.mod_revision,
                live=ev.kv.mod_revision > created_at.get(reply.watch_id, ev.kv.mod_revision),
            )
            for ev in reply.events
        ]
        if events:
            yield indexes[reply.watch_id], events


def _check_created(reply: Any, next_revision: list[int | None], index: int) -> None:
    """Note where a new watch starts (``next_revision``), or refuse one etcd would hold back.

    Raises:
        WatchLost: etcd's revision is behind one this watch had seen.
    """
    wanted = next_revision[index]
    if wanted is None:
        next_revision[index] = reply.header.revision + 1
    elif wanted > reply.header.revision + 1:
        # A revision we saw that this etcd has not reached: its history was replaced (restored
        # from a backup, or a new empty data dir). etcd would wait for that revision and ignore
        # every change until then. (A lagging member of a cluster can look alike for a moment;
        # reading again is safe.)
        raise WatchLost(
            f"etcd's revision went back (restored or replaced?): it is at "
            f"{reply.header.revision}, this watch had seen up to {wanted - 1}"
        )


def _cancelled(reply: Any) -> WatchLost:
    """Why etcd cancelled a watch."""
    if reply.compact_revision:
        return WatchLost(
            f"etcd compacted the history this watch needed (revision {reply.compact_revision})"
        )
    return WatchLost(f"etcd refused the watch: {reply.cancel_reason}")
