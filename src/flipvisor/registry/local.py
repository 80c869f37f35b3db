"""The ``local`` registry backend: the seed's keys in ``<state_dir>/registry.json``.

The file is one JSON object of key -> value strings, replaced atomically (``local_file``), so a
reader sees the old or the new object, never half of one. One supervisor writes it; anybody may
read it (``read_registry_file``).

Writes leave the event loop (a worker thread does the fsync) and are group-committed: changes
made while one write is under way go to disk together in the next, so 200 programs starting at
once cost a few writes rather than 200 rewrites of a growing file. A swap returns only once its
change is on disk. The supervisor keeps what it last read or wrote, and reads the file again only
when it changed underneath (mtime, size, inode).

A withdrawal (``withdraw``) applies only while the program's keys still name what this registry
last wrote for it (another writer, or a hand edit, may have promoted it since); one the file did
not take (unreadable, a disk error) stays pending and ``run`` retries it, with the same compare.

Without a server there is nothing to subscribe to, so ``watch`` polls the file (its mtime, size
and inode every ``POLL_INTERVAL`` seconds, then its content) and reports the keys that differ.
Revisions are a counter of this process, not stored in the file: a change that is undone between
two polls is not seen.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryConflict, RegistryError

from .base import (
    KEY_SUFFIXES,
    KeyRange,
    Snapshot,
    WatchEvent,
    key_matches,
    names_current,
    naming,
    program_key,
    taken_by_another,
    withdrawn,
)
from .local_file import read_registry_file, unwritable_advice, write_registry_file

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2
RETRY_INTERVAL = 1.0


def _program_values(values: Mapping[str, str], prefix: str, program: str) -> dict[str, str]:
    found = {}
    for suffix in KEY_SUFFIXES:
        value = values.get(program_key(prefix, program, suffix))
        if value is not None:
            found[suffix] = value
    return found


def _apply(values: dict[str, str], prefix: str, program: str, new: Snapshot) -> None:
    for suffix in KEY_SUFFIXES:
        key = program_key(prefix, program, suffix)
        value = new.get(suffix)
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value


class LocalRegistry:
    """The registry as a file; see the module docstring."""

    def __init__(self, path: Path, config: RegistryConfig) -> None:
        self.path = path
        self.prefix = config.prefix
        self.request_timeout = config.timeout  # a write to the file never waits that long
        self._pending: dict[str, Snapshot] = {}
        # What this registry last wrote for each program (on disk), and what the current keys
        # of a pending withdrawal must still name for it to apply.
        self._written: dict[str, Snapshot] = {}
        self._withdrawing: dict[str, list[dict[str, str | None]]] = {}
        self._revision = 0
        self._retry = anyio.Event()
        # What the file holds (or will, once the pending write is done); None: read it again.
        self._values: dict[str, str] | None = None
        self._file_stamp: tuple[int, int, int] | None = None
        self._changes = 0  # changes made to _values so far
        self._persisted = 0  # of those, how many are on disk
        self._lost = 0  # of those, how many a failed write dropped
        self._write_lock = anyio.Lock()
        # A watch found the file unreadable (logged once per version of it, the ``_stamp``).
        self._bad_file = False
        self._bad_stamp: tuple[int, int, int] | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Retry publications and withdrawals that a disk error left pending, until cancelled."""
        task_status.started()
        while True:
            if self._pending or self._withdrawing:
                with anyio.move_on_after(RETRY_INTERVAL):
                    await self._retry.wait()
            else:
                # Nothing to retry: sleep until a failed publication wakes us, so an idle
                # supervisor does not wake up once a second for nothing.
                await self._retry.wait()
            self._retry = anyio.Event()
            for program, new in list(self._pending.items()):
                if self._pending.get(program) is not new:
                    continue  # withdrawn or superseded while an earlier write awaited
                try:
                    await self._write_program(program, new)
                except RegistryError as exc:
                    log.warning("program=%s publishing to the registry failed: %s", program, exc)
                else:
                    self._written[program] = new
                    if self._pending.get(program) is new:
                        del self._pending[program]
            for program in list(self._withdrawing):
                try:
                    await self._withdraw_now(program)
                except RegistryError as exc:
                    log.warning("program=%s withdrawing its registry keys failed: %s", program, exc)

    async def snapshot(self, program: str) -> Snapshot:
        """``program``'s keys as the file holds them.

        Raises:
            RegistryError: the file is unreadable or malformed.
        """
        return Snapshot(_program_values(self._current(), self.prefix, program))

    async def swap(self, program: str, expected: Snapshot, new: Snapshot) -> None:
        """Replace ``program``'s keys with ``new`` if they still hold ``expected``.

        No await sits between the compare and the change in memory, so nothing else in this
        process interleaves; the call returns once the change is on disk.

        Raises:
            RegistryConflict: a key differs from ``expected``; the message names it.
            RegistryError: the file could not be read or written.
        """
        current = _program_values(self._current(), self.prefix, program)
        for suffix in KEY_SUFFIXES:
            if current.get(suffix) != expected.get(suffix):
                key = program_key(self.prefix, program, suffix)
                raise RegistryConflict(
                    f"registry key {key} changed: expected {expected.get(suffix)!r}, "
                    f"found {current.get(suffix)!r} (another writer promoted {program}?)"
                )
        self._withdrawing.pop(program, None)  # superseded
        await self._write_program(program, new)
        self._written[program] = new
        self._pending.pop(program, None)

    async def publish(self, program: str, new: Snapshot) -> None:
        """Write ``program``'s keys now; after a disk error ``run`` retries. Never raises."""
        self._pending[program] = new
        self._withdrawing.pop(program, None)  # superseded
        try:
            await self._write_program(program, new)
        except RegistryError as exc:
            log.warning(
                "program=%s publishing to the registry failed, will retry: %s", program, exc
            )
            self._retry.set()
            return
        self._written[program] = new
        self._pending.pop(program, None)

    async def withdraw(
        self, program: str, *, taken_over: str | None = None, final: bool = False
    ) -> None:
        """Make ``program``'s keys name nothing serving (``withdrawn``), from what the file holds
        now, if they still name what this registry last wrote for it (or ``taken_over``); after
        a disk error ``run`` retries. Never raises."""
        # A publication a disk error left pending names what served: it must not land later
        # (but its write may have reached the file: the keys may name it).
        ours = [
            naming(s) for s in (self._written.get(program), self._pending.pop(program, None)) if s
        ]
        if taken_over is not None:
            ours.append({"generation/current": taken_over})
        if not ours:
            return  # nothing of ours to withdraw
        self._withdrawing[program] = ours
        try:
            await self._withdraw_now(program)
        except RegistryError as exc:
            later = (
                "left as they are: the next `flipvisor run` replaces them"
                if final
                else "withdrawn once the file can be read and written, if they still name it"
            )
            log.warning("program=%s stopped; its registry keys are %s: %s", program, later, exc)
            self._retry.set()

    async def _withdraw_now(self, program: str) -> None:
        """Apply ``program``'s pending withdrawal if its keys still name what it expects, then
        forget the program; drop it (logged) if they name something else.

        Raises:
            RegistryError: the file could not be read or written (the withdrawal stays).
        """
        ours = self._withdrawing[program]
        # No await between the read and the change in memory (``_write_program``'s first
        # step): nothing else in this process interleaves.
        have = Snapshot(_program_values(self._current(), self.prefix, program))
        if not taken_by_another(program, have, ours, "registry keys") and names_current(have):
            await self._write_program(program, withdrawn(have))
        if self._withdrawing.get(program) is ours:  # not superseded meanwhile
            del self._withdrawing[program]
            self._written.pop(program, None)

    def unanswered(self) -> RegistryError | None:
        return None  # a file answers at once: a failed read is tried again, no wait saved

    def health(self) -> dict[str, Any]:
        return {
            "backend": "local",
            "where": str(self.path),
            "connected": True,
            "pending": sorted(self._pending.keys() | self._withdrawing.keys()),
            "problem": None,  # the file's errors are said where they happen (etcd: see there)
            "conflicting": [],  # no other writer conflicts with a write of the file's
        }

    async def aclose(self) -> None:
        """Nothing to release: the file is opened only while read or written."""

    async def read_keys(self, patterns: Sequence[str]) -> KeyRange:
        """The keys matching ``patterns``, with this process's revision counter.

        Raises:
            RegistryError: the file is unreadable or malformed.
        """
        values = read_registry_file(self.path)
        matching = {k: v for k, v in values.items() if any(key_matches(p, k) for p in patterns)}
        return KeyRange(matching, self._revision)

    async def watch(
        self, patterns: Sequence[str], since: KeyRange | None = None
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Poll the file and yield the keys matching ``patterns`` that changed.

        The baseline is ``since``'s values (None: the file as it is when the watch starts).
        With ``since`` the first poll compares the file's content even if its stamp did not
        change: the change may have landed between the read and this call (the file keeps no
        history, and its stamp then would already be the new one).

        Raises:
            RegistryError: never for an unreadable file (it is retried at the next poll).
        """
        read_anyway = since is not None
        live = True  # see below
        if since is not None:
            seen = {
                k: v for k, v in since.values.items() if any(key_matches(p, k) for p in patterns)
            }
            stamp = None
        else:
            seen = dict((await self.read_keys(patterns)).values)
            stamp = self._stamp()
        while True:
            await anyio.sleep(POLL_INTERVAL)
            now_stamp = self._stamp()
            if now_stamp == stamp and not read_anyway:
                continue
            current = await self._read_watched(patterns, now_stamp)
            if current is None:
                live = False  # what the next good read finds may be as old as the bad file
                continue
            # Live: this poll follows a good one, so the change is at most a poll old (the
            # first one compares with a read made before the watch began).
            live = not read_anyway and live
            stamp, read_anyway = now_stamp, False
            changed = sorted(
                k for k in seen.keys() | current.keys() if seen.get(k) != current.get(k)
            )
            seen = dict(current)
            if changed:
                self._revision += 1
                yield [WatchEvent(k, current.get(k), self._revision, live) for k in changed]
            live = True

    async def _read_watched(
        self, patterns: Sequence[str], stamp: tuple[int, int, int] | None
    ) -> Mapping[str, str] | None:
        """The keys a watch reads at a poll; None (logged) while the file is unreadable."""
        try:
            current = (await self.read_keys(patterns)).values
        except RegistryError as exc:
            # Once per bad version of the file (a hand edit), not at every poll of every
            # watch: it is read again at each poll, and a fix (even a chmod) takes effect.
            logged = self._bad_file and self._bad_stamp == stamp
            (log.debug if logged else log.warning)(
                "watching the registry file: %s; fix it, or rewrite it as one JSON object "
                "of key -> value strings",
                exc,
            )
            self._bad_file, self._bad_stamp = True, stamp
            return None
        if self._bad_file:
            log.info("watching the registry file: %s is readable again", self.path)
            self._bad_file = False
        return current

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current(self) -> dict[str, str]:
        """What the file holds, as far as this process knows: cached unless it changed on disk.

        Raises:
            RegistryError: the file is unreadable or malformed.
        """
        if self._values is not None and self._changes > max(self._persisted, self._lost):
            return self._values  # ahead of the disk: a write of it is under way
        stamp = self._stamp()
        if self._values is None or stamp != self._file_stamp:
            self._values = read_registry_file(self.path)
            self._file_stamp = stamp
        return self._values

    async def _write_program(self, program: str, new: Snapshot) -> None:
        """Change ``program``'s keys in memory, then wait until a write has put them on disk.

        Raises:
            RegistryError: the file could not be read or written (the change is dropped).
        """
        # In place: a copy per change made 1000 programs starting at once cost a copy of the
        # whole key set each. The writer thread gets its own copy (taken under the lock below).
        values = self._current()
        _apply(values, self.prefix, program, new)
        self._values = values
        self._changes += 1
        mine = self._changes
        # Shielded: a cancelled caller must not leave its change in memory but not on disk.
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                if self._persisted >= mine:
                    return  # the write that just finished carried this change too
                if self._lost >= mine:
                    raise RegistryError(
                        f"cannot write the registry file {self.path}: the write that carried "
                        "this change failed",
                        unwritable_advice(self.path),
                    )
                target, snapshot = self._changes, dict(self._values)
                try:
                    await anyio.to_thread.run_sync(write_registry_file, self.path, snapshot)
                except RegistryError:
                    # Forget what did not reach the disk: read the file again next time.
                    self._values, self._file_stamp = None, None
                    self._lost = self._changes
                    raise
                self._persisted = target
                self._file_stamp = self._stamp()
