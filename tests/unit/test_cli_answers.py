"""What the CLI prints for people from a supervisor's answer: text the supervisor sent (paths of
the config, what commands and workers said) with its control characters shown as escapes, and an
answer shaped otherwise than expected said in words, never a traceback. The supervisor here is a
scripted one on the control socket: it answers every request with the messages given."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flipvisor.cli import run_cli
from flipvisor.protocol import encode, result

# A path of the config, as a folder someone named badly: an escape sequence (it would clear
# the screen) and a newline (it would start a line that looks like flipvisor's own).
CONFIG_DIR = "conf\x1b[2J\nflipvisor: flip ok"
SHOWN = "conf\\x1b[2J\\x0aflipvisor: flip ok"


class ScriptedSupervisor:
    """A control socket that answers each request with ``answer`` (a list of messages)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(state_dir / "flipvisor.sock"))
        self.server.listen()
        self.answer: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed
            with connection, connection.makefile("rb") as requests:
                requests.readline()
                connection.sendall(b"".join(encode(message) for message in self.answer))

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._thread.join(timeout=5)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[ScriptedSupervisor]:
    scripted = ScriptedSupervisor(tmp_path / "state")
    try:
        yield scripted
    finally:
        scripted.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "flipvisor.yaml"
    path.write_text(
        json.dumps({"state_dir": str(tmp_path / "state"), "programs": {"web": {"command": ["x"]}}})
    )
    return path


def event(message: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "seq": 1,
        "time": 1_800_000_000.0,
        "kind": "flip-failed",
        "program": "web",
        "generation": 2,
        "message": message,
        "fields": fields,
    }


def test_events_show_control_characters_of_a_path_as_escapes(
    supervisor: ScriptedSupervisor, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    supervisor.answer = [
        event(f"cannot write the proxy file /srv/{CONFIG_DIR}/web.conf", dest=CONFIG_DIR),
        result(None),
    ]
    assert run_cli(["events", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    (line,) = out.splitlines()
    assert f"flip-failed cannot write the proxy file /srv/{SHOWN}/web.conf dest={SHOWN}" in line
    assert "\x1b" not in out

    # --json is for scripts: the message as sent (JSON escapes it).
    assert run_cli(["events", "--json", "-c", str(config)]) == 0
    (document,) = capsys.readouterr().out.splitlines()
    assert json.loads(document)["message"].endswith(f"/srv/{CONFIG_DIR}/web.conf")


@pytest.mark.parametrize("command", ["flip", "rollback"])
def test_a_failed_flip_shows_control_characters_of_a_path_as_escapes(
    command: str,
    supervisor: ScriptedSupervisor,
    config: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The steps, the new generation's output and the error, each from the supervisor; a
    ``[/]`` in a path is text too (it was rich markup: an error instead of the report)."""
    error = f"cannot write the proxy file /srv/{CONFIG_DIR}[/]/web.conf: Permission denied"
    step = {"step": "proxy", "status": "failed", "duration": 0.01, "detail": error}
    report = {
        "program": "web",
        "kind": command,
        "ok": False,
        "generation": 2,
        "steps": [step],
        "output": ["svc 2 said \x1b]0;owned\x07\tbye"],
        "error": error,
    }
    supervisor.answer = [{"type": "progress", **step}, result(report, error=error)]
    assert run_cli([command, "web", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err, err
    shown = f"cannot write the proxy file /srv/{SHOWN}[/]/web.conf: Permission denied"
    # The error as lines, the second indented: it cannot pass for a line of flipvisor's own.
    as_lines = shown.replace("\\x0a", "\n  ")
    assert f"flipvisor: {as_lines}\n" in err, err
    assert not any(line.startswith("flipvisor: flip ok") for line in err.splitlines()), err
    assert "  svc 2 said \\x1b]0;owned\\x07" in err, err  # (rich expands its tab)
    # The step's line, on one line (rich may wrap it: compared without the breaks it put in).
    assert shown in err.replace("\n", ""), err


def test_a_failed_flip_quoting_a_command_s_lines_shows_them_as_lines(
    supervisor: ScriptedSupervisor, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nginx -t`'s two lines, the most common flip error: as lines, not joined by escapes."""
    said = (
        'nginx: [emerg] unknown directive "upstrem" in /etc/nginx/conf.d/web.conf:1\n'
        "nginx: configuration file /etc/nginx/nginx.conf test failed"
    )
    error = f"proxy check of /etc/nginx/conf.d/web.conf failed, kept the previous file: {said}"
    report = {"program": "web", "kind": "flip", "ok": False, "generation": 2, "steps": []}
    supervisor.answer = [result({**report, "error": error}, error=error)]
    assert run_cli(["flip", "web", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"flipvisor: {error.replace(chr(10), chr(10) + '  ')}\n" in err, err
    assert "\\x0a" not in err, err


@pytest.mark.parametrize("command", ["start", "stop"])
def test_an_ok_answer_without_a_state_says_so(
    command: str,
    supervisor: ScriptedSupervisor,
    config: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``"result": null`` in an ok answer (a supervisor of another version, say) made the CLI
    fail with AttributeError on None after the command was carried out."""
    supervisor.answer = [result(None)]
    assert run_cli([command, "web", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert out == (
        "web: done (the supervisor did not say its state: `flipvisor status web` shows it)\n"
    )
    supervisor.answer = [result({"state": "stopped"})]
    assert run_cli([command, "web", "-c", str(config)]) == 0
    assert capsys.readouterr().out == "web: stopped\n"
