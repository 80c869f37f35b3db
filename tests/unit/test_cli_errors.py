"""How the CLI fails: `--json` prints one JSON document on stdout, errors included (a script always
has one to parse); what cannot be done is said in a sentence with what to do, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flipvisor.cli import interrupted_hint, run_cli

COMMANDS = [
    ["status", "--json"],
    ["status", "web", "--json"],
    ["flip", "web", "--json"],
    ["restart", "web", "--json"],
    ["rollback", "web", "--json"],
    ["start", "web", "--json"],
    ["stop", "web", "--json"],
    ["reload", "--json"],
    ["events", "--json"],
]


def _error_document(out: str) -> dict[str, object]:
    document = json.loads(out)  # exactly one document: json.loads refuses trailing data
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_no_supervisor_is_one_json_error_on_stdout(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nprograms:\n  web:\n    command: [x]\n")
    assert run_cli([*argv, "-c", str(config)]) == 2
    out, err = capsys.readouterr()
    document = _error_document(out)
    assert document["ok"] is False and document["exit_code"] == 2
    assert "no supervisor is listening" in str(document["error"])
    assert "flipvisor run" in err  # people still read it on stderr


@pytest.mark.parametrize("argv", [["status"], ["shutdown"], ["status", "--json"]])
def test_a_state_dir_too_long_for_a_socket_is_said_without_a_traceback(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `check` refuses such a file; a client given it anyway (a status after an edit) raised
    # Python's "AF_UNIX path too long" as a traceback.
    state_dir = tmp_path / ("x" * 120)
    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: {state_dir}\nprograms:\n  web:\n    command: [x]\n")
    assert run_cli([*argv, "-c", str(config)]) == 2
    out, err = capsys.readouterr()
    said = out if "--json" in argv else err
    assert "Traceback" not in out + err
    assert f"no supervisor can listen on {state_dir}/flipvisor.sock" in said, said
    assert "choose a shorter state_dir" in said, said


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_an_unreadable_config_is_one_json_error_on_stdout(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli([*argv, "-c", str(tmp_path / "missing.yaml")]) == 2
    document = _error_document(capsys.readouterr().out)
    assert document["ok"] is False and document["exit_code"] == 2
    assert "cannot read config file" in str(document["error"])


@pytest.mark.parametrize("follow", [[], ["-f"]], ids=["tail", "follow"])
def test_logs_that_cannot_be_read_say_so_without_a_traceback(
    follow: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nprograms:\n  web:\n    command: [x]\n")
    log_file = tmp_path / "state" / "logs" / "web.log"
    log_file.mkdir(parents=True)  # unreadable as a file (as one of another user would be)
    assert run_cli(["logs", "web", *follow, "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"flipvisor: cannot read {log_file}: Is a directory; run flipvisor as")


def test_ctrl_c_during_code_run_from_a_string_still_exits_130() -> None:
    """Under `python -m`, CPython ended a command by SIGINT (-2) at exit when the Ctrl-C had
    passed through code run from a string, although the command caught it and returned 130
    (seen once: `flip`'s client, interrupted during a lazy import)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tests.apps.interrupted_in_exec"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 130, done
    assert "Traceback" not in done.stderr, done.stderr


def test_the_ctrl_c_hint_never_offers_stop_as_the_undo_of_a_flip() -> None:
    """`stop` drains the serving generation too: it is named as what it is, never as a flip's
    rollback; only a `start` (nothing serves yet) is rolled back by it."""
    for command in ("flip", "restart", "rollback"):
        hint = interrupted_hint(command, "web", None)
        assert f"the {command} of web goes on in the supervisor" in hint
        assert hint.endswith(
            f"no command cancels only the {command}: `flipvisor stop web` stops the program, "
            "the generation that serves it included"
        ), hint
        assert "--timeout" not in hint
    assert interrupted_hint("start", "web", None).endswith(
        "; `flipvisor stop web` rolls the start back, leaving it stopped"
    )
    stop = interrupted_hint("stop", "web", None)
    assert stop.endswith("`flipvisor events -f web` follows it to its end"), stop


def test_a_refusal_shows_the_control_characters_of_a_path_as_escapes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A state_dir holding an ESC sequence (a new window title) and a line break that would
    # start a line of its own, "flipvisor: ...", passing for one of flipvisor's. In a short
    # folder: the socket path in it must fit a unix socket's 108 bytes.
    with tempfile.TemporaryDirectory(prefix="fv") as folder:
        _refuse_with_controls(Path(folder), capsys)


def _refuse_with_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s\x1b]0;x\x07\nflipvisor: ok"
    config = tmp_path / "flipvisor.yaml"
    config.write_text(f"state_dir: {json.dumps(str(state))}\nprograms:\n  web:\n    command: [x]\n")
    assert run_cli(["status", "--json", "-c", str(config)]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in err and "\x07" not in err
    assert "s\\x1b]0;x\\x07" in err
    assert "\nflipvisor: ok" not in err  # the line break starts an indented line
    assert "\n  flipvisor: ok" in err
    # The JSON document carries the message as it is (JSON escapes it).
    assert str(state) in str(_error_document(out)["error"])


def test_a_config_error_keeps_the_indent_of_its_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text("programs:\n  web:\n    command: 5\n  api:\n    command: []\n")
    assert run_cli(["check", "-c", str(config)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 2
    assert all(line.startswith("  ") and not line.startswith("    ") for line in lines[1:])


def test_check_s_ok_line_shows_the_control_characters_of_the_file_s_path_as_escapes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The one line `check` prints on success names the file, as given: a path with an ESC
    # sequence reached the terminal raw.
    with tempfile.TemporaryDirectory(prefix="fv") as folder:
        config = Path(folder) / "a\x1b]0;x\x07.yaml"
        config.write_text(f"state_dir: {Path(folder) / 's'}\nprograms: {{}}\n")
        assert run_cli(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out, out
    assert "a\\x1b]0;x\\x07.yaml: ok" in out, out
