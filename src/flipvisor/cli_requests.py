"""The commands that ask the running supervisor: ``status``, ``flip``, ``restart``, ``rollback``,
``start``, ``stop``, ``reload``, ``events`` and ``shutdown``; their answers printed for people or
as JSON, and what a Ctrl-C or a lost supervisor left undone said in a sentence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_output import print_error, print_json, report_failure, waiting_notice
from .errors import EXIT_FAILED, ControlUnreachable
from .printable import indented_lines, one_line

if TYPE_CHECKING:
    from .client import Reached


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


def _reach(path: Path, timeout: float | None = None) -> Reached:
    """A connection to the supervisor of the config file ``path`` (``client.reach``); how it
    was found said on stderr when that was through its run record."""
    from .client import reach

    reached = reach(path, timeout)
    if reached.notice is not None:
        print_error(reached.notice)
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
    return call(reached, Request(command, program, request_args), timeout, waiting_notice())


def _final(answer: dict[str, Any]) -> int:
    if answer.get("error"):
        # A flip's failure names paths of the config (its folder, `proxy.dest`) and quotes
        # commands' output (`nginx -t`'s lines): control characters shown as escapes, and
        # every line after the first indented.
        print_error(str(answer["error"]))
    return int(answer.get("exit_code", EXIT_FAILED))


def _refused(args: argparse.Namespace, answer: dict[str, Any]) -> int | None:
    """The exit code of an answer the supervisor refused (reported as ``report_failure`` does), or
    None: it carries a result to print."""
    if answer.get("ok"):
        return None
    code = int(answer.get("exit_code", EXIT_FAILED))
    return report_failure(
        args, str(answer.get("error") or "the supervisor refused the request"), code
    )


def status(args: argparse.Namespace, path: Path) -> int:
    """``status [PROGRAM]``: the table, or the answer as one JSON document."""
    answer = _request(path, "status", args.program)
    if (refused := _refused(args, answer)) is not None:
        return refused
    if args.json:
        print_json(answer["result"])
    else:
        from .display import print_status

        print_status(answer["result"], one_program=args.program is not None)
    return _final(answer)


def flip_like(args: argparse.Namespace, path: Path) -> int:
    """``flip``, ``restart``, ``rollback``, ``start`` and ``stop``: each step shown as it
    happens, then a summary (or the report as one JSON document)."""
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
        # Connected once the spinner (rich) is loaded: the supervisor gives a connection a few
        # seconds to send its request, which the import must not eat into on a loaded host.
        reached = _reach(path)
        try:
            for message in converse(reached, request, on_waiting=waiting_notice()):
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
        print_json(report)
    elif isinstance(report, dict) and "steps" in report:
        progress.summary(report)
    elif answer.get("ok"):
        print(f"{args.program}: {_state_of(args.program, report)}")
    return _final(answer)


def _state_of(program: str, result: Any) -> str:
    """What an ok answer to ``start`` or ``stop`` says ``program`` is now: its ``state``, or
    (an answer without one, such as ``"result": null``) that it did not say."""
    state = result.get("state") if isinstance(result, dict) else None
    if isinstance(state, str) and state:
        return one_line(state)
    return f"done (the supervisor did not say its state: `flipvisor status {program}` shows it)"


def reload(args: argparse.Namespace, path: Path) -> int:
    """``reload``: what was added, removed, flipped or kept, and what waits for a restart."""
    answer = _request(path, "reload")
    if (refused := _refused(args, answer)) is not None:
        return refused
    outcome = answer.get("result") or {}
    if args.json:
        print_json(outcome)
    elif answer.get("ok"):
        parts = [
            f"{what} {', '.join(outcome[key])}"
            for key, what in (("added", "added"), ("removed", "removed"), ("changed", "flipping"))
            if outcome.get(key)
        ]
        if not_flipped := list(outcome.get("not_flipped") or {}):
            # Changed all the same: why each is not flipped now follows.
            parts.append(f"changed {', '.join(not_flipped)}, not flipped now")
        said = "; ".join(parts) if parts else "no program changed"
        print(f"flipvisor: reload: {one_line(said)}")
        for name, why in (outcome.get("not_flipped") or {}).items():
            print(f"flipvisor: reload: {indented_lines(f'{name}: {why}')}")
        for name, why in (outcome.get("kept") or {}).items():
            print_error(f"reload: {name}: {why}")
        if outcome.get("needs_restart"):
            print_error(
                f"{', '.join(outcome['needs_restart'])} changed: that takes effect only when the "
                f"supervisor restarts ({outcome.get('restart_hint')})"
            )
    return _final(answer)


def events(args: argparse.Namespace, path: Path) -> int:
    """``events``: the recent events, then (``-f``) each as it happens; a line each."""
    from .client import converse
    from .protocol import Request

    reached = _reach(path)  # after the imports, as flip_like's
    request = Request("events", args.program, {"limit": args.lines, "follow": args.follow})
    answer: dict[str, Any] = {}
    for message in converse(reached, request, on_waiting=waiting_notice()):
        if message.get("type") == "event":
            print(json.dumps(message) if args.json else event_line(message), flush=True)
        elif message.get("type") == "result":
            answer = message
    if (refused := _refused(args, answer)) is not None:
        return refused
    return _final(answer)


def event_line(message: dict[str, Any]) -> str:
    """One event for people, on one line: ``12:00:01 web g2 promoted port=41234 pids=[101]``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(message["time"]))
    gen = f" g{message['generation']}" if message.get("generation") else ""
    fields = " ".join(f"{k}={v}" for k, v in message.get("fields", {}).items())
    # A message names paths of the config and quotes what workers and commands said: their
    # control characters shown as escapes, and one line per event whatever they hold.
    return one_line(
        f"{stamp} {message['program']}{gen} {message['kind']} "
        f"{message.get('message', '')} {fields}".rstrip()
    )


def shutdown(args: argparse.Namespace, path: Path) -> int:
    """``shutdown``: the events of the drains on stderr as they happen (none with
    ``--no-wait``)."""
    reached = _reach(path)
    from .client import converse
    from .protocol import Request

    answer: dict[str, Any] = {}
    # The events of the shutdown (drains, orphans stopped) as progress, on stderr.
    for message in converse(reached, Request("shutdown", None, {"wait": not args.no_wait})):
        if message.get("type") == "event":
            print(event_line(message), file=sys.stderr, flush=True)
        elif message.get("type") == "result":
            answer = message
    if answer.get("ok"):
        print("flipvisor: shutdown: " + ("asked" if args.no_wait else "done"))
    return _final(answer)
