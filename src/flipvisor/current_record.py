"""A program's ``generation/current`` registry record (written by ``published_keys.py``) read
back: its generation, port and the supervisor that wrote it. The one parser of it."""

from __future__ import annotations

import socket
from typing import Any, NamedTuple

from . import json_text
from .starttime import Recorded, recorded_from_json

# This host's name, as the records its supervisors write name it (``host``): a record naming
# another host is not this host's to judge by PID.
HOSTNAME = socket.gethostname()


class CurrentRecord(NamedTuple):
    """A ``generation/current`` record, parsed: its generation, port and writing supervisor
    (None where it has none that fits: a record written before records named it)."""

    document: dict[str, Any]
    generation: int | None
    port: int | None
    supervisor: Recorded | None


def parse_current(record: str | None) -> CurrentRecord | None:
    """``record`` (a ``generation/current`` value) parsed; None for none, or for a JSON value
    that is not an object. The one parser of it: start-up's leftovers
    (``leftover_records.py``) and the proxy-undo journal's ``promoted_by`` read it alike.

    Raises:
        ValueError, TypeError, KeyError: it is not a record flipvisor wrote (not JSON, or a
            supervisor entry that names no process).
    """
    document: Any = json_text.loads(record) if record else None
    if not isinstance(document, dict):
        return None
    owner = document.get("supervisor")
    generation, port = document.get("generation"), document.get("port")
    return CurrentRecord(
        document,
        generation if isinstance(generation, int) else None,
        port if isinstance(port, int) else None,
        recorded_from_json(owner) if isinstance(owner, dict) else None,
    )
