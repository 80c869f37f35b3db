"""How the ``flipvisor`` command line speaks: errors on stderr, JSON documents on stdout, the
one JSON document of a failure under ``--json``, and the first ``waiting`` line of an answer.

Every command module prints through these, so a script sees the same shapes whatever failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .printable import indented_lines


def print_error(message: str) -> None:
    """An error, a warning or a notice for people: on stderr, after the command's name. Its
    control characters are shown as escapes (it may name a path, or quote what another process
    said), every line after the first indented (``indented_lines``)."""
    print(f"flipvisor: {indented_lines(message)}", file=sys.stderr)


def waiting_notice() -> Callable[[str], None]:
    """An ``on_waiting`` for the client: the first ``waiting`` line of an answer, on stderr (the
    supervisor is still starting; the rest of them only say it is alive)."""
    said = False

    def say(message: str) -> None:
        nonlocal said
        if not said:
            said = True
            print_error(f"{message}; waiting")

    return say


def print_json(document: Any) -> None:
    """A command's one JSON document (``--json``), on stdout."""
    print(json.dumps(document, indent=2, sort_keys=False))


def report_failure(args: argparse.Namespace, message: str, exit_code: int) -> int:
    """Report an error: on stderr, and with ``--json`` as the one JSON document on stdout too
    (``{"ok": false, "exit_code": N, "error": "..."}``), so a script always has one to parse.

    On stderr its control characters are shown as escapes and every line after the first is
    indented (``indented_lines``): a message names paths (a state_dir, a socket path) and
    quotes the supervisor's errors, and what they hold must not reach the terminal raw."""
    print_error(message)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": exit_code, "error": message}), flush=True)
    return exit_code
