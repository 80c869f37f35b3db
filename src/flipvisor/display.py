"""What people see: the status table, and a flip's live progress (drawn with rich)."""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .fatal_advice import fatal_advice
from .printable import count, one_line, terminal_safe

if TYPE_CHECKING:
    from rich.console import Console

_STEP_MARK = {
    "ok": "[green]✓[/]",
    "failed": "[red]✗[/]",
    "running": "[yellow]…[/]",
    "cancelled": "[yellow]⊘[/]",  # cut short by a stop that called the flip off: no failure
}


def _duration(seconds: float) -> str:
    """``45s``, ``4m05s``, ``3h01m``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _last_exit(last: dict[str, Any] | str | None, now: float) -> str:
    """``w0 killed by SIGKILL, 12s ago`` (a plain string from an older supervisor as is)."""
    if not last:
        return ""
    if isinstance(last, str):
        return last
    ago = _duration(max(0.0, now - last["time"]))
    return f"w{last['worker']} {last['reason']}, {ago} ago"


def _flip_line(flip: dict[str, Any]) -> str:
    """``flip to generation 3 in progress: probe (2.1s)``."""
    generation = f" to generation {flip['generation']}" if flip.get("generation") else ""
    step, elapsed = flip["step"], flip["elapsed"]
    waiting = f"; {flip['waiting']}" if flip.get("waiting") else ""
    return f"{flip['kind']}{generation} in progress: {step} ({elapsed:.1f}s){waiting}"


# The longest command the table of every program shows (``status PROGRAM`` shows it whole).
COMMAND_WIDTH = 40


def _command(command: str | None, width: int | None) -> str:
    """The command (as ``shlex.join`` wrote it); longer than ``width`` (None: never cut), its
    executable by name alone and the end of its arguments, which tells releases apart more often
    than their start (a version, a release's path): ``python3 …releases/v2/app.py --workers 4``."""
    if not command:
        return "-"  # a status from a supervisor older than the field
    if width is None or len(command) <= width:
        return command
    head = width // 3
    middle_cut = f"{command[:head]}…{command[-(width - head - 1) :]}"
    if command.startswith("'"):  # a quoted executable (a space in its path): cut as it is
        return middle_cut
    executable, _, arguments = command.partition(" ")
    name = executable.rpartition("/")[2]  # without its folder
    short = f"{name} {arguments}".rstrip()
    if len(short) <= width:
        return short
    keep = width - len(name) - 2
    if keep < width // 2:  # a long executable name: its start and the arguments' end
        return middle_cut
    return f"{name} …{arguments[-keep:]}"


def _generation_state(gen: dict[str, Any], now: float) -> str:
    """``serving``; ``ready (warm 4m12s)`` for the one kept for a rollback, drained in 4m12s."""
    until = gen.get("warm_until")
    if until is None:
        return str(gen["state"])
    return f"{gen['state']} (warm {_duration(max(0.0, until - now))})"


def _warm_note(name: str, gen: dict[str, Any]) -> str:
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(gen["warm_until"]))
    return (
        f"{name}: generation {gen['generation']} is kept warm for a rollback until {until}, "
        "then drained"
    )


_ANSI = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold": "1"}
_COLUMNS = (
    "PROGRAM",
    "STATE",
    "GEN",
    "GEN STATE",
    "CONFIG",
    "PORT",
    "PIDS",
    "UPTIME",
    "RESTARTS",
    "LAST EXIT",
    "COMMAND",
)
_STATE_COLOUR = {"running": "green", "fatal": "red", "starting": "yellow"}


def _colour_enabled() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _paint(text: str, colour: str | None, enabled: bool) -> str:
    if not enabled or colour is None:
        return text
    return f"\x1b[{_ANSI[colour]}m{text}\x1b[0m"


def status_rows(
    document: dict[str, Any], now: float, *, one_program: bool = False
) -> tuple[list[list[str]], list[str]]:
    """The table's rows (one per generation, program columns on its first) and the notes
    below it: a line for each flip in progress and each fatal program (why, what to do).
    ``one_program`` (``status PROGRAM``): commands whole, not cut to ``COMMAND_WIDTH``, and a
    note saying by the clock when a warm generation is drained."""
    rows: list[list[str]] = []
    notes: list[str] = []
    width = None if one_program else COMMAND_WIDTH
    for program in document["programs"]:
        name = program["name"]
        for position, gen in enumerate(program["generations"] or [None]):
            # The program's columns on its first row only.
            head = [name, program["state"]] if position == 0 else ["", ""]
            if gen is None:
                rows.append([*head, "-", "-", "-", "-", "-", "-", str(program["restarts"]), "", ""])
                continue
            rows.append([*head, *_generation_cells(gen, now, width)])
            if one_program and gen.get("warm_until") is not None:
                notes.append(_warm_note(name, gen))
        notes += map(one_line, _program_notes(program))
    return rows, notes


def _generation_cells(gen: dict[str, Any], now: float, width: int | None) -> list[str]:
    """A generation's columns of the table, from ``GEN`` on (``width``: the command's, None
    for whole)."""
    return [
        str(gen["generation"]),
        _generation_state(gen, now),
        gen.get("fingerprint") or "-",
        str(gen["port"]),
        ",".join(map(str, gen["pids"])) or "-",
        _duration(gen["uptime"]),
        str(gen["restarts"]),
        _last_exit(gen.get("last_exit"), now),
        _command(one_line(gen.get("command") or ""), width),
    ]


def _program_notes(program: dict[str, Any]) -> list[str]:
    """The notes below the table about a program: its flip in progress, a killed supervisor's
    workers, a removal, and why it is fatal (with what to do)."""
    name, notes = program["name"], []
    if program.get("flip"):
        notes.append(f"{name}: {_flip_line(program['flip'])}")
    if left := program.get("leftovers"):
        pids = ",".join(map(str, left["pids"]))
        port = f", port {left['port']}" if left.get("port") is not None else ""
        flip = program.get("flip")
        when = (
            "being drained"  # the promotion is done: its drain step is theirs or after
            if flip and flip.get("step") == "drain"
            else "drained once the registry names a generation of this supervisor, or when "
            "the program stops"
        )
        notes.append(f"{name}: workers a killed supervisor left (pid {pids}{port}): {when}")
    if program.get("kept_after_removal"):
        notes.append(f"{name}: {program['kept_after_removal']}")
    if program.get("removing"):
        notes.append(f"{name}: removed from the config; listed until its workers are gone")
    if program.get("fatal_reason"):
        # The supervisor sends the reason with its next steps; one that did not (an older one)
        # gets them here, worded as the supervisor words them.
        notes.append(f"{name}: fatal: {fatal_advice(name, program['fatal_reason'])}")
    return notes


def keeper_line(keeper: dict[str, Any] | None) -> tuple[str, str | None] | None:
    """The line below the table about the output keeper, and its colour (a keeper not running
    is worth a look: a killed supervisor's workers would die at their next write); None from a
    supervisor that does not say."""
    if keeper is None:
        return None
    if keeper.get("disabled"):
        return f"output keeper: none ({keeper['disabled']})", None
    restarts = count(keeper["restarts"], "restart")
    if keeper["pid"] is None:
        return (
            f"output keeper: not running, starting another ({restarts}): until it runs, a killed "
            "supervisor's workers would die at their next write",
            "yellow",
        )
    return (
        f"output keeper: pid {keeper['pid']}, holding {count(keeper['pipes'], 'pipe')}, {restarts}",
        None,
    )


def print_status(document: dict[str, Any], *, one_program: bool = False) -> None:
    """The ``status`` table for people (``--json`` is for scripts); ``one_program``: the
    answer to ``status PROGRAM`` (``status_rows``).

    Drawn by hand rather than with rich: a rich table of 200 programs takes a quarter of a
    second to lay out, and ``status`` should answer at once.
    """
    rows, notes = status_rows(document, time.time(), one_program=one_program)
    colour = _colour_enabled()
    lines = _table_lines(rows, colour)
    for note in notes:
        lines.append(_paint(note, "red" if ": fatal: " in note else "yellow", colour))
    lines += _supervisor_lines(document, colour)
    sys.stdout.write("\n".join(lines) + "\n")


def _table_lines(rows: list[list[str]], colour: bool) -> list[str]:
    """The table: its header and ``rows``, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [list(_COLUMNS), *rows]) for i in range(len(_COLUMNS))]
    lines = [
        _paint(
            "  ".join(h.ljust(w) for h, w in zip(_COLUMNS, widths, strict=True)).rstrip(),
            "bold",
            colour,
        )
    ]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        cells[1] = _paint(cells[1], _STATE_COLOUR.get(row[1], "dim") if row[1] else None, colour)
        lines.append("  ".join(cells).rstrip())
    return lines


def _supervisor_lines(document: dict[str, Any], colour: bool) -> list[str]:
    """The lines below the notes about the supervisor itself: still starting, a registry that
    does not answer (or keys not written yet), the output keeper."""
    lines = []
    if document.get("starting"):
        lines.append(
            _paint(
                "the supervisor is starting: the configured programs not listed yet are added "
                "once it has looked for workers a killed supervisor left running",
                "yellow",
                colour,
            )
        )
    registry = document.get("registry")
    if registry and (not registry["connected"] or registry["pending"] or registry.get("problem")):
        state = "connected" if registry["connected"] else "unreachable"
        pending = ", ".join(registry["pending"])
        waiting = f"; keys of {pending} are written once it answers" if pending else ""
        if problem := registry.get("problem"):  # what it said (none from an older supervisor)
            # Not "unreachable" (an endpoint that is not etcd, etcd that wants credentials),
            # nor waiting for an answer it gave already.
            state = f"{'connected' if registry['connected'] else 'not connected'}: {problem}"
            waiting = f"; keys of {pending} are written once that is fixed" if pending else ""
        lines.append(
            _paint(
                f"registry: {registry['backend']} {registry['where']} {state}{waiting}",
                "yellow",
                colour,
            )
        )
    if registry and (conflicting := registry.get("conflicting")):  # (an older supervisor: none)
        lines.append(
            _paint(
                f"registry: keys of {', '.join(conflicting)} not rewritten: another writer kept "
                "changing them; tried again at the next publish, withdrawal or reconnect",
                "yellow",
                colour,
            )
        )
    if (keeper := keeper_line(document.get("keeper"))) is not None:
        lines.append(_paint(*keeper, colour))
    return lines


def _shown(text: object) -> str:
    """Text the supervisor sent (a step's detail naming a path of the config, a command's
    output) for a line of rich markup: its control characters as escapes, on one line, and its
    brackets as written (a ``[/]`` in a path was a markup error, ``[red]`` a colour)."""
    from rich.markup import escape

    return escape(one_line(str(text)))


class FlipProgress:
    """Prints each step of a flip as it finishes; a spinner on the running one on a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._status: Any = None
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """rich's console, loaded on first use: ``flip --json`` (scripts) never draws, and
        importing rich costs about 25 ms of CPU in the middle of the deploy it reports on."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def __enter__(self) -> FlipProgress:
        if self.enabled and sys.stderr.isatty():
            self._status = self.console.status("waiting for the supervisor")
            self._status.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._status is not None:
            self._status.__exit__(kind, exc, tb)

    def update(self, step: dict[str, Any]) -> None:
        if not self.enabled:
            return
        detail = _shown(step["detail"])
        if step["status"] == "running":
            if self._status is not None:
                self._status.update(f"{step['step']}: {detail}")
            else:  # no spinner (not a terminal: a CI log, a pipe): a line, so a wait shows
                self.console.print(
                    f"{_STEP_MARK['running']} {step['step']:<12} {'':>8}  [dim]{detail}[/]",
                    highlight=False,
                )
            return
        duration = f"{step['duration']:.3f}s" if step.get("duration") is not None else ""
        self.console.print(
            f"{_STEP_MARK.get(step['status'], '?')} {step['step']:<12} {duration:>8}  "
            f"[dim]{detail}[/]",
            highlight=False,
        )

    def summary(self, report: dict[str, Any]) -> None:
        if report["ok"]:
            self.console.print(
                f"[green]{report['program']}: generation {report['generation']} serving[/] "
                f"({report['duration']:.2f}s)",
                highlight=False,
            )
            if report.get("warning"):  # it succeeded, but something it does is still under way
                self.console.print(f"[yellow]{_shown(report['warning'])}[/]", highlight=False)
            return
        # Rolled back because a stop (a reload's removal, the shutdown) called it off: nothing
        # of it failed, and "failed" would read as a broken release.
        said, colour = ("called off", "yellow") if report.get("abandoned") else ("failed", "red")
        line = f"[{colour}]{report['program']}: {report['kind']} {said}[/]"
        self.console.print(line, highlight=False)
        if report.get("output"):
            self.console.print("last output of the new generation:", style="bold")
            for line in report["output"]:
                self.console.print("  " + terminal_safe(line), highlight=False, markup=False)
