"""JSON read from outside this process (registry values, the local registry file, state files)
decoded so that every way it can fail is a ``ValueError``: the one parser callers' existing
"not a record we wrote" paths can rely on."""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes | bytearray) -> Any:
    """``data`` decoded as JSON.

    Raises:
        ValueError: it is not JSON flipvisor can decode: not JSON, bytes that are not UTF-8, or
            JSON nested deeper than the interpreter's recursion limit (``json.loads`` raises
            ``RecursionError`` for that, which no ``except ValueError`` catches: a hand-written
            ``[[[[...]]]]`` in a registry key would otherwise kill the supervisor).
    """
    try:
        return json.loads(data)
    except RecursionError as error:
        raise ValueError(f"JSON nested too deeply to decode ({error})") from None
