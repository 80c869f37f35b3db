"""Whether a program's keys hold another supervisor's promotion, which this one must not write over.

Two supervisors may share a registry prefix (two hosts serving one program): the last to promote
owns the keys. The other one keeps its own view of what it serves (``desired``), and republishes it
when a worker of its is replaced or etcd comes back; those writes apply only to keys that are its
own (their ``generation/current`` record names a supervisor whose keys it wants, wrote or may have
written: itself, or the one a failed promotion's undo puts back), missing (etcd wiped) or not a
record flipvisor wrote. A record naming a supervisor of this boot that no longer runs (keys
restored from a backup, a killed predecessor's) is stale: written over too, so the keys match what
is serving.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from flipvisor.current_record import parse_current
from flipvisor.starttime import Recorded, boot_id, pid_still_names

from .base import Snapshot

HOSTNAME = socket.gethostname()


def supervisor_of(snapshot: Snapshot | None) -> Recorded | None:
    """The supervisor ``snapshot``'s ``generation/current`` record names; None for no record,
    garbage, or a record that names none."""
    if snapshot is None:
        return None
    try:
        parsed = parse_current(snapshot.get("generation/current"))
    except (ValueError, TypeError, KeyError):
        return None
    return parsed.supervisor if parsed is not None else None


def promoted_by_another(have: Snapshot, ours: Iterable[Snapshot | None]) -> Recorded | None:
    """The supervisor whose promotion ``have`` holds, if it is another one that may still run:
    none that ``ours`` (what this registry wants, wrote, or may have written for the program)
    names, and not one of this boot that is gone. None: the keys are this supervisor's to
    write."""
    found = supervisor_of(have)
    if found is None:
        return None
    # What this registry wants or wrote names this supervisor (or, for a failed promotion's
    # undo, the one whose keys it puts back).
    if found in {known for known in map(supervisor_of, ours) if known is not None}:
        return None
    if _of_this_host(found, have) and not pid_still_names(found):
        return None  # stale: its supervisor no longer runs
    return found


def _of_this_host(supervisor: Recorded, have: Snapshot) -> bool:
    """Whether ``supervisor`` ran on this host's current boot, so whether it still runs can be
    told here: by its boot id, else (an older record) by the record's host."""
    if supervisor.identity is not None:
        try:
            return supervisor.identity.boot_id == boot_id()
        except OSError:
            return False
    parsed = parse_current(have.get("generation/current"))
    return parsed is not None and parsed.document.get("host") == HOSTNAME
