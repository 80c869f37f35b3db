"""The run record (runrecord.py): where the supervisor of a config file listens, named by the
file's real path, believed only while its process runs (its PID, start tick and boot id); a
client also needs its socket to answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flipvisor.client import NotListening, logs_locations, reach
from flipvisor.errors import ConfigError
from flipvisor.locate import locate
from flipvisor.runrecord import (
    ROOT_RUNTIME_DIR,
    RUNTIME_ENV,
    RunRecord,
    answers,
    listening_already,
    parse_record,
    read_record,
    real_config_path,
    record_listening_on,
    record_path,
    remove_record,
    runtime_dirs,
    write_record,
)
from flipvisor.starttime import (
    Identity,
    boot_id,
    identity_of,
    is_process,
    start_ticks_of,
    start_time_of,
)
from tests.waiting import wait_until

CONFIG = "/etc/flipvisor.yaml"


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime folder of the test's own (created by write_record)."""
    folder = tmp_path / "run"
    monkeypatch.setenv(RUNTIME_ENV, str(folder))
    return folder


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "flipvisor.yaml"
    path.parent.mkdir()
    path.write_text("state_dir: state\n")
    return path


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts connections (as a supervisor's control socket does)."""
    path = tmp_path / "state" / "flipvisor.sock"
    path.parent.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    try:
        yield path
    finally:
        server.close()


def beyond_pid_max() -> int:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as pid_max:
        return int(pid_max.read()) + 1


def document(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "config": CONFIG,
        "socket": "/var/lib/flipvisor/flipvisor.sock",
        "pid": 1234,
        "ticks": 98765,
        "boot_id": "0b5c1f6e-2d1a-4c1e-9a57-2f5f2b8e2c11",
        "started": 1764490000.12,
    }
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


# -- where records are ----------------------------------------------------------------------


def test_the_runtime_folder_is_the_environment_s_if_set() -> None:
    assert runtime_dirs({RUNTIME_ENV: "/srv/run"}, euid=0) == [Path("/srv/run")]
    assert runtime_dirs({RUNTIME_ENV: "/srv/run", "XDG_RUNTIME_DIR": "/x"}, euid=1000) == [
        Path("/srv/run")
    ]


def test_the_cli_s_help_names_the_same_variable() -> None:
    from flipvisor import cli_parser

    assert cli_parser.RUNTIME_ENV == RUNTIME_ENV
    assert f"${RUNTIME_ENV}" in (cli_parser.build_parser().epilog or "")


def test_by_default_root_s_is_run_flipvisor() -> None:
    assert runtime_dirs({}, euid=0) == [ROOT_RUNTIME_DIR] == [Path("/run/flipvisor")]
    assert runtime_dirs({"XDG_RUNTIME_DIR": "/run/user/0"}, euid=0) == [ROOT_RUNTIME_DIR]


def test_another_user_s_are_xdg_runtime_dir_then_a_folder_of_its_own_in_the_temp_dir() -> None:
    import tempfile

    fallback = Path(tempfile.gettempdir()) / "flipvisor-1000"
    # run writes to the first; clients read both (a service's supervisor may have no
    # XDG_RUNTIME_DIR where the operator's shell has one).
    assert runtime_dirs({"XDG_RUNTIME_DIR": "/run/user/1000"}, euid=1000) == [
        Path("/run/user/1000/flipvisor"),
        fallback,
    ]
    assert runtime_dirs({}, euid=1000) == [fallback]


def test_a_record_is_named_by_the_config_s_real_path(config: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.yaml"
    link.symlink_to(config)
    relative = Path(os.path.relpath(config))
    folder = tmp_path / "run"
    named = {record_path(folder, real_config_path(p)) for p in (config, link, relative)}
    assert len(named) == 1
    (name,) = named
    assert name.parent == folder and name.suffix == ".json"
    other = config.with_name("other.yaml")
    assert record_path(folder, real_config_path(other)) != name
    # A file deleted since (an editor's rename dance) still names the same record.
    config.unlink()
    assert record_path(folder, real_config_path(config)) == name


# -- what a record must hold ------------------------------------------------------------------


def test_a_record_is_parsed() -> None:
    assert parse_record(document(), CONFIG) == RunRecord(
        CONFIG,
        Path("/var/lib/flipvisor/flipvisor.sock"),
        1234,
        Identity(98765, "0b5c1f6e-2d1a-4c1e-9a57-2f5f2b8e2c11"),
        1764490000.12,
    )
    record = parse_record(document(started=1764490000), CONFIG)
    assert record is not None and record.started == 1764490000.0
    assert record.state_dir == Path("/var/lib/flipvisor")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",  # a truncated write
        b"\xff\xfe",
        b"[]",
        b'"a record"',
        document(config="/etc/other.yaml"),  # another file's, under a colliding name
        document(config=None),
        document(pid=None),
        document(pid="1234"),
        document(pid=True),
        document(pid=0),
        document(pid=-5),
        document(pid=12.5),
        document(ticks=None),  # a record written before records held the start tick
        document(ticks="98765"),
        document(ticks=-1),
        document(ticks=1.5),
        document(ticks=True),
        document(boot_id=None),
        document(boot_id=""),
        document(boot_id=5),
        document(started=None),
        document(started="1764490000"),
        document(started=True),
        document(started=float("nan")),
        document(started=float("inf")),
        document(socket=None),
        document(socket=5),
        document(socket="state/flipvisor.sock"),  # relative: to what?
    ],
)
def test_anything_else_is_no_record(data: bytes) -> None:
    assert parse_record(data, CONFIG) is None


# -- writing, reading, removing -------------------------------------------------------------


def test_a_written_record_is_read_back_while_its_process_runs(
    runtime: Path, config: Path, listening: Path
) -> None:
    path = write_record(config, listening)
    assert path.parent == runtime
    assert runtime.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(runtime.iterdir()) == [path]  # no temporary file left beside it
    record = read_record(config)
    assert record == RunRecord(
        str(config.resolve()),
        listening,
        os.getpid(),
        identity_of(os.getpid()) or Identity(-1, ""),
        start_time_of(os.getpid()) or -1.0,
    )
    written = json.loads(path.read_text())
    assert (written["ticks"], written["boot_id"]) == (start_ticks_of(os.getpid()), boot_id())
    assert read_record(config.with_name("other.yaml")) is None


def test_a_record_whose_process_is_gone_or_whose_pid_was_reused_is_stale(
    runtime: Path, config: Path, listening: Path
) -> None:
    path = write_record(config, listening)
    mine = json.loads(path.read_text())
    ticks = mine["ticks"]
    other_boot = "00000000-0000-4000-8000-000000000000"
    for changes in [
        {"pid": beyond_pid_max()},  # gone
        {"ticks": ticks - 100},  # this PID, but another process's start tick
        {"pid": 1},  # a running process, started at another tick
        {"boot_id": other_boot},  # this PID and tick, but of another boot
    ]:
        path.write_text(json.dumps({**mine, **changes}))
        assert read_record(config) is None, changes


def test_a_stepped_wall_clock_does_not_make_a_live_supervisor_s_record_stale(
    runtime: Path, config: Path, listening: Path
) -> None:
    """The kernel derives start times from the wall clock: after a step (settimeofday, NTP's
    makestep) a live process's start time reads as another. Its tick and boot id do not move."""
    path = write_record(config, listening)
    mine = json.loads(path.read_text())
    for step in (-3600.0, 0.5, 86400.0):
        path.write_text(json.dumps({**mine, "started": mine["started"] + step}))
        record = read_record(config)
        assert record is not None and record.pid == os.getpid(), step


def test_a_live_supervisor_s_record_is_read_whether_or_not_its_socket_answers(
    runtime: Path, config: Path, tmp_path: Path
) -> None:
    """Whether it answers is the caller's to find out: a client needs it to (it connects), and
    ``run`` refuses either way (a busy or stopped supervisor is the file's all the same)."""
    # Bound but no longer listening: the socket file a killed supervisor leaves.
    stale = tmp_path / "stale.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(stale))
    server.close()
    for where in (stale, tmp_path / "absent.sock"):
        write_record(config, where)
        assert read_record(config) is not None  # its process runs...
        assert not answers(where)  # ...but nothing answers there


# -- a process's identity: its start tick and boot id ----------------------------------------


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A running child process (killed and reaped after)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_running_process_is_known_by_its_start_tick_and_boot_id(
    child: subprocess.Popen[bytes],
) -> None:
    identity = identity_of(child.pid)
    assert identity is not None
    assert identity.ticks == start_ticks_of(child.pid)
    assert identity.boot_id == boot_id()
    assert len(boot_id()) == 36  # a UUID
    assert is_process(child.pid, identity)
    # Another PID's identity is not its (nor is its identity another PID's).
    mine = identity_of(os.getpid())
    assert mine is not None and mine != identity
    assert not is_process(os.getpid(), identity)
    assert not is_process(child.pid, mine)
    # The same PID and tick of another boot is another process.
    assert not is_process(child.pid, Identity(identity.ticks, "0" * 8 + boot_id()[8:]))
    assert not is_process(child.pid, identity._replace(boot_id="another boot"))


def test_a_process_that_is_gone_has_no_identity(child: subprocess.Popen[bytes]) -> None:
    identity = identity_of(child.pid)
    assert identity is not None
    child.kill()
    child.wait()
    assert identity_of(child.pid) is None
    assert start_ticks_of(child.pid) is None
    assert not is_process(child.pid, identity)
    assert identity_of(beyond_pid_max()) is None


def test_a_zombie_is_no_longer_the_process_it_was(child: subprocess.Popen[bytes]) -> None:
    """Dead but not reaped yet: its PID and start tick are still there, but it runs no more (a
    killed supervisor's record is stale while its parent is slow to reap it)."""
    identity = identity_of(child.pid)
    assert identity is not None
    child.kill()  # not waited for: a zombie until the fixture reaps it
    wait_until(
        lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE,
        message="the killed child to be a zombie",
    )
    assert start_ticks_of(child.pid) == identity.ticks
    assert not is_process(child.pid, identity)


def test_answers_is_true_for_a_listening_socket(listening: Path) -> None:
    assert answers(listening)


def test_a_record_in_a_folder_other_users_can_write_to_is_not_believed(
    runtime: Path, config: Path, listening: Path
) -> None:
    write_record(config, listening)
    runtime.chmod(0o733)
    try:
        assert read_record(config) is None
        with pytest.raises(PermissionError, match=str(runtime)):
            write_record(config, listening)
    finally:
        runtime.chmod(0o700)
    assert read_record(config) is not None


def test_a_runtime_folder_that_is_a_symlink_or_a_file_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path, listening: Path
) -> None:
    real = tmp_path / "real-run"
    real.mkdir(mode=0o700)
    link = tmp_path / "run-link"
    link.symlink_to(real)
    monkeypatch.setenv(RUNTIME_ENV, str(link))
    with pytest.raises(PermissionError):
        write_record(config, listening)
    assert read_record(config) is None
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv(RUNTIME_ENV, str(a_file))
    with pytest.raises(OSError):
        write_record(config, listening)
    assert read_record(config) is None


def test_a_record_that_is_a_symlink_is_not_read(
    runtime: Path, config: Path, listening: Path, tmp_path: Path
) -> None:
    path = write_record(config, listening)
    moved = tmp_path / "elsewhere.json"
    path.rename(moved)
    path.symlink_to(moved)
    assert read_record(config) is None


def test_a_stale_record_is_replaced(runtime: Path, config: Path, listening: Path) -> None:
    path = write_record(config, listening)
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": beyond_pid_max()}))
    path.chmod(0o644)
    assert write_record(config, listening) == path
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_record(config) is not None


def test_only_this_process_s_record_is_removed(
    runtime: Path, config: Path, listening: Path
) -> None:
    path = write_record(config, listening)
    remove_record(path)
    assert not path.exists()
    remove_record(path)  # gone already: nothing to do
    path = write_record(config, listening)
    # Replaced since by another supervisor (this one had stopped answering): left alone.
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": 1}))
    remove_record(path)
    assert path.exists()


def test_the_supervisor_listening_on_a_socket_is_found_whatever_its_file(
    runtime: Path, config: Path, listening: Path, tmp_path: Path
) -> None:
    """For `check` and `run` of a file whose state_dir another file's supervisor uses: the
    record naming that socket, of a process that runs."""
    assert record_listening_on(listening) is None
    runtime.mkdir(mode=0o700)
    (runtime / "junk.json").write_text("[1, 2]")  # not a record: passed over
    (runtime / "other.json").write_text(json.dumps({"config": str(config)}))  # misnamed
    write_record(config, tmp_path / "elsewhere" / "flipvisor.sock")
    assert record_listening_on(listening) is None
    other = tmp_path / "other.yaml"
    write_record(other, listening)
    found = record_listening_on(listening)
    assert found is not None and (found.config, found.pid) == (str(other), os.getpid())
    assert record_listening_on(listening.parent / "." / listening.name) == found
    # One whose process is gone is stale.
    path = record_path(runtime, str(other))
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": beyond_pid_max()}))
    assert record_listening_on(listening) is None


def test_a_socket_taken_names_the_file_of_its_supervisor_and_how_to_stop_it(
    runtime: Path, listening: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    record = RunRecord(str(other), listening, 4321, Identity(1, "b"), 0.0)
    assert listening_already(listening, record) == (
        f"the supervisor of {other} (pid 4321) already listens on {listening}: this file's "
        f"state_dir is that file's too. Stop it first: `flipvisor -c {other} shutdown`, or "
        "give this file a state_dir of its own"
    )
    assert listening_already(listening, None).startswith(
        f"a supervisor is already listening on {listening} (not recorded as this user's"
    )
    # A file whose path a shell would split: the command is pasteable as given.
    spaced = tmp_path / "my configs" / "other.yaml"
    record = RunRecord(str(spaced), listening, 4321, Identity(1, "b"), 0.0)
    assert f"`flipvisor -c '{spaced}' shutdown`" in listening_already(listening, record)


# -- the client: the file's state_dir first, the record when that leads nowhere --------------


def write_config(config: Path, state_dir: Path) -> Path:
    config.write_text(f"state_dir: {state_dir}\nprograms:\n  web: {{command: [x]}}\n")
    return config


def test_a_file_that_leads_to_its_supervisor_costs_no_record(config: Path, listening: Path) -> None:
    """`status`'s usual path: the socket of the file's state_dir answers; no record is read,
    and neither the record's module nor pydantic is imported."""
    from tests.reaping import run_script

    write_config(config, listening.parent)
    notice, imported = run_script(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from flipvisor.client import reach\n"
        "reached = reach(Path(sys.argv[1]))\n"
        "reached.connection.close()\n"
        "heavy = ('flipvisor.runrecord', 'pydantic', 'anyio', 'psutil')\n"
        "print(json.dumps([reached.notice, sorted(m for m in sys.modules if m in heavy)]))\n",
        str(config),
    )
    assert (notice, imported) == (None, [])


def test_a_file_that_does_not_parse_leads_to_the_recorded_supervisor(
    runtime: Path, config: Path, listening: Path
) -> None:
    write_config(config, listening.parent)
    write_record(config, listening)
    config.write_text("state_dir: [\n")
    reached = reach(config)
    reached.connection.close()
    assert reached.locations.socket_path == listening
    # The file's error (its wording differs between libyaml and PyYAML), then the supervisor.
    assert (reached.notice or "").startswith(f"{config}:2:1: not valid YAML: ")
    assert (reached.notice or "").endswith(
        f"; the supervisor of {config} (pid {os.getpid()}, listening on {listening}) runs on "
        "with the config it last read"
    )
    locations, notice = logs_locations(config)
    assert locations.state_dir == listening.parent and notice is not None


def test_a_state_dir_changed_since_leads_to_the_recorded_supervisor(
    runtime: Path, config: Path, listening: Path, tmp_path: Path
) -> None:
    write_record(config, listening)
    write_config(config, tmp_path / "moved")
    reached = reach(config)
    reached.connection.close()
    assert reached.locations.state_dir == listening.parent
    assert reached.locations.programs == frozenset({"web"})
    assert reached.notice == (
        f"the supervisor of {config} (pid {os.getpid()}) listens on {listening}; the file's "
        f"state_dir changed to {tmp_path / 'moved'}, which takes effect when that supervisor "
        "restarts"
    )
    locations, notice = logs_locations(config)
    assert (locations.state_dir, notice) == (listening.parent, reached.notice)


def test_a_running_supervisor_whose_socket_is_gone_is_named_with_what_to_do(
    runtime: Path, config: Path, tmp_path: Path
) -> None:
    """Its record's process runs (this one) but nothing listens on its socket: not "start one
    with `flipvisor run`", which would be refused, but SIGHUP, which makes it listen again."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    write_config(config, state_dir)
    socket_path = state_dir / "flipvisor.sock"
    write_record(config, socket_path)
    expected = (
        f"the supervisor of {config} runs (pid {os.getpid()}), but its control socket "
        f"{socket_path} is gone (removed by hand, or by a temp cleaner?). `kill -HUP "
        f"{os.getpid()}` makes it listen there again"
    )
    with pytest.raises(NotListening) as caught:
        reach(config)
    assert str(caught.value).startswith(expected)
    assert "flipvisor run`" not in str(caught.value).replace("second `flipvisor run`", "")
    # A file there that nobody listens on is not its own: replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()
    with pytest.raises(NotListening, match=r"does not answer \(the file there is not its own"):
        reach(config)
    # Its file unreadable as well: both said.
    config.write_text("state_dir: [\n")
    with pytest.raises(NotListening, match="not valid YAML") as caught:
        reach(config)
    assert f"the supervisor of {config} runs (pid {os.getpid()})" in str(caught.value)


def test_without_a_running_supervisor_the_file_s_own_error_stands(
    runtime: Path, config: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    write_config(config, moved)
    with pytest.raises(NotListening, match=f"no supervisor is listening on {moved}/"):
        reach(config)
    assert logs_locations(config) == (locate(config), None)
    config.write_text("state_dir: [\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        reach(config)
    assert "supervisor" not in str(caught.value)
    with pytest.raises(ConfigError, match="not valid YAML"):
        logs_locations(config)


def test_a_socket_whose_backlog_is_full_answers(tmp_path: Path) -> None:
    """A supervisor too busy to accept (its backlog full) is alive: `run` must not take its
    socket for a stale one, nor a re-listen unlink it (review: two probes disagreed)."""
    path = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    waiting = []
    try:
        for _ in range(8):  # fill the backlog: never accepted
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        assert answers(path, timeout=0.2)
    finally:
        for client in waiting:
            client.close()
        server.close()
