"""The CLI's side of the control socket: plain blocking sockets, so a status call stays quick."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ControlUnreachable
from .protocol import MAX_LINE, Request, decode

STATUS_TIMEOUT = 30.0  # a status is built at once: longer means the supervisor is stuck


def converse(
    path: Path,
    request: Request,
    timeout: float | None = None,
    on_waiting: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Send ``request`` and yield each message of the answer, the final ``result`` last.

    ``waiting`` lines (the supervisor is still starting; ``timeout`` counts from the last of
    them) go to ``on_waiting`` instead.

    Raises:
        ControlUnreachable: nothing listens on ``path``, it went away mid-answer, or it did
            not answer within ``timeout`` seconds.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnreachable(
                f"no supervisor is listening on {path} (start one with `flipvisor run`)"
            ) from exc
        except PermissionError as exc:
            raise ControlUnreachable(
                f"permission denied on {path}: {exc.strerror}; run flipvisor as the user that "
                "runs the supervisor (or root)"
            ) from exc
        sock.sendall(request.encode())
        reader = sock.makefile("rb")
        with reader:
            while True:
                try:
                    line = reader.readline(MAX_LINE)
                except TimeoutError as exc:
                    raise ControlUnreachable(
                        f"the supervisor on {path} did not answer within {timeout:g} s (it may "
                        "be stuck: its log says what it is doing)"
                    ) from exc
                if not line:
                    raise ControlUnreachable(f"the supervisor on {path} closed the connection")
                message = decode(line)
                if message.get("type") == "waiting":
                    if on_waiting is not None:
                        on_waiting(str(message.get("message", "")))
                    continue
                yield message
                if message.get("type") == "result":
                    return
    finally:
        sock.close()


def call(
    path: Path,
    request: Request,
    timeout: float | None = STATUS_TIMEOUT,
    on_waiting: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Send ``request`` and return only the final ``result`` message.

    Raises:
        ControlUnreachable: nothing listens on ``path``.
    """
    final: dict[str, Any] = {}
    for message in converse(path, request, timeout, on_waiting):
        final = message
    return final
