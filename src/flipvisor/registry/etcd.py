"""The ``etcd`` registry backend: promotions as one transaction, kept true across outages.

``swap`` compares every key of the program against what the caller read, and that none changed
since this registry last read or wrote them (their revisions), and writes the new values in the
same transaction. When a swap's outcome is lost (a timeout, a cancelled flip), etcd may still
apply it later, so the keys are put back by rewriting every one of them: that moves their
revisions on, and a late transaction fails its compare.

The registry remembers the latest value it swapped or published for every program (``desired``,
kept in ``etcd_intent`` with the rest of its bookkeeping); ``run`` keeps a connection alive,
notices an outage when its liveness watch stream breaks (TCP reset, or HTTP/2 keepalive for a
silent peer: no polling), reconnects with backoff, and then rewrites every desired program whose
keys differ, so the keys match what is serving within seconds of etcd coming back. Until etcd
answers again, it keeps the error of the request it did not answer (``unanswered``; a request
past its timeout also makes ``run`` reconnect, which tells when it answers again): a first start
then registers later at once, rather than wait another timeout. What etcd (or whatever
answered) said that is no outage (credentials, no etcd there, a full database) is ``problem``
for `status`, until a request succeeds. Such a rewrite
(and a ``publish``: a replaced worker's PIDs) is one transaction that compares what was read, and
applies only to keys that are this supervisor's, missing or garbage: keys whose record names
another supervisor on the prefix that promoted the program since are left to it, with a warning
(``keys_owner``). A hand edit of keys whose record is still ours is healed. A write that finds
the keys changed since its read is tried again after a growing delay, and given up after a few in
a row until the next trigger (``etcd_conflicts``). A program that
stopped serving is *withdrawn*: its keys are read and rewritten without ``current``
(``base.withdrawn``) when etcd answers, which may be only after an outage, in a transaction that
compares what was read; and only while they still name what this registry last wrote (``desired``,
or a lost swap's value that may have landed). Keys another writer promoted meanwhile are left to
it. Then the program is forgotten: reconnects leave its keys alone until it is promoted again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aetcd import rpc
from anyio.abc import TaskStatus

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryConflict, RegistryError, RegistryUnanswered

from .base import (
    KeyRange,
    Snapshot,
    WatchEvent,
)
from .etcd_client import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    EtcdConnection,
    connect,
    text_of,
    txn_compare_unchanged_since,
    txn_compare_value,
    txn_read,
    txn_values,
    txn_write,
)
from .etcd_errors import TokenExpired
from .etcd_intent import EtcdIntent
from .etcd_keys import ProgramKeys
from .etcd_watch import watch_keys

log = logging.getLogger(__name__)

STABLE_AFTER = 5.0  # a connection that lived this long resets the backoff


def _said(exc: RegistryError) -> str | None:
    """For `status`: ``exc`` (with its next step if it knows one) for anything that answered (a
    refusal, a full database, no etcd there); None for an outage (`status` says "unreachable"),
    a conflict (said of the keys given up on) or an expired token (a new login fixes it)."""
    if isinstance(exc, (RegistryUnanswered, RegistryConflict, TokenExpired)):
        return None
    return str(exc) if exc.next_step is None else f"{exc}; {exc.next_step}"


class EtcdRegistry:
    """The registry in etcd; see the module docstring. Start ``run`` in the owner's task group."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.request_timeout = config.timeout
        self.intent = EtcdIntent(wake=self._wake)
        self._conn: EtcdConnection | None = None
        self._connect_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._kick = anyio.Event()
        self._running = False
        # How etcd answered the latest request (``_outcome``): the error it gave no answer to,
        # while it answered none since (``unanswered``); what it (or whatever answered) said
        # that is no outage, shown by `status`, until a request succeeds (``problem``).
        self._unanswered: RegistryError | None = None
        self.problem: str | None = None
        self.keys = ProgramKeys(self.prefix, self.intent, self._write_lock, self._wake)

    def _wake(self) -> None:
        """Wake ``run`` to write what ``intent`` wants (``_kick`` is a new event every round)."""
        self._kick.set()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.broken.is_set()

    def health(self) -> dict[str, Any]:
        where = self._conn.endpoint if self._conn else ", ".join(self.config.endpoints)
        return {
            "backend": "etcd",
            "where": where,
            "connected": self.connected,
            "pending": sorted(self.intent.pending),
            "problem": self.problem,
            # Given up on after conflicts in a row with another writer (``etcd_conflicts``).
            "conflicting": sorted(self.keys.conflicts.given_up),
        }

    def unanswered(self) -> RegistryError | None:
        """Why etcd is known not to answer (``Registry.unanswered``): a first start that finds
        it so defers its registration at once, not after another ``registry.timeout``."""
        return self._unanswered

    def _outcome(self, exc: RegistryError | None) -> None:
        """Remember how the latest request or connection attempt ended: failed with ``exc``,
        or succeeded (None: clears both). ``unanswered`` keeps an error etcd gave no answer to
        (``RegistryUnanswered``; a refusal, a lost compare, an endpoint that is no etcd all
        answered); ``problem``, what etcd or whatever answered said (``_said``)."""
        self._unanswered = exc if isinstance(exc, RegistryUnanswered) else None
        self.problem = None if exc is None else _said(exc)

    @asynccontextmanager
    async def _request(self) -> AsyncIterator[EtcdConnection]:
        """The live connection for one request bounded by the request timeout, recording its
        outcome (``_outcome``), the deadline's ``TimeoutError`` turned into the
        ``RegistryUnanswered`` that says so.

        A request past its deadline retires its connection and wakes ``run``: this deadline
        passes before the call's own (which would mark the connection broken), and the
        liveness watch outlives a short stall, so nothing else would reconnect, and nothing
        would find out that etcd answers again (``unanswered`` would stay set).

        Raises:
            RegistryError: etcd refused, failed, or did not answer within the timeout.
        """
        used: EtcdConnection | None = None
        try:
            with anyio.fail_after(self.config.timeout):
                async with self._use() as conn:  # records a RegistryError on the way
                    used = conn
                    yield conn
        except TimeoutError:
            error = self._timeout_error()
            self._outcome(error)
            if used is not None:
                await used.retire()
            raise error from None
        finally:
            if used is not None and used.broken.is_set():
                self._kick.set()  # ``run``: reconnect, which tells when etcd answers again
        self._outcome(None)

    def _timeout_error(self) -> RegistryError:
        where = self._conn.endpoint if self._conn else ", ".join(self.config.endpoints)
        return RegistryUnanswered(
            f"etcd at {where} did not answer within {self.config.timeout:g} s"
        )

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[EtcdConnection]:
        """The live connection (connecting now if there is none), held open while in the block.
        A ``RegistryError`` on the way is recorded (``_outcome``); a new connection is an
        answer (``unanswered`` clears), not yet a request that succeeded (``problem`` stays).

        Raises:
            RegistryError: no endpoint answered within the timeout.
        """
        try:
            async with self._connect_lock:
                conn = self._conn
                if conn is None or conn.broken.is_set():
                    self._conn = None
                    conn = await connect(self.config, f"{self.prefix}/")
                    self._conn = conn
                    self._unanswered = None
                    # A new connection checks every program: those to keep written and those to
                    # withdraw (a taken-over one is in ``withdrawing`` alone), given up on or not.
                    self.intent.pending.update(self.intent.desired, self.intent.withdrawing)
                    self._kick.set()
            async with conn.use():
                yield conn
        except RegistryError as exc:
            self._outcome(exc)
            raise

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Stay connected, reconnect after outages, and write what ``desired`` says; until
        cancelled. Starts at once, even while etcd is unreachable."""
        self._running = True
        task_status.started()
        delay, outage_logged = MIN_BACKOFF, False
        try:
            while True:
                try:
                    async with self._use() as conn:
                        if outage_logged:
                            log.info("etcd at %s is reachable again", conn.endpoint)
                            outage_logged = False
                        began = anyio.current_time()
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._watch_liveness, conn)
                            await self._keep_written(conn)
                            tg.cancel_scope.cancel()
                        await conn.retire()
                    if anyio.current_time() - began > STABLE_AFTER:
                        delay = MIN_BACKOFF
                except RegistryError as exc:
                    if not outage_logged:
                        log.warning("%s; retrying", exc)
                        outage_logged = True
                await anyio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        finally:
            self._running = False

    async def _watch_liveness(self, conn: EtcdConnection) -> None:
        """Hold a watch stream open until the connection breaks; then wake ``_keep_written``."""
        try:
            await conn.watch_until_broken(f"{self.prefix}/.flipvisor-liveness")
        finally:
            self._kick.set()

    async def _keep_written(self, conn: EtcdConnection) -> None:
        """Write pending programs whenever kicked, until the connection breaks; one whose last
        write found its keys changed by another writer once its delay is over
        (``etcd_conflicts``)."""
        backoff = self.keys.conflicts
        while not conn.broken.is_set():
            self._kick = anyio.Event()  # before writing, so a publish meanwhile kicks again
            wrote = False
            for program in sorted(self.intent.pending):
                if not backoff.due(program, anyio.current_time()):
                    continue
                try:
                    await self.keys.reconcile(conn, program)
                except RegistryError as exc:
                    self._outcome(exc)
                    log.warning("program=%s cannot update etcd keys yet: %s", program, exc)
                    return
                self._unanswered, wrote = None, True  # etcd answered (maybe after a timeout)
            if wrote:
                self.problem = None  # every program due was written: etcd took a request
            with anyio.move_on_after(backoff.wait(self.intent.pending, anyio.current_time())):
                await self._kick.wait()

    async def snapshot(self, program: str) -> Snapshot:
        """``program``'s keys in one linearizable read.

        Raises:
            RegistryError: etcd did not answer within the request timeout.
        """
        async with self._request() as conn:
            return await self.keys.read(conn, program)

    async def swap(self, program: str, expected: Snapshot, new: Snapshot) -> None:
        """Replace ``program``'s keys with ``new`` in one transaction if they hold ``expected``.

        When the outcome is unknown (etcd failed mid-request) ``expected`` becomes desired, so
        after the outage the keys are put back to what the caller still serves.

        Raises:
            RegistryConflict: a key differs from ``expected``; the message names it.
            RegistryError: etcd was unreachable or did not answer within the request timeout.
        """
        keys = self.keys.keys(program)
        began = self.intent.calls
        compare = [txn_compare_value(key, expected.get(suffix)) for suffix, key in keys.items()]
        seen = self.intent.seen.get(program)
        if seen is not None:
            compare += [txn_compare_unchanged_since(key, seen) for key in keys.values()]
        success = [txn_write(key, new.get(suffix)) for suffix, key in keys.items()]
        # Read back only the program's keys (not its folder, where other keys may be large).
        failure = txn_read(list(keys.values()))
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        try:
            async with self._request() as conn, self._write_lock:
                reply = await conn.call("Txn", request)
                if reply.succeeded:
                    # Under the lock, so no reconcile writes an older desired value over it.
                    self.intent.swapped(program, new, began=began, revision=reply.header.revision)
                    self.keys.conflicts.cleared(program)  # written: no backoff left
        except RegistryError:  # a timeout too (``_request``)
            self.intent.remember(program, expected, lost=new, began=began)
            raise
        except BaseException:
            # Cancelled (a flip's --timeout) while etcd may have applied the transaction: the
            # outcome is unknown as after a timeout, and the caller goes on serving `expected`.
            self.intent.remember(program, expected, lost=new, began=began)
            raise
        if not reply.succeeded:
            # Decoded as ``expected`` was read (``keys.read``): a key holding bytes that are
            # not UTF-8 compares equal to itself.
            raise self._conflict(program, expected, txn_values(reply, text_of))

    def _conflict(
        self, program: str, expected: Snapshot, found: Mapping[str, str]
    ) -> RegistryConflict:
        """What a swap that found ``found`` (its failure branch's read) says: the key that
        differed from ``expected``."""
        for suffix, key in self.keys.keys(program).items():
            if found.get(key) != expected.get(suffix):
                return RegistryConflict(
                    f"etcd key {key} changed: expected {expected.get(suffix)!r}, found "
                    f"{found.get(key)!r} (another writer promoted {program}?)"
                )
        return RegistryConflict(f"etcd keys of {program} changed during the promotion")

    async def withdraw(
        self, program: str, *, taken_over: str | None = None, final: bool = False
    ) -> None:
        """Make ``program``'s keys name nothing serving (``base.withdrawn`` of what etcd holds
        then) if they still name what this registry wrote for it or ``taken_over``: now if etcd
        answers within the request timeout, else once it is back (see ``Registry.withdraw``).

        Never raises: a withdrawal etcd did not answer stays pending for ``run``.
        """
        if not self.intent.ask_withdrawal(program, taken_over):
            log.debug("program=%s no etcd keys of ours to withdraw", program)
            return
        self._kick.set()
        if final:
            later = "left as they are: the next `flipvisor run` replaces them"
        else:
            later = "withdrawn once etcd is back, if they still name what this supervisor wrote"
        if self._running and not self.connected:
            log.warning("program=%s etcd keys %s", program, later)
            return  # ``run`` is reconnecting and will write it then
        try:
            await self._reconcile_within_timeout(program)
        except RegistryError as exc:
            log.warning("program=%s etcd keys %s: %s", program, later, exc)

    async def publish(self, program: str, new: Snapshot) -> None:
        """Make ``program``'s keys say ``new``: now if etcd answers, else once it is back.

        Never raises: a failed write stays pending for ``run``.
        """
        self.intent.remember(program, new)
        if self._running and not self.connected:
            return  # ``run`` is reconnecting and will write it then
        try:
            await self._reconcile_within_timeout(program)
        except RegistryError as exc:
            log.warning("program=%s etcd keys left pending: %s", program, exc)

    async def _reconcile_within_timeout(self, program: str) -> None:
        """``keys.reconcile`` of ``program`` now, within the request timeout.

        Raises:
            RegistryError: etcd failed, or did not answer in time.
        """
        async with self._request() as conn:
            await self.keys.reconcile(conn, program)

    async def read_keys(self, patterns: Sequence[str]) -> KeyRange:
        """Every key matching ``patterns``, read in one transaction (so at one revision).

        Raises:
            RegistryError: etcd did not answer within the request timeout.
        """
        async with self._request() as conn:
            reply = await conn.call("Txn", rpc.TxnRequest(success=txn_read(patterns)))
        return KeyRange(txn_values(reply), reply.header.revision)

    def watch(
        self, patterns: Sequence[str], since: KeyRange | None = None
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """``etcd_watch.watch_keys`` on this registry's connection."""
        return watch_keys(self._use, patterns, since)

    async def aclose(self) -> None:
        """Close the connection (its last user closes it if one is still in use)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.retire()
