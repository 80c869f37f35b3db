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
  comes after the registry step).
- A flip whose record is not marked as past its proxy step (``before_registry_step``: killed
  while its file was checked, say) was certainly never promoted: undone, even when the registry
  cannot be read. A file left in nginx's tree unchecked would fail every other program's check.
- When the registry cannot be read (etcd down at start-up), whether a flip past its proxy step
  (or one whose record predates that mark) took its registry step is unknown, and nothing is
  guessed: its file is left as it is (a killed reload may have loaded
  it), and its record kept, set aside under a name of its own (``keep_undecided``) so that this
  run's own flip of the program neither overwrites nor settles it: the next start decides, unless
  this run's flip of the program is promoted with the same files first (``promoted``: what they
  hold was routed after it, and the record is dropped then).
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
from .proxy_record import Pending, keep_undecided, pending


async def unfinished_proxy_steps(state_dir: Path) -> list[Pending]:
    """The proxy steps a killed supervisor of ``state_dir`` left unfinished."""
    return await anyio.to_thread.run_sync(pending, state_dir)


async def finish_proxy_steps(
    unfinished: list[Pending], records: Mapping[str, str] | None, events: EventLog
) -> None:
    """Keep or undo each of ``unfinished`` (see the module docstring): ``records`` are the
    programs' ``generation/current`` records (None: the registry could not be read)."""
    for step in unfinished:
        about = step.about
        what = about.describe()
        if records is None and step.maybe_promoted:
            kept = await anyio.to_thread.run_sync(keep_undecided, step)
            files = ", ".join(str(change.kept.dest) for change in step.changes)
            # A warning (WARNINGS): the file may name a generation the keys do not.
            events.emit(
                "proxy-left",
                about.program,
                None,
                f"a previous supervisor was killed during {what}, and the registry cannot be "
                f"read to tell whether it named that generation: its proxy file is left as it "
                f"is ({files}), and the record kept for the next start ({kept})",
            )
            continue
        record = records.get(about.program) if records is not None else None
        if step.promoted_by(record):
            files = ", ".join(str(change.kept.dest) for change in step.changes)
            events.emit(
                "proxy-kept",
                about.program,
                None,
                f"a previous supervisor was killed during {what}, after the registry named "
                f"that generation: its proxy file stays ({files}), as the keys name it",
            )
            await anyio.to_thread.run_sync(step.forget)
            continue
        outcome = await anyio.to_thread.run_sync(step.put_back)
        when = "before its registry step" if step.registry_next is False else "before it was done"
        message = f"a previous supervisor was killed during {what}, {when}: "
        message += "; ".join(outcome.done)
        if outcome.settled:
            await anyio.to_thread.run_sync(step.forget)
        else:
            message += f"; tried again at the next start ({step.path})"
        if outcome.settled and not outcome.left_alone:
            events.emit("proxy-restored", about.program, None, message)
        else:  # a warning (WARNINGS): a file left as it is may not name what the keys do
            events.emit("proxy-left", about.program, None, message)
