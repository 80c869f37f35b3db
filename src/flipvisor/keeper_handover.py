"""The next run's side of an output keeper's handover: a killed supervisor's keeper hands every
worker output pipe it kept (with what it is logged as, and the start of a line a worker is in the
middle of) over ``<state_dir>/keeper.sock`` and exits; ``take_over_outputs`` receives them.

It never raises: a handover that cannot be read to its end (the socket fails, a message is not
what a keeper sends) is a warning naming the socket, and ``run`` starts all the same. Every pipe
received is kept, since closing one would end its worker at its next write.
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import anyio

from .config_fields import MAX_PROGRAM_NAME, PROGRAM_NAME_RE
from .locate import log_path
from .output_keeper import (
    END,
    HANDOVER_MESSAGE,
    HANDOVER_SOCKET,
    HANDOVER_TIMEOUT,
    receive_with_fds,
)

log = logging.getLogger(__name__)

# What the pipes of a handover message that cannot be read are logged as (its log:
# ``logs/output-keeper.unnamed.log``, beside the keeper's errors file). A valid program name, so
# that our own keeper hands them over to the next run under it again.
UNNAMED_PROGRAM = "output-keeper.unnamed"
MAX_PREFIX = 200  # ours are "g2 w0 pid=1234"


@dataclass(frozen=True)
class KeptOutput:
    """A worker output pipe taken over from a killed supervisor's keeper."""

    fd: int  # the read end, close-on-exec, now ours
    program: str
    prefix: str  # what its lines are logged as: ``g2 w0 pid=1234``
    pending: bytes = b""  # the start of the line its worker is in the middle of writing


async def take_over_outputs(state_dir: Path) -> list[KeptOutput]:
    """The output pipes a killed supervisor's keeper kept (nothing if there is none): it hands
    them over and exits. A stale socket (its keeper is gone too) is removed.

    Never raises: a handover that cannot be read to its end (the socket fails, a message is not
    what a keeper sends) is a warning naming the socket, and ``run`` starts all the same. Every
    pipe received is kept, those of a message that cannot be read too (logged as
    ``UNNAMED_PROGRAM``): closing one would end its worker at its next write, as if no keeper had
    held it. A descriptor that is not a pipe is closed: it is no worker's output.
    """
    path = state_dir / HANDOVER_SOCKET
    if not path.exists() or (sock := _connect(path)) is None:
        return []
    outputs: list[KeptOutput] = []
    with sock:
        with anyio.move_on_after(HANDOVER_TIMEOUT) as waited:
            if await _receive(sock, path, state_dir, outputs):
                # The keeper exits: its path is ours to remove (it keeps it bound until the end,
                # so that a failed handover leaves it reachable) before our keeper binds.
                path.unlink(missing_ok=True)
        if waited.cancelled_caught:
            log.warning(
                "the output keeper at %s did not finish handing over within %gs; took %d",
                path,
                HANDOVER_TIMEOUT,
                len(outputs),
            )
    return outputs


def _connect(path: Path) -> socket.socket | None:
    """A connection to the keeper's socket at ``path``, not blocking; None if no keeper listens
    there (a stale socket, removed) or it cannot be reached (logged)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.fsencode(path))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        path.unlink(missing_ok=True)
        return None
    except OSError as exc:
        sock.close()
        log.warning("cannot reach the output keeper at %s: %s", path, exc.strerror)
        return None
    sock.setblocking(False)
    return sock


async def _receive(
    sock: socket.socket, path: Path, state_dir: Path, outputs: list[KeptOutput]
) -> bool:
    """Receive the keeper's messages into ``outputs`` (as they come: those of a handover cut
    short are kept) until its end (True), or until it fails or goes away (False, logged)."""
    while True:
        await anyio.wait_readable(sock)
        try:
            data, fds = receive_with_fds(sock, HANDOVER_MESSAGE)
        except BlockingIOError:
            continue
        except OSError as exc:
            log.warning(
                "cannot read the handover of the output keeper at %s (%s; took %d): the "
                "workers whose pipes it had not handed over yet may have lost their reader",
                path,
                exc.strerror or exc,
                len(outputs),
            )
            return False
        if data == END:
            return True
        if not data:
            log.warning(
                "the output keeper at %s went away before it had handed every pipe over "
                "(took %d): the workers whose pipes it still held lost their reader",
                path,
                len(outputs),
            )
            return False
        outputs.extend(_kept_outputs(data, fds, path, state_dir, outputs))


def _kept_outputs(
    data: bytes, fds: list[int], path: Path, state_dir: Path, taken: list[KeptOutput]
) -> list[KeptOutput]:
    """The pipes of one handover message (``path``: the keeper's socket; ``taken``: the pipes
    taken before it). A ``hold`` carries one pipe and what it is logged as; whatever else comes
    (a message that is not JSON, not a hold, a name that is no program's, more descriptors or
    none) is said in a warning, and its pipes are logged as ``UNNAMED_PROGRAM``."""
    named = _named(data)
    pipes = _pipes_only(fds)
    not_pipes = len(fds) - len(pipes)
    kept = []
    if isinstance(named, tuple) and pipes:
        kept.append(KeptOutput(pipes.pop(0), *named))
        if not pipes and not not_pipes:
            return kept  # a hold as the keeper sends it
    first = 1 + sum(1 for output in taken if output.program == UNNAMED_PROGRAM)
    unnamed = [
        KeptOutput(fd, UNNAMED_PROGRAM, f"unnamed {number}")
        for number, fd in enumerate(pipes, start=first)
    ]
    if isinstance(named, str):
        why = named
    else:
        why = f"a hold with {len(fds)} descriptors" if kept else "a hold without a pipe"
    done = []
    if unnamed:
        prefixes = ", ".join(repr(output.prefix) for output in unnamed)
        done.append(f"its pipes are logged in {log_path(state_dir, UNNAMED_PROGRAM)} as {prefixes}")
    if not_pipes:
        done.append(f"{not_pipes} descriptor(s) that are not a pipe closed")
    log.warning(
        "the output keeper at %s sent a message this run cannot use (%s): %s",
        path,
        why,
        "; ".join(done) or "no pipe came with it",
    )
    return kept + unnamed


def _pipes_only(fds: list[int]) -> list[int]:
    """The pipes among ``fds``, made non-blocking; the other descriptors are closed."""
    pipes = []
    for fd in fds:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.set_blocking(fd, False)
            pipes.append(fd)
        else:
            os.close(fd)
    return pipes


def _named(data: bytes) -> tuple[str, str, bytes] | str:
    """The program and prefix a keeper's ``hold`` message names, and the start of the line its
    worker is in the middle of (``pending``, base64; none from a keeper before it was sent), or
    why it names none usable: the program names a log file (it must be a program's name: not a
    path), the prefix starts each line of it (one printable line)."""
    try:
        message = json.loads(data)
    except ValueError:
        return f"not JSON: {data[:60]!r}"
    tag = message.get("tag") if isinstance(message, dict) else None
    if not isinstance(message, dict) or message.get("op") != "hold" or not isinstance(tag, dict):
        return f"not a hold: {data[:60]!r}"
    program, prefix = tag.get("program"), tag.get("prefix")
    if not (
        isinstance(program, str)
        and PROGRAM_NAME_RE.fullmatch(program)
        and len(program) <= MAX_PROGRAM_NAME
    ):
        return f"not a program name: {program!r:.60}"
    if not (isinstance(prefix, str) and prefix.isprintable() and 0 < len(prefix) <= MAX_PREFIX):
        return f"not a prefix: {prefix!r:.60}"
    try:
        pending = binascii.a2b_base64(message.get("pending", ""), strict_mode=True)
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        return f"its line's start is not base64: {message.get('pending')!r:.60}"
    return program, prefix, pending
