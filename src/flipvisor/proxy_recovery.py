"""At ``run``'s start-up, before a killed supervisor's leftovers are adopted or routed: the proxy
steps it left unfinished (``proxy_journal.py``) finished one way or the other, so that its proxy
files agree with the registry keys, which decide which of its generations serve on
(``leftovers.py``: those the ``generation/current`` record names).

- A flip whose generation that record names did its registry step: the keys name it, its workers
  are the leftovers that serve on, and its file, which passed its check, stays (the proxy may not
  have reloaded with it yet: this run's promotion reloads it, and any reload meanwhile routes to
  what the keys name).
- Any other flip (killed before its registry step: during the proxy check, say) is undone: the
  keys still name the generation it would have replaced, and so must the file, as after any
  failed flip. Nothing is reloaded: the proxy never reloaded with the flip's file (its reload
  comes after the registry step). When the registry cannot be read, the flip is undone too: it
  never ended, and the generation it replaced was serving through the previous file.
- A removed program's file taken away before the check without it passed: put back, and removed
  again (checked) by whatever removes the program now.

A file is put back only while it still holds what the interrupted step wrote: an operator's hand
edit since is left alone. Each outcome is an event of the program's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anyio

from .events import EventLog
from .proxy_journal import FLIP, Pending, pending


async def unfinished_proxy_steps(state_dir: Path) -> list[Pending]:
    """The proxy steps a killed supervisor of ``state_dir`` left unfinished."""
    return await anyio.to_thread.run_sync(pending, state_dir)


async def finish_proxy_steps(
    unfinished: list[Pending], records: Mapping[str, str] | None, events: EventLog
) -> None:
    """Keep or undo each of ``unfinished`` (see the module docstring): ``records`` are the
    programs' ``generation/current`` records (None: the registry could not be read)."""
    for step in unfinished:
        record = records.get(step.program) if records is not None else None
        what = (
            f"a flip to generation {step.generation} (port {step.port})"
            if step.kind == FLIP
            else "the removal of its proxy file"
        )
        if step.promoted_by(record):
            files = ", ".join(str(change.kept.dest) for change in step.changes)
            events.emit(
                "proxy-kept",
                step.program,
                None,
                f"a previous supervisor was killed during {what}, after the registry named "
                f"that generation: its proxy file stays ({files}), as the keys name it",
            )
            await anyio.to_thread.run_sync(step.forget)
            continue
        outcome = await anyio.to_thread.run_sync(step.put_back)
        why = (
            "the registry cannot be read, and the flip never ended"
            if records is None and step.kind == FLIP
            else "before it was done"
        )
        message = f"a previous supervisor was killed during {what}, {why}: "
        message += "; ".join(outcome.done)
        if outcome.settled:
            await anyio.to_thread.run_sync(step.forget)
        else:
            message += f"; tried again at the next start ({step.path})"
        if outcome.settled and not outcome.left_alone:
            events.emit("proxy-restored", step.program, None, message)
        else:  # a warning (WARNINGS): a file left as it is may not name what the keys do
            events.emit("proxy-left", step.program, None, message)
