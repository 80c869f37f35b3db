"""Control-socket messages: one JSON object per line, both ways.

A request is ``{"command": ..., "program": ..., "args": {...}}``. The answer is zero or more
``{"type": "progress" | "event" | "waiting", ...}`` lines (``waiting``: the supervisor is still
starting, ``{"message": ...}``), then exactly one
``{"type": "result", "ok": ..., "exit_code": ..., "result": ..., "error": ...}``.

orjson, not the stdlib's json: a ``status`` of 200 programs is ~45 KB, and the stdlib takes about
0.9 ms to encode and decode it, most of the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import EXIT_FAILED, EXIT_OK, FlipvisorError

MAX_LINE = 1024 * 1024
COMMANDS = frozenset(
    {"status", "flip", "restart", "rollback", "start", "stop", "shutdown", "events", "reload"}
)


class ProtocolError(FlipvisorError):
    """A malformed message on the control socket."""


@dataclass(frozen=True)
class Request:
    command: str
    program: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode({"command": self.command, "program": self.program, "args": self.args})


def is_seconds(value: object) -> bool:
    """A duration a request may carry (``flip``'s timeout): a finite number > 0, not a bool."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")
    )


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line of JSON."""
    try:
        return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        # A key that is not a string (an int): made one, as the stdlib's json would. Only on
        # demand: OPT_NON_STR_KEYS makes every encoding slower, about a fifth of a 200-program
        # status's.
        return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line.

    Raises:
        ProtocolError: not a JSON object.
    """
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError as exc:  # deep nesting too: orjson stops at 1024 levels
        raise ProtocolError(f"malformed control message: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("malformed control message: not an object")
    return message


def decode_request(line: bytes) -> Request:
    """Parse a request line.

    Raises:
        ProtocolError: malformed, or an unknown command.
    """
    message = decode(line)
    command = message.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r}")
    program = message.get("program")
    args = message.get("args") or {}
    if program is not None and not isinstance(program, str):
        raise ProtocolError("program must be a string")
    if not isinstance(args, dict):
        raise ProtocolError("args must be an object")
    return Request(command, program, args)


def result(
    value: Any = None, *, error: str | None = None, exit_code: int | None = None, **extra: Any
) -> dict[str, Any]:
    """The final message of an answer."""
    code = exit_code if exit_code is not None else (EXIT_OK if error is None else EXIT_FAILED)
    return {
        "type": "result",
        "ok": error is None,
        "exit_code": code,
        "result": value,
        "error": error,
        **extra,
    }
