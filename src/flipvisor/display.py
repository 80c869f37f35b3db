"""What people see: the status table and a flip's live progress, drawn with rich."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

PIPED_WIDTH = 200
_STEP_MARK = {"ok": "[green]✓[/]", "failed": "[red]✗[/]", "running": "[yellow]…[/]"}


def _uptime(seconds: float) -> str:
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
    ago = _uptime(max(0.0, now - last["time"]))
    return f"w{last['worker']} {last['reason']}, {ago} ago"


def _flip_line(flip: dict[str, Any]) -> str:
    """``[yellow]flip to generation 3 in progress: probe (2.1s)[/]``."""
    generation = f" to generation {flip['generation']}" if flip.get("generation") else ""
    step, elapsed = flip["step"], flip["elapsed"]
    return f"[yellow]{flip['kind']}{generation} in progress: {step} ({elapsed:.1f}s)[/]"


def print_status(document: dict[str, Any]) -> None:
    """The ``status`` table: one row per generation, program columns on its first row; below
    it, a line for each flip in progress and each fatal program (why, and what to do)."""
    now = time.time()
    notes: list[str] = []
    table = Table(show_edge=False, header_style="bold")
    for column in (
        "PROGRAM",
        "STATE",
        "GEN",
        "GEN STATE",
        "PORT",
        "PIDS",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
    ):
        table.add_column(column)
    for program in document["programs"]:
        state = program["state"]
        colour = {"running": "green", "fatal": "red", "starting": "yellow"}.get(state, "dim")
        gens = program["generations"] or [None]
        for position, gen in enumerate(gens):
            head = [program["name"], f"[{colour}]{state}[/]"] if position == 0 else ["", ""]
            if gen is None:
                table.add_row(*head, "-", "-", "-", "-", "-", str(program["restarts"]), "")
                continue
            table.add_row(
                *head,
                str(gen["generation"]),
                gen["state"],
                str(gen["port"]),
                ",".join(map(str, gen["pids"])) or "-",
                _uptime(gen["uptime"]),
                str(gen["restarts"]),
                _last_exit(gen.get("last_exit"), now),
            )
        if program.get("flip"):
            notes.append(f"{program['name']}: {_flip_line(program['flip'])}")
        if program.get("fatal_reason"):
            name, reason = program["name"], program["fatal_reason"]
            logs = (
                "" if "flipvisor logs" in reason else f"`flipvisor logs {name}` shows its output, "
            )
            notes.append(
                f"{name}: [red]fatal: {escape(reason)}[/]; "
                f"{logs}`flipvisor start {name}` tries again"
            )
    # Piped into grep or a file, a row stays one line instead of wrapping at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


class FlipProgress:
    """Prints each step of a flip as it finishes; a spinner on the running one on a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._status: Any = None

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
        if step["status"] == "running":
            if self._status is not None:
                self._status.update(f"{step['step']}: {step['detail']}")
            return
        duration = f"{step['duration']:.3f}s" if step.get("duration") is not None else ""
        self.console.print(
            f"{_STEP_MARK.get(step['status'], '?')} {step['step']:<12} {duration:>8}  "
            f"[dim]{step['detail']}[/]",
            highlight=False,
        )

    def summary(self, report: dict[str, Any]) -> None:
        if report["ok"]:
            self.console.print(
                f"[green]{report['program']}: generation {report['generation']} serving[/] "
                f"({report['duration']:.2f}s)",
                highlight=False,
            )
            return
        self.console.print(f"[red]{report['program']}: {report['kind']} failed[/]", highlight=False)
        if report.get("output"):
            self.console.print("last output of the new generation:", style="bold")
            for line in report["output"]:
                self.console.print("  " + line, highlight=False, markup=False)
