"""Durable atomic writes (``durable.py``), and the files flipvisor replaces through them: each
write is fsynced and renamed into place, and the folder fsynced after (review: the deploy
history and the run record were renamed into place without an fsync, so a power loss could
leave an empty file where the rename had already reached the disk). Real files in a temporary
folder; the folder's fsync observed at our own seam (``durable.fsync_dir``)."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from flipvisor import durable, proxy_file
from flipvisor.config import ProgramConfig
from flipvisor.errors import ProxyError
from flipvisor.history import History
from flipvisor.predecessor import remove_torn_writes
from flipvisor.proxy_file import put_in_place, take_away_now
from flipvisor.proxy_journal import ProxyJournal, flip_journal, removal_journal
from flipvisor.proxy_record import pending
from flipvisor.registry.local_file import read_registry_file, write_registry_file
from flipvisor.runrecord import RUNTIME_ENV, write_record

SUPERVISOR = {"pid": 4242, "started": 1.5, "ticks": 99, "boot_id": "b"}
V1 = ProgramConfig(command=["app", "--version", "1"], env={"TOKEN": "secret"})


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    """The folders ``durable.write_atomic`` made durable, with the thread that did it."""
    found: list[tuple[Path, int]] = []
    fsync_dir = durable.fsync_dir

    def recorded(directory: Path) -> None:
        found.append((directory, threading.get_ident()))
        fsync_dir(directory)

    monkeypatch.setattr(durable, "fsync_dir", recorded)
    return found


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    dest = tmp_path / "a.json"
    dest.write_bytes(b"old")
    durable.write_atomic(dest, b"new", 0o600)
    assert dest.read_bytes() == b"new" and dest.stat().st_mode & 0o777 == 0o600
    assert [name.name for name in tmp_path.iterdir()] == ["a.json"]
    assert [folder for folder, _ in synced] == [tmp_path]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "a.json"
    dest.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        durable.write_atomic(dest, b"new", 0o600, prepare=fail)
    assert dest.read_bytes() == b"old"
    assert [name.name for name in tmp_path.iterdir()] == ["a.json"]


def test_torn_temporaries_are_told_by_name() -> None:
    names = [".web.json.abcd_123.tmp", ".web.json.tmp", "web.json", ".x.conf.abcd1234.tmp"]
    torn = durable.torn_temporaries(names, of=lambda name: name.endswith(".json"))
    assert torn == [".web.json.abcd_123.tmp"]


def test_the_deploy_history_is_written_durably_off_the_event_loop(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    path = tmp_path / "history" / "web.json"
    history = History(path)

    anyio.run(history.record_deployed, V1)

    assert History(path).current == V1
    assert path.stat().st_mode & 0o777 == 0o600  # its env may hold secrets
    [(folder, thread)] = synced
    assert folder == path.parent and thread != threading.get_ident()


def test_the_deploy_history_folder_is_made_again_if_removed(tmp_path: Path) -> None:
    path = tmp_path / "history" / "web.json"
    History(path).deployed(V1)
    path.unlink()
    path.parent.rmdir()
    History(path).deployed(V1)
    assert History(path).current == V1


def test_the_run_record_is_written_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synced: list[tuple[Path, int]]
) -> None:
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "run"))
    config = tmp_path / "flipvisor.yaml"
    config.write_text("programs: {}\n")
    record = write_record(config, tmp_path / "control.sock")
    assert record.stat().st_mode & 0o777 == 0o600
    assert [folder for folder, _ in synced] == [record.parent]
    assert sorted(p.name for p in record.parent.iterdir()) == [record.name]


def test_the_local_registry_file_is_written_durably(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    path = tmp_path / "registry" / "keys.json"
    write_registry_file(path, {"a": "1"})
    assert read_registry_file(path) == {"a": "1"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert [folder for folder, _ in synced] == [path.parent]


def _folder_fsync_fails(monkeypatch: pytest.MonkeyPatch, folder: Path, *, times: int) -> list[Path]:
    """``fsync_dir`` of ``folder`` raises EIO its first ``times`` calls (others sync): a disk
    failing after the rename. Returns the folders it failed for."""
    failed: list[Path] = []
    fsync_dir = durable.fsync_dir

    def failing(directory: Path) -> None:
        if directory == folder and len(failed) < times:
            failed.append(directory)
            raise OSError(errno.EIO, "Input/output error")
        fsync_dir(directory)

    monkeypatch.setattr(durable, "fsync_dir", failing)
    monkeypatch.setattr(proxy_file, "fsync_dir", failing)
    return failed


def test_a_folder_fsync_failing_after_the_rename_says_the_file_was_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "a.json"
    dest.write_bytes(b"old")
    _folder_fsync_fails(monkeypatch, tmp_path, times=1)
    with pytest.raises(durable.ReplacedNotDurable):
        durable.write_atomic(dest, b"new", 0o600)
    assert dest.read_bytes() == b"new"


def _journalled(tmp_path: Path) -> tuple[Path, Path, ProxyJournal]:
    state_dir, conf_d = tmp_path / "state", tmp_path / "conf.d"
    conf_d.mkdir()
    dest = conf_d / "web.conf"
    dest.write_bytes(b"server 127.0.0.1:2001;\n")
    journal = flip_journal(state_dir, "web", generation=2, port=2002, supervisor=SUPERVISOR)
    return state_dir, dest, journal


def test_a_proxy_file_replaced_but_not_synced_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: the folder's fsync failing after ``os.replace`` left the new, unchecked file in
    place with no ``Installed`` to undo it, and the journal's record settled: no trace of it."""
    state_dir, dest, journal = _journalled(tmp_path)
    _folder_fsync_fails(monkeypatch, dest.parent, times=1)

    with pytest.raises(OSError, match="Input/output error"):
        put_in_place(dest, b"server 127.0.0.1:2002;\n", journal)

    assert dest.read_bytes() == b"server 127.0.0.1:2001;\n"
    anyio.run(journal.settle)  # the flip's undo: the file is as it was
    assert pending(state_dir) == []


def test_a_proxy_file_that_cannot_be_put_back_either_keeps_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir, dest, journal = _journalled(tmp_path)
    _folder_fsync_fails(monkeypatch, dest.parent, times=1)
    writes = proxy_file.write_atomic

    def put_back_fails(path: Path, data: bytes, *args: Any) -> None:
        if data == b"server 127.0.0.1:2001;\n":  # the put-back: the disk is full by now
            raise OSError(errno.ENOSPC, "No space left on device")
        writes(path, data, *args)

    monkeypatch.setattr(proxy_file, "write_atomic", put_back_fails)

    with pytest.raises(ProxyError, match="proxy-undo record is kept"):
        put_in_place(dest, b"server 127.0.0.1:2002;\n", journal)
    anyio.run(journal.settle)  # the flip's undo, with no Installed to put back

    assert dest.read_bytes() == b"server 127.0.0.1:2002;\n"  # the unchecked file stays
    [left] = pending(state_dir)  # the next start puts it back, whatever the file holds then
    assert left.about.program == "web" and left.registry_next is False


@pytest.mark.parametrize("previous", [b"server 127.0.0.1:2001;\n", None], ids=["file", "none"])
def test_a_put_back_that_cannot_be_synced_is_a_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bytes | None
) -> None:
    """Review: on a filesystem whose folders cannot be synced, the put-back after a failed
    rename's sync (``write_atomic`` renamed the previous bytes back, or removed the new file)
    was reported as failed and its record kept, while the file was as before: the next start
    then took it for a hand edit."""
    state_dir, dest, journal = _journalled(tmp_path)
    if previous is None:
        dest.unlink()
    _folder_fsync_fails(monkeypatch, dest.parent, times=2)

    with pytest.raises(OSError, match="Input/output error"):
        put_in_place(dest, b"server 127.0.0.1:2002;\n", journal)
    anyio.run(journal.settle)

    assert (dest.read_bytes() if dest.exists() else None) == previous
    assert pending(state_dir) == []


def test_a_proxy_file_removed_but_not_synced_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir, dest, _ = _journalled(tmp_path)
    journal = removal_journal(state_dir, "web")
    _folder_fsync_fails(monkeypatch, dest.parent, times=1)

    with pytest.raises(OSError, match="Input/output error"):
        take_away_now(dest, journal)

    assert dest.read_bytes() == b"server 127.0.0.1:2001;\n"


def test_torn_temporaries_of_ours_are_removed_at_start_up(tmp_path: Path) -> None:
    """Review: a kill mid-write leaked ``.<name>.XXXXXXXX.tmp`` beside the deploy histories and
    the local registry file, and only the proxy-undo records' were removed. Only the exact names
    ``write_atomic`` makes for those files go."""
    state_dir = tmp_path / "state"
    (state_dir / "history").mkdir(parents=True)
    torn = [
        state_dir / ".registry.json.ab_cd123.tmp",
        state_dir / "history" / ".web.json.x1y2z3w4.tmp",
    ]
    kept = [
        state_dir / ".other.json.ab_cd123.tmp",
        state_dir / "registry.json",
        state_dir / "history" / "web.json",
        state_dir / "history" / ".web.json.tmp",
    ]
    for path in [*torn, *kept]:
        path.write_bytes(b"{")

    remove_torn_writes(state_dir)

    assert [path for path in torn if path.exists()] == []
    assert all(path.exists() for path in kept)


def test_a_torn_run_record_of_this_config_is_removed_when_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    monkeypatch.setenv(RUNTIME_ENV, str(folder))
    config = tmp_path / "flipvisor.yaml"
    config.write_text("programs: {}\n")
    record = write_record(config, tmp_path / "control.sock")
    ours, anothers = folder / f".{record.name}.a1b2c3d4.tmp", folder / ".0123abcd.json.a1b2c3d4.tmp"
    ours.write_bytes(b"{")
    anothers.write_bytes(b"{")  # another config's supervisor's write, maybe under way

    write_record(config, tmp_path / "control.sock")

    assert not ours.exists() and anothers.exists()
