"""The ``etcd`` registry backend: promotions as one transaction, kept true across outages.

``swap`` compares every key of the program against what the caller read, and that none changed
since this registry last read or wrote them (their revisions), and writes the new values in the
same transaction. When a swap's outcome is lost (a timeout, a cancelled flip), etcd may still
apply it later, so the keys are put back by rewriting every one of them: that moves their
revisions on, and a late transaction fails its compare.

The registry remembers the latest value it swapped or published for every program (``desired``);
``run`` keeps a connection alive, notices an outage when its liveness watch stream breaks (TCP
reset, or HTTP/2 keepalive for a silent peer: no polling), reconnects with backoff, and then
rewrites every desired program whose keys differ, so the keys match what is serving within
seconds of etcd coming back. A program that stopped serving is *withdrawn*: its keys are read and
rewritten without ``current`` (``base.withdrawn``) when etcd answers, which may be only after an
outage, in a transaction that compares what was read; and only while they still name what this
registry last wrote (``desired``, or a lost swap's value that may have landed). Keys another
writer promoted meanwhile are left to it. Then the program is forgotten: reconnects leave its
keys alone until it is promoted again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import grpc  # type: ignore[import-untyped]
from aetcd import rpc
from anyio.abc import TaskStatus

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryConflict, RegistryError

from .base import (
    KEY_SUFFIXES,
    KeyRange,
    Snapshot,
    WatchEvent,
    names_current,
    naming,
    program_key,
    taken_by_another,
    withdrawn,
)
from .etcd_client import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    EtcdConnection,
    connect,
    describe_rpc_error,
    range_of,
    txn_compare_unchanged_since,
    txn_compare_value,
    txn_read,
    txn_values,
    txn_write,
)
from .etcd_watch import watch_keys

log = logging.getLogger(__name__)

STABLE_AFTER = 5.0  # a connection that lived this long resets the backoff


class EtcdRegistry:
    """The registry in etcd; see the module docstring. Start ``run`` in the owner's task group."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.desired: dict[str, Snapshot] = {}
        self._pending: set[str] = set()
        # The etcd revision at which this registry last read or wrote each program's keys.
        self._seen: dict[str, int] = {}
        # Programs whose last swap's outcome was lost: their keys are rewritten, not compared.
        self._fenced: set[str] = set()
        # What a swap whose outcome was lost may have written: a withdrawal applies to it too.
        self._maybe: dict[str, Snapshot] = {}
        # What etcd holds for a program from this registry's last write that landed: a publish
        # still pending (etcd unreachable) leaves it there while ``desired`` says what is to come.
        self._written: dict[str, Snapshot] = {}
        # Programs to withdraw (``withdraw``), each with the number of that call (a swap that
        # began before it does not cancel it; a later swap or publish does) and the record of
        # the killed supervisor's workers it took over, if any.
        self._withdrawing: dict[str, tuple[int, str | None]] = {}
        self._calls = 0
        self._conn: EtcdConnection | None = None
        self._connect_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._kick = anyio.Event()
        self._running = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.broken.is_set()

    def health(self) -> dict[str, Any]:
        where = self._conn.endpoint if self._conn else ", ".join(self.config.endpoints)
        return {
            "backend": "etcd",
            "where": where,
            "connected": self.connected,
            "pending": sorted(self._pending),
        }

    def _timeout_error(self) -> RegistryError:
        where = self._conn.endpoint if self._conn else ", ".join(self.config.endpoints)
        return RegistryError(f"etcd at {where} did not answer within {self.config.timeout:g} s")

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[EtcdConnection]:
        """The live connection (connecting now if there is none), held open while in the block.

        Raises:
            RegistryError: no endpoint answered within the timeout.
        """
        async with self._connect_lock:
            conn = self._conn
            if conn is None or conn.broken.is_set():
                self._conn = None
                conn = await connect(self.config, f"{self.prefix}/")
                self._conn = conn
                self._pending.update(self.desired)  # a new connection checks every program
                self._kick.set()
        async with conn.use():
            yield conn

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
        """Hold a watch stream open until it breaks, then mark the connection broken."""
        call = conn.open_watch()
        try:
            key, range_end = range_of(f"{self.prefix}/.flipvisor-liveness")
            create = rpc.WatchCreateRequest(key=key, range_end=range_end)
            await call.write(rpc.WatchRequest(create_request=create))
            while await call.read() is not grpc.aio.EOF:
                pass
            log.warning("etcd at %s closed the watch stream", conn.endpoint)
        except grpc.aio.AioRpcError as exc:
            log.warning("%s", describe_rpc_error(exc, conn.endpoint, conn.timeout))
        finally:
            call.cancel()
            conn.broken.set()
            self._kick.set()

    async def _keep_written(self, conn: EtcdConnection) -> None:
        """Write pending programs whenever kicked, until the connection breaks."""
        while not conn.broken.is_set():
            self._kick = anyio.Event()  # before writing, so a publish meanwhile kicks again
            for program in sorted(self._pending):
                try:
                    await self._reconcile(conn, program)
                except RegistryError as exc:
                    log.warning("program=%s cannot update etcd keys yet: %s", program, exc)
                    return
            await self._kick.wait()

    async def _reconcile(self, conn: EtcdConnection, program: str) -> None:
        """Make ``program``'s keys say ``desired`` if they do not already.

        Raises:
            RegistryError: the connection failed.
        """
        async with self._write_lock:
            if program in self._withdrawing:
                await self._withdraw_now(conn, program)
                return
            want = self.desired.get(program)
            if want is None:
                self._pending.discard(program)
                return
            if program in self._fenced:
                # Even if they look right: a lost swap may still land, and must find every
                # key's revision moved on.
                await self._write_program(conn, program, want)
                self._fenced.discard(program)
                log.info("program=%s etcd keys rewritten after a lost promotion", program)
            else:
                have = await self._read_program(conn, program)
                if dict(have.values) != dict(want.values):
                    await self._write_program(conn, program, want)
                    log.info("program=%s etcd keys rewritten to match what is serving", program)
            if self.desired.get(program) is want:
                self._pending.discard(program)

    async def _withdraw_now(self, conn: EtcdConnection, program: str) -> None:
        """Rewrite ``program``'s keys without ``current``, from what etcd holds now, if they
        still name what this registry wrote (or took over); then forget the program. Under the
        write lock.

        Raises:
            RegistryError: the connection failed.
        """
        withdrawal = self._withdrawing[program]
        ours = [
            naming(snapshot)
            for snapshot in (
                self.desired.get(program),
                self._maybe.get(program),
                self._written.get(program),
            )
            if snapshot is not None
        ]
        if withdrawal[1] is not None:
            ours.append({"generation/current": withdrawal[1]})
        fenced = program in self._fenced
        have = await self._read_program(conn, program)
        if taken_by_another(program, have, ours, "etcd keys"):
            pass  # forgotten below, as a withdrawal that landed
        elif names_current(have) or fenced:
            # Fenced: every key is rewritten, so that a lost swap that lands late fails.
            if not await self._write_if_unchanged(conn, program, have, withdrawn(have)):
                self._kick.set()  # changed since the read: decide again from a new one
                return
            log.info("program=%s etcd keys withdrawn: nothing serves it", program)
        if self._withdrawing.get(program) == withdrawal:  # not superseded meanwhile
            self._forget(program)

    async def _write_if_unchanged(
        self, conn: EtcdConnection, program: str, have: Snapshot, new: Snapshot
    ) -> bool:
        """Write ``new`` in one transaction if every key still holds ``have`` and none changed
        since it was read (``_seen``); whether it did.

        Raises:
            RegistryError: the connection failed.
        """
        keys = self._keys(program)
        compare = [txn_compare_value(key, have.get(suffix)) for suffix, key in keys.items()]
        compare += [txn_compare_unchanged_since(key, self._seen[program]) for key in keys.values()]
        success = [txn_write(key, new.get(suffix)) for suffix, key in keys.items()]
        reply = await conn.call("Txn", rpc.TxnRequest(compare=compare, success=success))
        if reply.succeeded:
            self._seen[program] = reply.header.revision
        return bool(reply.succeeded)

    def _forget(self, program: str) -> None:
        """``program``'s withdrawal is over: nothing of it is kept true any more (until a
        swap or publish names it again)."""
        self._withdrawing.pop(program, None)
        self.desired.pop(program, None)
        self._seen.pop(program, None)
        self._fenced.discard(program)
        self._maybe.pop(program, None)
        self._written.pop(program, None)
        self._pending.discard(program)

    def _keys(self, program: str) -> dict[str, str]:
        return {suffix: program_key(self.prefix, program, suffix) for suffix in KEY_SUFFIXES}

    async def _read_program(self, conn: EtcdConnection, program: str) -> Snapshot:
        key, range_end = range_of(f"{self.prefix}/{program}/")
        reply = await conn.call("Range", rpc.RangeRequest(key=key, range_end=range_end))
        self._seen[program] = reply.header.revision
        values = {kv.key.decode(): kv.value.decode() for kv in reply.kvs}
        return Snapshot({s: values[k] for s, k in self._keys(program).items() if k in values})

    async def _write_program(self, conn: EtcdConnection, program: str, new: Snapshot) -> None:
        ops = [txn_write(key, new.get(suffix)) for suffix, key in self._keys(program).items()]
        reply = await conn.call("Txn", rpc.TxnRequest(success=ops))
        self._seen[program] = reply.header.revision
        self._written[program] = new

    async def snapshot(self, program: str) -> Snapshot:
        """``program``'s keys in one linearizable read.

        Raises:
            RegistryError: etcd did not answer within the request timeout.
        """
        try:
            with anyio.fail_after(self.config.timeout):
                async with self._use() as conn:
                    return await self._read_program(conn, program)
        except TimeoutError:
            raise self._timeout_error() from None

    async def swap(self, program: str, expected: Snapshot, new: Snapshot) -> None:
        """Replace ``program``'s keys with ``new`` in one transaction if they hold ``expected``.

        When the outcome is unknown (etcd failed mid-request) ``expected`` becomes desired, so
        after the outage the keys are put back to what the caller still serves.

        Raises:
            RegistryConflict: a key differs from ``expected``; the message names it.
            RegistryError: etcd was unreachable or did not answer within the request timeout.
        """
        keys = self._keys(program)
        began = self._calls
        compare = [txn_compare_value(key, expected.get(suffix)) for suffix, key in keys.items()]
        seen = self._seen.get(program)
        if seen is not None:
            compare += [txn_compare_unchanged_since(key, seen) for key in keys.values()]
        success = [txn_write(key, new.get(suffix)) for suffix, key in keys.items()]
        failure = txn_read([f"{self.prefix}/{program}/"])
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        try:
            with anyio.fail_after(self.config.timeout):
                async with self._use() as conn, self._write_lock:
                    reply = await conn.call("Txn", request)
                    if reply.succeeded:
                        # Under the lock, so no reconcile writes an older desired value over it.
                        self.desired[program] = new
                        self._pending.discard(program)
                        self._fenced.discard(program)  # it rewrote the keys: fenced as well
                        self._maybe.pop(program, None)
                        self._written[program] = new
                        self._supersede_withdrawal(program, began)
                        self._seen[program] = reply.header.revision
        except TimeoutError:
            self._remember(program, expected, lost=new, began=began)
            raise self._timeout_error() from None
        except RegistryError:
            self._remember(program, expected, lost=new, began=began)
            raise
        except BaseException:
            # Cancelled (a flip's --timeout) while etcd may have applied the transaction: the
            # outcome is unknown as after a timeout, and the caller goes on serving `expected`.
            self._remember(program, expected, lost=new, began=began)
            raise
        if not reply.succeeded:
            found = txn_values(reply)
            for suffix, key in keys.items():
                if found.get(key) != expected.get(suffix):
                    raise RegistryConflict(
                        f"etcd key {key} changed: expected {expected.get(suffix)!r}, found "
                        f"{found.get(key)!r} (another writer promoted {program}?)"
                    )
            raise RegistryConflict(f"etcd keys of {program} changed during the promotion")

    def _remember(
        self,
        program: str,
        value: Snapshot,
        *,
        lost: Snapshot | None = None,
        began: int | None = None,
    ) -> None:
        """``value`` is what ``program``'s keys should say; ``lost``: what a swap whose outcome
        is unknown may have written instead; ``began``: the ``_calls`` count when the swap that
        wants it began (a withdrawal asked for since then still applies)."""
        self.desired[program] = value
        self._supersede_withdrawal(program, began)
        self._pending.add(program)
        if lost is not None:
            self._fenced.add(program)
            self._maybe[program] = lost
        self._kick.set()

    def _supersede_withdrawal(self, program: str, began: int | None) -> None:
        """Forget a pending withdrawal of ``program`` asked for before ``began`` (None: any)."""
        if began is None or self._withdrawing.get(program, (began, None))[0] <= began:
            self._withdrawing.pop(program, None)

    async def withdraw(
        self, program: str, *, taken_over: str | None = None, final: bool = False
    ) -> None:
        """Make ``program``'s keys name nothing serving (``base.withdrawn`` of what etcd holds
        then) if they still name what this registry wrote for it or ``taken_over``: now if etcd
        answers within the request timeout, else once it is back (see ``Registry.withdraw``).

        Never raises: a withdrawal etcd did not answer stays pending for ``run``.
        """
        known = program in self.desired or program in self._maybe
        if not known and taken_over is None:
            log.debug("program=%s no etcd keys of ours to withdraw", program)
            return
        self._calls += 1
        self._withdrawing[program] = (self._calls, taken_over)
        self._pending.add(program)
        self._kick.set()
        if final:
            later = "left as they are: the next `flipvisor run` replaces them"
        else:
            later = "withdrawn once etcd is back, if they still name what this supervisor wrote"
        if self._running and not self.connected:
            log.warning("program=%s etcd keys %s", program, later)
            return  # ``run`` is reconnecting and will write it then
        with anyio.move_on_after(self.config.timeout) as deadline:
            try:
                async with self._use() as conn:
                    await self._reconcile(conn, program)
            except RegistryError as exc:
                log.warning("program=%s etcd keys %s: %s", program, later, exc)
        if deadline.cancelled_caught:
            log.warning("program=%s etcd keys %s: %s", program, later, self._timeout_error())

    async def publish(self, program: str, new: Snapshot) -> None:
        """Make ``program``'s keys say ``new``: now if etcd answers, else once it is back.

        Never raises: a failed write stays pending for ``run``.
        """
        self._remember(program, new)
        if self._running and not self.connected:
            return  # ``run`` is reconnecting and will write it then
        with anyio.move_on_after(self.config.timeout):
            try:
                async with self._use() as conn:
                    await self._reconcile(conn, program)
            except RegistryError as exc:
                log.warning("program=%s etcd keys left pending: %s", program, exc)

    async def read_keys(self, patterns: Sequence[str]) -> KeyRange:
        """Every key matching ``patterns``, read in one transaction (so at one revision).

        Raises:
            RegistryError: etcd did not answer within the request timeout.
        """
        try:
            with anyio.fail_after(self.config.timeout):
                async with self._use() as conn:
                    reply = await conn.call("Txn", rpc.TxnRequest(success=txn_read(patterns)))
        except TimeoutError:
            raise self._timeout_error() from None
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
