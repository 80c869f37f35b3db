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
dropped once this run promotes a flip of the program over the same files (``promoted``).

One record per program (``<program>.json``): a step's first record takes over the one an earlier
step of the program left there (``Previous``: kept after a failed reload back, halfway, or one
whose removal failed), rather than overwrite or set it aside: nested whole in the new record
(``"previous"``), with its own header, so that the next start, once it decided the new step,
decides the earlier one on its own (its own registry check: it may have been promoted), with its
owed reload and its note. Once the new step reloads the proxy (promoted, or reloaded back) its
owed reload is done; if it ends with its own changes undone or standing, the earlier record is
written back as it was, unless nothing of it is left to put back.

One small write (atomic, fsynced) per file a step changes, one for a flip's mark, one removal at its
end; blocking calls, run off the event loop. The folder is made when a record finds it missing
(once, or again after someone removed it); the temporary files of a record's write that a kill tore
are removed by the next start's ``proxy_record.pending``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .durable import ReplacedNotDurable, write_atomic
from .errors import ProxyError
from .proxy_change import Change, digest
from .proxy_file import Installed, same_file
from .proxy_record import (
    FLIP,
    KEPT,
    PREVIOUS,
    RECORD_MODE,
    REGISTRY_NEXT,
    RELOAD_BACK_FAILED,
    REMOVAL,
    UNREADABLE,
    About,
    drop_record,
    parse_record,
    read_record,
    record_path,
    set_aside_unreadable,
    undecided_name,
)

log = logging.getLogger("flipvisor.proxy")  # with the proxy's steps


@dataclass
class ProxyJournal:
    """The record of one step's changes to proxy files (``proxy_file.Journal``), written before
    each change (taking over the record an earlier step left: ``previous``), removed when the
    step ends (``settle``, ``stands``, ``promoted``, ``reloaded_back``), or the earlier record
    written back as it was."""

    path: Path
    about: About
    changes: list[Change] = field(default_factory=list)
    # A change made halfway that could not be undone (``failed_halfway``): the record stays.
    halfway: bool = False
    # What a flip's record says of its proxy step (``REGISTRY_NEXT``), as last written: marked by
    # ``before_registry_step``, cleared by a change after it. The one source of what ``_write``
    # writes there.
    registry_next: bool = False
    # The record an earlier step of the program left, taken over by this step's first record.
    previous: Previous | None = None

    @property
    def recorded(self) -> bool:
        """Whether a record of this step's changes is on disk, not settled: one that stays for
        the next start if the step ends without settling (a reload back that failed)."""
        return bool(self.changes)

    def replacing(self, kept: Installed, written: bytes | None) -> None:
        """Record durably that ``kept.dest`` is about to hold ``written`` (None: be removed).

        Raises:
            ProxyError: the record could not be written, or the one an earlier step left could
                not be read (nothing was changed yet).
        """
        change = Change(kept, None if written is None else digest(written))
        if not self.changes:
            # One record per program: an earlier step's left here (its owed reload, its files
            # still to put back) lives on in this step's, not overwritten.
            self.previous = previous(self.path)
            if self.previous is not None:
                log.info(
                    "program=%s takes over the proxy-undo record an earlier step left in %s",
                    self.about.program,
                    self.path,
                )
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
                "back: %s; it stays as last written, marked as past its proxy step: the next "
                "start undoes it and reloads the proxy, unless the registry still names "
                "generation %s (its keys not put back either), which it then takes for a "
                "promotion: check the proxy's config and reload it by hand",
                self.about.program,
                self.path,
                exc.strerror or exc,
                self.about.generation,
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
        if self.previous is not None:
            # Whole, its header with it: decided on its own once this step is (undone last).
            document[PREVIOUS] = self.previous.document
        data = json.dumps(document, indent=1).encode()
        try:
            write_atomic(self.path, data, RECORD_MODE)
        except FileNotFoundError:  # the first record in this state_dir, or folder removed
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.path, data, RECORD_MODE)

    async def settle(self) -> None:
        """The step ended without reloading the proxy, its changes undone (or a removal's
        standing before its reload: ``stands``): remove the record, or write back the one an
        earlier step left, which still stands (its owed reload, its files) (off the event loop).

        Shielded: a cancellation (a flip's --timeout, a stop) landing here must neither leave
        the record (the next start would undo a change that stands) nor make the step look
        failed to its caller."""
        await self._end(keep_previous=True)

    async def stands(self) -> None:
        """A removal passed its check and stands, its reload done (or a ``not-unrouted`` warning
        says to run it; ``unroute``): the record goes, and with it one an earlier step of the
        program left for the same files: the program's file is gone on purpose."""
        await self._end(keep_previous=not self._covers_previous())

    async def promoted(self) -> None:
        """The flip's promotion is complete, the proxy reloaded with its files: the record goes,
        with the earlier one it took over (its owed reload done; its files replaced by this
        flip's, which the keys name), unless that one names other files too. The records of
        this program's flips that an earlier start kept undecided (``keep_undecided``) whose
        files this flip replaced go too: what those files hold now was routed after them, and
        put back by such a record (this flip's bytes may be theirs: the same port, a template
        without the generation), they would route to a generation the keys no longer name."""
        replaced = [change.kept.dest for change in self.changes]
        await self._end(keep_previous=not self._covers_previous())
        if replaced and not self.halfway:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    _drop_decided, self.path.parent, self.about.program, replaced
                )

    async def reloaded_back(self) -> None:
        """The flip's undo put its files back and reloaded the proxy back: the record goes; an
        earlier one it took over is written back only if it has files to put back still (its
        owed reload is done, but writing it back as it was costs one more reload at most)."""
        keep = self.previous is not None and bool(self.previous.changes)
        await self._end(keep_previous=keep)

    def _covers_previous(self) -> bool:
        """Whether every file of the earlier record taken over is one this step changed."""
        inherited = self.previous.changes if self.previous is not None else ()
        mine = [change.kept.dest for change in self.changes]
        return all(any(same_file(c.kept.dest, dest) for dest in mine) for c in inherited)

    async def _end(self, *, keep_previous: bool) -> None:
        """Remove the record, or write back the earlier one it took over (``keep_previous``),
        unless a change was made halfway: then it stays for the next start (shielded)."""
        if self.halfway:
            log.warning(
                "program=%s the proxy-undo record %s is kept: a proxy file was changed halfway "
                "and could not be put back; the next start puts it back",
                self.about.program,
                self.path,
            )
        elif self.changes:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._remove, keep_previous)

    def _remove(self, keep_previous: bool) -> None:
        # Left behind, the next start would look at changes that stand: a flip's are kept
        # while the keys name its generation, and a removal's is made again.
        earlier, self.previous = self.previous, None
        if keep_previous and earlier is not None:
            try:
                write_atomic(self.path, earlier.data, RECORD_MODE)
            except OSError as exc:
                log.warning(
                    "program=%s cannot write back the earlier proxy-undo record in %s: %s; the "
                    "record as this step left it stays for the next start",
                    self.about.program,
                    self.path,
                    exc.strerror or exc,
                )
        else:
            drop_record(self.path)
        self.changes.clear()


@dataclass(frozen=True)
class Previous:
    """The record a new step of a program found under ``<program>.json`` as it made its first
    change (one record per program: the new step's takes it over): an earlier step's of this run
    left for the next start (kept after its reload back failed, a change made halfway that could
    not be put back, one whose removal failed), or one a start-up could not settle.
    ``changes``: its files that may still need putting back (none for one kept after a failed
    reload back: its undo put them back); ``data``: the record as it was, written back if the
    new step ends without its files replacing those; ``document``: the same, nested whole in the
    new step's record."""

    changes: tuple[Change, ...]
    data: bytes
    document: dict[str, Any]


def previous(path: Path) -> Previous | None:
    """The record at ``path`` that a new step takes over (None: there is none, the common case;
    one that cannot be parsed is set aside as at start-up, with a warning) (blocking).

    Raises:
        ProxyError: it exists but cannot be read (nothing is changed then).
    """
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # none (no folder: its write says why)
        return None
    except OSError as exc:
        raise ProxyError(
            f"cannot read the proxy-undo record {path} an earlier step of the program left, "
            f"which this step's takes over: {exc.strerror or exc}"
        ) from exc
    try:
        step = parse_record(path, data)
    except UNREADABLE as exc:
        set_aside_unreadable(path, exc)  # as the next start would, with its warning
        return None
    # Files put back already (a reload back failed), or that stand (promoted): none to cover.
    stand = step.reload_back_failed
    below = step.previous.chain() if step.previous is not None else ()
    return Previous(below if stand else step.chain(), data, step.document)


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


def _drop_decided(folder: Path, program: str, replaced: list[Path]) -> None:
    """Drop ``program``'s undecided records every file of which is among ``replaced`` (files a
    flip of it just promoted replaced again) (blocking; a failure is logged)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:  # removed by hand since: no record to drop
        return
    except OSError as exc:
        log.warning("cannot read the proxy-undo records in %s: %s", folder, exc.strerror)
        return
    undecided = undecided_name(program)
    for name in names:
        if not undecided.fullmatch(name):
            continue
        try:
            step = read_record(folder / name)
        except UNREADABLE:
            continue  # the next start sets it aside, with a warning
        # Those of an earlier record nested in it too: all replaced, none is left to put back.
        if all(any(same_file(c.kept.dest, dest) for dest in replaced) for c in step.chain()):
            drop_record(step.path)
            log.info(
                "program=%s dropped the proxy-undo record %s kept undecided: this run's flip "
                "replaced its file since, and is promoted",
                program,
                step.path,
            )
