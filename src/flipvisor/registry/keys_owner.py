"""Whether a program's keys hold another supervisor's promotion, which this one must not write over.

Two supervisors may share a registry prefix (two hosts serving one program): the last to promote
owns the keys. The other one keeps its own view of what it serves (``desired``), and republishes it
when a worker of its is replaced or etcd comes back; those writes apply only to keys that are its
own (the very ``generation/current`` record it wants, wrote or may have written, or one naming
this process), missing (etcd wiped) or not a record flipvisor wrote. A record naming a supervisor
of this host that no longer runs (a killed predecessor's; keys restored from a backup, of an
earlier boot) is stale: written over too, so the keys match what is serving.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache

from flipvisor.current_record import HOSTNAME, parse_current
from flipvisor.starttime import Recorded, boot_id, pid_still_names, recorded_now

from .base import Snapshot


def promoted_by_another(have: Snapshot, ours: Iterable[Snapshot | None]) -> Recorded | None:
    """The supervisor whose promotion ``have`` holds, if it is another one that may still run.
    None: the keys are this supervisor's to write, as they are exactly what this registry
    wants, wrote or may have written for the program (``ours``), or name this process, or a
    supervisor of this host that is gone.

    By the record itself, not the supervisor it names: a failed promotion's undo puts back
    another supervisor's keys (``desired`` then names it), and judged by that supervisor, its
    newer promotion since would be taken for ours and written over with its older one."""
    record = have.get("generation/current")
    try:
        parsed = parse_current(record)
    except (ValueError, TypeError, KeyError):
        return None  # garbage: not a record flipvisor wrote
    if parsed is None or (found := parsed.supervisor) is None:
        return None
    if any(s is not None and s.get("generation/current") == record for s in ours):
        return None
    if _is_this_process(found) or _gone(found, parsed.document.get("host")):
        return None
    return found


def _is_this_process(supervisor: Recorded) -> bool:
    me = _this_process()
    return me is not None and (supervisor.pid, supervisor.identity) == (me.pid, me.identity)


@cache
def _this_process() -> Recorded | None:
    return recorded_now(os.getpid())


def _gone(supervisor: Recorded, host: object) -> bool:
    """Whether ``supervisor`` (whose record names ``host``) certainly no longer runs: it ran on
    this host (the record's host is this one's name: a container on this machine shares its
    boot id, not its PIDs), and in an earlier boot, or its PID names it no more."""
    if host != HOSTNAME:
        return False
    if supervisor.identity is not None:
        try:
            if supervisor.identity.boot_id != boot_id():
                return True  # an earlier boot of this host: keys restored from a backup
        except OSError:
            return False
    return not pid_still_names(supervisor)
