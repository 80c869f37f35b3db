"""Proxy-undo records kept on purpose (``"kept"``: a flip's undo put its files back and failed to
reload the proxy back): how the next start reads them whatever the registry says
(``proxy_recovery.py``), how a later flip of the same program treats them (``set_aside``), and
the record's format (``proxy_journal.py``). Real files, real check and reload commands."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from flipvisor.proxy_file import put_in_place
from flipvisor.proxy_journal import ProxyJournal, flip_journal
from flipvisor.proxy_record import pending
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
    back), the kept record's reload is done: it goes. If that flip's own reload back fails, its
    record is kept, standing for both: one reload at the next start."""
    state_dir, dest = tmp_path / "state", tmp_path / "web.conf"
    for end in ("promoted", "reloaded_back", "reload_back_failed"):
        dest.write_bytes(OLD)
        _kept_after_a_failed_reload_back(state_dir)
        journal = _journal(state_dir, generation=3, port=2003)
        installed = put_in_place(dest, b"server 127.0.0.1:2003;\n", journal)
        anyio.run(journal.before_registry_step)
        if end != "promoted":
            installed.restore()
        anyio.run(getattr(journal, end))

        left = pending(state_dir)
        if end == "reload_back_failed":
            assert [(step.about.generation, step.reload_back_failed) for step in left] == [
                (3, True)
            ], end
            _finish(state_dir, {"web": _current(1, 2001)}, _web(state_dir))
        else:
            assert left == [], end
