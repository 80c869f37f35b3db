"""The local registry: one JSON object in a file, replaced atomically; swap compares."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
from contextlib import aclosing
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import flipvisor.registry.local as local_module
from flipvisor.config import Config, RegistryConfig
from flipvisor.errors import RegistryConflict, RegistryError
from flipvisor.registry import Snapshot, WatchEvent, open_registry
from flipvisor.registry.local import LocalRegistry
from flipvisor.registry.local_file import read_registry_file, write_registry_file
from tests.waiting import await_until, holds


def new(port: int, pids: str) -> Snapshot:
    pid_list = [{"pid": int(pids), "started": 1.5}]
    record = json.dumps({"generation": 1, "port": port, "pids": pid_list})
    return Snapshot({"port/current": str(port), "pid/current": pids, "generation/current": record})


async def test_file_layout_modes_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.json"
    registry = open_registry(
        Config(state_dir=tmp_path / "state", registry=RegistryConfig(prefix="uswitch"))
    )
    assert isinstance(registry, LocalRegistry) and registry.path == path
    await registry.swap("experiment", Snapshot(), new(41000, "101"))
    first = await registry.snapshot("experiment")
    second = Snapshot({**new(41234, "201").values, "port/previous": "41000", "pid/previous": "101"})
    await registry.swap("experiment", first, second)

    data = json.loads(path.read_text())
    assert data["uswitch/experiment/port/current"] == "41234"
    assert data["uswitch/experiment/port/previous"] == "41000"
    assert data["uswitch/experiment/pid/previous"] == "101"
    assert json.loads(data["uswitch/experiment/generation/current"])["port"] == 41234
    assert read_registry_file(path) == data
    assert (await registry.snapshot("experiment")).values == second.values
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["registry.json"]  # no temporary left


async def test_swap_conflict_names_the_key_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    await registry.swap("app", Snapshot(), new(1, "11"))
    seen = await registry.snapshot("app")
    other = read_registry_file(path)
    other["p/app/pid/current"] = "99"  # another writer, between snapshot and swap
    write_registry_file(path, other)
    before = path.read_bytes()
    with pytest.raises(RegistryConflict, match="p/app/pid/current"):
        await registry.swap("app", seen, new(2, "22"))
    assert path.read_bytes() == before


async def test_other_programs_keys_are_kept_and_publish_writes_at_once(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    write_registry_file(path, {"unrelated": "x", "p/other/port/current": "5"})
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    await registry.publish("app", new(7, "70"))
    assert read_registry_file(path)["p/app/port/current"] == "7"
    await registry.publish("app", Snapshot({"port/current": "8"}))  # absent suffixes are deleted
    assert read_registry_file(path) == {
        "unrelated": "x",
        "p/other/port/current": "5",
        "p/app/port/current": "8",
    }


async def test_withdraw_names_what_served_as_previous_and_removes_current(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.json"
    write_registry_file(path, {"p/other/port/current": "5"})
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    await registry.swap("app", Snapshot(), new(7, "70"))
    await registry.withdraw("app")
    assert read_registry_file(path) == {
        "p/other/port/current": "5",
        "p/app/port/previous": "7",
        "p/app/pid/previous": "70",
    }
    inode = path.stat().st_ino
    await registry.withdraw("app")  # nothing current: nothing to write
    assert path.stat().st_ino == inode
    await registry.swap("app", await registry.snapshot("app"), new(8, "80"))
    assert read_registry_file(path)["p/app/port/current"] == "8"


async def test_withdraw_leaves_keys_another_writer_promoted(tmp_path: Path) -> None:
    """The keys no longer name what this registry wrote (another writer, a hand edit): the
    withdrawal leaves them as they are."""
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    await registry.swap("app", Snapshot(), new(7, "70"))
    theirs = {"p/app/port/current": "50000", "p/app/pid/current": "5555"}
    write_registry_file(path, theirs)
    await registry.withdraw("app")
    assert read_registry_file(path) == theirs
    assert registry.health()["pending"] == []


async def test_a_withdrawal_the_file_did_not_take_is_pending_and_retried(tmp_path: Path) -> None:
    """registry.json cannot be read when the program stops: the withdrawal is reported pending
    and ``run`` applies it once the file is readable again, if the keys still name what this
    registry wrote."""
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    async with anyio.create_task_group() as tg:
        await tg.start(registry.run)
        await registry.swap("app", Snapshot(), new(7, "70"))
        await registry.swap("other", Snapshot(), new(8, "80"))
        good = path.read_bytes()
        path.write_text("{")  # a hand edit half done
        await registry.withdraw("app")
        await registry.withdraw("other")
        assert registry.health()["pending"] == ["app", "other"]
        # Meanwhile another writer promoted "other": its withdrawal is dropped.
        fixed = {**json.loads(good), "p/other/port/current": "50000"}
        write_registry_file(path, fixed)
        await await_until(
            lambda: holds(registry.health()["pending"] == []),
            timeout=5,
            message="the withdrawals to be retried",
        )
        values = read_registry_file(path)
        assert {k: v for k, v in values.items() if k.startswith("p/app/")} == {
            "p/app/port/previous": "7",
            "p/app/pid/previous": "70",
        }
        assert {k: v for k, v in values.items() if k.startswith("p/other/")} == {
            k: v for k, v in fixed.items() if k.startswith("p/other/")
        }
        tg.cancel_scope.cancel()


async def test_malformed_file_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text('{"a": 1}')
    registry = LocalRegistry(path, RegistryConfig())
    with pytest.raises(RegistryError, match="object of key -> value strings"):
        await registry.snapshot("app")


@pytest.mark.parametrize(
    "content", [b'{"a": ', b'\xff\xfe{"a": "b"}'], ids=["truncated", "not-utf8"]
)
def test_a_file_that_is_not_json_text_is_a_registry_error(tmp_path: Path, content: bytes) -> None:
    """A damaged file (a disk filled mid-write by someone else, a stray editor) is reported as the
    registry's error, which callers handle, not as a decoding exception that escapes them."""
    path = tmp_path / "registry.json"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match="is not valid JSON"):
        read_registry_file(path)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"", "is empty (0 bytes)"),
        (b"\n", "is empty (1 bytes)"),
        (b'{"a": ', "is not valid JSON"),
        (b'["a"]', "must hold one JSON object of key -> value strings, and holds a JSON list"),
        (b'{"a": 1}', "and holds the key 'a' with a value of type int"),
    ],
)
def test_a_damaged_file_says_what_to_do_about_the_file_not_about_etcd(
    tmp_path: Path, content: bytes, what: str
) -> None:
    """A failed flip ends with the error's next step: for this file, not "make the registry
    reachable (registry.endpoints)", which is about etcd."""
    path = tmp_path / "registry.json"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=re.escape(what)) as caught:
        read_registry_file(path)
    assert caught.value.next_step is not None
    assert caught.value.next_step.startswith(f"fix {path} by hand (one JSON object of key -> ")
    assert "or move it aside" in caught.value.next_step


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_something_else_than_a_file_says_so_and_is_not_waited_on(tmp_path: Path, kind: str) -> None:
    """A folder at the file's path (a container's bind mount of a file that did not exist yet)
    said "Is a directory" with advice to make it readable; a FIFO's read waited for a writer
    forever (`run`'s start-up check, a watch's poll). Both say what is there, and what to do."""
    path = tmp_path / "registry.json"
    if kind == "folder":
        path.mkdir()
        said = "a folder"
    else:
        os.mkfifo(path)
        said = "a FIFO (named pipe)"
    with pytest.raises(RegistryError, match=re.escape(f"{path} is {said}, not a file")) as caught:
        read_registry_file(path)
    assert caught.value.next_step is not None
    assert caught.value.next_step.startswith("move it out of the way")


async def test_watch_polls_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    start = await registry.read_keys(["p/app/"])
    assert start.values == {}
    seen: list[WatchEvent] = []
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async with aclosing(registry.watch(["p/app/"], since=start)) as events:
                async for batch in events:
                    seen.extend(batch)

        tg.start_soon(consume)
        await anyio.lowlevel.checkpoint()  # let the watcher take its first look
        await registry.publish("app", Snapshot({"port/current": "1"}))
        await await_until(lambda: holds(bool(seen)), message="the first change")
        await registry.publish("app", Snapshot({"port/current": "2", "pid/current": "3"}))
        await await_until(lambda: holds(len(seen) == 3), message="the second change")
        tg.cancel_scope.cancel()
    assert [(e.key, e.value) for e in seen] == [
        ("p/app/port/current", "1"),
        ("p/app/pid/current", "3"),
        ("p/app/port/current", "2"),
    ]


async def test_watch_since_a_read_sees_a_change_made_before_the_watch_began(
    tmp_path: Path,
) -> None:
    # The watcher's initial render and reload run between its read and its watch; a change in
    # that gap must not be lost (the file keeps no history: the read is the baseline).
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    await registry.publish("app", Snapshot({"port/current": "1"}))
    start = await registry.read_keys(["p/app/"])
    await registry.publish("app", Snapshot({"port/current": "2"}))  # before the watch begins
    with anyio.fail_after(5):
        async with aclosing(registry.watch(["p/app/"], since=start)) as events:
            batch = await anext(events)
    assert [(e.key, e.value) for e in batch] == [("p/app/port/current", "2")]


async def test_publish_after_a_disk_error_is_retried_until_it_lands(tmp_path: Path) -> None:
    # The registry's folder is a file for a while: writes fail, then work again.
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    registry = LocalRegistry(blocker / "registry.json", RegistryConfig(prefix="p"))
    async with anyio.create_task_group() as tg:
        await tg.start(registry.run)
        await registry.publish("web", new(41000, "101"))  # never raises for a failed write
        assert not (blocker / "registry.json").exists()
        blocker.unlink()

        async def landed() -> bool:
            return (blocker / "registry.json").exists()

        await await_until(landed, timeout=5, message="the pending publication to be retried")
        tg.cancel_scope.cancel()
    assert read_registry_file(blocker / "registry.json")["p/web/port/current"] == "41000"


async def test_a_retry_skips_a_publication_withdrawn_while_an_earlier_one_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two publications left pending by a disk error are retried one after the other. One is
    withdrawn (its program stopped) while the retry writes the other: it must not be written
    after all, naming a stopped program's workers as serving."""
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")  # the registry's folder is a file: writes fail
    registry = LocalRegistry(blocker / "registry.json", RegistryConfig(prefix="p"))
    writing, go_on = threading.Event(), threading.Event()
    original = write_registry_file

    def held(path: Path, values: dict[str, str]) -> None:
        writing.set()
        assert go_on.wait(timeout=10), "the test did not let the write go on"
        original(path, values)

    async with anyio.create_task_group() as tg:
        await tg.start(registry.run)
        await registry.publish("a", new(41000, "101"))
        await registry.publish("b", new(42000, "202"))
        assert registry.health()["pending"] == ["a", "b"]
        monkeypatch.setattr(local_module, "write_registry_file", held)
        blocker.unlink()  # the retry writes "a", and waits in ``held`` meanwhile
        await await_until(lambda: holds(writing.is_set()), message="the retry to write a")
        await registry.withdraw("b")  # b stopped: its publication is taken back
        go_on.set()

        async def landed() -> bool:
            # The file is there once the write's thread renamed it, which may be before the
            # retry loop hears back from that thread: the loop is past "a" once nothing is
            # pending any more.
            return (blocker / "registry.json").exists() and registry.health()["pending"] == []

        await await_until(landed, message="a's publication to land, with nothing left pending")
        await anyio.wait_all_tasks_blocked()  # whatever the retry loop does next, it has done
        assert dict((await registry.snapshot("b")).values) == {}
        assert registry.health()["pending"] == []
        tg.cancel_scope.cancel()
    on_disk = read_registry_file(blocker / "registry.json")
    assert on_disk["p/a/port/current"] == "41000"
    assert not any(key.startswith("p/b/") for key in on_disk), on_disk


async def test_concurrent_swaps_are_group_committed_and_all_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    writes = 0
    original = write_registry_file

    def counting(path: Path, values: dict[str, str]) -> None:
        nonlocal writes
        writes += 1
        original(path, values)

    monkeypatch.setattr(local_module, "write_registry_file", counting)  # a spy: it still writes
    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(registry.swap, f"prog{n}", Snapshot(), new(40000 + n, str(n + 1)))
    on_disk = read_registry_file(path)
    assert all(on_disk[f"p/prog{n}/port/current"] == str(40000 + n) for n in range(50))
    assert writes < 50, "changes made during a write share the next one"
    # A second registry object (another supervisor run) reads what the first wrote.
    assert (await LocalRegistry(path, RegistryConfig(prefix="p")).snapshot("prog7")).get(
        "port/current"
    ) == "40007"


async def test_a_failed_write_fails_every_swap_it_carried_and_is_forgotten(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    registry = LocalRegistry(blocker / "registry.json", RegistryConfig(prefix="p"))
    with pytest.raises(RegistryError):
        await registry.swap("web", Snapshot(), new(41000, "101"))
    blocker.unlink()
    assert (await registry.snapshot("web")).values == {}  # nothing pretends to be written
    await registry.swap("web", Snapshot(), new(41001, "102"))
    assert read_registry_file(blocker / "registry.json")["p/web/port/current"] == "41001"


# In a child process: RLIMIT_FSIZE makes the kernel write only part of a file past the limit
# (a short write, as on a full disk), then refuse with EFBIG.
_WRITE_PAST_A_SIZE_LIMIT = """
import resource, sys
from pathlib import Path
from flipvisor.errors import RegistryError
from flipvisor.registry.local_file import write_registry_file
resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.RLIM_INFINITY))
try:
    values = {f"flipvisor/p{i}/port/current": "4" * 20 for i in range(50)}
    write_registry_file(Path(sys.argv[1]), values)
except RegistryError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_short_write_fails_and_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    write_registry_file(path, {"flipvisor/web/port/current": "41000"})
    before = path.read_bytes()
    child = subprocess.run(
        [sys.executable, "-c", _WRITE_PAST_A_SIZE_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 3, child.stdout + child.stderr
    assert "cannot write the registry file" in child.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]  # no temporary file left


async def test_watch_of_a_bad_file_warns_once_and_the_change_after_it_is_not_live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A hand edit breaks the file for a while: one warning, not one per poll; what the next good
    # read finds may be as old as the breakage (drain_pid must not take it as live).
    caplog.set_level(logging.DEBUG, logger="flipvisor.registry")
    path = tmp_path / "registry.json"
    registry = LocalRegistry(path, RegistryConfig(prefix="p"))
    write_registry_file(path, {"p/app/pid/current": "1"})
    seen: list[WatchEvent] = []
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async with aclosing(registry.watch(["p/app/"])) as events:
                async for batch in events:
                    seen.extend(batch)

        tg.start_soon(consume)
        await anyio.lowlevel.checkpoint()  # let the watcher take its first look
        write_registry_file(path, {"p/app/pid/current": "2"})
        await await_until(lambda: holds(len(seen) == 1), message="a live change")
        path.write_text('{"p/app/pid/current": ')
        # Several polls of the same bad file (the later ones log at DEBUG).
        await await_until(
            lambda: holds(caplog.text.count("watching the registry file") >= 4),
            message="polls of the bad file",
        )
        write_registry_file(path, {"p/app/pid/current": "3"})
        await await_until(lambda: holds(len(seen) == 2), message="the change after it")
        tg.cancel_scope.cancel()
    assert [(e.value, e.live) for e in seen] == [("2", True), ("3", False)]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
