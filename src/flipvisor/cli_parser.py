"""The ``flipvisor`` command line's arguments: every subcommand with its options and help, and
the argument types that refuse a bad value with a usage error (exit 2) before anything runs.

Kept free of heavy imports: ``--help`` and every command parse their arguments with it first.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .locate import CONFIG_ENV

if TYPE_CHECKING:
    # What ``add_subparsers`` returns: argparse names its type only privately.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

RUNTIME_ENV = "FLIPVISOR_RUNTIME_DIR"  # runrecord.RUNTIME_ENV, not imported: --help stays quick


def _config_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        # Subcommands must not overwrite a -c given before the subcommand.
        default=None if top else argparse.SUPPRESS,
        help=f"config file (default: ${CONFIG_ENV}, else ./flipvisor.yaml)",
    )


TIMEOUT_HELP = (
    "give up and roll back (exit 1) if the new generation is not promoted within S seconds; "
    "once promoted it is not rolled back by S: if S runs out while the old generation drains, "
    "exit 0 then, with a warning, and the drain goes on as its drain settings say (in its "
    "delay, the flip still routes back to it if the new one gives up: the warning says the "
    "outcome is pending, and `flipvisor events` tells how it ends); a rollback that "
    "outlasts S (a reload back that hangs) is answered at S and goes on in the supervisor, "
    "its end a rollback-finished event"
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; its subcommands are added in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="flipvisor",
        description="Supervise programs and flip them to new generations with zero dropped "
        "requests.",
        epilog="The commands other than run, check, watch and logs talk to the supervisor of "
        "the config file on <state_dir>/flipvisor.sock (logs reads <state_dir>/logs, with or "
        "without a supervisor); while the file does not parse, or names another state_dir "
        "than the one it runs with, they find it through the record it keeps in "
        f"${RUNTIME_ENV} (default: /run/flipvisor for root, else $XDG_RUNTIME_DIR/flipvisor "
        "or <temp dir>/flipvisor-UID), and say so.",
    )
    _config_option(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def _command(
    commands: Subcommands,
    name: str,
    help_text: str,
    *,
    program: bool = False,
    json_output: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand with ``-c``, and with a ``PROGRAM`` argument and ``--json`` if asked."""
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    _config_option(sub, top=False)
    if program:
        sub.add_argument("program", metavar="PROGRAM")
    if json_output:
        sub.add_argument("--json", action="store_true", help="print one JSON document")
    return sub


def _add_run(commands: Subcommands) -> None:
    _command(
        commands,
        "run",
        "run the supervisor in the foreground; refused while a supervisor of the same config "
        "file runs, whatever state_dir the file names now",
    )


def _add_flip(commands: Subcommands) -> None:
    flip = _command(
        commands, "flip", "deploy a new generation of PROGRAM", program=True, json_output=True
    )
    flip.add_argument("--timeout", type=seconds, metavar="S", help=TIMEOUT_HELP)


def _add_restart(commands: Subcommands) -> None:
    _command(
        commands,
        "restart",
        "restart PROGRAM: a flip (re-reads its section of the file; after a rollback, it warns "
        "that it undoes it)",
        program=True,
        json_output=True,
    ).add_argument("--timeout", type=seconds, metavar="S", help=TIMEOUT_HELP)


def _add_rollback(commands: Subcommands) -> None:
    _command(
        commands,
        "rollback",
        "flip back to the previous deploy's section (instant within rollback_window); the "
        "file is not changed, so the next `run` starts the file's again",
        program=True,
        json_output=True,
    )


def _add_status(commands: Subcommands) -> None:
    status = _command(
        commands,
        "status",
        "show programs and their generations: state, config fingerprint, port, PIDs, uptime, "
        "restarts, last exit, command, how long a warm generation is kept for a rollback, and "
        "the output keeper (pid, pipes held, restarts)",
        json_output=True,
    )
    status.add_argument(
        "program",
        nargs="?",
        metavar="PROGRAM",
        help="only this program, with its commands whole (the table of all cuts them short)",
    )


def _add_start(commands: Subcommands) -> None:
    _command(
        commands,
        "start",
        "start PROGRAM (clears fatal; while it waits for the proxy, tries it again now)",
        program=True,
        json_output=True,
    )


def _add_stop(commands: Subcommands) -> None:
    _command(
        commands,
        "stop",
        "stop PROGRAM (drain all its generations)",
        program=True,
        json_output=True,
    )


def _add_logs(commands: Subcommands) -> None:
    logs = _command(commands, "logs", "show PROGRAM's captured output", program=True)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-n", "--lines", type=count, default=50, metavar="N", help="how many lines (default 50)"
    )
    logs.add_argument(
        "--raw",
        action="store_true",
        help="print control characters as written, escape sequences included (to a terminal "
        "they are shown as \\xNN by default; piped, they are always printed as written)",
    )


def _add_check(commands: Subcommands) -> None:
    _command(
        commands,
        "check",
        "validate the config file, and that its commands, directories, templates, proxy files, "
        "state_dir and metrics address work here, for the user running it",
        json_output=True,
    )


def _add_shutdown(commands: Subcommands) -> None:
    shutdown = _command(
        commands,
        "shutdown",
        "drain everything and stop the running supervisor; shows the drains as they happen and "
        "returns once they are done",
    )
    shutdown.add_argument(
        "--no-wait",
        action="store_true",
        help="only ask the supervisor to shut down; return at once",
    )


def _add_reload(commands: Subcommands) -> None:
    _command(
        commands,
        "reload",
        "ask the running supervisor to re-read its config (like SIGHUP): start added programs, "
        "drain removed ones (one whose proxy file or fixed port an added one takes over only "
        "once that one serves), flip changed ones (one that a flip is under way for, once that "
        "is over); say which settings wait for a restart. Returns once the removed programs "
        "left the proxy; `status` lists them until their drain is over",
        json_output=True,
    )


def _add_events(commands: Subcommands) -> None:
    events = _command(commands, "events", "show lifecycle events")
    events.add_argument("program", nargs="?", metavar="PROGRAM")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument(
        "-n", "--lines", type=count, default=50, metavar="N", help="past events first (default 50)"
    )
    # A stream (-f) has no end to close one document with: a JSON object per line instead.
    events.add_argument(
        "--json", action="store_true", help="one JSON object per event, a line each (JSON Lines)"
    )


def _add_watch(commands: Subcommands) -> None:
    _command(commands, "watch", "run the built-in confd alone: render templates from registry keys")


# In the order of ``--help``'s list of commands.
SUBCOMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    _add_run,
    _add_flip,
    _add_restart,
    _add_rollback,
    _add_status,
    _add_start,
    _add_stop,
    _add_logs,
    _add_check,
    _add_shutdown,
    _add_reload,
    _add_events,
    _add_watch,
)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (the supervisor checks it alike)."""
    from .protocol import is_seconds

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not is_seconds(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


# What ``count`` makes of a larger number: more lines or events than any log or history holds
# (the history keeps 1,000 events), so the same "all of them", and it fits the requests' JSON
# (orjson refuses integers past 64 bits: `events -n 99999999999999999999999` died with a traceback).
COUNT_MAX = 2**63 - 1


def count(text: str) -> int:
    """An argparse type: a whole number >= 0; a number past ``COUNT_MAX`` is ``COUNT_MAX``
    (every line or event there is), a script passing "everything" as a big number."""
    try:
        value = int(text)
    except ValueError:
        # More digits than Python converts (4,300): a whole number all the same.
        digits = text.strip().removeprefix("+")
        value = COUNT_MAX if digits.isascii() and digits.isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return min(value, COUNT_MAX)
