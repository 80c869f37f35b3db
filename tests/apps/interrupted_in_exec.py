"""``python -m tests.apps.interrupted_in_exec``: the flipvisor CLI, whose `status` is interrupted
by SIGINT while it runs code from a string (as a lazy import making a dataclass does)."""

import argparse
from pathlib import Path

from flipvisor import cli


def _status_interrupted_in_exec(args: argparse.Namespace, path: Path) -> int:
    exec("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)")
    return 0


cli.HANDLERS["status"] = _status_interrupted_in_exec
cli.main(["status"])
