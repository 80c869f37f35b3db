"""Worker output capture: real children writing into a real pipe, rotation, tail and follow."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from flipvisor.config import LogsConfig
from flipvisor.log_lines import MAX_LINE
from flipvisor.logs import ProgramLog
from flipvisor.logs_capture import capture, enlarge_pipe
from flipvisor.logs_follow import SEQ_XATTR, SKIPPED_MARK, UNNUMBERED_MARK, follow, read_seq
from flipvisor.logs_tail import tail_lines
from flipvisor.output_pipe import open_output_pipe
from flipvisor.reaper import Reaper
from flipvisor.spawn import spawn_process
from tests.waiting import wait_until

LINE_RE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (g\d+ w\d+ pid=\d+) \| (.*)$")

# Writes N numbered lines of W bytes in 1 MiB blocks, then records how long the writing took.
WRITER = r"""
import sys, time
count, width, result = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
filler = "x" * (width - 9)
block = "".join(f"{i:08d}{filler}\n" for i in range(1000)).encode()
out = sys.stdout.buffer
start = time.monotonic()
for _ in range(count // 1000):
    out.write(block)
out.flush()
with open(result, "w") as f:
    f.write(str(time.monotonic() - start))
"""


async def run_captured(
    argv: list[str],
    log: ProgramLog,
    *,
    prefix: str = "g1 w0",
    tail: collections.deque[str] | None = None,
) -> int:
    """Run ``argv`` with its output captured into ``log``; its return code once both are done."""
    read_fd, write_fd = open_output_pipe()
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        try:
            child = spawn_process(argv, reaper=reaper, env=os.environ, output_fd=write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as inner:
                    inner.start_soon(
                        lambda: capture(read_fd, log, prefix=f"{prefix} pid={child.pid}", tail=tail)
                    )
                    returncode = await child.wait()
        finally:
            await child.stop(timeout=5)
            child.close()
            os.close(read_fd)
        tg.cancel_scope.cancel()
    return returncode


def parsed(path: Path) -> list[tuple[str, bytes]]:
    """(writer, line) of every worker record in one file; fails on a record without the prefix."""
    records = []
    for raw in path.read_bytes().splitlines():
        if re.match(rb"^\S+Z \[flipvisor\] ", raw):
            continue  # a supervisor note
        match = LINE_RE.match(raw)
        assert match, f"unprefixed record {raw[:120]!r}"
        records.append((match.group(1).decode(), match.group(2)))
    return records


def oldest_first(path: Path) -> list[Path]:
    """``path.N`` ... ``path.1``, ``path``: the rotated files in the order they were written."""
    backups = sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: int(p.suffix[1:]))
    return [*backups[::-1], path]


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "logs" / "app.log"


async def test_child_output_is_prefixed_and_tailed(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig())
    tail: collections.deque[str] = collections.deque(maxlen=2)
    code = "import sys; print('one'); print('two', flush=True); sys.stderr.write('three\\n')"
    try:
        returncode = await run_captured(python(code), log, prefix="g2 w1", tail=tail)
        log.note("worker exited with 0")
    finally:
        log.close()
    assert returncode == 0
    lines = (await anyio.Path(log_path).read_text()).splitlines()
    records = parsed(log_path)
    assert [line for _, line in records[:3]] == [b"one", b"two", b"three"]
    assert all(writer.startswith("g2 w1 pid=") for writer, _ in records[:3])
    assert lines[3].endswith("Z [flipvisor] worker exited with 0")
    assert list(tail) == ["two", "three"]
    assert stat.S_IMODE((await anyio.Path(log_path).stat()).st_mode) == 0o600
    assert stat.S_IMODE((await anyio.Path(log_path.parent).stat()).st_mode) == 0o700
    assert log.dropped == 0


async def test_partial_last_line_and_overlong_line(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig())
    code = (
        "import sys; o = sys.stdout.buffer; o.write(b'a' * (3 * 65536 + 8192) + b'\\nshort\\n');"
        " o.write(b'no newline at the end')"
    )
    try:
        assert await run_captured(python(code), log) == 0
    finally:
        log.close()
    lines = [line for _, line in parsed(log_path)]
    assert [len(line) for line in lines[:4]] == [MAX_LINE, MAX_LINE, MAX_LINE, 8192]
    assert lines[4:] == [b"short", b"no newline at the end"]


async def test_a_cancelled_capture_first_reads_what_the_pipe_holds(log_path: Path) -> None:
    """Cancelled as its writer is reaped, capture still takes what is in the pipe, without
    waiting for its end (what the writer left running may hold it open), and a line cut between
    two reads stays whole."""
    log = ProgramLog(log_path, LogsConfig())
    tail: collections.deque[str] = collections.deque(maxlen=10)
    read_fd, write_fd = open_output_pipe()
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: capture(read_fd, log, prefix="g1 w0 pid=1", tail=tail))
                os.write(write_fd, b"first\npart")
                await anyio.wait_all_tasks_blocked()  # all read: capture waits for more
                assert list(tail) == ["first"]
                os.write(write_fd, b"ial\nlast")  # not read before the cancellation below
                tg.cancel_scope.cancel()
    finally:
        os.close(read_fd)
        os.close(write_fd)
        log.close()
    assert [line for _, line in parsed(log_path)] == [b"first", b"partial", b"last"]
    assert list(tail) == ["first", "partial", "last"]


async def test_fast_writer_is_not_slowed_and_nothing_is_lost(tmp_path: Path) -> None:
    count, width = 250_000, 200  # 50 MB
    log_path = tmp_path / "logs" / "fast.log"
    log = ProgramLog(log_path, LogsConfig(max_bytes=16 * 1024 * 1024, backups=10))
    to_file, to_pipe = tmp_path / "file.time", tmp_path / "pipe.time"
    args = python(WRITER, str(count), str(width))
    # The baseline: the same child writing straight into a file on the same disk. (/dev/null
    # would measure nothing: 50 MB cost it well under a millisecond.)
    fd = os.open(tmp_path / "direct.out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        try:
            child = spawn_process(
                [*args, str(to_file)], reaper=reaper, env=os.environ, output_fd=fd
            )
        finally:
            os.close(fd)
        try:
            with anyio.fail_after(20):
                assert await child.wait() == 0
        finally:
            await child.stop(timeout=5)
            child.close()
        tg.cancel_scope.cancel()
    started = time.monotonic()
    try:
        assert await run_captured([*args, str(to_pipe)], log) == 0
    finally:
        log.close()
    total = time.monotonic() - started
    file_time, pipe_time = float(to_file.read_text()), float(to_pipe.read_text())
    # Through the supervisor the writer can only go as fast as we prefix and copy its output, but
    # it must keep going at disk-like speed. Generous bounds for loaded CI machines.
    assert pipe_time < max(20 * file_time, 3.0), (pipe_time, file_time, total)
    assert log.dropped == 0
    seen = 0
    for path in oldest_first(log_path):
        for _, line in parsed(path):
            assert len(line) == width - 1
            assert int(line[:8]) == seen % 1000, f"line {seen} out of order or lost"
            seen += 1
    assert seen == count


async def test_a_flooding_worker_does_not_starve_the_event_loop(tmp_path: Path) -> None:
    log = ProgramLog(tmp_path / "logs" / "flood.log", LogsConfig(max_bytes=4 * 1024 * 1024))
    # Writes as fast as it can for one second: the pipe always has data for the reader.
    code = (
        "import sys, time; o = sys.stdout.buffer; block = b'f' * 99 + b'\\n'\n"
        "end = time.monotonic() + 1\n"
        "while time.monotonic() < end: o.write(block * 10000)\n"
    )
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            assert await run_captured(python(code), log) == 0
            tg.cancel_scope.cancel()
    finally:
        log.close()
    assert len(gaps) > 10
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f}s"
    assert log.dropped == 0


def test_rotation_keeps_backups_near_max_bytes(log_path: Path) -> None:
    config = LogsConfig(max_bytes=1024, backups=3)
    log = ProgramLog(log_path, config)
    try:
        for i in range(200):
            log.write_line("g1 w0 pid=1", f"line {i:03d} ".encode() + b"y" * 20)
            if i % 7 == 0:
                log.flush()  # flushes at odd points must not change where rotation happens
    finally:
        log.close()
    names = sorted(p.name for p in log_path.parent.iterdir())
    assert names == ["app.log", "app.log.1", "app.log.2", "app.log.3"]
    record = len(parsed(log_path)[0][1]) + len("2026-11-30T11:29:04.123Z g1 w0 pid=1 | \n")
    for name in names[1:]:
        size = (log_path.parent / name).stat().st_size
        assert config.max_bytes - record < size <= config.max_bytes
        assert stat.S_IMODE((log_path.parent / name).stat().st_mode) == 0o600
    assert log_path.stat().st_size <= config.max_bytes
    numbers = [int(line.split()[1]) for p in oldest_first(log_path) for _, line in parsed(p)]
    assert numbers == list(range(numbers[0], 200))


def test_backups_zero_starts_afresh(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=0))
    try:
        for i in range(100):
            log.write_line("g1 w0 pid=1", f"{i:03d}".encode() + b"z" * 40)
    finally:
        log.close()
    assert [p.name for p in log_path.parent.iterdir()] == ["app.log"]
    assert 0 < log_path.stat().st_size <= 1024
    assert parsed(log_path)[-1][1].startswith(b"099")


def test_tail_lines_reaches_into_the_previous_files(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=3))
    try:
        for i in range(100):
            log.write_line("g1 w0 pid=1", f"n={i}".encode())
    finally:
        log.close()
    current = len(log_path.read_bytes().splitlines())
    assert 0 < current < 20
    lines = tail_lines(log_path, 20)
    assert [line.rsplit("n=", 1)[1] for line in lines] == [str(i) for i in range(80, 100)]
    assert tail_lines(log_path, 3)[-1].endswith("| n=99")
    # Every backup kept (.1, .2, .3), oldest line first, none twice: all that is on disk.
    on_disk = sum(
        len(p.read_bytes().splitlines()) for p in log_path.parent.iterdir() if p.is_file()
    )
    assert on_disk > 3 * current  # so .2 and .3 are needed for the whole of it
    everything = [line.rsplit("n=", 1)[1] for line in tail_lines(log_path, 1000)]
    assert len(everything) == on_disk
    assert everything == [str(i) for i in range(100 - on_disk, 100)]
    assert tail_lines(log_path.with_name("missing.log"), 5) == []


def test_the_logs_command_reads_without_the_supervisors_modules(tmp_path: Path) -> None:
    """`flipvisor logs` only reads files: like `status`, it imports neither pydantic (the config
    models) nor anyio, spawn or output_pipe (the capture), so it answers as quickly."""
    from tests.reaping import run_script

    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nprograms:\n  app: {{command: [x]}}\n")
    log = ProgramLog(tmp_path / "state" / "logs" / "app.log", LogsConfig())
    log.write_line("g1 w0 pid=1", b"hello")
    log.close()
    code, printed, imported = run_script(
        "import contextlib, io, json, sys\n"
        "from flipvisor.cli import run_cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = run_cli(['logs', 'app', '-n', '1', '-c', sys.argv[1]])\n"
        "heavy = ('pydantic', 'anyio', 'flipvisor.config', 'flipvisor.spawn',\n"
        "         'flipvisor.output_pipe')\n"
        "print(json.dumps([code, out.getvalue(), sorted(m for m in sys.modules if m in heavy)]))\n",
        str(config),
    )
    assert (code, imported) == (0, [])
    assert printed.endswith(" g1 w0 pid=1 | hello\n")


def test_dropped_lines_are_counted_and_reported(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.symlink_to("/dev/full")  # every write fails with ENOSPC
    log = ProgramLog(log_path, LogsConfig())
    try:
        log.write_lines("g1 w0 pid=1", [b"lost 1", b"lost 2", b"lost 3"])
        log.flush()
        assert log.dropped == 3
        log_path.unlink()  # space again: the next write reopens the name as a fresh file
        log.write_line("g1 w0 pid=1", b"kept")
        log.flush()
    finally:
        log.close()
    assert log.dropped == 3
    lines = log_path.read_text().splitlines()
    assert lines[0].endswith("Z [flipvisor] dropped 3 lines")
    assert lines[1].endswith("| kept")


def test_a_dropped_count_whose_note_cannot_be_written_is_carried_on(log_path: Path) -> None:
    """The note of the lines dropped before fails with the next lines: it says them all later."""
    log_path.parent.mkdir(parents=True)
    log_path.symlink_to("/dev/full")
    log = ProgramLog(log_path, LogsConfig())
    try:
        log.write_lines("g1 w0 pid=1", [b"lost 1", b"lost 2", b"lost 3"])
        log.flush()
        log.write_line("g1 w0 pid=1", b"lost 4")
        log.flush()  # "dropped 3 lines" fails to be written, and so does "lost 4"
        log_path.unlink()
        log.write_line("g1 w0 pid=1", b"kept")
        log.flush()
    finally:
        log.close()
    assert log.dropped == 4
    lines = log_path.read_text().splitlines()
    assert lines[0].endswith("Z [flipvisor] dropped 4 lines")
    assert lines[1].endswith("| kept")


@pytest.fixture
def looking_every_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every flush looks whether the file at the path is still the one written (not once a
    second), so that a test need not wait for it."""
    monkeypatch.setattr("flipvisor.logs.CHECK_INTERVAL", 0.0)


def open_on(path: Path) -> list[str]:
    """What this process holds open of ``path`` (as /proc names it: "... (deleted)" once gone)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor, closed since
            continue
    return [target for target in held if target.startswith(str(path))]


@pytest.mark.usefixtures("looking_every_flush")
def test_a_log_file_removed_by_hand_is_written_again_and_let_go(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig())
    try:
        log.write_line("g1 w0 pid=1", b"before")
        log.flush()
        log_path.unlink()  # disk full: the operator removes the biggest file
        log.write_line("g1 w0 pid=1", b"after")
        log.flush()
        assert open_on(log_path) == [str(log_path)]  # the removed file is freed
    finally:
        log.close()
    note, after = log_path.read_text().splitlines()
    assert " [flipvisor] the log file was removed, not by flipvisor: written again" in note
    assert "the last 0 bytes" not in note
    assert after.endswith("| after")
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert log.dropped == 0


@pytest.mark.usefixtures("looking_every_flush")
def test_a_log_folder_removed_by_hand_is_made_again(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig())
    try:
        log.write_line("g1 w0 pid=1", b"before")
        log.flush()
        shutil.rmtree(log_path.parent)
        log.write_line("g1 w0 pid=1", b"after")
        log.flush()
    finally:
        log.close()
    assert log_path.read_text().splitlines()[-1].endswith("| after")
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700


@pytest.mark.usefixtures("looking_every_flush")
def test_a_log_file_moved_away_by_logrotate_create_is_written_at_its_path(
    log_path: Path,
) -> None:
    """logrotate's default: the file renamed, a new empty one created in its place; the next
    file gets the next number, so that ``logs -f`` knows it follows the one moved away."""
    log = ProgramLog(log_path, LogsConfig())
    moved = log_path.with_name("app.log-20261130")
    try:
        log.write_line("g1 w0 pid=1", b"before")
        log.flush()
        log_path.rename(moved)
        log_path.touch(mode=0o640)
        log.write_line("g1 w0 pid=1", b"after")
        log.flush()
    finally:
        log.close()
    assert [line for _, line in parsed(moved)] == [b"before"]
    note, after = log_path.read_text().splitlines()
    assert "[flipvisor] the log file was replaced (moved away), not by flipvisor" in note
    assert after.endswith("| after")
    with moved.open("rb") as old, log_path.open("rb") as new:
        first = read_seq(old.fileno())
        if first is not None:  # numbered where the file system has user xattrs
            assert read_seq(new.fileno()) == first + 1


@pytest.mark.usefixtures("looking_every_flush")
def test_a_log_file_truncated_in_place_is_written_on_and_rotated_at_its_new_size(
    log_path: Path,
) -> None:
    """logrotate's ``copytruncate``: the same file, emptied; the rotation counts from zero."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=1))
    try:
        for i in range(15):
            log.write_line("g1 w0 pid=1", f"before {i:02d}".encode())
            log.flush()
        assert log_path.stat().st_size > 600
        os.truncate(log_path, 0)
        for i in range(15):
            log.write_line("g1 w0 pid=1", f"after {i:02d}".encode())
            log.flush()
    finally:
        log.close()
    assert not log_path.with_name("app.log.1").exists()  # not rotated at the old size
    lines = [line.decode() for _, line in parsed(log_path)]
    assert lines == [f"after {i:02d}" for i in range(15)]


@pytest.fixture
def never_looking_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flush looks at the path because time passed: only what rotation itself does is seen."""
    monkeypatch.setattr("flipvisor.logs.CHECK_INTERVAL", 3600.0)


def fill_to_near(log: ProgramLog, log_path: Path, size: int) -> list[str]:
    """Write numbered lines, one flush each, until the file is within one line of ``size``."""
    written = []
    while log_path.stat().st_size < size - 80:
        written.append(f"before {len(written):02d}")
        log.write_line("g1 w0 pid=1", written[-1].encode())
        log.flush()
    return written


@pytest.mark.usefixtures("never_looking_by_time")
def test_a_log_file_truncated_near_its_size_is_not_rotated_before_the_look(log_path: Path) -> None:
    """copytruncate of a file about to rotate: its true size is taken before rotating, so the
    emptied file is written on, not made ``.1`` (which would push the real backup out)."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=1))
    backup = log_path.with_name("app.log.1")
    try:
        fill_to_near(log, log_path, 1024)
        backup.write_text("the real backup\n")
        shutil.copy(log_path, log_path.with_name("app.log-20261130"))
        os.truncate(log_path, 0)
        for i in range(3):
            log.write_line("g1 w0 pid=1", f"after {i}".encode())
            log.flush()
    finally:
        log.close()
    assert backup.read_text() == "the real backup\n"
    assert [line.decode() for _, line in parsed(log_path)] == [f"after {i}" for i in range(3)]


@pytest.mark.usefixtures("never_looking_by_time")
def test_a_log_file_moved_away_near_its_size_is_not_rotated_before_the_look(
    log_path: Path,
) -> None:
    """logrotate's create just before the file reached its size: the new file at the path is
    written (with the note), not renamed to ``.1`` by a rotation counted on the old file's size."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=1))
    moved = log_path.with_name("app.log-20261130")
    try:
        before = fill_to_near(log, log_path, 1024)
        log_path.rename(moved)
        log_path.touch(mode=0o640)
        for i in range(3):
            log.write_line("g1 w0 pid=1", f"after {i}".encode())
            log.flush()
    finally:
        log.close()
    assert not log_path.with_name("app.log.1").exists()
    assert [line.decode() for _, line in parsed(moved)] == before
    note = log_path.read_text().splitlines()[0]
    assert "[flipvisor] the log file was replaced (moved away), not by flipvisor" in note
    assert [line.decode() for _, line in parsed(log_path)] == [f"after {i}" for i in range(3)]


@pytest.mark.usefixtures("looking_every_flush")
def test_a_removed_log_file_that_cannot_be_opened_again_is_said_so_and_noted_later(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Removed, and its path not openable for a while (a folder put there): the warning says the
    lines are dropped, and the note of the removal waits for the file to be written again."""
    log = ProgramLog(log_path, LogsConfig())
    try:
        log.write_line("g1 w0 pid=1", b"before")
        log.flush()
        log_path.unlink()
        log_path.mkdir()  # open(O_WRONLY) fails: EISDIR
        log.write_line("g1 w0 pid=1", b"lost")
        log.flush()
        assert log.dropped == 1
        log_path.rmdir()
        log.write_line("g1 w0 pid=1", b"after")
        log.flush()
    finally:
        log.close()
    warned = [r.getMessage() for r in caplog.records if "was removed" in r.getMessage()]
    assert warned == [
        f"{log_path} was removed while written and cannot be opened again at its "
        "path; dropping lines (counted) until it can"
    ]
    removed, dropped, after = log_path.read_text().splitlines()
    assert " [flipvisor] the log file was removed, not by flipvisor: written again" in removed
    assert dropped.endswith(" [flipvisor] dropped 1 lines")
    assert after.endswith("| after")


def collect(lines: Iterator[str], wanted: str) -> list[str]:
    got = []
    for line in lines:
        got.append(line)
        if line.endswith(wanted):
            break
    return got


def following(log: ProgramLog, log_path: Path) -> Generator[str, None, None]:
    """A line written, then ``follow`` from there (``last=1``, 10 s at most), that line read."""
    log.write_line("g1 w0 pid=1", b"before follow")
    log.flush()
    deadline = time.monotonic() + 10
    lines = follow(log_path, poll_interval=0.01, last=1, until=lambda: time.monotonic() > deadline)
    assert next(lines).endswith("| before follow")
    return lines


def test_follow_survives_rotation(log_path: Path) -> None:
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=1))
    deadline = time.monotonic() + 10
    record = b"w" * 20

    def write(start: int, stop: int) -> None:
        for i in range(start, stop):
            log.write_line("g1 w0 pid=1", f"after {i:03d} ".encode() + record)
        log.flush()

    try:
        log.write_line("g1 w0 pid=1", b"before follow")
        log.flush()
        lines = follow(
            log_path, poll_interval=0.01, last=1, until=lambda: time.monotonic() > deadline
        )
        write(0, 20)  # rotates once before the follower even opened the file
        assert log_path.with_name("app.log.1").read_bytes().startswith(b"20")
        got = collect(lines, f"after 019 {record.decode()}")
        for start in range(20, 200, 10):  # less than a file each: the follower keeps up
            write(start, start + 10)
            got += collect(lines, f"after {start + 9:03d} {record.decode()}")
        log.write_line("g2 w0 pid=2", b"still followed")
        log.flush()
        got += collect(lines, "still followed")
        lines.close()
    finally:
        log.close()
    assert got[0].endswith("| before follow")
    assert [int(line.split("after ")[1][:3]) for line in got[1:-1]] == list(range(200))
    assert got[-1].endswith("g2 w0 pid=2 | still followed")


def test_follow_reads_every_file_of_rotations_between_two_polls(log_path: Path) -> None:
    """The log rotated twice (or more) while the follower was not looking: the files rotated in
    between are read too, in order, before the current one."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=5))
    try:
        lines = following(log, log_path)
        for i in range(60):  # about three files' worth, all before the follower reads on
            log.write_line("g1 w0 pid=1", f"line {i:03d} ".encode() + b"w" * 20)
        log.flush()
        assert log_path.with_name("app.log.3").exists()  # rotated at least three times
        got = collect(lines, "line 059 " + "w" * 20)
        lines.close()
    finally:
        log.close()
    assert [int(line.split("line ")[1][:3]) for line in got] == list(range(60))


def test_follow_marks_where_rotation_outran_it(log_path: Path) -> None:
    """The log rotated through every backup while the follower was not looking: the files in
    between are gone, and the follower says where it lost lines instead of a silent gap."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=2))
    try:
        lines = following(log, log_path)
        for i in range(150):  # about seven files' worth: more than the two backups keep
            log.write_line("g1 w0 pid=1", f"line {i:03d} ".encode() + b"w" * 20)
        log.flush()
        got = collect(lines, "line 149 " + "w" * 20)
        lines.close()
    finally:
        log.close()
    mark = SKIPPED_MARK.decode().rstrip("\n")
    assert got.count(mark) == 1, got
    gap = got.index(mark)
    # The file it had open is read to its end (open, it outlives its deletion), then the mark,
    # then what the kept files hold: every line once, in order, the lost ones only missing.
    before = [int(line.split("line ")[1][:3]) for line in got[:gap]]
    after = [int(line.split("line ")[1][:3]) for line in got[gap + 1 :]]
    assert before == list(range(len(before))) and before, got[:3]
    assert after == list(range(after[0], 150)) and after[0] > len(before), after[:3]
    # Everything the backups still hold is read: on from the oldest one (it went to the current
    # file, skipping the backups).
    oldest = log_path.with_name("app.log.2").read_text().splitlines()[0]
    assert after[0] == int(oldest.split("line ")[1][:3])


MARK = SKIPPED_MARK.decode().rstrip("\n")
UNNUMBERED = UNNUMBERED_MARK.decode().rstrip("\n")


def assert_every_gap_marked(got: list[str], first: int, last: int) -> int:
    """``got`` holds the numbered lines ``first`` to ``last`` (the number ends each line), each at
    most once, in order, from ``first`` to ``last`` itself, and ``MARK`` exactly where numbers
    are missing; how many such gaps there are."""
    expected, marked, gaps = first, False, 0
    for index, line in enumerate(got):
        if line == MARK:
            assert not marked, f"two marks in a row at {index}"
            marked = True
            continue
        number = int(line.rsplit(" ", 1)[1])
        assert number >= expected, f"line {index}: {number} after {expected - 1}"
        if number > expected:
            assert marked, f"line {index}: {expected}..{number - 1} missing without a mark"
            gaps += 1
        else:
            assert not marked, f"line {index}: a mark before {number}, but nothing is missing"
        marked, expected = False, number + 1
    assert (expected, marked) == (last + 1, False), got[-3:]
    return gaps


def number_of(path: Path) -> int | None:
    """The rotation number of the file at ``path``; None without one, or without a file (the
    writer is between a rotation's rename and the new file)."""
    try:
        with path.open("rb") as f:
            return read_seq(f.fileno())
    except FileNotFoundError:
        return None


# Writes numbered lines through ProgramLog at 3 lines per ms (a busy access log), then "done".
LOG_WRITER = r"""
import sys, time
from pathlib import Path
from flipvisor.config import LogsConfig
from flipvisor.logs import ProgramLog
path, count, backups = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = ProgramLog(path, LogsConfig(max_bytes=20000, backups=backups))
start = time.monotonic()
for i in range(0, count, 3):
    log.write_lines("g1 w0 pid=1", [b"%06d" % n for n in range(i, min(i + 3, count))])
    log.flush()
    ahead = start + (i + 3) / 3000 - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
log.write_line("g1 w0 pid=1", b"done")
log.close()
"""


def follow_a_writer(
    log_path: Path, count: int, backups: int, pause: Callable[[int], None] = lambda n: None
) -> list[str]:
    """What ``follow`` (polling as ``logs -f`` does) yields while another process writes
    ``count`` numbered lines through ``ProgramLog(max_bytes=20000, backups=backups)``, up to
    the writer's last line; ``pause(n)`` is called after line number ``n``."""
    ProgramLog(log_path, LogsConfig(max_bytes=20000, backups=backups)).close()  # numbered 0
    deadline = time.monotonic() + 20
    lines = follow(log_path, until=lambda: time.monotonic() > deadline)
    writer = subprocess.Popen(python(LOG_WRITER, str(log_path), str(count), str(backups)))
    got: list[str] = []
    try:
        for line in lines:
            if line.endswith("| done"):
                break
            got.append(line)
            if line != MARK:
                pause(int(line.rsplit(" ", 1)[1]))
        assert writer.wait(timeout=20) == 0
    finally:
        lines.close()
        writer.kill()
        writer.wait()
    return got


def test_follow_reads_every_file_of_a_fast_writer_that_keeps_them(log_path: Path) -> None:
    """Rotating every ~150 ms while the follower polls every 100 ms, nothing rotates out (ten
    backups): every line arrives, in order, and no mark. (It skipped whole files, unmarked.)"""
    got = follow_a_writer(log_path, count=3000, backups=10)
    assert log_path.with_name("app.log.5").exists()  # it did rotate, several times
    assert MARK not in got
    assert assert_every_gap_marked(got, 0, 2999) == 0


def test_follow_marks_exactly_the_files_a_fast_writer_rotated_out(log_path: Path) -> None:
    """The follower stops reading until two files it had not read are rotated out (deleted):
    it says so where they were, and only there, then goes on with the oldest file kept (not the
    current one); every line still kept arrives, in order."""
    resumed: list[int] = []  # the first number in the current file when the follower read on

    def first_number() -> int | None:
        try:
            with log_path.open("rb") as f:
                line = f.readline()
        except FileNotFoundError:
            return None  # mid-rotation
        return int(line.split()[-1]) if line.endswith(b"\n") else None

    def pause(number: int) -> None:
        if number >= 300 and not resumed:
            # The follower holds this file or older ones; four rotations on, the file after
            # this one is gone too.
            (seq,) = wait_until(
                lambda: (n := number_of(log_path)) is not None and [n],
                message="the current file's number",
            )
            wait_until(
                lambda: (number_of(log_path) or 0) >= seq + 4,
                message="the log to rotate four times",
            )
            resumed.append(wait_until(first_number, message="a line in the new file"))

    got = follow_a_writer(log_path, count=3000, backups=2, pause=pause)
    assert resumed, "never paused"
    assert assert_every_gap_marked(got, 0, 2999) >= 1
    # Where it paused (an earlier gap would be a stall of this busy machine's), it read the rest
    # of what it held, then the mark, then the two backups kept then (the file current then
    # comes after them; a rotation takes ~150 ms).
    paused = next(i for i, line in enumerate(got) if line != MARK and int(line[-6:]) >= 300)
    gap = got.index(MARK, paused)
    assert int(got[gap + 1].split()[-1]) < resumed[0]


def test_follow_with_no_backups_marks_only_where_a_file_was_lost(log_path: Path) -> None:
    """With ``backups: 0`` every rotation deletes the file read: the numbers tell a rotation
    that came straight after it (no mark) from one that lost a whole file (a mark)."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=0))

    def write(start: int, stop: int) -> None:
        for i in range(start, stop):
            log.write_line("g1 w0 pid=1", b"w" * 20 + f" {i:03d}".encode())
        log.flush()

    try:
        write(0, 1)
        lines = follow(log_path, poll_interval=0.01, last=1)
        assert next(lines).endswith(" 000")
        write(1, 20)  # a file is about 15 lines: one rotation
        assert number_of(log_path) == 1
        got = collect(lines, " 019")
        write(20, 80)  # four rotations while the follower is not looking
        got += collect(lines, " 079")
        lines.close()
    finally:
        log.close()
    assert MARK not in got[:19]
    assert assert_every_gap_marked(got, 1, 79) == 1


@pytest.mark.parametrize("numbered", [True, False])
def test_follow_past_a_file_rotated_out_while_it_read_it(log_path: Path, numbered: bool) -> None:
    """The file read was rotated out (deleted) by exactly ``backups + 1`` rotations, so the oldest
    file kept is the one right after it: nothing is lost, and its number says so. Without numbers
    (a file system without user xattrs) the follower cannot rule a gap out, and marks one."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=2))
    written = 0

    def rotate(times: int) -> None:
        nonlocal written
        target = (number_of(log_path) or 0) + times
        while number_of(log_path) != target:
            log.write_line("g1 w0 pid=1", b"w" * 20 + f" {written:03d}".encode())
            log.flush()
            written += 1

    try:
        rotate(0)
        log.write_line("g1 w0 pid=1", b"w" * 20 + b" 000")
        log.flush()
        written = 1
        lines = follow(log_path, poll_interval=0.01, last=1)
        assert next(lines).endswith(" 000")
        rotate(3)  # the file read is .3 now: deleted
        if not numbered:
            for kept in (log_path, *log_path.parent.glob("app.log.*")):
                os.removexattr(kept, SEQ_XATTR)
        got = collect(lines, f" {written - 1:03d}")
        lines.close()
    finally:
        log.close()
    if numbered:
        assert assert_every_gap_marked(got, 1, written - 1) == 0
    else:  # a mark that says it cannot tell, and every line all the same
        assert got.count(UNNUMBERED) == 1 and MARK not in got, got
        numbers = [int(line.split()[-1]) for line in got if line != UNNUMBERED]
        assert numbers == list(range(1, written))


# In a folder on a file system without user xattrs (argv[1]), what `follow` yields past the file
# it read, rotated out while it read it (as above), as JSON; and whether the files could be
# numbered there.
FOLLOW_PAST_A_ROTATED_OUT_FILE = r"""
import json, os, sys, time
from pathlib import Path
from flipvisor.config import LogsConfig
from flipvisor.logs import ProgramLog
from flipvisor.logs_follow import can_number, follow
path = Path(sys.argv[1]) / "app.log"
log = ProgramLog(path, LogsConfig(max_bytes=1024, backups=2))
def write(number):
    log.write_line("g1 w0 pid=1", b"w" * 20 + b" %03d" % number)
    log.flush()
write(0)
deadline = time.monotonic() + 20
lines = follow(path, poll_interval=0.01, last=1, until=lambda: time.monotonic() > deadline)
got = [next(lines)]
written, rotations, inode = 1, 0, os.stat(path).st_ino
while rotations < 3:  # the file read is .3 now: deleted
    write(written)
    written += 1
    if os.stat(path).st_ino != inode:
        rotations, inode = rotations + 1, os.stat(path).st_ino
for line in lines:
    got.append(line)
    if line.endswith(" %03d" % (written - 1)):
        break
lines.close()
with path.open("rb") as f:
    numbered = can_number(f.fileno())
log.close()
print(json.dumps({"got": got, "written": written, "can_number": numbered}))
"""


def in_a_ramfs(tmp_path: Path, scenario: str) -> dict[str, Any]:
    """What ``scenario`` (Python code, given a folder as argv[1]) prints as JSON, run on a ramfs,
    which takes no user xattrs, mounted in a mount namespace of its own. Skipped where that
    cannot be (not root, no unshare, or a kernel whose ramfs takes them: ``can_number`` in the
    JSON says)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare to mount a ramfs in a mount namespace of its own")
    folder = tmp_path / "ramfs"
    folder.mkdir()
    mount = 'mount -t ramfs flipvisor-test "$1" && exec "$0" -c "$2" "$1"'
    argv = [sys.executable, str(folder), scenario]  # $0, $1, $2
    result = subprocess.run(
        [unshare, "--mount", "sh", "-c", mount, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 and "mount" in result.stderr and "Traceback" not in result.stderr:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must be able to mount a ramfs: {result.stderr}")
        pytest.skip(f"cannot mount a ramfs: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout)
    if outcome["can_number"]:
        pytest.skip("ramfs takes user xattrs on this kernel: nothing to test it with")
    return outcome


def test_follow_on_a_file_system_without_user_xattrs_says_lines_may_be_missing(
    tmp_path: Path,
) -> None:
    """ramfs takes no user xattrs (nor does tmpfs before Linux 6.6, or some overlays), so
    ``ProgramLog`` cannot number its files there. Past a file rotated out while it was read, the
    follower cannot tell whether a file came between: it says so, and reads on. It said that
    lines were skipped, though every one was there."""
    outcome = in_a_ramfs(tmp_path, FOLLOW_PAST_A_ROTATED_OUT_FILE)
    got = outcome["got"]
    assert got.count(UNNUMBERED) == 1 and MARK not in got, got
    numbers = [int(line.split()[-1]) for line in got if line != UNNUMBERED]
    assert numbers == list(range(outcome["written"]))


# On a file system without user xattrs (argv[1]), with `backups: 0`: a rotation deletes the file
# read and starts an empty one (its first line still buffered); what `follow` yields then (before
# its 5 s deadline), as JSON.
FOLLOW_INTO_A_NEW_EMPTY_FILE = r"""
import json, sys, time
from pathlib import Path
from flipvisor.config import LogsConfig
from flipvisor.logs import ProgramLog
from flipvisor.logs_follow import can_number, follow
path = Path(sys.argv[1]) / "app.log"
log = ProgramLog(path, LogsConfig(max_bytes=1024, backups=0))
log.write_line("g1 w0 pid=1", b"first")
log.flush()
started = time.monotonic()
lines = follow(path, poll_interval=0.01, last=1, until=lambda: time.monotonic() > started + 5)
got = [next(lines)]
while path.stat().st_size:  # up to the rotation, whose line is not flushed yet
    log.write_line("g1 w0 pid=1", b"w" * 40)
    if path.stat().st_size:
        log.flush()
got.append(next((line for line in lines if not line.endswith("w" * 40)), "(deadline)"))
with path.open("rb") as f:
    numbered = can_number(f.fileno())
log.close()
print(json.dumps({"got": got, "seconds": time.monotonic() - started, "can_number": numbered}))
"""


def test_follow_does_not_wait_for_a_number_that_cannot_come(tmp_path: Path) -> None:
    """A file just rotated in and still empty may be about to get its number: the follower
    looks again. Where files cannot be numbered, it does not wait for one (it polled every 2 ms
    until the file's first line came, here until its deadline): it says lines may be missing."""
    outcome = in_a_ramfs(tmp_path, FOLLOW_INTO_A_NEW_EMPTY_FILE)
    assert outcome["got"][1:] == [UNNUMBERED], outcome
    assert outcome["seconds"] < 5, outcome


def test_follow_holds_no_file_the_log_deleted_before_it_was_read(log_path: Path) -> None:
    """A file the follower opened as the next to read, but that rotated out before it got to it,
    is let go (a follower holds no more than the log keeps) and marked as lost."""
    log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=1))

    def write(start: int, stop: int) -> None:
        for i in range(start, stop):
            log.write_line("g1 w0 pid=1", b"w" * 20 + f" {i:03d}".encode())
        log.flush()

    try:
        write(0, 1)
        lines = follow(log_path, poll_interval=0.01, last=1)
        assert next(lines).endswith(" 000")
        write(1, 20)  # one rotation: the follower opens the new file when it reads on
        got = [next(lines)]
        write(20, 60)  # two more: the file it opened is deleted before it was read
        got += collect(lines, " 059")
        lines.close()
        oldest = log_path.with_name("app.log.1").read_text().splitlines()[0]
    finally:
        log.close()
    assert assert_every_gap_marked(got, 1, 59) == 1
    assert got[got.index(MARK) + 1] == oldest  # on with the oldest file kept


def test_log_files_are_numbered_in_rotation_order(log_path: Path) -> None:
    for backups in (2, 0):
        log = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=backups))
        first = number_of(log_path)
        assert first is not None
        for i in range(40):  # about three files
            log.write_line("g1 w0 pid=1", f"line {i:03d} ".encode() + b"w" * 20)
        log.flush()
        log.close()
        now = number_of(log_path)
        assert now is not None and now >= first + 2
        if backups:
            assert [number_of(log_path.with_name(f"app.log.{i}")) for i in (1, 2)] == [
                now - 1,
                now - 2,
            ]
        # A new ProgramLog (a restarted supervisor) goes on with the same file and numbering.
        again = ProgramLog(log_path, LogsConfig(max_bytes=1024, backups=backups))
        assert number_of(log_path) == now
        again.close()


def test_follow_waits_for_the_file_and_finishes_partial_lines(log_path: Path) -> None:
    deadline = time.monotonic() + 10
    lines = follow(log_path, poll_interval=0.01, until=lambda: time.monotonic() > deadline)
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"first\nhalf")
    try:
        assert next(lines) == "first"
        with log_path.open("ab") as f:
            f.write(b" and the rest\n")
        assert next(lines) == "half and the rest"
    finally:
        lines.close()


def test_enlarge_pipe() -> None:
    read_fd, write_fd = open_output_pipe()
    try:
        assert enlarge_pipe(read_fd) >= 64 * 1024
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_the_logs_command_shows_a_workers_escape_sequences_to_a_terminal(tmp_path: Path) -> None:
    """A worker's output may hold escape sequences (a new window title, cursor moves, an
    answer-back request) that the operator's terminal obeyed when `flipvisor logs` printed
    them. To a terminal they are shown as ``\\x1b``; piped, or with ``--raw``, as written."""
    import pty

    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nprograms:\n  app: {{command: [x]}}\n")
    log = ProgramLog(tmp_path / "state" / "logs" / "app.log", LogsConfig())
    log.write_line("g1 w0 pid=1", b"\x1b]0;owned\x07red: \x1b[31mno\x1b[0m\tend")
    log.close()

    def printed(*extra: str, terminal: bool) -> bytes:
        argv = [sys.executable, "-m", "flipvisor", "logs", "app", "-n", "1", "-c", str(config)]
        if not terminal:
            return subprocess.run(
                [*argv, *extra], capture_output=True, timeout=30, check=True
            ).stdout
        controller, terminal_end = pty.openpty()
        try:
            subprocess.run([*argv, *extra], stdout=terminal_end, timeout=30, check=True)
            os.close(terminal_end)
            terminal_end = -1
            out = b""
            while True:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # EIO: the writer is gone and everything was read
                    break
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            os.close(controller)
            if terminal_end >= 0:
                os.close(terminal_end)

    shown = printed(terminal=True)
    assert shown.endswith(b" | \\x1b]0;owned\\x07red: \\x1b[31mno\\x1b[0m\tend\r\n"), shown
    assert b"\x1b" not in shown and b"\x07" not in shown, shown
    as_written = b" | \x1b]0;owned\x07red: \x1b[31mno\x1b[0m\tend"
    assert printed(terminal=False).endswith(as_written + b"\n")
    assert printed("--raw", terminal=True).endswith(as_written + b"\r\n")
