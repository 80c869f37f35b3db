"""One program's etcd keys, read and written on a live connection, each write one transaction
that compares what was read (``etcd.py`` says why): made to say what the registry wants
(``reconcile``), unless another supervisor on the prefix promoted the program since
(``keys_owner``: left to it, with a warning), or withdrawn (``withdraw_now``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from aetcd import rpc

from flipvisor.starttime import Recorded

from .base import (
    KEY_SUFFIXES,
    Snapshot,
    names_current,
    owner_of,
    program_key,
    taken_by_another,
    withdrawn,
)
from .etcd_client import (
    EtcdConnection,
    text_of,
    txn_compare_unchanged_since,
    txn_compare_value,
    txn_read,
    txn_values,
    txn_write,
)
from .etcd_conflicts import MAX_CONFLICTS, ConflictBackoff
from .etcd_intent import EtcdIntent
from .keys_owner import promoted_by_another

log = logging.getLogger("flipvisor.registry.etcd")  # the registry's own


@dataclass
class ProgramKeys:
    """The keys of the registry's programs under ``prefix``, written as ``intent`` wants, under
    ``write_lock``; ``wake`` asks the registry to decide again (a write found the keys changed
    since its read)."""

    prefix: str
    intent: EtcdIntent
    write_lock: anyio.Lock
    wake: Callable[[], None]
    conflicts: ConflictBackoff = field(default_factory=ConflictBackoff)

    async def reconcile(self, conn: EtcdConnection, program: str) -> None:
        """Make ``program``'s keys say ``desired`` if they do not already.

        Raises:
            RegistryError: the connection failed.
        """
        async with self.write_lock:
            if program in self.intent.withdrawing:
                await self.withdraw_now(conn, program)
                return
            want = self.intent.desired.get(program)
            if want is None:  # nothing of it to keep written (nor given up on) any more
                self.conflicts.cleared(program)
                self.intent.pending.discard(program)
                return
            fenced = program in self.intent.fenced
            have = await self.read(conn, program)
            if dict(have.values) == dict(want.values) and not fenced:
                pass
            elif (owner := promoted_by_another(have, self.intent.snapshots(program))) is not None:
                # Another supervisor on the prefix promoted the program since: its keys. Our
                # lost swap (fenced), if any, cannot land on them: they moved on since it read.
                self.intent.fenced.discard(program)
                self._leave(program, have, owner)
            elif await self._write_if_unchanged(conn, program, have, want, every_key=fenced):
                # A fenced program is rewritten even if the keys look right: a lost swap may
                # still land, and must find every key's revision moved on.
                self.intent.written[program] = want
                self.intent.fenced.discard(program)
                self.intent.left.pop(program, None)
                why = "after a lost promotion" if fenced else "to match what is serving"
                log.info("program=%s etcd keys rewritten %s", program, why)
            else:
                self._conflicted(program)
                return
            self.conflicts.cleared(program)
            if self.intent.desired.get(program) is want:
                self.intent.pending.discard(program)

    def _conflicted(self, program: str) -> None:
        """``program``'s keys changed since the read: decide again from a new one, after a
        delay (``etcd_conflicts``); or, after too many conflicts in a row, not until the next
        publish, withdrawal or reconnect, with a warning (and ``status`` shows it meanwhile)."""
        if self.conflicts.conflicted(program, anyio.current_time()):
            self.wake()  # so that ``run`` waits for the new delay
            return
        self.intent.pending.discard(program)
        log.warning(
            "program=%s etcd keys not rewritten: another writer changed them %d times in a row "
            "while this supervisor wrote them; tried again at the next publish, withdrawal or "
            "reconnect (status lists it as conflicting until then)",
            program,
            MAX_CONFLICTS,
        )

    def _leave(self, program: str, have: Snapshot, owner: Recorded) -> None:
        """Leave ``program``'s keys to the supervisor ``owner`` that promoted it since: warned
        once (until the keys are ours again or another supervisor takes them)."""
        if self.intent.left.get(program) != owner:
            self.intent.left[program] = owner
            log.warning(
                "program=%s etcd keys not rewritten: they name %s now, not what this supervisor "
                "serves (another supervisor on the prefix promoted it); left to it",
                program,
                owner_of(have),
            )

    async def withdraw_now(self, conn: EtcdConnection, program: str) -> None:
        """Rewrite ``program``'s keys without ``current``, from what etcd holds now, if they
        still name what this registry wrote (or took over); then forget the program. Under the
        write lock.

        Raises:
            RegistryError: the connection failed.
        """
        withdrawal = self.intent.withdrawing[program]
        ours = self.intent.ours(program)
        fenced = program in self.intent.fenced
        have = await self.read(conn, program)
        if taken_by_another(program, have, ours, "etcd keys"):
            pass  # forgotten below, as a withdrawal that landed
        elif names_current(have) or fenced:
            # Fenced: every key is rewritten, so that a lost swap that lands late fails.
            if not await self._write_if_unchanged(
                conn, program, have, withdrawn(have), every_key=fenced
            ):
                self._conflicted(program)
                return
            log.info("program=%s etcd keys withdrawn: nothing serves it", program)
        self.conflicts.cleared(program)
        if self.intent.withdrawing.get(program) == withdrawal:  # not superseded meanwhile
            self.intent.forget(program)

    async def _write_if_unchanged(
        self,
        conn: EtcdConnection,
        program: str,
        have: Snapshot,
        new: Snapshot,
        *,
        every_key: bool,
    ) -> bool:
        """Write ``new`` in one transaction if every key still holds ``have`` and none changed
        since it was read (``intent.seen``); whether it did. Only the keys that differ are written
        (a replaced worker changes ``pid/current`` and the record, nothing else: a watcher of
        ``pid/previous`` sees no put), unless ``every_key`` (fenced: a lost swap that lands late
        must find every key's revision moved on).

        Raises:
            RegistryError: the connection failed.
        """
        keys = self.keys(program)
        compare = [txn_compare_value(key, have.get(suffix)) for suffix, key in keys.items()]
        compare += [
            txn_compare_unchanged_since(key, self.intent.seen[program]) for key in keys.values()
        ]
        success = [
            txn_write(key, new.get(suffix))
            for suffix, key in keys.items()
            if every_key or new.get(suffix) != have.get(suffix)
        ]
        reply = await conn.call("Txn", rpc.TxnRequest(compare=compare, success=success))
        if reply.succeeded:
            self.intent.seen[program] = reply.header.revision
        return bool(reply.succeeded)

    def keys(self, program: str) -> dict[str, str]:
        return {suffix: program_key(self.prefix, program, suffix) for suffix in KEY_SUFFIXES}

    async def read(self, conn: EtcdConnection, program: str) -> Snapshot:
        """``program``'s keys, read in one transaction (so at one revision, which ``seen``
        keeps for the compare of the next write). Only those keys, never a range over the
        program's folder: other keys there (another tool's data) could make the reply exceed
        what gRPC takes (4 MiB), failing every flip and withdrawal.

        Raises:
            RegistryError: the connection failed.
        """
        keys = self.keys(program)
        request = rpc.TxnRequest(success=txn_read(list(keys.values())))
        reply = await conn.call("Txn", request)
        self.intent.seen[program] = reply.header.revision
        values = txn_values(reply, text_of)
        return Snapshot({s: values[k] for s, k in keys.items() if k in values})
