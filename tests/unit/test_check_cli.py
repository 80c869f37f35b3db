"""`flipvisor check` as operators run it, a real `python -m flipvisor` process: a bad file exits 2
with one message naming the file, the line and the dotted key (never a traceback, never "ok")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from tests.fixtures.nginx import free_port

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "templates" / "nginx.conf.j2"


def check(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Run ``flipvisor check -c config`` with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "flipvisor", "check", "-c", str(config), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def write(folder: Path, text: str | bytes) -> Path:
    path = folder / "flipvisor.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(dedent(text), encoding="utf-8")
    return path


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    for text in expected:
        assert text in result.stderr, result.stderr


def test_two_programs_sharing_a_proxy_file_are_refused(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        programs:
          a:
            command: ["{sys.executable}"]
            proxy: {{template: {TEMPLATE}, dest: out/shared.conf}}
          b:
            command: ["{sys.executable}"]
            proxy: {{template: {TEMPLATE}, dest: ./out/../out/shared.conf}}
        """,
    )
    assert_refused(
        check(config),
        f"{config}:8: programs.b.proxy.dest: ",
        "is programs.a.proxy.dest already",
    )
    config.write_text(config.read_text().replace("./out/../out/shared.conf", "out/b.conf"))
    result = check(config)
    assert result.returncode == 0, result


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, b"state_dir: state\n# caf\xe9\nprograms: {}\n")
    assert_refused(check(config), f"{config}:2: not UTF-8: byte 0xe9 at column 6")


def test_an_empty_file_is_refused_and_programs_left_empty_is_ok(tmp_path: Path) -> None:
    config = write(tmp_path, "# truncated by a config tool\n")
    assert_refused(check(config), f"{config}: the file is empty (no YAML document); ")
    config.write_text("programs:\n")
    result = check(config)
    assert (result.returncode, result.stdout) == (0, f"{config}: ok (0 programs, 0 watches)\n")


def test_check_names_every_reserved_variable_of_an_env(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """\
        state_dir: state
        programs:
          web:
            command: [python3]
            env: {LISTEN_FDS: '2', NOTIFY_SOCKET: x, FLIPVISOR_STATE_DIR: y}
        """,
    )
    result = check(config)
    assert_refused(
        result,
        *(
            f"{config}:5: programs.web.env.{name}: is set by flipvisor for every worker"
            for name in ("LISTEN_FDS", "NOTIFY_SOCKET", "FLIPVISOR_STATE_DIR")
        ),
    )


def test_a_drain_that_would_freeze_the_workers_is_refused_and_one_by_sigkill_warned_of(
    tmp_path: Path,
) -> None:
    program = f"""\
        state_dir: state
        programs:
          web:
            command: ["{sys.executable}"]
            drain: {{signal: SIGNAL}}
        """
    config = write(tmp_path, program.replace("SIGNAL", "SIGSTOP"))
    assert_refused(
        check(config),
        f"{config}:5: programs.web.drain.signal: SIGSTOP does not ask a process to stop: it "
        "freezes the process (it cannot be handled)",
    )
    write(tmp_path, program.replace("SIGNAL", "SIGKILL"))
    result = check(config)
    assert result.returncode == 0, result
    assert f"{config}:5: warning: programs.web.drain.signal: SIGKILL cannot be handled" in (
        result.stderr
    )
    assert result.stdout == f"{config}: ok (1 program, 0 watches, 1 warning)\n"


def test_a_home_folder_of_an_unknown_user_is_refused(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        programs:
          a: {{command: ["{sys.executable}"], cwd: ~nosuchuser-fv/app}}
        """,
    )
    assert_refused(check(config), f"{config}:3: programs.a.cwd: unknown user 'nosuchuser-fv'")


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """`check` said ok; `run` then could not create it."""
    (tmp_path / "state").write_text("")
    config = write(tmp_path, "state_dir: state\n")
    assert_refused(
        check(config),
        f"{config} is valid, but would not work on this host:",
        f"state_dir: {tmp_path}/state is a file, not a folder; choose a writable folder",
    )


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problems `check` listed under its header, one a line."""
    assert result.returncode == 2, result
    header, *problems = result.stderr.splitlines()
    assert header.startswith("flipvisor: "), result.stderr
    return [line.removeprefix("  ") for line in problems]


def test_host_problems_name_the_line_of_their_key(tmp_path: Path) -> None:
    """They said `flipvisor.yaml: state_dir: ...`, without the line every other problem has."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    config = write(
        tmp_path,
        f"""\
        programs:
          web:
            command: ["{sys.executable}"]
            proxy:
              template: {TEMPLATE}
              dest: {a_file}/web.conf
        metrics:
          listen: "192.0.2.1:9100"
        state_dir: {a_file}
        """,
    )
    assert problem_lines(check(config)) == [
        f"{config}:6: programs.web.proxy.dest: {a_file} is a file, not a folder",
        f"{config}:8: metrics.listen: cannot listen on 192.0.2.1:9100: 192.0.2.1 is "
        "not an address of this host; use one of its own, or 0.0.0.0",
        f"{config}:9: state_dir: {a_file} is a file, not a folder; choose a writable folder in "
        "`state_dir`",
    ]


def test_a_socket_host_that_is_not_this_host_s_is_found_with_port_0_too(tmp_path: Path) -> None:
    """With the default port 0 nothing collides, but the host must still be one of this host's
    addresses: `check` said ok, and `run` made the program fatal (QA finding)."""
    config = write(
        tmp_path,
        f"""\
        programs:
          web:
            command: ["{sys.executable}"]
            socket: {{host: 192.0.2.1}}
        state_dir: {tmp_path / "state"}
        """,
    )
    assert problem_lines(check(config)) == [
        f"{config}:4: programs.web.socket.host: cannot listen on 192.0.2.1: 192.0.2.1 is "
        "not an address of this host; use one of its own, or 0.0.0.0",
    ]


def test_a_nul_in_a_command_or_a_path_is_refused_with_its_location(tmp_path: Path) -> None:
    """A stray NUL (a templated config): in a command, `check` said ok and `run` made the
    program fatal with "internal error: ... embedded null byte"; in a `cwd` or `state_dir`,
    `check` itself died with a traceback, exit 1 (QA findings)."""
    config = write(
        tmp_path,
        """\
        state_dir: "/tmp\\u0000state"
        programs:
          web:
            command: ["sleep", "30\\u0000"]
            cwd: "/tmp\\u0000x"
            readiness: {exec: ["true", "a\\u0000"]}
        """,
    )
    result = check(config)
    assert_refused(result)
    assert problem_lines(result) == [
        f"{config}:1: state_dir: a path cannot hold a NUL character",
        f"{config}:4: programs.web.command: argument 1 holds a NUL character, which no program "
        "can get",
        f"{config}:5: programs.web.cwd: a path cannot hold a NUL character",
        f"{config}:6: programs.web.readiness.exec: argument 1 holds a NUL character, which no "
        "program can get",
    ]


def test_invalid_keys_are_listed_in_the_files_order(tmp_path: Path) -> None:
    """They came in the models' order (state_dir, logs, ..., programs), not the file's."""
    config = write(
        tmp_path,
        """\
        programs:
          web:
            command: x
            numprocs: 0
        logs: {backups: 500}
        state_dir: [1]
        """,
    )
    assert problem_lines(check(config)) == [
        f"{config}:4: programs.web.numprocs: must be >= 1",
        f"{config}:5: logs.backups: must be <= 100",
        f"{config}:6: state_dir: must be a path",
    ]


def test_problems_across_keys_and_on_this_host_are_listed_together_in_order(
    tmp_path: Path,
) -> None:
    """Two programs on one fixed port hid the host problems (a missing command above them),
    and each kind came in a block of its own."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    port = free_port()  # a port in use on this host would be one more problem
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        programs:
          web:
            command: [no-such-program-fv]
            socket: {{port: {port}}}
          api:
            command: ["{sys.executable}"]
            socket: {{port: {port}}}
        watch:
          - keys: [a/b]
            template: {tmp_path}/missing.j2
            dest: {a_file}/out.conf
        """,
    )
    result = check(config)
    assert problem_lines(result) == [
        f"{config}:4: programs.web.command: command 'no-such-program-fv': not found in PATH",
        f"{config}:8: programs.api.socket.port: 127.0.0.1:{port} is programs.web's already (each "
        "fixed port belongs to one program)",
        f"{config}:11: watch.0.template: {tmp_path}/missing.j2 does not exist",
        f"{config}:12: watch.0.dest: {a_file} is a file, not a folder",
    ]
    assert result.stderr.startswith(f"flipvisor: invalid config file {config}:\n")


def test_check_json_carries_its_exit_code(tmp_path: Path) -> None:
    """Every other --json document that can fail says its exit_code; check's did not."""
    config = write(
        tmp_path, f'state_dir: state\nprograms:\n  web: {{command: ["{sys.executable}"]}}\n'
    )
    result = check(config, "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == {
        "ok": True,
        "exit_code": 0,
        "programs": ["web"],
        "warnings": [],
    }
    config.write_text("state_dir: state\nbogus: 1\n")
    result = check(config, "--json")
    assert result.returncode == 2, result
    assert json.loads(result.stdout) == {
        "ok": False,
        "exit_code": 2,
        "error": f"invalid config file {config}:",
        "problems": [f"{config}:2: bogus: unknown key"],
        "warnings": [],
    }
    config.unlink()
    result = check(config, "--json")
    assert result.returncode == 2, result
    assert json.loads(result.stdout)["exit_code"] == 2


def test_a_mistyped_placeholder_is_a_warning_that_keeps_exit_0(tmp_path: Path) -> None:
    """`{prot}` passed `check` and reached the app as written. Braces stay legitimate (a JSON
    argument, `awk '{print}'`), so it is a warning: printed, the exit code unchanged."""
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        programs:
          web:
            command: ["{sys.executable}", "app.py", "--port", "{{prot}}", '{{"a": 1}}']
        """,
    )
    warning = (
        f"{config}:4: warning: programs.web.command: {{prot}} is not replaced in command, so it is "
        "passed on as written (did you mean {port}?); command's placeholders: {port}, {fd}, "
        "{generation}, {worker}"
    )
    result = check(config)
    assert result.returncode == 0, result
    assert result.stderr == f"flipvisor: {warning}\n"
    assert result.stdout == f"{config}: ok (1 program, 0 watches, 1 warning)\n"
    result = check(config, "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["warnings"] == [warning]
    # Beside errors, in the file's order; --json keeps them apart from the problems.
    config.write_text(config.read_text() + "  api:\n    command: [no-such-program-fv]\n")
    missing = f"{config}:6: programs.api.command: command 'no-such-program-fv': not found in PATH"
    assert problem_lines(check(config)) == [warning, missing]
    result = check(config, "--json")
    assert result.returncode == 2, result
    document = json.loads(result.stdout)
    assert (document["problems"], document["warnings"]) == ([missing], [warning])


def test_a_watch_template_with_a_syntax_error_is_refused_with_its_line(tmp_path: Path) -> None:
    template = tmp_path / "app.conf.j2"
    template.write_text('upstream app {\n{% for k in keys %}\n  server {{ get("k") }};\n}\n')
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        watch:
          - keys: ["flipvisor/app/port/current"]
            template: {template}
            dest: out/app.conf
        """,
    )
    assert_refused(check(config), f"{config}:4: watch.0.template:", f"{template}, line 3")


def drained_program(folder: Path, extra: str) -> Path:
    return write(
        folder,
        f"""\
        state_dir: state
        programs:
          web:
            command: ["{sys.executable}"]{extra}
        watch:
          - keys: ["flipvisor/web/pid/previous"]
            drain_pid: {{timeout: 5}}
        """,
    )


def test_drain_pid_on_a_supervised_program_kept_for_rollback_is_refused(tmp_path: Path) -> None:
    # The watcher would kill the generation rollback_window keeps warm.
    config = drained_program(tmp_path, "\n            rollback_window: 600")
    assert_refused(check(config), f"{config}:8: watch.0.drain_pid: drains programs.web's")


def test_watch_entries_on_a_supervised_program_s_keys_are_warnings(tmp_path: Path) -> None:
    template = tmp_path / "port.j2"
    template.write_text('port={{ get("flipvisor/web/port/current") }}\n')
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        programs:
          web:
            command: ["{sys.executable}"]
        watch:
          - keys: ["flipvisor/web/pid/previous"]
            drain_pid: {{timeout: 5}}
          - keys: ["flipvisor/web/port/current"]
            template: {template}
            dest: out/port.txt
        """,
    )
    result = check(config)
    assert result.returncode == 0, result
    assert f"{config}:7: warning: watch.0.drain_pid: drains programs.web's" in result.stderr
    assert f"{config}:9: warning: watch.1.template: renders programs.web's keys" in result.stderr
    assert "give programs.web a proxy: section" in result.stderr
    assert result.stdout == f"{config}: ok (1 program, 2 watches, 2 warnings)\n"


def test_a_watch_template_using_names_a_watch_never_gives_is_a_warning(tmp_path: Path) -> None:
    """A proxy template given to a watch entry passed `check`, and every render of it failed
    ('program' is undefined): a watch template gets `keys` and `get` only. Names it sets itself,
    loop variables, jinja2's own (`range`) and names it guards somewhere (`is defined`, `is
    undefined`, `| default`) are no problem; the warning does not fail `check` (exit 0)."""
    proxy_like = tmp_path / "proxy-like.j2"
    proxy_like.write_text(
        "upstream {{ program }} {\n{% for u in upstreams %}  server {{ u }};\n{% endfor %}}\n"
    )
    fine = tmp_path / "fine.j2"
    fine.write_text(
        "{% set port = get('app/port/current', '1') %}"
        "{% for i in range(2) %}{{ keys['app/port/current'] }}:{{ port }}{{ i }}{% endfor %}"
        "{% if extra is defined %}{{ extra }}{% endif %}{{ maybe | default('-') }}"
        "{% if gone is undefined %}-{% else %}{{ gone }}{% endif %}{{ also | d('') }}\n"
    )
    half = tmp_path / "half.j2"  # `missing` is guarded by nothing: `other | default` is another
    half.write_text("{{ other | default(missing) }}{{ other.field is defined }}\n")
    config = write(
        tmp_path,
        f"""\
        state_dir: state
        watch:
          - keys: [app/port/current]
            template: {proxy_like}
            dest: {tmp_path}/one.conf
          - keys: [app/port/current]
            template: {fine}
            dest: {tmp_path}/two.conf
          - keys: [app/port/current]
            template: {half}
            dest: {tmp_path}/three.conf
        """,
    )
    result = check(config, "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["warnings"] == [
        f"{config}:4: warning: watch.0.template: the template uses program, upstreams, which a "
        "watch template does not get: it gets `keys` (registry key -> value) and "
        "`get(key, default=None)`; a render fails on them unless guarded by `is defined`",
        f"{config}:10: warning: watch.2.template: the template uses missing, which a watch "
        "template does not get: it gets `keys` (registry key -> value) and `get(key, "
        "default=None)`; a render fails on them unless guarded by `is defined`",
    ]


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        (" uswitch", "' uswitch' has whitespace at its start or end; remove it"),
        ("uswitch ", "'uswitch ' has whitespace at its start or end; remove it"),
        ("us\nwitch", "'us\\nwitch' holds a character that does not print"),
        ("us\x00witch", "'us\\x00witch' holds a character that does not print"),
        ("/", "'/' names no folder"),
    ],
)
def test_check_refuses_a_prefix_with_whitespace_or_control_characters(
    tmp_path: Path, prefix: str, problem: str
) -> None:
    """A quoting slip in registry.prefix (QA 15): `check` said ok and the keys went to
    ' uswitch/web/...', which no confd reads; `/` alone was "must not be empty"."""
    registry = {"backend": "etcd", "endpoints": ["127.0.0.1:2379"], "prefix": prefix}
    config = write(tmp_path, json.dumps({"registry": registry}))  # JSON is YAML: one line
    result = check(config)
    assert_refused(result)
    assert any(
        line.startswith(f"{config}:1: registry.prefix: {problem}") for line in problem_lines(result)
    ), result.stderr
