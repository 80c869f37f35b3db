"""A later step of a program that takes over the proxy-undo record an earlier one left (one
record per program: ``proxy_journal.Previous``): the earlier record nested whole in the new one,
decided on its own at the next start, after the new step (``proxy_recovery``), and a start
killed halfway through a record's chain decided again by the next (``Pending.put_back``). Real
files, real check and reload commands."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from flipvisor.proxy_file import put_in_place, take_away_now
from flipvisor.proxy_journal import removal_journal
from flipvisor.proxy_record import pending
from tests.unit.test_proxy_journal import _current, _finish, _proxy_saw
from tests.unit.test_proxy_kept import NEW, OLD, _journal, _kept_after_a_failed_reload_back

G3, G4 = b"server 127.0.0.1:2003;\n", b"server 127.0.0.1:2004;\n"


def _left_after_its_registry_step(state_dir: Path, dest: Path) -> None:
    """Generation 3's flip past its registry step (the keys name it), its record left in place:
    its removal failed (``drop_record`` only logs), or a start-up could not forget it."""
    journal = _journal(state_dir, generation=3, port=2003)
    put_in_place(dest, G3, journal)
    anyio.run(journal.before_registry_step)


def test_a_record_taken_over_is_judged_by_its_own_flip(tmp_path: Path) -> None:
    """Generation 3's record (generation 1's file to put back) left though the keys name it,
    then taken over by generation 4's flip, killed during its check. The next start judged the
    whole record by generation 4 (not named), and undid both: generation 1's file put back,
    and reloaded, while the keys name generation 3 (review). Generation 3's record is now
    decided on its own: its file stays."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    _left_after_its_registry_step(state_dir, dest)
    put_in_place(dest, G4, _journal(state_dir, generation=4, port=2004))  # killed in its check

    events = _finish(state_dir, {"web": _current(3, 2003)})

    assert dest.read_bytes() == G3, events
    assert [kind for kind, _ in events] == ["proxy-restored", "proxy-kept"], events
    assert "flip to generation 3 (port 2003), after the registry named" in events[1][1], events
    assert _proxy_saw(state_dir) == []  # generation 4 never reloaded; 3's reload is the run's
    assert pending(state_dir) == []


def test_a_kept_later_flip_leaves_the_earlier_records_other_files_to_put_back(
    tmp_path: Path,
) -> None:
    """A removal's file (``old-web.conf``) taken away halfway (its record kept), then a flip of
    ``web.conf`` killed after its registry step: the next start kept the flip's file and
    dropped the whole record: the removal's file was never put back (review)."""
    state_dir, dest, other = tmp_path / "state", tmp_path / "web.conf", tmp_path / "old-web.conf"
    other.write_bytes(b"old dest\n")
    removal = removal_journal(state_dir, "web")
    take_away_now(other, removal)
    removal.failed_halfway()
    anyio.run(removal.settle)
    dest.write_bytes(OLD)
    _left_after_its_registry_step(state_dir, dest)

    events = _finish(state_dir, {"web": _current(3, 2003)})

    assert [kind for kind, _ in events] == ["proxy-kept", "proxy-restored"], events
    assert dest.read_bytes() == G3
    assert other.read_bytes() == b"old dest\n", events
    assert pending(state_dir) == []


def test_a_kept_records_note_survives_its_take_over(tmp_path: Path) -> None:
    """A record kept as its reload back failed, its keys not put back either (the registry
    still names generation 2), taken over by generation 3's flip killed during its check: the
    next start said only that a reload was owed, not that the keys still name generation 2."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    _kept_after_a_failed_reload_back(state_dir)
    put_in_place(dest, G3, _journal(state_dir, generation=3, port=2003))  # killed in its check

    events = _finish(state_dir, {"web": _current(2, 2002)})

    assert [kind for kind, _ in events] == ["proxy-restored", "proxy-restored"], events
    assert (
        "the registry still names generation 2, as putting its keys back failed" in (events[1][1])
    ), events
    assert dest.read_bytes() == OLD
    assert _proxy_saw(state_dir) == ["check", "reload"]
    assert pending(state_dir) == []


def _halfway_then_generation_3(state_dir: Path, dest: Path) -> None:
    """Generation 2's file could not be put back (halfway: ``NEW`` stays), then generation 3's
    flip past its proxy step, killed before its registry step was known to be done."""
    dest.write_bytes(OLD)
    halfway = _journal(state_dir)
    put_in_place(dest, NEW, halfway)
    halfway.failed_halfway()
    anyio.run(halfway.settle)
    journal = _journal(state_dir, generation=3, port=2003)
    put_in_place(dest, G3, journal)
    anyio.run(journal.before_registry_step)


def _flattened(path: Path) -> None:
    """The record at ``path`` as builds of this series wrote a take-over: the earlier record's
    files first in the later one's, no nesting."""
    document = json.loads(path.read_text())
    earlier = document.pop("previous", None)
    if earlier is not None:
        document["files"] = earlier["files"] + document["files"]
    path.write_text(json.dumps(document))


def test_a_start_killed_after_putting_back_a_chain_is_not_taken_for_a_hand_edit(
    tmp_path: Path,
) -> None:
    """A record carrying two changes of one file (generation 1 -> 2, halfway, then 2 -> 3):
    a start put both back (generation 1's file) and was killed before its reload. The next
    start found generation 3's change's file holding "something other than what that step
    wrote (by hand?)": left alone, the reload skipped, the record forgotten, a false
    ``proxy-left`` (review)."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    _halfway_then_generation_3(state_dir, dest)
    [record] = pending(state_dir)
    _flattened(record.path)
    [step] = pending(state_dir)
    assert step.put_back().settled  # ... then SIGKILL, before the reload
    assert dest.read_bytes() == OLD

    [(kind, message)] = _finish(state_dir, {"web": _current(1, 2001)})

    assert kind == "proxy-restored", message
    assert "left as it is" not in message, message
    assert _proxy_saw(state_dir) == ["check", "reload"]
    assert pending(state_dir) == []


def test_a_start_killed_between_a_chains_records_finishes_it(tmp_path: Path) -> None:
    """The nested form: a start undid generation 3's step and wrote the halfway record back
    in its place, then was killed; the next start decides that one (generation 1's file)."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    _halfway_then_generation_3(state_dir, dest)
    [step] = pending(state_dir)
    assert step.previous is not None and step.put_back().settled
    assert dest.read_bytes() == NEW
    assert step.forget(step.previous)  # ... then SIGKILL

    [(kind, message)] = _finish(state_dir, {"web": _current(1, 2001)})

    assert kind == "proxy-restored", message
    assert dest.read_bytes() == OLD
    assert pending(state_dir) == []
