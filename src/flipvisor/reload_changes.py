"""What a config reload makes of the sections it changed: which programs changed (not those
already running, or being flipped to, what the file says), and for each whether it is flipped
now, once the flip or the stop under way is over, or stored for its next start.
"""

from __future__ import annotations

import logging

from .config import Config, ProgramConfig, same_deploy
from .errors import Busy, UsageError
from .program import Program

# A reload's log lines, wherever they are written, name the module operators know them by.
log = logging.getLogger("flipvisor.reload")


def changed_programs(programs: dict[str, Program], last_read: Config, new: Config) -> list[str]:
    """The programs whose section the file changed since it was last read (``last_read``), and
    which do not run it already (nor does the flip under way deploy it). A rollback, or a flip
    that failed, is not redone by a reload that leaves their section alone; a section deployed
    by `flip` is not flipped again."""
    changed = []
    for name, section in new.programs.items():
        program = programs.get(name)
        if program is None:
            continue
        last_section = last_read.programs.get(name)
        target = program.flips.target
        deployed = target if target is not None else program.config
        if not same_deploy(section, last_section) and not same_deploy(section, deployed):
            changed.append(name)
    return changed


def forget_superseded(programs: dict[str, Program], new: Config) -> None:
    """Forget what an earlier reload deferred (``Flips.pending``) that the file no longer
    says: a section changed again replaces it (``deploy_changed``), and one put back as it
    is deployed, or being deployed, needs no flip."""
    for name, program in programs.items():
        pending = program.flips.pending
        if pending is not None and not same_deploy(pending, new.programs.get(name)):
            program.flips.pending = None


def deploy_changed(program: Program, config: ProgramConfig) -> tuple[str | None, bool]:
    """A running program whose section changed is flipped to it (rolled back if it fails,
    like any flip); a stopped one starts with it next time. One that a flip is under way for
    is flipped to it once that flip is over; one that a stop drains starts with it next time.
    Returns why it was not flipped now (None: the flip started), and whether it is deferred
    until the flip or the stop under way is over."""
    program.flips.pending = None  # an earlier reload's, if any: this section replaces it
    if program.serving is None and program.current_flip is None and not program.stops_under_way:
        program.config = config
        return f"stored: `flipvisor start {program.name}` starts it with the new section", False
    if program.current_flip is not None and not program.shut_down:
        # Flipped once it is over (``Flips._deploy_pending``). Refused, the edit was lost:
        # the next reload found the file as it last read it.
        program.flips.pending = config
        why = (
            f"{program.flips.describe_running()}: it is flipped to the new section once "
            "that is over"
        )
        log.info("config of %s changed: %s", program.name, why)
        return why, True
    if program.stops_under_way and not program.shut_down:
        program.flips.pending = config  # ``Flips.store_pending``, at the stop's end
        why = (
            f"a stop of {program.name} is in progress: `flipvisor start {program.name}` "
            "starts it with the new section once that is over"
        )
        log.info("config of %s changed: %s", program.name, why)
        return why, True
    try:
        program.start_flip(config, kind="flip")
    except (Busy, UsageError) as exc:  # the shutdown's stop
        why = f"not deployed: {exc}; then `flipvisor flip {program.name}`"
        log.warning("config of %s changed, %s", program.name, why)
        return why, False
    return None, False


def deploy_all_changed(
    programs: dict[str, Program], changed: list[str], new: Config
) -> tuple[list[str], dict[str, str], list[str]]:
    """``deploy_changed`` for each changed program. Returns those flipping now, why each
    other one is not, and those deferred until the flip or the stop under way is over."""
    flipping, not_flipped, deferred = [], {}, []
    for name in changed:
        why, later = deploy_changed(programs[name], new.programs[name])
        if why is None:
            flipping.append(name)
        else:
            not_flipped[name] = why
        if later:
            deferred.append(name)
    return flipping, not_flipped, deferred
