"""A section's fingerprint (``status`` shows it for each generation): the same for what deploys
the same thing, whatever wrote it down, and different for anything that deploys differently."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from flipvisor.config import ProgramConfig, fingerprint, same_deploy
from flipvisor.config_file import parse_config
from flipvisor.history import History

PATH = Path("/etc/flipvisor/flipvisor.yaml")
SECTION = """\
    command: python3 app.py --port {port}
    cwd: app
    env: {APP_ENV: production, REGION: eu}
    readiness: {http: /health}
    drain: {signal: SIGINT}
    rollback_window: 30
"""


def section(text: str = SECTION) -> ProgramConfig:
    document = "programs:\n  web:\n" + "".join(
        f"    {line}\n" for line in dedent(text).splitlines()
    )
    return parse_config(document, PATH).programs["web"]


def test_it_is_twelve_hex_digits() -> None:
    assert len(fingerprint(section())) == 12
    int(fingerprint(section()), 16)


def test_the_same_section_written_differently_has_the_same_fingerprint() -> None:
    rewritten = section(
        """\
        command: ["python3", "app.py", "--port", "{port}"]
        cwd: /etc/flipvisor/app
        env: {REGION: eu, APP_ENV: production}
        readiness: {http: /health, timeout: 30}
        drain: {signal: 2, delay: 0.5}
        rollback_window: 30.0
        autostart: false
        """
    )
    assert same_deploy(section(), rewritten)
    assert fingerprint(rewritten) == fingerprint(section())


def test_the_deploy_historys_copy_has_the_same_fingerprint(tmp_path: Path) -> None:
    """A cold rollback starts the history's copy of the section, read back from its file."""
    path = tmp_path / "web.json"
    written = History(path)
    written.deployed(section())
    written.deployed(section(SECTION.replace("production", "staging")))
    read = History(path)
    assert read.previous is not None and read.current is not None
    assert fingerprint(read.previous) == fingerprint(section())
    assert fingerprint(read.current) == fingerprint(
        section(SECTION.replace("production", "staging"))
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("--port {port}", "--port {port} --workers 2"),  # the command
        ("production", "staging"),  # an env value
        ("cwd: app", "cwd: app2"),
        ("rollback_window: 30", "rollback_window: 31"),
        ("SIGINT", "SIGTERM"),
    ],
)
def test_a_change_that_deploys_differently_changes_it(old: str, new: str) -> None:
    changed = section(SECTION.replace(old, new))
    assert not same_deploy(section(), changed)
    assert fingerprint(changed) != fingerprint(section())
