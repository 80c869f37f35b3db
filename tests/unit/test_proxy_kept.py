"""Proxy-undo records kept on purpose (``"kept"``: a flip's undo put its files back and failed to
reload the proxy back): how the next start reads them whatever the registry says
(``proxy_recovery.py``), how a later step of the same program takes them over (one record per
program: ``proxy_journal.Previous``, nested whole), and the record's format
(``proxy_journal.py``). Real files, real check and reload commands."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from flipvisor.config import ProxyConfig
from flipvisor.proxy_file import put_in_place
from flipvisor.proxy_journal import ProxyJournal, flip_journal
from flipvisor.proxy_lock import ProxyLock
from flipvisor.proxy_record import pending
from flipvisor.unroute import unroute
from tests.reaping import running_reaper
from tests.unit.test_proxy_journal import SUPERVISOR, _current, _finish, _proxy_saw, _web

OLD, NEW = b"server 127.0.0.1:2001;\n", b"server 127.0.0.1:2002;\n"


def _journal(state_dir: Path, generation: int = 2, port: int = 2002) -> ProxyJournal:
    return flip_journal(state_dir, "web", generation=generation, port=port, supervisor=SUPERVISOR)


def _kept_after_a_failed_reload_back(state_dir: Path) -> None:
    """Generation 2's flip past its proxy step, undone (its file put back), its reload back
    failed: its record kept, as ``promotion_undo`` keeps it."""
    journal = _journal(state_dir)
    installed = put_in_place(state_dir.parent / "web.conf", NEW, journal)
    anyio.run(journal.before_registry_step)
    installed.restore()
    anyio.run(journal.reload_back_failed)


def _later_flip_ends(state_dir: Path, dest: Path, end: str) -> None:
    """A later flip, to generation 3, put in place and past its registry step, then ended by
    ``end`` (a ``ProxyJournal`` method: ``promoted``, or undone by ``reloaded_back`` or
    ``reload_back_failed``)."""
    journal = _journal(state_dir, generation=3, port=2003)
    installed = put_in_place(dest, b"server 127.0.0.1:2003;\n", journal)
    anyio.run(journal.before_registry_step)
    if end != "promoted":
        installed.restore()
    anyio.run(getattr(journal, end))


def _record(state_dir: Path) -> dict[str, object]:
    [step] = pending(state_dir)
    return json.loads(step.path.read_text())  # type: ignore[no-any-return]


def test_a_kept_record_whose_keys_were_not_put_back_is_undone_and_reloaded(
    tmp_path: Path,
) -> None:
    """The undo failed to swap the keys back (etcd gone) as well as to reload the proxy back:
    the registry still names generation 2. The next start took that for a promotion: "after the
    registry named that generation: its proxy file stays (...), as the keys name it", dropped
    the record and reloaded nothing, though the file is generation 1's again and nginx may
    still route to generation 2, rolled back and stopped."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    _kept_after_a_failed_reload_back(state_dir)

    [(kind, message)] = _finish(state_dir, {"web": _current(2, 2002)})

    assert kind == "proxy-restored", message
    assert message.startswith(
        "the reload back of web's rolled-back flip to generation 2 (port 2002) failed before "
        "the last shutdown: the registry still names generation 2, as putting its keys back "
        "failed too"
    ), message
    assert "as the keys name it" not in message, message
    assert "checked and reloaded" in message, message
    assert _proxy_saw(state_dir) == ["check", "reload"]
    assert dest.read_bytes() == OLD
    assert pending(state_dir) == []


def test_a_kept_record_is_reloaded_even_with_the_registry_unreadable(tmp_path: Path) -> None:
    """etcd down at the next start: a kept record's flip is known rolled back, its file put
    back; it was kept undecided ("the registry cannot be read to tell whether it named that
    generation: its proxy file is left as it is") and the proxy not reloaded."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    _kept_after_a_failed_reload_back(state_dir)

    [(kind, message)] = _finish(state_dir, None)

    assert kind == "proxy-restored", message
    assert "registry cannot be read" not in message, message
    assert "(its reload back, away from generation 2, failed)" in message, message
    assert _proxy_saw(state_dir) == ["check", "reload"]
    assert pending(state_dir) == []


def test_a_record_kept_for_an_unknown_reason_is_not_said_as_a_kill(tmp_path: Path) -> None:
    """A ``kept`` reason this version does not know (a later version's record): said as kept
    by a previous supervisor, with its reason, not as one killed."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    journal = _journal(state_dir)
    put_in_place(dest, NEW, journal)
    anyio.run(journal.before_registry_step)
    path = state_dir / "proxy-undo" / "web.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "kept": "some later reason"}))

    [(kind, message)] = _finish(state_dir, {"web": _current(1, 2001)})

    assert message.startswith(
        "a flip to generation 2 (port 2002) was kept unfinished by a previous supervisor "
        "(some later reason), before it was done: "
    ), message
    assert "killed" not in message, message
    assert kind == "proxy-restored" and dest.read_bytes() == OLD, message


def test_the_record_format_at_each_step(tmp_path: Path) -> None:
    """One source of ``registry_next`` (the journal's own): what is on disk at each step of a
    flip whose undo failed to reload back, as before."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    journal = _journal(state_dir)
    installed = put_in_place(dest, NEW, journal)
    first = _record(state_dir)
    assert (first["registry_next"], "kept" in first) == (False, False)
    assert set(first) == {"program", "kind", "generation", "port", "supervisor", "files"} | {
        "registry_next"
    }
    anyio.run(journal.before_registry_step)
    assert (_record(state_dir)["registry_next"], journal.registry_next) == (True, True)
    installed.restore()
    anyio.run(journal.reload_back_failed)
    kept = _record(state_dir)
    assert (kept["registry_next"], kept["kept"]) == (True, "reload back failed")
    assert kept["files"] == first["files"]


def test_a_later_flip_failing_before_its_reload_keeps_the_need_to_reload(tmp_path: Path) -> None:
    """A kept record, then this run's next flip of web fails at its check (before any reload):
    it overwrote ``web.json`` with its own record and settled it, so the next start no longer
    knew that the proxy may still route to generation 2."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    _kept_after_a_failed_reload_back(state_dir)

    journal = _journal(state_dir, generation=3, port=2003)
    put_in_place(dest, b"server 127.0.0.1:2003;\n", journal).restore()  # its check failed
    anyio.run(journal.settle)

    [kept] = pending(state_dir)
    assert kept.reload_back_failed and kept.about.generation == 2, kept
    [(kind, message)] = _finish(state_dir, {"web": _current(1, 2001)})  # the next start
    assert kind == "proxy-restored", message
    assert message.startswith("the reload back of web's rolled-back flip to generation 2")
    assert _proxy_saw(state_dir) == ["check", "reload"]
    assert pending(state_dir) == []


def test_a_later_flip_that_reloads_the_proxy_makes_a_kept_record_moot(tmp_path: Path) -> None:
    """The proxy reloaded by this run's next flip of web (promoted, or undone and reloaded
    back), the kept record's reload is done: nothing is left. If that flip's own reload back
    fails, its record, which took the kept one over, is kept: one reload at the next start."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    for end in ("promoted", "reloaded_back", "reload_back_failed"):
        dest.write_bytes(OLD)
        _kept_after_a_failed_reload_back(state_dir)
        _later_flip_ends(state_dir, dest, end)

        left = pending(state_dir)
        if end == "reload_back_failed":
            assert [(step.about.generation, step.reload_back_failed) for step in left] == [
                (3, True)
            ], end
            _finish(state_dir, {"web": _current(1, 2001)}, _web(state_dir))
        else:
            assert left == [], end


def test_a_kill_after_the_later_flips_registry_step_keeps_its_file_and_reloads(
    tmp_path: Path,
) -> None:
    """A kept record, then this run's next flip of web is killed after its registry step,
    before its record went (``promoted``). The kept record was set aside beside the new one,
    and the next start, after keeping the new flip's file (the keys name it), undid the set-aside
    one regardless: a false ``proxy-left`` warning, or, the port reused with the same bytes, the
    older file put back over the promoted one (review). One record now, the kept one nested in
    it: the promoted file stays, then the kept one is decided on its own, its file (replaced by
    the promoted flip's) left out, and the reload it owed done."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    for port, written in ((2003, b"server 127.0.0.1:2003;\n"), (2002, NEW)):
        dest.write_bytes(OLD)
        (tmp_path / "proxy.log").unlink(missing_ok=True)
        _kept_after_a_failed_reload_back(state_dir)
        journal = _journal(state_dir, generation=3, port=port)
        put_in_place(dest, written, journal)
        anyio.run(journal.before_registry_step)  # then the registry step, then SIGKILL

        events = _finish(state_dir, {"web": _current(3, port)})  # the next start

        [(kind, _), (then, owed)] = events
        assert kind == "proxy-kept", (port, events)
        assert then == "proxy-restored", (port, events)
        assert owed.startswith(
            "the reload back of web's rolled-back flip to generation 2 (port 2002) failed "
            "before the last shutdown: its proxy files were replaced since by a later step's"
        ), owed
        assert "checked and reloaded" in owed, owed
        assert dest.read_bytes() == written, port
        assert _proxy_saw(state_dir) == ["check", "reload"], port
        assert pending(state_dir) == [], port


def test_a_kept_promoted_record_whose_owed_reload_fails_is_tried_again(tmp_path: Path) -> None:
    """The owed reload fails at the next start: a warning, and the kept record stays, without
    the file the promoted flip replaced, for the start after it, which reloads. A flip of that
    run, killed during its check, takes the record over: undone, it puts back generation 3's
    file, which the keys name, not generation 1's."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    gen3, gen4 = b"server 127.0.0.1:2003;\n", b"server 127.0.0.1:2004;\n"
    for then_a_flip in (False, True):
        dest.write_bytes(OLD)
        _kept_after_a_failed_reload_back(state_dir)
        journal = _journal(state_dir, generation=3, port=2003)
        put_in_place(dest, gen3, journal)
        anyio.run(journal.before_registry_step)  # then the registry step, then SIGKILL

        failing = _web(state_dir, reload="false")
        [(kind, _), (then, message)] = _finish(state_dir, {"web": _current(3, 2003)}, failing)
        assert kind == "proxy-kept" and then == "proxy-left", message
        assert "tried again at the next start" in message, message
        [left] = pending(state_dir)
        assert (left.about.generation, left.changes) == (2, ()), left
        if then_a_flip:  # the run started after that: its flip of web killed during its check
            put_in_place(dest, gen4, _journal(state_dir, generation=4, port=2004))
        events = _finish(state_dir, {"web": _current(3, 2003)})
        assert [kind for kind, _ in events] == ["proxy-restored"] * (1 + then_a_flip), events
        assert "checked and reloaded" in events[-1][1], events
        assert dest.read_bytes() == gen3, then_a_flip
        assert pending(state_dir) == [], then_a_flip


async def _remove(state_dir: Path, proxy: ProxyConfig) -> bool:
    """web removed from the config: ``unroute`` with ``proxy``, its section."""
    async with running_reaper() as reaper:
        with anyio.fail_after(20):
            return await unroute(
                "web", proxy, reaper=reaper, proxy_lock=ProxyLock(), state_dir=state_dir
            )


def test_a_removal_after_a_kept_record_leaves_no_warning_for_the_next_start(
    tmp_path: Path,
) -> None:
    """A kept record, then web is removed from the config: its file removed, the check passed,
    the proxy reloaded. The removal set the kept record aside and never dropped it: the next
    start warned ``proxy-left`` ("left as it is: it is gone") though nothing was left (review).
    A removal whose check fails puts the file back, and the kept record with it."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    for check in ("true", "false"):
        dest.write_bytes(OLD)
        _kept_after_a_failed_reload_back(state_dir)
        proxy = _web(state_dir, check=check)["web"].proxy
        assert proxy is not None

        removed = anyio.run(_remove, state_dir, proxy)

        if check == "true":
            assert removed and not dest.exists()
            assert pending(state_dir) == []
            assert _finish(state_dir, {}, {}) == []  # the next start, web no longer configured
        else:
            assert not removed and dest.read_bytes() == OLD
            [kept] = pending(state_dir)
            assert kept.reload_back_failed and kept.about.generation == 2, kept
            [(kind, message)] = _finish(state_dir, {"web": _current(1, 2001)})
            assert kind == "proxy-restored", message


def test_a_removals_record_stays_until_its_reload(tmp_path: Path) -> None:
    """A removal's record went as its check passed, before its reload: a supervisor killed
    between the two left nothing, and the next start neither put the file back nor reloaded
    (review). The reload command here passes only while the record is still there."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    record = state_dir / "proxy-undo" / "web.json"
    proxy = _web(state_dir, reload=f"test -e {record}")["web"].proxy
    assert proxy is not None

    assert anyio.run(_remove, state_dir, proxy)  # its reload passed: the record was there

    assert not dest.exists()
    assert _proxy_saw(state_dir) == ["check", "reload"]
    assert pending(state_dir) == []


def test_a_halfway_record_is_not_lost_to_a_later_flip(tmp_path: Path) -> None:
    """Generation 2's file could not be put back (its record kept, ``failed_halfway``), then
    this run's next flip of web ends: failed before its reload (``settle``), or undone and
    reloaded back (which dropped the set-aside halfway record: generation 1's file was never
    put back), or promoted (generation 2's file replaced by one the keys name: nothing of it
    is left to put back)."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    for end in ("settle", "reloaded_back", "promoted"):
        dest.write_bytes(OLD)
        halfway = _journal(state_dir)
        put_in_place(dest, NEW, halfway)
        anyio.run(halfway.before_registry_step)
        halfway.failed_halfway()  # its undo could not put generation 1's file back
        anyio.run(halfway.settle)
        _later_flip_ends(state_dir, dest, end)

        if end == "promoted":
            assert pending(state_dir) == [], end
            continue
        [left] = pending(state_dir)
        assert left.about.generation == 2, end
        [(kind, message)] = _finish(state_dir, {"web": _current(1, 2001)})  # the next start
        assert kind == "proxy-restored", (end, message)
        assert dest.read_bytes() == OLD, end
        assert pending(state_dir) == [], end


def test_a_later_flip_nests_the_kept_record_in_its_own(tmp_path: Path) -> None:
    """The format: the later flip's record is its own (generation 3, its file), with the kept
    record nested whole (``"previous"``: its header, its note, its file). Killed before its
    registry step, the next start undoes it, then the kept one, and reloads."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    dest.write_bytes(OLD)
    _kept_after_a_failed_reload_back(state_dir)
    kept = _record(state_dir)
    journal = _journal(state_dir, generation=3, port=2003)
    put_in_place(dest, b"server 127.0.0.1:2003;\n", journal)  # killed during its check

    record = _record(state_dir)
    assert (record["generation"], record["registry_next"], "kept" in record) == (3, False, False)
    assert record["previous"] == kept, record
    assert "reload_owed" not in record, record
    assert len(record["files"]) == 1  # type: ignore[arg-type]
    events = _finish(state_dir, {"web": _current(1, 2001)})
    assert [kind for kind, _ in events] == ["proxy-restored", "proxy-restored"], events
    assert events[1][1].startswith("the reload back of web's rolled-back flip to generation 2")
    assert dest.read_bytes() == OLD
    assert _proxy_saw(state_dir) == ["check", "reload"]
