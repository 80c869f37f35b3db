"""The records of the proxy-undo journal (``proxy_journal.py``) in
``<state_dir>/proxy-undo/``: their format (``Change``, ``About``), and the records a killed
supervisor left (or kept, as its flip's undo failed to reload the proxy back: ``KEPT``), read
back at start-up (``pending``) and put back where the file still holds what the interrupted step
wrote (``Pending.put_back``), kept undecided for a later start (``keep_undecided``), or set aside
when they cannot be read. One record per program: a later step of it takes over the one it
finds (``proxy_journal.Previous``). Blocking calls: run off the event loop, or at start-up
before anything runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import json_text
from .current_record import parse_current
from .durable import fsync_dir, remove_torn, write_atomic
from .errors import ProxyError
from .proxy_change import Change
from .proxy_file import same_file
from .starttime import Recorded, recorded_from_json

log = logging.getLogger("flipvisor.proxy")  # with the proxy's steps

UNDO_DIR = "proxy-undo"
RECORD_MODE = 0o600  # it may hold a proxy file's bytes: private, as the state_dir is
# A flip's record: whether its proxy step was done and its registry step next
# (``before_registry_step``); False: it was never promoted. Missing from older records.
REGISTRY_NEXT = "registry_next"
# Why a record was kept on purpose, not left by a kill: its flip's undo failed to reload the
# proxy back (``ProxyJournal.reload_back_failed``), and the next start reloads it. Missing from
# records a kill left, and from older records.
KEPT = "kept"
RELOAD_BACK_FAILED = "reload back failed"
# The record an earlier step of the program left, that this step's took over
# (``proxy_journal.Previous``), whole, with its own header: decided on its own, after this one.
PREVIOUS = "previous"
FLIP = "flip"  # a promotion's proxy step: undone unless the registry names its generation
REMOVAL = "removal"  # a removed program's file taken away, until the proxy check passed


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


def record_path(state_dir: Path, program: str) -> Path:
    return state_dir / UNDO_DIR / f"{program}.json"


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
    kept: str | None = None  # why it was kept on purpose (``KEPT``); None: a kill left it
    # The earlier record this one took over (``PREVIOUS``), at the same path: decided after
    # this one, on its own (its own registry check); None: none.
    previous: Pending | None = None
    # The record as read: written back when a later one that took it over is done with.
    document: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def reload_back_failed(self) -> bool:
        """Whether the record was kept as its flip's undo failed to reload the proxy back."""
        return self.kept == RELOAD_BACK_FAILED

    @property
    def owes_reload(self) -> str | None:
        """Why the proxy must be checked and reloaded at the next start whatever becomes of this
        record's changes (kept as promoted, undone, kept undecided); None: no reload is owed
        beyond what its own step may need (``maybe_promoted``)."""
        return self.how_left() if self.reload_back_failed else None

    def owed_in_chain(self) -> str | None:
        """Why a reload is owed by this record or an earlier one nested in it (``owes_reload``);
        None: none is."""
        if self.owes_reload is not None or self.previous is None:
            return self.owes_reload
        return self.previous.owed_in_chain()

    def how_left(self) -> str:
        """How the step came to be left unfinished, for a message."""
        about = self.about
        if self.reload_back_failed:
            return (
                f"the reload back of {about.program}'s rolled-back flip to generation "
                f"{about.generation} (port {about.port}) failed before the last shutdown"
            )
        if self.kept is not None:  # a reason this version does not know (a later one's)
            return f"{about.describe()} was kept unfinished by a previous supervisor ({self.kept})"
        return f"a previous supervisor was killed during {about.describe()}"

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
        wrote, or a state of an earlier change in the record's chain (put back by a start
        killed before it dropped the record: ours, not a hand edit) (blocking)."""
        outcome = PutBack()
        below = self.previous.chain() if self.previous is not None else ()
        for index in reversed(range(len(self.changes))):
            change = self.changes[index]
            try:
                line, left_alone = change.put_back((*below, *self.changes[:index]))
            except ProxyError as exc:
                line, outcome.settled = str(exc), False
            else:
                outcome.left_alone = outcome.left_alone or left_alone
            outcome.done.append(line)
        return outcome

    def chain(self) -> tuple[Change, ...]:
        """The changes of this record and of the earlier ones nested in it, earliest first."""
        below = self.previous.chain() if self.previous is not None else ()
        return (*below, *self.changes)

    def past(self, later: Pending) -> Pending:
        """This record as it stands once ``later`` (the record that took it over) was kept as
        promoted: without its files that ``later`` changed again, which stand as the keys name
        ``later``'s flip (its reload owed, its other files still to put back)."""
        theirs = [change.kept.dest for change in later.changes]
        left = tuple(c for c in self.changes if not any(same_file(c.kept.dest, d) for d in theirs))
        document = {**self.document, "files": [change.to_json() for change in left]}
        return replace(self, changes=left, document=document)

    def forget(self, then: Pending | None = None) -> bool:
        """Remove the record, or write ``then`` there (the earlier record it took over, decided
        next); whether that was done (a failure is logged: the record stays, and the next start
        decides it again) (blocking)."""
        if then is None:
            drop_record(self.path)
            return True
        try:
            write_atomic(self.path, json.dumps(then.document, indent=1).encode(), RECORD_MODE)
        except OSError as exc:
            log.warning(
                "cannot write back the earlier proxy-undo record nested in %s: %s; the next "
                "start decides this one again (put back already, or standing), then that one",
                self.path,
                exc.strerror or exc,
            )
            return False
        return True


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
            found.append(read_record(path))
        except UNREADABLE as exc:
            set_aside_unreadable(path, exc)
    return found


UNREADABLE = (OSError, ValueError, KeyError, TypeError, IndexError)


def read_record(path: Path) -> Pending:
    """The record at ``path`` (blocking).

    Raises:
        OSError, ValueError, KeyError, TypeError, IndexError: it cannot be read.
    """
    return parse_record(path, path.read_bytes())


def parse_record(path: Path, data: bytes) -> Pending:
    """The record at ``path`` that holds ``data`` (raises as ``read_record``)."""
    return _parse_document(path, json_text.loads(data))


def _parse_document(path: Path, document: dict[str, Any]) -> Pending:
    changes = tuple(Change.from_json(c) for c in document["files"])
    registry_next, kept = document.get(REGISTRY_NEXT), document.get(KEPT)
    nested = document.get(PREVIOUS)
    return Pending(
        path,
        About.from_json(document),
        changes,
        None if registry_next is None else bool(registry_next),
        None if kept is None else str(kept),
        None if nested is None else _parse_document(path, nested),
        document,
    )


def undecided_name(program: str) -> re.Pattern[str]:
    return re.compile(re.escape(program) + r"\.undecided-[0-9]+\.json")


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


def set_aside_unreadable(path: Path, exc: Exception) -> None:
    """A record that cannot be read, renamed ``<name>.<ns>.bad`` (a name of its own: one set
    aside before is kept too) so that it is said once, not at every start, and kept for the
    operator to look at (blocking)."""
    aside = path.with_name(f"{path.name}.{time.time_ns()}.bad")
    try:
        path.rename(aside)
        fsync_dir(aside.parent)  # else a crash could bring it back, said again
    except OSError:
        if not aside.exists():
            aside = path
    log.warning(
        "ignoring the proxy-undo record %s (%s): if a supervisor was killed during a flip, see "
        "that the proxy file it names is the previous one",
        aside,
        exc,
    )
