"""The ``flipvisor`` command's entry point: its arguments parsed, the command's handler run,
and the only place that turns exceptions into exit codes (0 success, 1 the operation failed,
2 usage, config or unreachable; 130 Ctrl-C).

The handlers live in the ``cli_*`` modules, by what they do. Heavy modules are imported only by
the commands that need them, so ``status`` stays quick.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import cli_check, cli_foreground, cli_logs, cli_requests
from .cli_output import print_error, report_failure
from .cli_parser import build_parser
from .cli_requests import flip_like, interrupted_hint
from .errors import FlipvisorError
from .locate import default_config_path

# Client commands read only the config file's state_dir (cheap, client.py); run and watch
# validate it whole.
Handler = Callable[[argparse.Namespace, Path], int]


class Interrupted(Exception):
    """Ctrl-C (SIGINT) in a command that talks to the supervisor or reads its files, raised in
    place of ``KeyboardInterrupt``. CPython (3.11, 3.12) remembers a ``KeyboardInterrupt`` that
    passes through code run from a string (``exec``: a dataclass being made by a lazy import, say)
    and, under ``python -m``, ends the process by SIGINT at exit even though it was caught: the
    command's 130 and its message about what goes on became a death by signal."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


# The supervisor and `watch` handle their signals themselves (signals.py).
OWN_SIGNALS = ("run", "watch")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``flipvisor`` command; the only ``sys.exit``."""
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    path: Path = args.config or default_config_path()
    try:
        if args.command not in OWN_SIGNALS:
            # A client's Ctrl-C (the ban is about the supervisor's signals, read by its task).
            signal.signal(signal.SIGINT, _interrupt)  # noqa: TID251
        return HANDLERS[args.command](args, path)
    except FlipvisorError as exc:  # ConfigError included: its exit code is 2
        return report_failure(args, str(exc), exc.exit_code)
    except (Interrupted, KeyboardInterrupt):
        if HANDLERS[args.command] is flip_like:
            print_error(
                interrupted_hint(args.command, args.program, getattr(args, "timeout", None))
            )
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a command killed by SIGPIPE would.
        # stdout now points nowhere, so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


HANDLERS: dict[str, Handler] = {
    "check": cli_check.check,
    "run": cli_foreground.run_supervisor,
    "watch": cli_foreground.run_watch,
    "status": cli_requests.status,
    "flip": flip_like,
    "restart": flip_like,
    "rollback": flip_like,
    "start": flip_like,
    "stop": flip_like,  # shows each wait of the drain as it happens
    "shutdown": cli_requests.shutdown,
    "reload": cli_requests.reload,
    "logs": cli_logs.logs,
    "events": cli_requests.events,
}
