"""flipvisor check's host checks: commands, directories and templates that would fail here."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from flipvisor.cli import run_cli
from flipvisor.config import Config
from flipvisor.config_file import parse_config
from flipvisor.preflight import host_problems
from flipvisor.runrecord import remove_record, write_record

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "templates" / "nginx.conf.j2"


def problems(text: str, folder: Path) -> list[str]:
    """The host problems of ``text`` as a config file in ``folder`` (its state_dir there too,
    unless it names one: the default, /var/lib/flipvisor, is root's)."""
    text = dedent(text)
    if not text.startswith("state_dir:"):
        text = f"state_dir: {folder / 'state'}\n{text}"
    return [
        str(problem) for problem in host_problems(parse_config(text, folder / "flipvisor.yaml"))
    ]


def test_a_working_config_has_no_problems(tmp_path: Path) -> None:
    text = f"""\
        programs:
          web:
            command: ["{sys.executable}", "app.py", "--port", "{{port}}"]
            cwd: {tmp_path}
            readiness: {{exec: ["true"]}}
            proxy:
              template: {TEMPLATE}
              dest: {tmp_path}/web.conf
              check_cmd: ["true", "{{path}}"]
              reload_cmd: ["true"]
              vars: {{listen: "127.0.0.1:8080"}}
        """
    assert problems(text, tmp_path) == []


def test_every_host_problem_is_named_with_its_location(tmp_path: Path) -> None:
    broken = tmp_path / "broken.j2"
    broken.write_text("upstream {{ program }} { server {{ upstreams[0] }}; {% if %}\n")
    text = f"""\
        programs:
          web:
            command: [no-such-program-xyz]
            cwd: {tmp_path}/missing
            proxy:
              template: {broken}
              dest: {tmp_path}/web.conf
              reload_cmd: [also-missing-xyz, -s, reload]
          api:
            command: ["{sys.executable}"]
            readiness: {{exec: ["./probe.sh"]}}
            proxy:
              template: {TEMPLATE}
              dest: {tmp_path}/api.conf
        watch:
          - keys: [a/b]
            template: {tmp_path}/nope.j2
            dest: {tmp_path}/out.conf
        """
    found = problems(text, tmp_path)
    assert f"programs.web.cwd: {tmp_path}/missing is not a directory" in found
    assert "programs.web.command: command 'no-such-program-xyz': not found in PATH" in found
    assert any(
        p.startswith("programs.web.proxy.reload_cmd: command 'also-missing-xyz'") for p in found
    )
    assert any(
        p.startswith("programs.web.proxy.template: proxy template") and "line 1" in p for p in found
    )
    assert any(
        p.startswith("programs.api.readiness.exec: command './probe.sh' (")
        and p.endswith("/probe.sh): no such file")
        for p in found
    ), found
    # The shipped template needs `listen` or falls back to 8080: it renders.
    assert not any(p.startswith("programs.api.proxy.template") for p in found)
    assert f"watch.0.template: {tmp_path}/nope.j2 does not exist" in found
    assert len(found) == 6, found


def test_a_command_the_kernel_cannot_exec_is_a_problem(tmp_path: Path) -> None:
    """`run` would refuse it (spawn.py's shell shim would run it as a shell script)."""
    lost = tmp_path / "lost-shebang.py"
    lost.write_text("import os\n")
    lost.chmod(0o755)
    (tmp_path / "bin").mkdir()
    orphan = tmp_path / "bin" / "tool"
    orphan.write_text("#!/no/such/python3\n")
    orphan.chmod(0o755)
    text = f"""\
        programs:
          web:
            command: ["{lost}"]
            readiness: {{exec: [tool, --check]}}
            env: {{PATH: "{tmp_path / "bin"}"}}
        """
    assert problems(text, tmp_path) == [
        f"programs.web.command: command '{lost}': not a program: no #! line naming its "
        "interpreter, and not a binary (exec format error)",
        f"programs.web.readiness.exec: command 'tool' ({orphan}): its #! interpreter "
        "/no/such/python3: no such file",
    ]


def test_check_exits_2_on_a_host_problem(tmp_path: Path) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text("state_dir: st\nprograms:\n  web:\n    command: [no-such-program-xyz]\n")
    assert run_cli(["check", "-c", str(config)]) == 2
    config.write_text(f"state_dir: st\nprograms:\n  web:\n    command: [{sys.executable}]\n")
    assert run_cli(["check", "-c", str(config)]) == 0


def test_what_run_would_refuse_is_found_before(tmp_path: Path) -> None:
    """`check` said ok, and `run` failed: a state_dir or proxy file it cannot create, a metrics
    address that is not this host's."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "a-folder").mkdir()
    watch_template = tmp_path / "watch.j2"
    watch_template.write_text("upstream b { server {{ get('a/b', '127.0.0.1:1') }}; }\n")
    text = f"""\
        state_dir: {a_file}
        metrics: {{listen: "999.1.1.1:9000"}}
        programs:
          web:
            command: ["{sys.executable}"]
            proxy: {{template: {TEMPLATE}, dest: {tmp_path}/a-folder}}
          api:
            command: ["{sys.executable}"]
            proxy: {{template: {TEMPLATE}, dest: {a_file}/sites/api.conf}}
        watch:
          - keys: [a/b]
            template: {watch_template}
            dest: {a_file}/out.conf
        """
    found = problems(text, tmp_path)
    assert found[0] == (
        f"state_dir: {a_file} is a file, not a folder; choose a writable folder in `state_dir`"
    )
    assert found[1].startswith("metrics.listen: cannot listen on 999.1.1.1:9000: '999.1.1.1' is ")
    assert found[2:] == [
        f"programs.web.proxy.dest: {tmp_path}/a-folder is a folder; name a file",
        f"programs.api.proxy.dest: cannot create {a_file}/sites: {a_file} is a file, not a folder",
        f"watch.0.dest: {a_file} is a file, not a folder",
    ]


@pytest.mark.parametrize(
    ("state_dir", "why"),
    [
        (
            "{tmp}/a-file/state",
            "cannot create {tmp}/a-file/state: {tmp}/a-file is a file, not a folder",
        ),
        (
            "/proc/sys/kernel/fv",
            "cannot create /proc/sys/kernel/fv: /proc/sys/kernel is not writable",
        ),
        ("{tmp}/state", "{tmp}/state/logs is a file, not a folder"),  # run creates it too
    ],
    ids=["parent-a-file", "parent-not-writable", "its-logs-a-file"],
)
def test_a_state_dir_run_could_not_create(tmp_path: Path, state_dir: str, why: str) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "logs").write_text("")
    (problem,) = problems(f"state_dir: {state_dir.format(tmp=tmp_path)}\n", tmp_path)
    assert problem.startswith(f"state_dir: {why.format(tmp=tmp_path)}"), problem
    assert problem.endswith("; choose a writable folder in `state_dir`")


def test_check_counts_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: st\nprograms:\n  web:\n    command: [{sys.executable}]\n")
    assert run_cli(["check", "-c", str(config)]) == 0
    assert capsys.readouterr().out == f"{config}: ok (1 program, 0 watches)\n"
    config.write_text(
        "state_dir: st\nwatch:\n  - keys: [p/w/pid/previous]\n    drain_pid: {}\n"
        "  - keys: [p/v/pid/previous]\n    drain_pid: {}\n"
    )
    assert run_cli(["check", "-c", str(config)]) == 0
    assert capsys.readouterr().out == f"{config}: ok (0 programs, 2 watches)\n"


def _config_on_its_own_state_dir(tmp_path: Path) -> tuple[Config, Path, Path]:
    """A config file of no programs with a state_dir of its own: the config, its path, and
    where its control socket goes."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    config_path = tmp_path / "flipvisor.yaml"
    config_path.write_text(f"state_dir: {state_dir}\nprograms: {{}}\n")
    config = parse_config(config_path.read_text(), config_path)
    return config, config_path, state_dir / "flipvisor.sock"


def test_a_state_dir_another_file_s_supervisor_listens_on_is_named_with_its_file(
    tmp_path: Path,
) -> None:
    """`run` would be refused there; the other file is named, with the command that stops its
    supervisor (its own -c: with this file's it refuses). Its own supervisor is no problem; one
    not recorded (another user's, maybe this file's own) is a warning."""
    config, config_path, socket_path = _config_on_its_own_state_dir(tmp_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    server.listen()
    record = None
    try:
        [unrecorded] = host_problems(config, config_path)
        assert unrecorded.warning and unrecorded.loc == ("state_dir",)
        assert "a supervisor is already listening" in unrecorded.message

        other = tmp_path / "other.yaml"
        record = write_record(other, socket_path)
        [taken] = host_problems(config, config_path)
        assert not taken.warning and taken.loc == ("state_dir",)
        assert str(taken).startswith(
            f"state_dir: `run` would be refused: the supervisor of {other} (pid {os.getpid()}) "
            f"already listens on {socket_path}"
        )
        assert f"`flipvisor -c {other} shutdown`" in taken.message

        remove_record(record)
        record = write_record(config_path, socket_path)  # this file's own supervisor
        assert host_problems(config, config_path) == []
    finally:
        server.close()
        if record is not None:
            remove_record(record)


def test_a_state_dir_whose_other_supervisor_lost_its_socket_file_is_still_taken(
    tmp_path: Path,
) -> None:
    """Another file's supervisor recorded on the state_dir, its socket file removed: nothing
    answers, but `run` is refused all the same (two supervisors would share the logs and the
    history); the way to make it listen again is named."""
    config, config_path, socket_path = _config_on_its_own_state_dir(tmp_path)
    other = tmp_path / "other.yaml"
    record = write_record(other, socket_path)  # no file at socket_path: removed
    try:
        [taken] = host_problems(config, config_path)
    finally:
        remove_record(record)
    assert not taken.warning and taken.loc == ("state_dir",)
    assert f"control socket {socket_path} is gone" in taken.message
    assert f"`kill -HUP {os.getpid()}`" in taken.message
    assert f"`flipvisor -c {other} shutdown`" in taken.message
