"""Readiness probes: when may a new generation be promoted (http on its own port, exec, sd_notify).

There is deliberately no TCP-connect probe: the generation's socket is bound and listening by the
supervisor before any worker runs, so the kernel accepts connections whether or not a worker ever
answers them. Only an answer proves readiness.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .config import ReadinessConfig
from .errors import ProbeFailed, SpawnError
from .notify_socket import NotifySocket
from .run_command import run_command

if TYPE_CHECKING:  # for their types only: httpx is imported by the http probe that needs it
    import httpx

    from .reaper import Reaper

log = logging.getLogger(__name__)

# How much of a failed health response or exec probe output goes into the error message.
HTTP_BODY_EXCERPT = 200
EXEC_OUTPUT_LINES = 20


@dataclass
class ProbeProgress:
    """What the probe last learned, the reason a timed-out probe reports; and when the HTTP
    attempt under way began (None: none is), to say so if the timeout cuts it short. A caller
    that cuts the probe short itself (a flip's ``--timeout``) reads it with ``last``."""

    reason: str = ""
    attempt_since: float | None = None
    # Where what the probe knows is asked for rather than learned (sd_notify's state).
    explain: Callable[[], str] | None = None

    def last(self) -> str | None:
        """What the probe last learned (its last answer, the exec probe's output, the notify
        state), or None if nothing yet."""
        return self.explain() if self.explain is not None else (self.reason or None)


def probe_url(host: str, port: int, path: str) -> str:
    """The URL the http probe requests: the generation's own port, IPv6 bracketed.

    A wildcard bind address is probed on loopback, since one cannot connect to it.
    """
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    # A zone id ("fe80::1%eth0") is written %25-escaped inside the brackets (RFC 6874).
    netloc = f"[{str(address).replace('%', '%25')}]" if address.version == 6 else str(address)
    return f"http://{netloc}:{port}{path}"


async def _probe_http(url: str, deadline: float, interval: float, progress: ProbeProgress) -> None:
    """GET ``url`` every ``interval`` until it answers 2xx.

    An attempt may take the rest of ``readiness.timeout`` (until ``deadline``): no limit of its
    own, so a /health that takes 2.5 s (a check of the database, a cold cache) passes with a
    timeout that allows for it. A fixed per-attempt limit failed such a probe whatever the
    timeout said. A worker still starting (the socket listens before it runs) answers the first
    attempt once it accepts it, rather than after a retry.
    """
    import httpx  # ~60 ms: only programs with an http probe pay for it

    # verify=False: the URL is always plain http on the generation's own port, and redirects are
    # not followed, so no TLS can happen; the default would load the CA bundle into a new SSL
    # context for every probe (17 ms of CPU, 120 ms the first time) in the middle of a deploy.
    async with httpx.AsyncClient(trust_env=False, verify=False) as client:
        while True:
            now = anyio.current_time()
            progress.attempt_since = now
            left = httpx.Timeout(max(deadline - now, 0.01))
            try:
                # Streamed: a health endpoint that never ends its body must not hang the probe.
                async with client.stream("GET", url, timeout=left) as response:
                    if response.is_success:
                        return
                    status = f"{response.status_code} {response.reason_phrase}"
                    body = await _body_start(response)
                progress.reason = f"GET {url}: {status}" + (f": {body}" if body else "")
            except httpx.HTTPError as exc:
                progress.reason = f"GET {url}: {_describe_http_error(exc, now)}"
            progress.attempt_since = None
            await anyio.sleep(interval)


async def _body_start(response: httpx.Response) -> str:
    """The first line of a failed response's body (often says what is not ready yet)."""
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= HTTP_BODY_EXCERPT or b"\n" in data:
            break
    text = data[:HTTP_BODY_EXCERPT].decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else ""


def _no_response(since: float) -> str:
    """An attempt begun at ``since`` that the end of ``readiness.timeout`` cut short."""
    waited = anyio.current_time() - since
    return f"no response within {waited:.1f}s (the rest of readiness.timeout)"


def _describe_http_error(exc: httpx.HTTPError, since: float) -> str:
    import httpx

    cause: BaseException | None = exc
    while cause is not None:  # httpx wraps the OS error a few levels down
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return _no_response(since)
    return str(exc) or type(exc).__name__


async def _probe_exec(
    argv: list[str],
    *,
    port: int,
    deadline: float,
    interval: float,
    reaper: Reaper,
    env: Mapping[str, str],
    cwd: Path | None,
    progress: ProbeProgress,
) -> None:
    """Run ``argv`` every ``interval`` until it exits 0; each run bounded by the time left.

    Raises:
        ProbeFailed: the command cannot be started at all (retrying would not help).
    """
    command = [arg.replace("{port}", str(port)) for arg in argv]
    command_env = {**env, "PORT": str(port)}
    while True:
        remaining = deadline - anyio.current_time()
        try:
            result = await run_command(
                command, reaper=reaper, timeout=max(remaining, 0.01), env=command_env, cwd=cwd
            )
        except SpawnError as exc:
            raise ProbeFailed(f"readiness exec probe cannot run: {exc}") from exc
        if result.ok:
            return
        if not result.timed_out:
            # Only the last run can be cut short by the deadline; the reason set before it says so
            # (or an earlier run's failure does, which says more).
            progress.reason = _last_lines(result.describe(), EXEC_OUTPUT_LINES)
        await anyio.sleep(interval)


def _last_lines(text: str, count: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines[:1] + lines[1:][-count:]) if len(lines) > count + 1 else text


async def wait_ready(
    readiness: ReadinessConfig,
    *,
    host: str,
    port: int,
    reaper: Reaper,
    env: Mapping[str, str],
    cwd: Path | None,
    notify: NotifySocket | None,
    worker_pids: Callable[[], set[int]],
    numprocs: int,
    progress: ProbeProgress | None = None,
) -> None:
    """Return once the generation on ``host:port`` is ready, as ``readiness`` defines it; what
    the probe learns meanwhile goes into ``progress``, for a caller that may cut it short.

    Cancellable at every await: an in-flight HTTP connection is closed and a running exec probe
    is killed and reaped before the cancellation propagates.

    Raises:
        ProbeFailed: not ready within ``readiness.timeout`` (the message carries the last reason:
            the last HTTP status or error, the exec probe's output, or the notify state), or the
            exec probe cannot be started.
        ValueError: ``readiness`` asks for notify but no ``notify`` socket was given.
    """
    deadline = anyio.current_time() + readiness.timeout
    progress = progress if progress is not None else ProbeProgress()
    if readiness.http is not None:
        reason = await _wait_http(
            readiness, readiness.http, host, port, deadline, progress=progress
        )
        if reason is None:
            return
        progress.reason = reason
    elif readiness.exec is not None:
        passed = await _wait_exec(
            readiness,
            readiness.exec,
            port=port,
            deadline=deadline,
            reaper=reaper,
            env=env,
            cwd=cwd,
            progress=progress,
        )
        if passed:
            return
    elif await _wait_notify(readiness, notify, worker_pids, numprocs, progress):
        return
    raise ProbeFailed(f"not ready after {readiness.timeout:g}s: {progress.last()}")


async def _wait_notify(
    readiness: ReadinessConfig,
    notify: NotifySocket | None,
    worker_pids: Callable[[], set[int]],
    numprocs: int,
    progress: ProbeProgress,
) -> bool:
    """Wait for every worker's ``READY=1`` (True) until ``readiness.timeout`` runs out (False:
    ``progress`` says what the workers sent)."""
    if notify is None:
        raise ValueError("readiness notify needs a NotifySocket")
    progress.explain = lambda: notify.describe(numprocs)
    with anyio.move_on_after(readiness.timeout):
        await notify.wait_ready(worker_pids, numprocs)
        return True
    return False


async def _wait_exec(
    readiness: ReadinessConfig,
    command: list[str],
    *,
    port: int,
    deadline: float,
    reaper: Reaper,
    env: Mapping[str, str],
    cwd: Path | None,
    progress: ProbeProgress,
) -> bool:
    """Run the exec probe until it passes (True) or ``readiness.timeout`` runs out (False, the
    reason in ``progress``)."""
    with anyio.move_on_after(readiness.timeout):
        await _probe_exec(
            command,
            port=port,
            deadline=deadline,
            interval=readiness.interval,
            reaper=reaper,
            env=env,
            cwd=cwd,
            progress=progress,
        )
        return True
    if not progress.reason:  # its first run had not finished
        progress.reason = f"`{' '.join(command)}` did not finish within {readiness.timeout:g}s"
    return False


async def _wait_http(
    readiness: ReadinessConfig,
    path: str,
    host: str,
    port: int,
    deadline: float,
    *,
    progress: ProbeProgress,
) -> str | None:
    """``wait_ready`` for an http probe: None once ready, else why not when the timeout came."""
    url = probe_url(host, port, path)
    unanswered = f"GET {url}: no response"
    progress.reason = unanswered
    with anyio.move_on_after(readiness.timeout):
        await _probe_http(url, deadline, readiness.interval, progress)
        return None
    since = progress.attempt_since
    # The timeout came first: the attempt under way hung, unless it had just begun (less than
    # an interval ago) after one that got an answer, which says more.
    if since is not None and (
        progress.reason == unanswered or anyio.current_time() - since >= readiness.interval
    ):
        return f"GET {url}: {_no_response(since)}"
    return progress.reason
