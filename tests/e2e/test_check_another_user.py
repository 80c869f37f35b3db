"""``flipvisor check`` run by another user than ``run``'s: what it may not reach is said as a
problem of that user (which folder, by whom), not as a missing file."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.e2e.another_user import USER, run_as_another_user


def test_check_by_another_user_names_the_folder_it_may_not_enter() -> None:
    """Root's programs live in a folder only root may enter (0700): `check` run by another user
    said "no such executable file" of a command that is there, and ended in a traceback
    (PermissionError) at a working directory, a template or a proxy file in it. It names the
    folder and the user, and that `run` by another user may be allowed. Root's own `check`
    finds nothing wrong there."""
    public = Path(tempfile.mkdtemp(prefix="flipvisor-check-"))
    try:
        os.chmod(public, 0o755)  # the config file is readable by another user
        closed = public / "closed"
        closed.mkdir(mode=0o700)
        app = closed / "app.sh"
        app.write_text("#!/bin/sh\nexec sleep 60\n")
        app.chmod(0o755)
        (closed / "work").mkdir()
        template = closed / "upstream.j2"
        template.write_text("upstream {{ program }} { server 127.0.0.1:{{ port }}; }\n")
        config_path = public / "flipvisor.yaml"
        programs = {
            "web": {"command": [str(app)]},
            # Found on a PATH folder this user may not enter: not merely "not found".
            "tool": {"command": ["app.sh"], "env": {"PATH": f"{closed}:/usr/bin"}},
            "api": {
                "command": [sys.executable, "-V"],
                "cwd": str(closed / "work"),
                "proxy": {"template": str(template), "dest": str(closed / "api.conf")},
            },
        }
        watch = [{"keys": ["a/b"], "template": str(template), "dest": str(closed / "out.conf")}]
        config = {"state_dir": str(public / "state"), "programs": programs, "watch": watch}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        check = [sys.executable, "-m", "flipvisor", "check", "-c", str(config_path)]

        others = run_as_another_user(check, cwd=public)
        as_root = subprocess.run(check, capture_output=True, text=True, check=False, timeout=60)
    finally:
        shutil.rmtree(public, ignore_errors=True)

    user = f"this user ({USER}, uid {pwd.getpwnam(USER).pw_uid})"
    denied = f"{user} may not enter {closed} (permission denied)"
    advice = "if `run` runs as another user, run `check` as that user"
    assert (
        f"programs.web.command: command '{app}': {denied}: `run` as this user could not start "
        f"it, and `check` cannot tell whether it is there; {advice}"
    ) in others.stderr, others.stderr
    assert (
        f"programs.tool.command: command 'app.sh': not found in PATH ({denied})"
    ) in others.stderr, others.stderr
    assert (
        f"programs.api.cwd: {denied}: `run` as this user could not work in {closed / 'work'}; "
        f"{advice}"
    ) in others.stderr, others.stderr
    # Read by `run` (a template), or written (a proxy file): said alike, without a traceback.
    for where in ("programs.api.proxy.template", "watch.0.template"):
        assert (
            f"{where}: {template}: {denied}: `run` as this user could not read it; {advice}"
        ) in others.stderr, others.stderr
    for where, dest in (("programs.api.proxy.dest", "api.conf"), ("watch.0.dest", "out.conf")):
        assert f"{where}: cannot write {closed / dest}: {denied}" in others.stderr, others.stderr
    assert "Traceback" not in others.stderr, others.stderr
    assert "no such executable file" not in others.stderr, others.stderr
    assert "is not a directory" not in others.stderr, others.stderr
    assert others.returncode == 2, others.stderr
    assert as_root.returncode == 0, as_root.stdout + as_root.stderr


def test_a_working_directory_another_user_may_not_enter_is_named_as_such() -> None:
    """`run` by a user who may not enter the folder above a program's `cwd` said that the
    working directory "does not exist"; it names the folder it may not enter, and the user."""
    public = Path(tempfile.mkdtemp(prefix="flipvisor-cwd-"))
    try:
        os.chmod(public, 0o755)
        closed = public / "closed"
        (closed / "work").mkdir(parents=True)
        closed.chmod(0o700)
        said = run_as_another_user(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from flipvisor.command_lookup import "
                "workdir_problem; print(workdir_problem(Path(sys.argv[1])))",
                str(closed / "work"),
            ],
            cwd=public,
        )
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert said.returncode == 0, said.stderr
    user = f"this user ({USER}, uid {pwd.getpwnam(USER).pw_uid})"
    assert said.stdout.strip() == f"{user} may not enter {closed} (permission denied)"
