"""A killed supervisor's registry records, read at start-up: which ``generation/current`` record a
supervisor of this host that no longer runs wrote (the keys it left that a withdrawal may take
over), and which of the workers it names still run as recorded (its program's leftovers,
``leftovers.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from . import json_text
from .current_record import CurrentRecord, parse_current
from .errors import RegistryError
from .leftovers import Leftovers, runs_as_recorded
from .registry import WatchableRegistry, program_key
from .starttime import recorded_from_json, with_identity

log = logging.getLogger(__name__)


def leftovers_in(
    program: str, record: str | None, host: str, *, even_if_gone: bool = False
) -> Leftovers | None:
    """The leftovers a ``generation/current`` ``record`` names, or None if there are none: the
    record is from another host or has no supervisor (written before records named it), its
    supervisor still runs, or none of its workers runs as recorded (by start tick and boot id,
    or by start time in a record without them). ``even_if_gone``: leftovers without a worker in
    that last case (a program removed from the config still has its keys and proxy file)."""
    parsed = _dead_supervisors_document(program, record, host)
    if parsed is None:
        return None
    try:
        workers = [recorded_from_json(p) for p in parsed.document.get("pids", [])]
    except (ValueError, TypeError, KeyError):
        log.warning("program=%s: generation/current is not a record flipvisor wrote", program)
        return None
    # Started by a supervisor for this program: a forged or stale record could name any process
    # with its real start time (anyone can read pid 1's). Those an older flipvisor's record names
    # by start time only are identified by their start tick from now on: a clock step before
    # their drain does not hide them.
    alive = tuple(with_identity(w) for w in workers if runs_as_recorded(w, program=program))
    if not alive and not even_if_gone:
        return None
    return Leftovers(program, parsed.generation, parsed.port, alive, record)


def dead_supervisors_record(program: str, record: str | None, host: str) -> str | None:
    """``record`` (a ``generation/current`` value) if a supervisor of ``host`` that no longer
    runs wrote it: the keys of a program it served that a withdrawal may take over (whether or
    not the workers it names still run). None otherwise (logged when its supervisor runs)."""
    return record if _dead_supervisors_document(program, record, host) is not None else None


def _dead_supervisors_document(program: str, record: str | None, host: str) -> CurrentRecord | None:
    """``record`` parsed, if it names ``host`` and a supervisor that no longer runs; None for
    none, another host's, one that names no supervisor (written before records did), or one
    whose supervisor still runs (logged: it is not this one's to replace)."""
    try:
        parsed = parse_current(record)
    except (ValueError, TypeError, KeyError):
        if _names_another_host(record, host):
            return None  # another host's supervisor wrote it as it does: not ours to judge
        log.warning("program=%s: generation/current is not a record flipvisor wrote", program)
        return None
    if parsed is None or parsed.document.get("host") != host or parsed.supervisor is None:
        return None
    supervisor = parsed.supervisor
    if runs_as_recorded(supervisor):
        log.warning(
            "program=%s: the registry names the workers of a supervisor that still runs "
            "(pid %d); they are not this one's to replace. Do two supervisors share the "
            "registry prefix?",
            program,
            supervisor.pid,
        )
        return None
    return parsed


async def read_records(
    registry: WatchableRegistry, prefix: str, programs: Iterable[str], *, unclean: bool = False
) -> dict[str, str] | None:
    """The ``generation/current`` record of each of ``programs`` that has one, by program, read
    in one request; None if the registry cannot be read (logged: what a previous supervisor
    left then goes on running, and stays routed, as before this supervisor started; after an
    ``unclean`` exit, its workers are still found by their environment, ``lineage.py``)."""
    keys = {program_key(prefix, name, "generation/current"): name for name in programs}
    if not keys:
        return {}
    try:
        values = (await registry.read_keys(list(keys))).values
    except RegistryError as exc:
        log.warning(
            "cannot read the registry to find workers a previous supervisor left running, or "
            "programs it served that the config no longer has: %s; %s",
            exc,
            UNREAD_UNCLEAN if unclean else UNREAD_CLEAN,
        )
        return None
    return {name: values[key] for key, name in keys.items() if key in values}


# What a start-up that cannot read the records does without them, by how the supervisor before
# ended: killed (its workers are found by their environment), or cleanly (it drained them).
UNREAD_UNCLEAN = (
    "the workers it left running are found by their environment instead, and drained once the "
    "registry records this supervisor's generation of their program (stopped now if the config "
    "no longer has it); a program the config no longer has whose workers are all gone keeps "
    "its proxy file and registry keys"
)
UNREAD_CLEAN = (
    "none was killed (none left its control socket), so no workers of one are looked for, and "
    "programs the config no longer has keep their proxy files and registry keys"
)


def recorded_leftovers(
    records: Mapping[str, str], programs: Iterable[str], host: str, *, even_if_gone: bool = False
) -> dict[str, Leftovers]:
    """The leftovers that ``records`` (``read_records``) name for each of ``programs``;
    ``even_if_gone``: also those none of whose workers still runs (see ``leftovers_in``)."""
    found = {}
    for name in programs:
        left = leftovers_in(name, records.get(name), host, even_if_gone=even_if_gone)
        if left is not None:
            found[name] = left
    return found


def _names_another_host(record: str | None, host: str) -> bool:
    try:
        document = json_text.loads(record) if record else None
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("host") not in (None, host)
