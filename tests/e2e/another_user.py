"""A command run by another user than the tests' root: ``nobody``, without any privilege, that
can still run this Python and import flipvisor.

The Python running the tests, its modules or the checkout may lie where only root may enter (a
pyenv in /root, which is 0700). The command runs in a mount namespace of its own, where each such
folder on the way is covered by a tmpfs that anyone may enter, holding only what the command
needs (bound from the real tree). Nothing changes outside the namespace, nor what the user may
do elsewhere: root's state_dir, processes and sockets stay as closed to it as they are.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

import flipvisor

USER = "nobody"
OTHERS_ENTER = stat.S_IXOTH
OTHERS_READ = stat.S_IROTH | stat.S_IXOTH
CANNOT_OPEN = 97  # the exit status of a namespace that could not be set up


def _needed() -> list[Path]:
    """The folders this Python and its modules are read from, flipvisor's included."""
    found = {Path(flipvisor.__file__).resolve().parents[1]}
    for entry in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        found.add(Path(entry).resolve())
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            found.add(Path(entry).resolve())
    return sorted(found)


def _closed_ancestor(path: Path) -> Path | None:
    """The outermost folder above ``path`` that other users may not enter, if any."""
    for ancestor in reversed(path.parents):  # from / down
        if not os.stat(ancestor).st_mode & OTHERS_ENTER:
            return ancestor
    return None


def _opening_script(saved: Path) -> str:
    """Shell commands, run as root in the new namespace, that open the way to ``_needed()``:
    each closed folder on it becomes a tmpfs holding just the needed folders, bound back."""
    covers: dict[Path, list[Path]] = {}
    for path in _needed():
        if os.stat(path).st_mode & OTHERS_READ != OTHERS_READ:
            pytest.skip(f"{path}, which this Python reads, is closed to other users")
        if (closed := _closed_ancestor(path)) is not None:
            covers.setdefault(closed, []).append(path)
    lines = ["umask 022"]
    for index, (closed, paths) in enumerate(sorted(covers.items())):
        keep = saved / str(index)
        lines += [
            f"mkdir {shlex.quote(str(keep))}",
            f"mount --bind {shlex.quote(str(closed))} {shlex.quote(str(keep))}",
            f"mount -t tmpfs -o mode=0755 flipvisor-test {shlex.quote(str(closed))}",
        ]
        for path in paths:
            inside = path.relative_to(closed)
            target = shlex.quote(str(closed / inside))
            lines += [
                f"mkdir -p {target}",
                f"mount --bind {shlex.quote(str(keep / inside))} {target}",
            ]
    # Any step that fails: the namespace could not be made as needed (not the command's exit).
    return " &&\n".join(lines) + f" || exit {CANNOT_OPEN}"


def run_as_another_user(
    argv: Sequence[str], *, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``argv`` (this Python's, or anything) run by ``nobody`` in ``cwd``, a folder it may
    enter; skips the test where that cannot be arranged (not root, no unshare or setpriv)."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if os.geteuid() != 0 or unshare is None or setpriv is None:
        pytest.skip("needs root, unshare and setpriv (util-linux) to run as another user")
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user named {USER} to run as")
    saved = Path(tempfile.mkdtemp(prefix="flipvisor-saved-"))
    try:
        drop = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        script = f"{_opening_script(saved)}\nexec {shlex.join([*drop, '--', *argv])}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(
                None, [str(Path(flipvisor.__file__).resolve().parents[1]), env.get("PYTHONPATH")]
            )
        )
        result = subprocess.run(
            [unshare, "--mount", "sh", "-c", script],
            cwd=cwd,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    if result.returncode == CANNOT_OPEN or (
        result.returncode != 0 and result.stderr.startswith("unshare:")
    ):
        problem = f"cannot make the mount namespace: {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must be able to: {problem}")
        pytest.skip(problem)
    return result
