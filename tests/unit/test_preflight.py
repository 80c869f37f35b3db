"""flipvisor check's host checks: commands, directories and templates that would fail here."""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

from flipvisor.cli import run_cli
from flipvisor.config import parse_config
from flipvisor.preflight import host_problems

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "templates" / "nginx.conf.j2"


def problems(text: str, folder: Path) -> list[str]:
    return host_problems(parse_config(dedent(text), folder / "flipvisor.yaml"))


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
    assert "programs.api.readiness.exec: command './probe.sh': no such executable file" in found
    # The shipped template needs `listen` or falls back to 8080: it renders.
    assert not any(p.startswith("programs.api.proxy.template") for p in found)
    assert f"watch.0.template: {tmp_path}/nope.j2 does not exist" in found
    assert len(found) == 6, found


def test_check_exits_2_on_a_host_problem(tmp_path: Path) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text("programs:\n  web:\n    command: [no-such-program-xyz]\n")
    assert run_cli(["check", "-c", str(config)]) == 2
    config.write_text(f"programs:\n  web:\n    command: [{sys.executable}]\n")
    assert run_cli(["check", "-c", str(config)]) == 0
