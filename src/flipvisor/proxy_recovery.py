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
  failed flip. A flip killed before its proxy step was done (its record not marked
  ``registry_next``) never reloaded the proxy with its file: nothing is reloaded. One past it (or
  whose record predates the mark) may have: killed while its failed promotion was undone, after
  its reload and before the reload back (which may go on after a ``--timeout`` answered the
  flip's client), it leaves the proxy routing to the generation it threw away. So the proxy is
  checked and reloaded then (``ProxyAccess``: with the configured proxy section of the program
  that writes the file), whether the file needed putting back or was the previous one already;
  without such a section, or if the check or the reload fails, a ``proxy-left`` warning says
  what to do (and a failed one is tried again at the next start).
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
- A flip whose undo put its files back but failed to reload the proxy back (its record kept on
  purpose, ``KEPT``) was rolled back: undone (its files are the previous ones already, unless
  edited by hand since) and the proxy checked and reloaded, whatever the registry says, or
  whether it can be read: keys that name its generation are ones its undo failed to put back,
  said so, not taken for a promotion.
- A record that took over an earlier step's (nested whole in it, ``"previous"``) is decided
  first; once it is done with, the earlier record is written back in its place and decided on
  its own, by its own registry check (its flip may have been promoted: a record whose removal
  failed), with its own note and owed reload: after a later flip kept as promoted, without its
  files that flip changed again (they stand). A later step kept undecided keeps the earlier one
  with it (a reload it owes is done now, and again when it is decided).
- A removed program's file taken away before its reload without it was done: put back, and removed
  again (checked) by whatever removes the program now.

A file is put back only while it still holds what the interrupted step wrote (or a state of an
earlier change in the record's chain: put back by a start killed before it dropped the record):
an operator's hand edit since is left alone. Each outcome is an event of the program's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from .config import ProgramConfig, ProxyConfig
from .errors import ProxyError
from .events import EventLog
from .proxy import Routing, how_to_reload
from .proxy_file import same_file
from .proxy_lock import ProxyHolder, ProxyLock
from .proxy_record import Pending, keep_undecided, pending
from .reaper import Reaper


@dataclass(frozen=True)
class ProxyAccess:
    """How start-up reaches the proxy that a killed flip may have reloaded: the configured
    ``programs`` (their proxy sections), the ``reaper`` the proxy's commands run under, and the
    ``lock`` of the proxy steps on this host."""

    programs: Mapping[str, ProgramConfig]
    reaper: Reaper
    lock: ProxyLock

    def section_of(self, step: Pending) -> ProxyConfig | None:
        """The configured proxy section that writes a file ``step`` changed: its program's, or
        (renamed since) another program's; None if none does."""
        # Its own program's section first (False sorts first).
        ordered = sorted(self.programs.items(), key=lambda item: item[0] != step.about.program)
        for _, config in ordered:
            proxy = config.proxy
            if proxy is not None and any(same_file(c.kept.dest, proxy.dest) for c in step.changes):
                return proxy
        if not step.changes:  # its files replaced by a later step kept since: its program's
            own = self.programs.get(step.about.program)
            return own.proxy if own is not None else None
        return None

    async def check_and_reload(self, program: str, proxy: ProxyConfig) -> None:
        """Check the proxy's config as it is on disk and reload it, as ``proxy`` says.

        Raises:
            ProxyError: the check or the reload failed (or timed out).
        """
        route = Routing(program, self.reaper)
        async with self.lock.held(
            ProxyHolder.named(f"start-up recovery of {program}'s unfinished proxy step", program)
        ):
            await route.check(proxy)
            await route.reload(proxy)


async def unfinished_proxy_steps(state_dir: Path) -> list[Pending]:
    """The proxy steps a killed supervisor of ``state_dir`` left unfinished."""
    return await anyio.to_thread.run_sync(pending, state_dir)


async def finish_proxy_steps(
    unfinished: list[Pending],
    records: Mapping[str, str] | None,
    events: EventLog,
    proxy: ProxyAccess | None = None,
) -> None:
    """Keep or undo each of ``unfinished`` (see the module docstring): ``records`` are the
    programs' ``generation/current`` records (None: the registry could not be read); ``proxy``
    reloads the proxy after an undone flip that may have reloaded it (None: it is not
    reached, and a warning says to reload it)."""
    for first in unfinished:
        step: Pending | None = first
        while step is not None:
            step = await _finish_one(step, records, events, proxy)


async def _finish_one(
    step: Pending,
    records: Mapping[str, str] | None,
    events: EventLog,
    proxy: ProxyAccess | None,
) -> Pending | None:
    """Keep or undo ``step``; returns the earlier record it took over, written back in its place
    to be decided next on its own (None: there is none, or the record stays)."""
    named = step.promoted_by(records.get(step.about.program) if records is not None else None)
    earlier = step.previous
    if step.reload_back_failed:
        # Rolled back, its files put back: decided, whatever the registry says (keys that
        # still name its generation are ones its undo failed to put back).
        done = await _undo(step, events, proxy, earlier, keys_left=named)
    elif records is None and step.maybe_promoted:
        await _keep_undecided(step, events, proxy)  # the earlier record kept aside with it
        return None
    elif named:
        # Its files stand: the earlier record's on the same files are replaced for good.
        earlier = earlier.past(step) if earlier is not None else None
        done = await _keep(step, events, proxy, earlier)
    else:
        done = await _undo(step, events, proxy, earlier)
    return earlier if done else None


async def _keep_undecided(step: Pending, events: EventLog, proxy: ProxyAccess | None) -> None:
    """The registry cannot be read: ``step``'s file left as it is, its record kept aside (and
    the proxy reloaded if an earlier step's reload is owed: once more at the next start)."""
    kept = await anyio.to_thread.run_sync(keep_undecided, step)
    files = ", ".join(str(change.kept.dest) for change in step.changes)
    message = (
        f"{step.how_left()}, and the registry cannot be read to tell whether it named that "
        f"generation: its proxy file is left as it is ({files}), and the record kept for the "
        f"next start ({kept})"
    )
    owed = step.owed_in_chain()
    if owed is not None:
        said, _, _ = await _reload_proxy(step, proxy, owed)
        message += f"; {said}"
    # A warning (WARNINGS): the file may name a generation the keys do not.
    events.emit("proxy-left", step.about.program, None, message)


async def _keep(
    step: Pending, events: EventLog, proxy: ProxyAccess | None, earlier: Pending | None
) -> bool:
    """The registry names ``step``'s generation: its file stays (a reload an earlier step owes
    is that step's, decided on its own after this one). Whether it is done with: dropped, or
    ``earlier`` written in its place."""
    files = ", ".join(str(change.kept.dest) for change in step.changes)
    message = (
        f"{step.how_left()}, after the registry named that generation: its proxy file stays "
        f"({files}), as the keys name it"
    )
    done = await anyio.to_thread.run_sync(step.forget, earlier)
    events.emit("proxy-kept", step.about.program, None, message)
    return done


async def _undo(
    step: Pending,
    events: EventLog,
    proxy: ProxyAccess | None,
    earlier: Pending | None,
    *,
    keys_left: bool = False,
) -> bool:
    """``step`` undone: its files put back where they hold what it wrote, and the proxy checked
    and reloaded if the flip may have reloaded it (``keys_left``: the registry still names the
    generation of that flip, rolled back, as its undo failed to put the keys back). Whether it
    is done with: dropped, or ``earlier`` written in its place."""
    about = step.about
    outcome = await anyio.to_thread.run_sync(step.put_back)
    message = _undone(step, keys_left)
    # None left: a later step that took its record over replaced them, and stands.
    message += "; ".join(outcome.done) or "its proxy files were replaced since by a later step's"
    settled, routed = outcome.settled, True
    if step.maybe_promoted and settled:
        # It may have reloaded the proxy with its file (killed before its reload back, or that
        # reload back failed).
        if outcome.left_alone:
            routed = False
            message += (
                f"; the proxy may have reloaded with that flip's file, and may still route "
                f"to generation {about.generation}: once the file is right, check the "
                "proxy's config and reload it"
            )
        else:
            said, routed, settled = await _reload_proxy(step, proxy)
            message += f"; {said}"
    done = False
    if settled:
        done = await anyio.to_thread.run_sync(step.forget, earlier)
    else:
        message += f"; tried again at the next start ({step.path})"
    if settled and routed and not outcome.left_alone:
        events.emit("proxy-restored", about.program, None, message)
    else:  # a warning (WARNINGS): a file left as it is may not name what the keys do
        events.emit("proxy-left", about.program, None, message)
    return done


def _undone(step: Pending, keys_left: bool) -> str:
    """The start of the event of ``step`` undone: how it was left (``keys_left``: see
    ``_undo``)."""
    about = step.about
    if not step.reload_back_failed:
        when = "before its registry step" if step.registry_next is False else "before it was done"
        return f"{step.how_left()}, {when}: "
    message = f"{step.how_left()}: "
    if keys_left:
        message += (
            f"the registry still names generation {about.generation}, as putting its keys "
            "back failed too, though that flip was rolled back: they are replaced once this "
            f"run promotes a generation of {about.program}; "
        )
    return message


async def _reload_proxy(
    step: Pending, access: ProxyAccess | None, owed: str | None = None
) -> tuple[str, bool, bool]:
    """Check and reload the proxy after ``step``'s flip was undone, as it may have reloaded
    the proxy with its file: what was done (for the event), whether the proxy routes as the
    files say now, and whether the record may go (a failed check or reload is tried again at
    the next start; with no proxy section to reload with, the operator is told what to do)."""
    about = step.about
    section = access.section_of(step) if access is not None else None
    if access is None or section is None:
        return _no_proxy_section(step, owed), False, True
    if not section.reload_cmd:
        return "the proxy has no reload_cmd: nothing was reloaded", True, True
    try:
        await access.check_and_reload(about.program, section)
    except ProxyError as exc:
        return (
            (
                f"a reload is owed ({owed}), and it failed: {exc}"
                if owed is not None
                else f"it may have reloaded the proxy with its file, and reloading the proxy back "
                f"failed: {exc}; the proxy may still route to generation {about.generation}"
            )
            + f": run {how_to_reload(section)}",
            False,
            False,
        )
    return _reloaded(step, owed), True, True


def _no_proxy_section(step: Pending, owed: str | None) -> str:
    """What to tell the operator when no proxy section of this config writes ``step``'s
    files, so the reload it may need (``owed``, or as its flip may have reloaded the proxy)
    cannot be done here."""
    files = ", ".join(str(change.kept.dest) for change in step.changes)
    return (
        f"a reload is owed ({owed})"
        if owed is not None
        else f"it may have reloaded the proxy with its file, and the proxy may still "
        f"route to generation {step.about.generation}"
    ) + (
        ", but no program of this config has a proxy section "
        f"writing {files} to reload it with: check the proxy's config and reload it by hand"
    )


def _reloaded(step: Pending, owed: str | None) -> str:
    """Why the proxy was checked and reloaded after ``step``, for its event."""
    if owed is not None:
        return f"the proxy was checked and reloaded, as a reload was owed ({owed})"
    if step.reload_back_failed:
        why = "failed"
    elif step.kept is not None:  # kept for a reason this version does not know
        why = "had not happened when its record was kept"
    else:
        why = "had not happened when it was killed"
    return (
        "the proxy was checked and reloaded, as that flip may have reloaded it with its file "
        f"(its reload back, away from generation {step.about.generation}, {why})"
    )
