"""`flipvisor check` as operators run it, a real `python -m flipvisor` process: a bad file exits 2
with one message naming the file, the line and the dotted key (never a traceback, never "ok")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "templates" / "nginx.conf.j2"


def check(config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``flipvisor check -c config`` with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "flipvisor", "check", "-c", str(config)],
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
