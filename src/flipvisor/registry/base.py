"""The ``Registry`` interface shared by the local file and etcd backends, and the key layout.

For program ``experiment`` under prefix ``uswitch`` the keys are ``uswitch/experiment/<suffix>``
with the suffixes of ``KEY_SUFFIXES`` (the seed's layout plus the JSON generation record).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from flipvisor import json_text
from flipvisor.errors import RegistryError

log = logging.getLogger(__name__)

KEY_SUFFIXES = (
    "port/current",
    "port/previous",
    "pid/current",
    "pid/previous",
    "generation/current",
)


def program_key(prefix: str, program: str, suffix: str) -> str:
    """The full key of ``suffix`` for ``program``: ``<prefix>/<program>/<suffix>``."""
    return f"{prefix}/{program}/{suffix}"


@dataclass(frozen=True)
class Snapshot:
    """The values of one program's keys, by suffix; a missing suffix means the key is absent."""

    values: Mapping[str, str] = field(default_factory=dict)

    def get(self, suffix: str) -> str | None:
        return self.values.get(suffix)


CURRENT_SUFFIXES = ("port/current", "pid/current", "generation/current")


def withdrawn(snapshot: Snapshot) -> Snapshot:
    """The keys once nothing serves the program any more: what ``current`` named becomes
    ``previous`` (as after a flip, so a ``drain_pid`` watcher sees the same change), and the
    ``current`` keys are gone. Keys that name nothing current are returned as they are."""
    values = dict(snapshot.values)
    if not any(suffix in values for suffix in CURRENT_SUFFIXES):
        return snapshot
    for kind in ("port", "pid"):
        current = values.get(f"{kind}/current")
        if current is not None:
            values[f"{kind}/previous"] = current
    for suffix in CURRENT_SUFFIXES:
        values.pop(suffix, None)
    return Snapshot(values)


def naming(snapshot: Snapshot) -> dict[str, str | None]:
    """What ``snapshot``'s ``current`` keys name (None: absent): a withdrawal's expectation."""
    return {suffix: snapshot.get(suffix) for suffix in CURRENT_SUFFIXES}


def still_named(have: Snapshot, ours: Sequence[Mapping[str, str | None]]) -> bool:
    """Whether ``have``'s ``current`` keys still name what one of ``ours`` expects (each maps
    the suffixes it knows to their values; None: absent), and name something: a withdrawal
    applies only to keys the withdrawing supervisor published (or took over) itself."""
    return any(
        any(value is not None for value in expected.values())
        and all(have.get(suffix) == value for suffix, value in expected.items())
        for expected in ours
    )


def names_current(snapshot: Snapshot) -> bool:
    """Whether any ``current`` key names something."""
    return any(snapshot.get(suffix) is not None for suffix in CURRENT_SUFFIXES)


def taken_by_another(
    program: str, have: Snapshot, ours: Sequence[Mapping[str, str | None]], keys: str
) -> bool:
    """Whether ``have`` names something current that is none of ``ours``: another writer
    promoted ``program`` since, and a withdrawal must leave its ``keys`` alone (logged)."""
    if not names_current(have) or still_named(have, ours):
        return False
    log.warning(
        "program=%s %s not withdrawn: they name %s now, not what this supervisor wrote "
        "(another writer promoted it?); left as they are",
        program,
        keys,
        owner_of(have),
    )
    return True


def owner_of(have: Snapshot) -> str:
    """Who seems to own keys that name something else: their ``generation/current`` record's
    host, supervisor and generation when it has them, else what ``current`` names."""
    try:
        record: Any = json_text.loads(have.get("generation/current") or "null")
    except ValueError:
        record = None
    parts = []
    if isinstance(record, dict):
        if record.get("host"):
            parts.append(f"host {record['host']}")
        if isinstance(owner := record.get("supervisor"), dict) and "pid" in owner:
            parts.append(f"supervisor pid {owner['pid']}")
        if "generation" in record:
            parts.append(f"generation {record['generation']}")
    parts += [f"{kind} {have.get(f'{kind}/current')}" for kind in ("port", "pid")]
    return ", ".join(parts)


class Registry(Protocol):
    """What the supervisor needs from a registry backend.

    Every method that talks to a remote store is bounded by the registry's request timeout and
    raises ``RegistryError`` (``RegistryConflict`` for a lost compare) rather than hang.
    """

    # That request timeout (``registry.timeout``): what a failed flip's undo allows for putting
    # the keys back (``promotion_undo.undo_bound``).
    request_timeout: float

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection alive until cancelled; after every (re)connect, write what
        ``publish`` left pending so the keys match what is serving. Calls ``started()`` at once,
        even while the store is unreachable."""
        ...

    async def snapshot(self, program: str) -> Snapshot:
        """Read all of ``program``'s keys in one consistent read."""
        ...

    async def swap(self, program: str, expected: Snapshot, new: Snapshot) -> None:
        """In one transaction: if every key of ``KEY_SUFFIXES`` still holds what ``expected``
        says (absent where it has no value), set them to ``new`` (deleting keys ``new`` lacks).

        Raises:
            RegistryConflict: somebody changed the keys since ``expected`` was read.
            RegistryError: the store could not be reached in time.
        """
        ...

    async def publish(self, program: str, new: Snapshot) -> None:
        """Make ``program``'s keys say ``new`` (unconditionally) now if the store is reachable,
        else as soon as it is back. Never raises for an outage; the latest value wins."""
        ...

    async def withdraw(
        self, program: str, *, taken_over: str | None = None, final: bool = False
    ) -> None:
        """``program`` stopped serving: in one write, make its keys ``withdrawn`` (its
        ``current`` keys gone, what they named now ``previous``), computed from what the store
        holds when the write happens, and only while they still name what this registry last
        wrote for ``program`` (or the ``generation/current`` record ``taken_over``: a killed
        supervisor's workers this one replaced): keys another writer promoted since are left
        to it (logged). Now if the store answers within the request timeout, else as soon as
        it is back (a later ``swap`` or ``publish`` supersedes it). Once it landed, or was
        dropped, the program is forgotten: reconnects leave its keys alone until it is
        promoted again. ``final``: the supervisor exits next, so a withdrawal left pending is
        not retried. Never raises, and never waits longer than the request timeout."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...

    def unanswered(self) -> RegistryError | None:
        """Why the store is known not to answer: the error of its latest request or connection
        attempt that got no answer (a timeout, a refused connection; not an error the store
        answered with) while it answered nothing since; else None. A
        first start defers its registration at once then (``promotion_steps``), rather than
        wait another request timeout for a store that just failed to answer."""
        ...

    def health(self) -> dict[str, Any]:
        """For ``status``: ``{"backend", "where", "connected", "pending": [programs],
        "problem", "conflicting": [programs]}``: the programs whose keys are not yet written as
        they should be; what the store (or whatever answered for it) said that is no outage,
        with what to do, until a request succeeds (etcd; else None); and the programs whose
        writes were given up on after conflicts in a row with another writer (etcd), left so
        until the next publish, withdrawal or reconnect."""
        ...


class WatchLost(RegistryError):
    """A watch cannot resume: the history it needs was compacted or replaced (the store's
    revision went back), or the store refused it. Read the keys again and watch from the new
    revision."""


@dataclass(frozen=True)
class WatchEvent:
    """One change of one key: its new value (None once deleted) and the revision that made it.

    ``live``: received as it happened, the watch connected and caught up. False for a change
    delivered late: replayed from history (after a resume, or made between a read and the
    watch) or made up from a new read; it may be much older than its arrival (``drain_pid``
    trusts a bare PID only from a live change).
    """

    key: str
    value: str | None
    revision: int
    live: bool = False


@dataclass(frozen=True)
class KeyRange:
    """Values of the keys under some prefixes, all read at one ``revision``.

    ``watch(patterns, since=this)`` misses no change made after this read.
    """

    values: Mapping[str, str]
    revision: int


def key_matches(pattern: str, key: str) -> bool:
    """Whether ``key`` is ``pattern`` itself, or lies under it when ``pattern`` ends in "/"."""
    return key.startswith(pattern) if pattern.endswith("/") else key == pattern


class WatchableRegistry(Registry, Protocol):
    """A registry whose keys can be read and watched by anyone (the confd side, ``watch.py``).

    ``patterns`` are keys, or prefixes ending in "/" (the config's ``watch[].keys``).
    """

    async def read_keys(self, patterns: Sequence[str]) -> KeyRange:
        """Every key matching ``patterns``, read at one revision.

        Raises:
            RegistryError: the store could not be reached in time.
        """
        ...

    def watch(
        self, patterns: Sequence[str], since: KeyRange | None = None
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Changes of keys matching ``patterns`` made after the read ``since`` (a ``read_keys``
        of the same patterns; None: from now), however long ago that read was, one list per
        revision (the keys a transaction changed under one pattern arrive
        together; each pattern's lists in revision order). Survives outages: after a
        reconnect it resumes after the last revision it delivered.

        Raises:
            WatchLost: the history to resume from was compacted away or replaced (the
                store's revision went back), or the store refused the watch (read again and
                watch from the new revision).
        """
        ...
