"""``flipvisor logs``: a program's captured output read from its log files (``-f`` follows them),
with or without a supervisor, and without loading the config's models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_output import print_error
from .errors import EXIT_OK, EXIT_USAGE, FlipvisorError
from .locate import log_path


def logs(args: argparse.Namespace, path: Path) -> int:
    """``logs PROGRAM``: its last lines, then (``-f``) each new one."""
    from .client import logs_locations
    from .logs_follow import follow
    from .logs_tail import tail_lines
    from .printable import terminal_safe

    config, notice = logs_locations(path)
    if notice is not None:
        print_error(notice)

    log_file = log_path(config.state_dir, args.program)
    if args.program not in config.programs and not log_file.exists():
        print_error(f"no program named {args.program!r} in {path}; `flipvisor status` lists them")
        return EXIT_USAGE
    # A worker's escape sequences are shown, not obeyed, by the operator's terminal.
    shown = terminal_safe if sys.stdout.isatty() and not args.raw else str
    try:
        if args.follow:
            # follow() prints the last lines and continues from the same offset: no gap, no repeat
            for line in follow(log_file, last=args.lines):
                print(shown(line), flush=True)
            return EXIT_OK
        for line in tail_lines(log_file, args.lines):
            print(shown(line))
    except BrokenPipeError:
        raise  # the reader of our output went away: not a log file we cannot read
    except OSError as exc:
        raise FlipvisorError(
            f"cannot read {exc.filename or log_file}: {exc.strerror or exc}; run flipvisor as the "
            "user that runs the supervisor (or root), or see the supervisor's log for why"
        ) from exc
    return EXIT_OK
