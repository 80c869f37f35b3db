"""The proxy-undo journal: what a flip's (or a removed program's) proxy step replaces, recorded
durably in ``<state_dir>/proxy-undo/<program>.json`` before the step replaces or removes a proxy
file, and removed once the change stands (promoted: keys swapped, proxy reloaded) or was undone
(the file put back, and the proxy reloaded back if it may have reloaded with it).

``Installed`` keeps the previous bytes in memory only: a supervisor killed (SIGKILL, the OOM
killer) between a file's install and the promotion's end takes them with it, and the file of a
generation never promoted would stay in place. A record left behind is how the next ``run``
knows (``proxy_recovery.py``): ``proxy_record.pending`` reads them back, and the previous files
are put back only where they still hold what the interrupted step wrote (an operator's hand edit
since is left alone).

A flip's record is marked once its proxy step is done, before its registry step
(``before_registry_step``): one without the mark was certainly never promoted, and is put back
even when the next start cannot read the registry. A record kept undecided by such a start is
dropped once this run promotes a flip of the program over the same files (``promoted``). A record
kept for the next start's reload (``reload_back_failed``, or a reload at start-up that failed) is
set aside by the program's next step rather than overwritten (``proxy_record.set_aside``), and
dropped once that step reloads the proxy over the same files (``promoted``, ``reloaded_back``) or
keeps its own record for the same reload.

One small write (atomic, fsynced) per file a step changes, one for a flip's mark, one removal at its
end; blocking calls, run off the event loop. The folder is made when a record finds it missing
(once, or again after someone removed it); the temporary files of a record's write that a kill tore
are removed by the next start's ``proxy_record.pending``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .durable import ReplacedNotDurable, write_atomic
from .errors import ProxyError
from .proxy_file import Installed, same_file
from .proxy_record import (
    FLIP,
    KEPT,
    RECORD_MODE,
    REGISTRY_NEXT,
    RELOAD_BACK_FAILED,
    REMOVAL,
    UNREADABLE,
    About,
    Change,
    digest,
    drop_record,
    read_record,
    record_path,
    set_aside,
    set_aside_name,
    undecided_name,
)

log = logging.getLogger("flipvisor.proxy")  # with the proxy's steps


@dataclass
class ProxyJournal:
    """The record of one step's changes to proxy files (``proxy_file.Journal``), written before
    each change, removed by ``settle``."""

    path: Path
    about: About
    changes: list[Change] = field(default_factory=list)
    # A change made halfway that could not be undone (``failed_halfway``): the record stays.
    halfway: bool = False
    # What a flip's record says of its proxy step (``REGISTRY_NEXT``), as last written: marked by
    # ``before_registry_step``, cleared by a change after it. The one source of what ``_write``
    # writes there.
    registry_next: bool = False

    @property
    def recorded(self) -> bool:
        """Whether a record of this step's changes is on disk, not settled: one that stays for
        the next start if the step ends without settling (a reload back that failed)."""
        return bool(self.changes)

    def replacing(self, kept: Installed, written: bytes | None) -> None:
        """Record durably that ``kept.dest`` is about to hold ``written`` (None: be removed).

        Raises:
            ProxyError: the record could not be written (nothing was changed yet).
        """
        change = Change(kept, None if written is None else digest(written))
        if not self.changes:
            # A record an earlier step of this program kept for the next start (its reload back
            # failed, or a start-up's reload did) stays for it, beside this step's, unless this
            # step's reload makes it moot (``promoted``, ``reloaded_back``).
            set_aside(self.path, self.about.program)
        self.registry_next = False  # a change after the mark: its proxy step is not done
        try:
            self._write([*self.changes, change])
        except OSError as exc:
            if isinstance(exc, ReplacedNotDurable):
                self.changes.append(change)  # in place all the same: settled with the step
            raise ProxyError(
                f"cannot record what {kept.dest} holds in {self.path} before replacing it: "
                f"{exc.strerror or exc}; without that record, a supervisor killed before the "
                "promotion ends could not put it back"
            ) from exc
        self.changes.append(change)

    async def before_registry_step(self) -> None:
        """The proxy step is done (its files checked) and the registry step comes next: mark the
        record so, durably (off the event loop). A flip's record without that mark was certainly
        never promoted: the next start puts its files back even if it cannot read the registry.

        Raises:
            ProxyError: the mark could not be written; the registry step must not be taken.
        """
        if self.changes and self.about.kind == FLIP:
            await anyio.to_thread.run_sync(self._mark_registry_next)

    def _mark_registry_next(self) -> None:
        self.registry_next = True
        try:
            self._write(self.changes)
        except OSError as exc:
            # Not marked (or, not durably: ``ReplacedNotDurable``); the registry step is not
            # taken either way.
            self.registry_next = False
            raise ProxyError(
                f"cannot mark in {self.path} that the proxy step is done, before the registry "
                f"step: {exc.strerror or exc}; a supervisor killed after the registry step could "
                "not tell that it was taken"
            ) from exc

    def failed_halfway(self) -> None:
        """A change was made that could be neither confirmed nor undone (``proxy_file``): the
        record stays for the next start, which puts the file back, whatever ``settle`` is told."""
        self.halfway = True

    async def reload_back_failed(self) -> None:
        """The flip's undo put its files back but failed to reload the proxy back: the record
        stays for the next start, which reloads the proxy, and says so (``KEPT``), so that the
        next start does not take it for one a kill left (off the event loop; a failure to say
        so is logged: the record stays all the same)."""
        if self.changes and self.about.kind == FLIP:
            await anyio.to_thread.run_sync(self._mark_kept)

    def _mark_kept(self) -> None:
        try:
            self._write(self.changes, kept=RELOAD_BACK_FAILED)
        except OSError as exc:
            log.warning(
                "program=%s cannot mark the proxy-undo record %s as kept after a failed reload "
                "back: %s; the next start reloads the proxy all the same",
                self.about.program,
                self.path,
                exc.strerror or exc,
            )
            return
        # An earlier flip's record set aside, kept for the same reload of the same files: this
        # one stands for it (one reload at the next start, not one per failed flip).
        _drop_moot(
            self.path.parent,
            self.about.program,
            [change.kept.dest for change in self.changes],
            [set_aside_name(self.about.program)],
            "this program's later flip's record is kept for the same reload of its file",
        )

    def _write(self, changes: list[Change], *, kept: str | None = None) -> None:
        """Write the record of ``changes`` (a flip's marked as ``registry_next`` says; ``kept``:
        why it is kept on purpose), durably (blocking).

        Raises:
            OSError: it could not be written (``ReplacedNotDurable``: it was, not durably).
        """
        document = {**self.about.to_json(), "files": [c.to_json() for c in changes]}
        if self.about.kind == FLIP:
            document[REGISTRY_NEXT] = self.registry_next
        if kept is not None:
            document[KEPT] = kept
        data = json.dumps(document, indent=1).encode()
        try:
            write_atomic(self.path, data, RECORD_MODE)
        except FileNotFoundError:  # the first record in this state_dir, or folder removed
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.path, data, RECORD_MODE)

    async def settle(self) -> None:
        """The changes stand, or were undone: remove the record (off the event loop).

        Shielded: a cancellation (a flip's --timeout, a stop) landing here, after the promotion,
        must neither leave the record (the next start would undo a change that stands) nor make
        the promotion look failed to its caller, which would discard what now serves."""
        if self.halfway:
            log.warning(
                "program=%s the proxy-undo record %s is kept: a proxy file was changed halfway "
                "and could not be put back; the next start puts it back",
                self.about.program,
                self.path,
            )
        elif self.changes:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._remove)

    async def promoted(self) -> None:
        """The flip's promotion is complete: ``settle``, and drop the records of this program's
        flips that an earlier start kept undecided (``keep_undecided``) whose files this flip
        replaced too: what those files hold now was routed after them, and put back by such a
        record (this flip's bytes may be theirs: the same port, a template without the
        generation), they would route to a generation the keys no longer name. Those set aside as
        kept for a reload (``set_aside``) go too: the promotion reloaded the proxy over them."""
        await self._settle_and_drop(
            [undecided_name(self.about.program), set_aside_name(self.about.program)],
            "this run's flip replaced its file since, and is promoted",
        )

    async def reloaded_back(self) -> None:
        """The flip's undo put its files back and reloaded the proxy back: ``settle``, and drop
        the records of this program's earlier steps set aside as kept for the next start's
        reload (``set_aside``) whose files this flip replaced: the proxy was reloaded with them
        as they are now. Undecided ones stay: whether their flip was promoted is still unknown."""
        await self._settle_and_drop(
            [set_aside_name(self.about.program)],
            "the proxy was reloaded since, with its file as it is now",
        )

    async def _settle_and_drop(self, names: list[re.Pattern[str]], why: str) -> None:
        """``settle``, then drop the records of this program named as one of ``names`` whose
        files this step replaced too (``why``: for the log) (shielded)."""
        replaced = [change.kept.dest for change in self.changes]
        await self.settle()
        if replaced and not self.halfway:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    _drop_moot, self.path.parent, self.about.program, replaced, names, why
                )

    def _remove(self) -> None:
        # Left behind, the next start would look at changes that stand: a flip's are kept
        # while the keys name its generation, and a removal's is made again.
        drop_record(self.path)
        self.changes.clear()


def flip_journal(
    state_dir: Path, program: str, *, generation: int, port: int, supervisor: dict[str, Any]
) -> ProxyJournal:
    """The journal of the proxy step of ``program``'s flip to ``generation`` on ``port``, by
    ``supervisor`` (``lineage.this_supervisor``: as its ``generation/current`` record names it)."""
    about = About(program, FLIP, generation, port, supervisor)
    return ProxyJournal(record_path(state_dir, program), about)


def removal_journal(state_dir: Path, program: str) -> ProxyJournal:
    """The journal of the removal of ``program``'s proxy file (``unroute.py``)."""
    return ProxyJournal(record_path(state_dir, program), About(program, REMOVAL))


def _drop_moot(
    folder: Path, program: str, replaced: list[Path], names: list[re.Pattern[str]], why: str
) -> None:
    """Drop ``program``'s records named as one of ``names`` (kept undecided, or set aside) every
    file of which is among ``replaced`` (files a flip of it just promoted, or reloaded back,
    replaced again: ``why``) (blocking; a failure is logged)."""
    try:
        listed = os.listdir(folder)
    except FileNotFoundError:  # removed by hand since: no record to drop
        return
    except OSError as exc:
        log.warning("cannot read the proxy-undo records in %s: %s", folder, exc.strerror)
        return
    for name in listed:
        if not any(pattern.fullmatch(name) for pattern in names):
            continue
        try:
            step = read_record(folder / name)
        except UNREADABLE:
            continue  # the next start sets it aside, with a warning
        if all(any(same_file(c.kept.dest, dest) for dest in replaced) for c in step.changes):
            drop_record(step.path)
            log.info("program=%s dropped the proxy-undo record %s: %s", program, step.path, why)
