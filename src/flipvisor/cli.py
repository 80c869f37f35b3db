"""The ``flipvisor`` command line: argparse, human and ``--json`` output, and the only place
that turns exceptions into exit codes (0 success, 1 the operation failed, 2 usage, config or
unreachable).

Heavy modules are imported only by the commands that need them, so ``status`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_parser import build_parser
from .errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    ControlUnreachable,
    FlipvisorError,
)
from .locate import default_config_path, log_path

if TYPE_CHECKING:
    from .client import Reached
    from .problems import Problem

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
        return _fail(args, str(exc), exc.exit_code)
    except (Interrupted, KeyboardInterrupt):
        if HANDLERS[args.command] is _flip_like:
            _error(interrupted_hint(args.command, args.program, getattr(args, "timeout", None)))
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a command killed by SIGPIPE would.
        # stdout now points nowhere, so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def interrupted_hint(command: str, program: str, timeout: float | None) -> str:
    """What a Ctrl-C of ``flipvisor COMMAND PROGRAM`` did and did not do. Only this client stops:
    the supervisor carries the command through whoever watches. An operator who pressed Ctrl-C to
    abort a deploy must know, and must not be sent to `stop` as its undo: `stop` drains the
    generation that serves too (an outage), and no command cancels a flip alone."""
    said = (
        f"interrupted: only this client stopped; the {command} of {program} goes on in the "
        f"supervisor (Ctrl-C did not cancel it): `flipvisor status {program}` shows where it "
        f"is, `flipvisor events -f {program}` follows it to its end"
    )
    if command == "stop":
        return said
    if command == "start":
        return f"{said}; `flipvisor stop {program}` rolls the start back, leaving it stopped"
    if timeout is not None:
        said += f"; --timeout {timeout:g} still rolls it back if it is not promoted by then"
    return (
        f"{said}; no command cancels only the {command}: `flipvisor stop {program}` stops "
        "the program, the generation that serves it included"
    )


def outcome_unknown(lost: str, command: str, program: str) -> str:
    """A ``command`` whose supervisor went away (``lost``: how) before it answered: it may have
    done all of it, some of it or none of it, and only a supervisor can tell which, once one
    runs again (a killed supervisor's workers serve on; the next `run` takes them over)."""
    could_be = "" if command == "stop" else " (promoted, rolled back, or cut short midway)"
    return (
        f"{lost} before the {command} of {program} ended (it exited or was killed): how the "
        f"{command} ended is unknown{could_be}; once a supervisor runs again (`flipvisor run`), "
        f"`flipvisor status {program}` shows what serves"
    )


def _error(message: str) -> None:
    print(f"flipvisor: {message}", file=sys.stderr)


def _say_once() -> Callable[[str], None]:
    """An ``on_waiting`` for the client: the first ``waiting`` line of an answer, on stderr (the
    supervisor is still starting; the rest of them only say it is alive)."""
    said = False

    def say(message: str) -> None:
        nonlocal said
        if not said:
            said = True
            _error(f"{message}; waiting")

    return say


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=False))


def _fail(args: argparse.Namespace, message: str, exit_code: int) -> int:
    """Report an error: on stderr, and with ``--json`` as the one JSON document on stdout too
    (``{"ok": false, "exit_code": N, "error": "..."}``), so a script always has one to parse."""
    _error(message)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": exit_code, "error": message}), flush=True)
    return exit_code


# -- commands -----------------------------------------------------------------------------


def _check(args: argparse.Namespace, path: Path) -> int:
    from .config_consistency import sigkill_warnings, watch_warnings
    from .config_file import load_config_file
    from .placeholders import placeholder_warnings
    from .preflight import host_problems
    from .problems import in_file_order

    as_json = getattr(args, "json", False)
    try:
        parsed = load_config_file(path)
    except ConfigError as exc:  # a key is invalid: nothing to check on this host
        return _check_failed(args, exc, [])
    # Host checks need valid keys only: a file with two programs on one fixed port is checked on
    # this host too, and every problem is listed at its line, from the top of the file down.
    on_host = [
        parsed.problem(found.loc, found.message, warning=found.warning)
        for found in host_problems(parsed.config, path)
    ]
    errors = in_file_order([*parsed.problems, *(p for p in on_host if not p.warning)])
    warnings = in_file_order(
        [
            *placeholder_warnings(parsed),
            *watch_warnings(parsed),
            *sigkill_warnings(parsed),
            *(p for p in on_host if p.warning),
        ]
    )
    if errors:
        header = (
            f"invalid config file {path}:"
            if parsed.problems
            else f"{path} is valid, but would not work on this host:"
        )
        # In text, one list in the file's order, the warnings marked; --json keeps them apart.
        listed = errors if as_json else in_file_order([*errors, *warnings])
        return _check_failed(args, ConfigError(header, [str(p) for p in listed]), warnings)
    config = parsed.config
    if as_json:
        _print_json(
            {
                "ok": True,
                "exit_code": EXIT_OK,
                "programs": sorted(config.programs),
                "warnings": [str(warning) for warning in warnings],
            }
        )
        return EXIT_OK
    for warning in warnings:
        _error(str(warning))
    counts = [_count(len(config.programs), "program"), _count(len(config.watch), "watch")]
    if warnings:
        counts.append(_count(len(warnings), "warning"))
    print(f"{path}: ok ({', '.join(counts)})")
    return EXIT_OK


def _check_failed(args: argparse.Namespace, exc: ConfigError, warnings: list[Problem]) -> int:
    """``check``'s refusal: on stderr, or as its JSON document (``warnings`` apart from the
    ``problems``, which alone make the exit code 2)."""
    if getattr(args, "json", False):
        _print_json(
            {
                "ok": False,
                "exit_code": EXIT_USAGE,
                "error": str(exc).splitlines()[0],
                "problems": exc.problems,
                "warnings": [str(warning) for warning in warnings],
            }
        )
    else:
        _error(str(exc))
    return EXIT_USAGE


def _count(number: int, noun: str) -> str:
    """``1 program``, ``2 programs``, ``1 watch``, ``0 watches``."""
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun}{'es' if noun.endswith('ch') else 's'}"


def _log_to_stderr() -> None:
    """Log lines of the long-running commands, for journald or a terminal."""
    import logging

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe attempt is noise


def _run(args: argparse.Namespace, path: Path) -> int:
    from . import signals

    signals.hold()  # until the supervisor handles them (signals.py says why)
    import anyio

    from .config_file import load_config
    from .supervisor import Supervisor

    config = load_config(path)
    _log_to_stderr()
    anyio.run(Supervisor(path, config).run, backend="asyncio")
    return EXIT_OK


def _watch(args: argparse.Namespace, path: Path) -> int:
    from . import signals

    signals.hold()  # until watch_main receives them (signals.py says why)
    import anyio

    from .config_file import load_config
    from .watch import watch_main

    config = load_config(path)
    _log_to_stderr()
    if not config.watch:
        raise ConfigError(f"{path}: no `watch:` entries")
    anyio.run(watch_main, config, backend="asyncio")
    return EXIT_OK


def _reach(path: Path, timeout: float | None = None) -> Reached:
    """A connection to the supervisor of the config file ``path`` (``client.reach``); how it
    was found said on stderr when that was through its run record."""
    from .client import reach

    reached = reach(path, timeout)
    if reached.notice is not None:
        _error(reached.notice)
    return reached


def _request(
    path: Path, command: str, program: str | None = None, **request_args: Any
) -> dict[str, Any]:
    from .client import STATUS_TIMEOUT, call
    from .protocol import Request

    # Only a status answers at once; the supervisor bounds the rest (a stop waits for drains,
    # a start for the probe), so the CLI waits as long as they take.
    timeout = STATUS_TIMEOUT if command == "status" else None
    reached = _reach(path, timeout)
    return call(reached, Request(command, program, request_args), timeout, _say_once())


def _final(answer: dict[str, Any]) -> int:
    if answer.get("error"):
        _error(str(answer["error"]))
    return int(answer.get("exit_code", EXIT_FAILED))


def _refused(args: argparse.Namespace, answer: dict[str, Any]) -> int | None:
    """The exit code of an answer the supervisor refused (reported as ``_fail`` does), or
    None: it carries a result to print."""
    if answer.get("ok"):
        return None
    code = int(answer.get("exit_code", EXIT_FAILED))
    return _fail(args, str(answer.get("error") or "the supervisor refused the request"), code)


def _status(args: argparse.Namespace, path: Path) -> int:
    answer = _request(path, "status", args.program)
    if (refused := _refused(args, answer)) is not None:
        return refused
    if args.json:
        _print_json(answer["result"])
    else:
        from .display import print_status

        print_status(answer["result"], one_program=args.program is not None)
    return _final(answer)


def _flip_like(args: argparse.Namespace, path: Path) -> int:
    reached = _reach(path)
    from .client import converse
    from .display import FlipProgress
    from .protocol import Request

    # The request names the file this command was given (``converse``): the supervisor
    # refuses it if it reads another.
    request_args: dict[str, Any] = {}
    if getattr(args, "timeout", None) is not None:
        request_args["timeout"] = args.timeout
    request = Request(args.command, args.program, request_args)
    answer: dict[str, Any] = {}
    progress = FlipProgress(enabled=not args.json)
    with progress:
        try:
            for message in converse(reached, request, on_waiting=_say_once()):
                if message.get("type") == "progress":
                    progress.update(message)
                elif message.get("type") == "result":
                    answer = message
        except ControlUnreachable as exc:  # it went away mid-answer: the request had reached it
            raise ControlUnreachable(outcome_unknown(str(exc), args.command, args.program)) from exc
    report = answer.get("result")
    if (
        not (isinstance(report, dict) and "steps" in report)
        and (refused := _refused(args, answer)) is not None
    ):
        return refused  # refused before a flip began (busy, unknown program, invalid file)
    if args.json:
        _print_json(report)
    elif isinstance(report, dict) and "steps" in report:
        progress.summary(report)
    elif answer.get("ok"):
        print(f"{args.program}: {answer.get('result', {}).get('state', 'ok')}")
    return _final(answer)


def _reload(args: argparse.Namespace, path: Path) -> int:
    answer = _request(path, "reload")
    if (refused := _refused(args, answer)) is not None:
        return refused
    outcome = answer.get("result") or {}
    if args.json:
        _print_json(outcome)
    elif answer.get("ok"):
        parts = [
            f"{what} {', '.join(outcome[key])}"
            for key, what in (("added", "added"), ("removed", "removed"), ("changed", "flipping"))
            if outcome.get(key)
        ]
        if not_flipped := list(outcome.get("not_flipped") or {}):
            # Changed all the same: why each is not flipped now follows.
            parts.append(f"changed {', '.join(not_flipped)}, not flipped now")
        print(f"flipvisor: reload: {'; '.join(parts) if parts else 'no program changed'}")
        for name, why in (outcome.get("not_flipped") or {}).items():
            print(f"flipvisor: reload: {name}: {why}")
        for name, why in (outcome.get("kept") or {}).items():
            _error(f"reload: {name}: {why}")
        if outcome.get("needs_restart"):
            _error(
                f"{', '.join(outcome['needs_restart'])} changed: that takes effect only when the "
                f"supervisor restarts ({outcome.get('restart_hint')})"
            )
    return _final(answer)


def _logs(args: argparse.Namespace, path: Path) -> int:
    from .client import logs_locations
    from .logs_follow import follow
    from .logs_tail import tail_lines, terminal_safe

    config, notice = logs_locations(path)
    if notice is not None:
        _error(notice)

    log_file = log_path(config.state_dir, args.program)
    if args.program not in config.programs and not log_file.exists():
        _error(f"no program named {args.program!r} in {path}; `flipvisor status` lists them")
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


def _events(args: argparse.Namespace, path: Path) -> int:
    reached = _reach(path)
    from .client import converse
    from .protocol import Request

    request = Request("events", args.program, {"limit": args.lines, "follow": args.follow})
    answer: dict[str, Any] = {}
    for message in converse(reached, request, on_waiting=_say_once()):
        if message.get("type") == "event":
            print(json.dumps(message) if args.json else _event_line(message), flush=True)
        elif message.get("type") == "result":
            answer = message
    if (refused := _refused(args, answer)) is not None:
        return refused
    return _final(answer)


def _event_line(message: dict[str, Any]) -> str:
    """One event for people: ``12:00:01 web g2 promoted  port=41234 pids=[101]``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(message["time"]))
    gen = f" g{message['generation']}" if message.get("generation") else ""
    fields = " ".join(f"{k}={v}" for k, v in message.get("fields", {}).items())
    return (
        f"{stamp} {message['program']}{gen} {message['kind']} "
        f"{message.get('message', '')} {fields}".rstrip()
    )


def _shutdown(args: argparse.Namespace, path: Path) -> int:
    reached = _reach(path)
    from .client import converse
    from .protocol import Request

    answer: dict[str, Any] = {}
    # The events of the shutdown (drains, orphans stopped) as progress, on stderr.
    for message in converse(reached, Request("shutdown", None, {"wait": not args.no_wait})):
        if message.get("type") == "event":
            print(_event_line(message), file=sys.stderr, flush=True)
        elif message.get("type") == "result":
            answer = message
    if answer.get("ok"):
        print("flipvisor: shutdown: " + ("asked" if args.no_wait else "done"))
    return _final(answer)


HANDLERS: dict[str, Handler] = {
    "check": _check,
    "run": _run,
    "watch": _watch,
    "status": _status,
    "flip": _flip_like,
    "restart": _flip_like,
    "rollback": _flip_like,
    "start": _flip_like,
    "stop": _flip_like,  # shows each wait of the drain as it happens
    "shutdown": _shutdown,
    "reload": _reload,
    "logs": _logs,
    "events": _events,
}
