"""The proxy-undo journal: what a flip's (or a removed program's) proxy step replaces, recorded
durably in ``<state_dir>/proxy-undo/<program>.json`` before the step replaces or removes a proxy
file, and removed once the change stands (promoted: keys swapped, proxy reloaded) or was undone.

``Installed`` keeps the previous bytes in memory only: a supervisor killed (SIGKILL, the OOM
killer) between a file's install and the promotion's end takes them with it, and the file of a
generation never promoted would stay in place. A record left behind is how the next ``run``
knows (``proxy_recovery.py``); ``pending`` reads them, ``Pending.put_back`` puts the previous
files back, but only those that still hold what the interrupted step wrote (an operator's hand
edit since is left alone).

A flip's record is marked once its proxy step is done, before its registry step
(``before_registry_step``): one without the mark was certainly never promoted, and is put back
even when the next start cannot read the registry. A record kept undecided by such a start is
dropped once this run promotes a flip of the program over the same files (``promoted``).

One small write (atomic, fsynced) per file a step changes, one for a flip's mark, one removal at its
end; blocking calls, run off the event loop. The folder is made when a record finds it missing
(once, or again after someone removed it); the temporary files of a record's write that a kill tore
are removed by the next start's ``pending``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .current_record import parse_current
from .durable import ReplacedNotDurable, fsync_dir, remove_torn, write_atomic
from .errors import ProxyError
from .proxy_file import DEFAULT_FILE_MODE, Installed, same_file
from .starttime import Recorded, recorded_from_json

log = logging.getLogger("flipvisor.proxy")  # with the proxy's steps

UNDO_DIR = "proxy-undo"
RECORD_MODE = 0o600  # it may hold a proxy file's bytes: private, as the state_dir is
# A flip's record: whether its proxy step was done and its registry step next
# (``before_registry_step``); False: it was never promoted. Missing from older records.
REGISTRY_NEXT = "registry_next"
FLIP = "flip"  # a promotion's proxy step: undone unless the registry names its generation
REMOVAL = "removal"  # a removed program's file taken away, until the proxy check passed


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Change:
    """One proxy file a step changed: what it held (``kept``) and the digest of what the step
    wrote there (None: it removed the file)."""

    kept: Installed
    written: str | None

    def to_json(self) -> dict[str, Any]:
        kept = self.kept
        previous = kept.previous
        return {
            "dest": str(kept.dest),
            "previous": None if previous is None else base64.b64encode(previous).decode(),
            "mode": kept.previous_mode,
            "owner": None if kept.previous_owner is None else list(kept.previous_owner),
            "written_sha256": self.written,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Change:
        previous, owner = data["previous"], data["owner"]
        kept = Installed(
            dest=Path(data["dest"]),
            previous=None if previous is None else base64.b64decode(previous, validate=True),
            previous_mode=int(data.get("mode", DEFAULT_FILE_MODE)),
            previous_owner=None if owner is None else (int(owner[0]), int(owner[1])),
        )
        written = data["written_sha256"]
        return cls(kept, None if written is None else str(written))

    def put_back(self) -> tuple[str, bool]:
        """Put the previous file back if ``dest`` still holds what the step wrote; what was
        done, for a message, and whether the file was left alone (a hand edit since).

        Raises:
            ProxyError: it could not be put back.
        """
        dest = self.kept.dest
        try:
            now: bytes | None = dest.read_bytes()
        except FileNotFoundError:
            now = None
        except OSError as exc:
            raise ProxyError(f"cannot read {dest}: {exc.strerror or exc}") from exc
        if now == self.kept.previous:
            return f"{dest} is the previous file already", False
        if (now is None and self.written is not None) or (
            now is not None and _digest(now) != self.written
        ):
            what = "is gone" if now is None else "holds something else"
            return (
                f"{dest} left as it is: it {what} than that step left it (changed by a later "
                "step, or by hand, since?); see that it is what the proxy should load"
            ), True
        self.kept.restore()
        if self.kept.previous is None:
            return f"{dest} removed (there was none before)", False
        return f"{dest}: the previous file put back", False


@dataclass(frozen=True)
class About:
    """What a record is of: ``program``'s step of ``kind`` (``FLIP``, ``REMOVAL``), and for a
    flip its ``generation``, ``port`` and ``supervisor`` (``lineage.this_supervisor``)."""

    program: str
    kind: str
    generation: int | None = None
    port: int | None = None
    supervisor: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"program": self.program, "kind": self.kind}
        if self.kind == FLIP:
            document |= {
                "generation": self.generation,
                "port": self.port,
                "supervisor": self.supervisor,
            }
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> About:
        return cls(
            program=str(document["program"]),
            kind=str(document["kind"]),
            generation=document.get("generation"),
            port=document.get("port"),
            supervisor=document.get("supervisor"),
        )

    def describe(self) -> str:
        """The step, for a message."""
        if self.kind == FLIP:
            return f"a flip to generation {self.generation} (port {self.port})"
        return "the removal of its proxy file"


@dataclass
class ProxyJournal:
    """The record of one step's changes to proxy files (``proxy_file.Journal``), written before
    each change, removed by ``settle``."""

    path: Path
    about: About
    changes: list[Change] = field(default_factory=list)
    # A change made halfway that could not be undone (``failed_halfway``): the record stays.
    halfway: bool = False

    def replacing(self, kept: Installed, written: bytes | None) -> None:
        """Record durably that ``kept.dest`` is about to hold ``written`` (None: be removed).

        Raises:
            ProxyError: the record could not be written (nothing was changed yet).
        """
        change = Change(kept, None if written is None else _digest(written))
        try:
            self._write([*self.changes, change], registry_next=False)
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
        try:
            self._write(self.changes, registry_next=True)
        except OSError as exc:
            raise ProxyError(
                f"cannot mark in {self.path} that the proxy step is done, before the registry "
                f"step: {exc.strerror or exc}; a supervisor killed after the registry step could "
                "not tell that it was taken"
            ) from exc

    def failed_halfway(self) -> None:
        """A change was made that could be neither confirmed nor undone (``proxy_file``): the
        record stays for the next start, which puts the file back, whatever ``settle`` is told."""
        self.halfway = True

    def _write(self, changes: list[Change], *, registry_next: bool) -> None:
        """Write the record of ``changes``, durably (blocking).

        Raises:
            OSError: it could not be written (``ReplacedNotDurable``: it was, not durably).
        """
        document = {**self.about.to_json(), "files": [c.to_json() for c in changes]}
        if self.about.kind == FLIP:
            document[REGISTRY_NEXT] = registry_next
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
        generation), they would route to a generation the keys no longer name."""
        replaced = [change.kept.dest for change in self.changes]
        await self.settle()
        if replaced and not self.halfway:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    _drop_decided, self.path.parent, self.about.program, replaced
                )

    def _remove(self) -> None:
        # Left behind, the next start would look at changes that stand: a flip's are kept
        # while the keys name its generation, and a removal's is made again.
        drop_record(self.path)
        self.changes.clear()


def record_path(state_dir: Path, program: str) -> Path:
    return state_dir / UNDO_DIR / f"{program}.json"


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


@dataclass
class PutBack:
    """What ``Pending.put_back`` did: a line per file; ``settled``: no file failed to be put
    back (those left alone are settled: the hand edit is the operator's); ``left_alone``: a
    file was, as it held something else than the step left."""

    done: list[str] = field(default_factory=list)
    settled: bool = True
    left_alone: bool = False


@dataclass(frozen=True)
class Pending:
    """A record a killed supervisor left: its step neither stood nor was undone."""

    path: Path
    about: About
    changes: tuple[Change, ...]
    # A flip's: whether it was past its proxy step (``before_registry_step``); None: unknown (a
    # record written before that mark existed).
    registry_next: bool | None = None

    @property
    def maybe_promoted(self) -> bool:
        """Whether the registry step may have been taken: a flip not known to have stopped
        before it."""
        return self.about.kind == FLIP and self.registry_next is not False

    def promoted_by(self, record: str | None) -> bool:
        """Whether the registry's ``generation/current`` ``record`` names this flip's
        generation: its registry step was done, and its files are the ones the keys name."""
        about = self.about
        if about.kind != FLIP:
            return False
        try:
            named = parse_current(record)
            ours = recorded_from_json(about.supervisor)
        except (ValueError, TypeError, KeyError):
            return False
        if named is None or named.supervisor is None:
            return False
        return (named.generation, named.port) == (about.generation, about.port) and _same_run(
            named.supervisor, ours
        )

    def put_back(self) -> PutBack:
        """Put each previous file back (last change first) where it still holds what the step
        wrote (blocking)."""
        outcome = PutBack()
        for change in reversed(self.changes):
            try:
                line, left_alone = change.put_back()
            except ProxyError as exc:
                line, outcome.settled = str(exc), False
            else:
                outcome.left_alone = outcome.left_alone or left_alone
            outcome.done.append(line)
        return outcome

    def forget(self) -> None:
        """Remove the record (blocking)."""
        drop_record(self.path)


def _same_run(one: Recorded, other: Recorded) -> bool:
    """Whether two records of a supervisor name one run of it: by PID and start tick (and boot),
    or by start time where neither has a tick."""
    if one.identity is None and other.identity is None:
        return one.pid == other.pid and one.started == other.started
    return one.pid == other.pid and one.identity == other.identity


def drop_record(path: Path) -> None:
    """Remove the record at ``path``, durably (blocking); a failure is logged."""
    try:
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except OSError as exc:
        log.warning("cannot remove the proxy-undo record %s: %s", path, exc.strerror)


def pending(state_dir: Path) -> list[Pending]:
    """The records a supervisor of ``state_dir`` left (killed before its step ended); one that
    cannot be read is logged and left in place (blocking)."""
    folder = state_dir / UNDO_DIR
    try:
        listed = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the proxy-undo records in %s: %s", folder, exc.strerror)
        return []
    # Only at start-up: no step of this state_dir writes a record meanwhile.
    remove_torn(folder, of=lambda name: name.endswith(".json"), names=listed)
    found = []
    for name in _newest_first(folder, [name for name in listed if name.endswith(".json")]):
        path = folder / name
        try:
            found.append(_read(path))
        except _UNREADABLE as exc:
            _set_aside(path, exc)
    return found


_UNREADABLE = (OSError, ValueError, KeyError, TypeError, IndexError)


def _read(path: Path) -> Pending:
    """The record at ``path`` (blocking).

    Raises:
        OSError, ValueError, KeyError, TypeError, IndexError: it cannot be read.
    """
    document = json.loads(path.read_bytes())
    changes = tuple(Change.from_json(c) for c in document["files"])
    registry_next = document.get(REGISTRY_NEXT)
    return Pending(
        path,
        About.from_json(document),
        changes,
        None if registry_next is None else bool(registry_next),
    )


def _undecided_name(program: str) -> re.Pattern[str]:
    return re.compile(re.escape(program) + r"\.undecided-[0-9]+\.json")


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
    undecided = _undecided_name(program)
    for name in names:
        if not undecided.fullmatch(name):
            continue
        try:
            step = _read(folder / name)
        except _UNREADABLE:
            continue  # the next start sets it aside, with a warning
        if all(any(same_file(c.kept.dest, dest) for dest in replaced) for c in step.changes):
            drop_record(step.path)
            log.info(
                "program=%s dropped the proxy-undo record %s kept undecided: this run's flip "
                "replaced its file since, and is promoted",
                program,
                step.path,
            )


def _newest_first(folder: Path, names: list[str]) -> list[str]:
    """``names`` by the time each record was last written, newest first: a program may have a
    record kept undecided by an earlier start (``keep_undecided``) beside a later flip's, and
    the later change is undone first, as the file holds what it wrote."""

    def written(name: str) -> int:
        try:
            return (folder / name).stat().st_mtime_ns
        except OSError:
            return 0

    return sorted(sorted(names), key=written, reverse=True)


def keep_undecided(step: Pending) -> Path:
    """Keep ``step``'s record for the next start, whose registry tells whether its flip was
    promoted, renamed ``<program>.undecided-<ns>.json``: a flip of the program by this run
    records under ``<program>.json``, and its settling must not take this one along. Returns
    where it is (its old path if it cannot be renamed: logged) (blocking)."""
    aside = step.path.with_name(f"{step.about.program}.undecided-{time.time_ns()}.json")
    if step.path.name != f"{step.about.program}.json":
        return step.path  # set aside already, at an earlier start
    try:
        step.path.rename(aside)
        fsync_dir(aside.parent)
    except OSError as exc:
        log.warning("cannot set the proxy-undo record %s aside: %s", step.path, exc.strerror)
        return step.path
    return aside


def _set_aside(path: Path, exc: Exception) -> None:
    """A record that cannot be read, renamed ``<name>.bad`` so that it is said once, not at
    every start, and kept for the operator to look at (blocking)."""
    aside = path.with_name(f"{path.name}.bad")
    try:
        path.rename(aside)
    except OSError:
        aside = path
    log.warning(
        "ignoring the proxy-undo record %s (%s): if a supervisor was killed during a flip, see "
        "that the proxy file it names is the previous one",
        aside,
        exc,
    )
