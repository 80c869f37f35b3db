"""Readiness probes against real worker processes serving on a socket bound by the test."""

from __future__ import annotations

import array
import contextlib
import gc
import os
import re
import signal
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import httpx  # noqa: F401  the http probe imports it lazily: not within a test's short timeout
import psutil
import pytest

from flipvisor.config import ReadinessConfig
from flipvisor.errors import ProbeFailed
from flipvisor.notify_socket import FLOOD_LIMIT, FLOOD_WINDOW, NotifySocket
from flipvisor.probe import probe_url, wait_ready
from flipvisor.reaper import Reaper
from flipvisor.spawn import Child, spawn_process
from tests.fixtures.dgram_queue import unix_dgram_capacity
from tests.reaping import running_reaper
from tests.waiting import await_until

# /health answers 503 to the first argv[1] requests, then 200; every status goes to argv[2].
# argv[3], optional: seconds each answer takes (a check of a database, a cold cache).
HTTP_SERVER = r"""
import http.server, socket, sys, time
failures, log = int(sys.argv[1]), sys.argv[2]
delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
seen = 0
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global seen
        time.sleep(delay)
        seen += 1
        code = 200 if self.path == "/health" and seen > failures else 503
        with open(log, "a") as f:
            f.write(f"{code}\n")
        body = b"ok\n" if code == 200 else b"warming up\nline two\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Health, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
server.serve_forever()
"""

# Holds the listening socket and never accepts: the kernel still completes every handshake.
SILENT_WORKER = "import time; time.sleep(60)"

# sd_notify sender. argv[1]: "ready", "status", "after:<file>" (READY=1 once <file> exists) or
# "child" (READY=1 from a forked child). argv[2], optional: a file created once the message is sent.
NOTIFY_WORKER = r"""
import os, signal, socket, sys, time
def notify(message):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), os.environ["NOTIFY_SOCKET"])
    if len(sys.argv) > 2:
        open(sys.argv[2], "w").close()
mode = sys.argv[1]
if mode == "ready":
    notify("READY=1\nSTATUS=serving")
elif mode == "status":
    notify("STATUS=loading model")
elif mode.startswith("after:"):
    deadline = time.monotonic() + 30
    while not os.path.exists(mode[6:]) and time.monotonic() < deadline:
        time.sleep(0.01)
    notify("READY=1")
elif mode == "child":
    pid = os.fork()
    if pid == 0:
        notify("READY=1")
        time.sleep(60)
        os._exit(0)
    # The group gets SIGTERM at once: collect the child so it never lingers as an orphan.
    signal.signal(signal.SIGTERM, lambda *_: (os.waitpid(pid, 0), os._exit(0)))
time.sleep(60)
"""


@contextlib.contextmanager
def listening(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen(16)
        yield sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running(
    reaper: Reaper,
    script: str,
    *args: str,
    sock: socket.socket | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Child]:
    child = spawn_process(
        [sys.executable, "-c", script, *args],
        reaper=reaper,
        env={**os.environ, **(env or {})},
        listen_fd=sock.fileno() if sock is not None else None,
    )
    try:
        yield child
    finally:
        await child.stop(signal.SIGTERM, timeout=5)
        child.close()


def readiness(**kwargs: object) -> ReadinessConfig:
    return ReadinessConfig.model_validate({"interval": 0.05, **kwargs})


async def probe(
    config: ReadinessConfig,
    reaper: Reaper,
    port: int,
    *,
    host: str = "127.0.0.1",
    notify: NotifySocket | None = None,
    pids: set[int] | None = None,
    numprocs: int = 1,
    env: dict[str, str] | None = None,
) -> None:
    failure: Exception | None = None
    async with anyio.create_task_group() as generation:
        if notify is not None:  # read by its generation, as ``Generation.run`` does
            generation.start_soon(notify.read, lambda: set(pids or ()))
        try:
            await wait_ready(
                config,
                host=host,
                port=port,
                reaper=reaper,
                env=env if env is not None else dict(os.environ),
                cwd=None,
                notify=notify,
                worker_pids=lambda: set(pids or ()),
                numprocs=numprocs,
            )
        except Exception as exc:  # raised after the group, so that it is not wrapped in one
            failure = exc
        generation.cancel_scope.cancel()
    if failure is not None:
        raise failure


def answers(port: int) -> bool:
    """Whether something answers HTTP on ``port`` (any status)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
            return True
    except urllib.error.HTTPError as status:
        status.close()
        return True
    except OSError:
        return False


def tcp_connections_to(port: int) -> list[object]:
    return [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr[1] == port]


# --- http ---------------------------------------------------------------------------------------


async def test_http_ready_after_a_few_503s(tmp_path: Path) -> None:
    statuses = tmp_path / "statuses"
    async with running_reaper() as reaper:
        with listening() as sock:
            async with running(reaper, HTTP_SERVER, "3", str(statuses), sock=sock):
                with anyio.fail_after(10):
                    await probe(readiness(http="/health", timeout=8), reaper, port_of(sock))
    assert statuses.read_text().split() == ["503", "503", "503", "200"]


async def test_http_never_ready_fails_with_the_last_status(tmp_path: Path) -> None:
    async with running_reaper() as reaper:
        with listening() as sock:
            port = port_of(sock)
            async with running(reaper, HTTP_SERVER, "1000000", str(tmp_path / "s"), sock=sock):
                # Answering before the probe starts: its 0.8 s are not spent on the server's
                # start-up, which a loaded machine can make longer than that (no status then).
                await await_until(
                    lambda: anyio.to_thread.run_sync(answers, port), message="the server"
                )
                started = time.monotonic()
                with pytest.raises(ProbeFailed) as failed:
                    await probe(readiness(http="/health", timeout=0.8), reaper, port)
    assert time.monotonic() - started == pytest.approx(0.8, abs=0.5)
    assert f"GET http://127.0.0.1:{port}/health: 503 Service Unavailable: warming up" in str(
        failed.value
    )
    assert "not ready after 0.8s" in str(failed.value)
    assert (tmp_path / "s").read_text().split()[0] == "503"


async def test_http_worker_that_never_answers_times_out() -> None:
    # The socket accepts connections (the kernel does), but no worker ever answers: not ready.
    async with running_reaper() as reaper:
        with listening() as sock:
            async with running(reaper, SILENT_WORKER, sock=sock):
                with pytest.raises(ProbeFailed, match="no response"):
                    await probe(readiness(http="/health", timeout=0.5), reaper, port_of(sock))
            assert not tcp_connections_to(port_of(sock))


async def test_a_slow_health_check_passes_within_readiness_timeout() -> None:
    """An attempt may take what is left of readiness.timeout: a fixed 2 s per attempt failed a
    /health that takes 2.5 s, whatever the timeout."""
    async with running_reaper() as reaper:
        with listening() as sock:
            async with running(reaper, HTTP_SERVER, "0", os.devnull, "2.5", sock=sock):
                with anyio.fail_after(30):
                    await probe(readiness(http="/health", timeout=20), reaper, port_of(sock))


async def test_a_health_check_slower_than_the_timeout_says_it_got_no_response() -> None:
    async with running_reaper() as reaper:
        with listening() as sock:
            async with running(reaper, HTTP_SERVER, "0", os.devnull, "60", sock=sock):
                with pytest.raises(ProbeFailed) as failed:
                    await probe(readiness(http="/health", timeout=1), reaper, port_of(sock))
    assert re.search(
        r"not ready after 1s: GET http://127\.0\.0\.1:\d+/health: no response within "
        r"[01]\.\ds \(the rest of readiness\.timeout\)$",
        str(failed.value),
    ), str(failed.value)


async def test_http_connection_refused() -> None:
    with listening() as sock:
        port = port_of(sock)  # closed on exit: nothing listens on it any more
    async with running_reaper() as reaper:
        with pytest.raises(ProbeFailed) as failed:
            await probe(readiness(http="/health", timeout=0.3), reaper, port)
    assert f"GET http://127.0.0.1:{port}/health: connection refused" in str(failed.value)


async def test_http_probe_over_ipv6(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        try:
            sock = stack.enter_context(listening("::1"))
        except OSError:
            pytest.skip("::1 is not available")
        async with (
            running_reaper() as reaper,
            running(reaper, HTTP_SERVER, "0", str(tmp_path / "s"), sock=sock),
        ):
            config = readiness(http="/health", timeout=8)
            with anyio.fail_after(10):
                await probe(config, reaper, port_of(sock), host="::1")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080/health"),
        ("0.0.0.0", "http://127.0.0.1:8080/health"),
        ("::1", "http://[::1]:8080/health"),
        ("::", "http://[::1]:8080/health"),
        ("fe80::1", "http://[fe80::1]:8080/health"),
    ],
)
def test_probe_url(host: str, url: str) -> None:
    assert probe_url(host, 8080, "/health") == url


async def test_http_probe_cancelled_mid_request_leaves_no_connection() -> None:
    async with running_reaper() as reaper:
        with listening() as sock:
            async with running(reaper, SILENT_WORKER, sock=sock):
                config = readiness(http="/health", timeout=10)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(probe, config, reaper, port_of(sock))
                    # Cancel while the request is in flight on an open connection.
                    await await_until(_async(lambda: bool(tcp_connections_to(port_of(sock)))))
                    tg.cancel_scope.cancel()
                assert not tcp_connections_to(port_of(sock))
                gc.collect()  # an unclosed socket would warn (an error here) when collected


# --- exec ---------------------------------------------------------------------------------------


async def test_exec_ok() -> None:
    async with running_reaper() as reaper:
        with anyio.fail_after(10):
            await probe(readiness(exec=[sys.executable, "-c", "pass"], timeout=8), reaper, 1234)


async def test_exec_retried_until_it_passes(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]);"
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1));"
        "sys.exit(0 if n >= 2 else 1)"
    )
    async with running_reaper() as reaper:
        with anyio.fail_after(10):
            config = readiness(exec=[sys.executable, "-c", script, str(counter)], timeout=8)
            await probe(config, reaper, 1234)
    assert counter.read_text() == "xxx"


async def test_exec_failing_reports_its_output() -> None:
    # sh, not Python: its start-up fits in the 0.5 s on a loaded machine too (else the probe
    # times out before the command ever answered).
    script = "echo 'database not reachable'; exit 3"
    async with running_reaper() as reaper:
        with pytest.raises(ProbeFailed) as failed:
            await probe(readiness(exec=["sh", "-c", script], timeout=0.5), reaper, 1234)
    assert "exited with status 3: database not reachable" in str(failed.value)


async def test_exec_sees_port_in_env_and_argv() -> None:
    script = (
        "import os, sys; print(os.environ['PORT'], sys.argv[1]);"
        "sys.exit(0 if os.environ['PORT'] == sys.argv[1] == '4321' else 1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    async with running_reaper() as reaper:
        with anyio.fail_after(10):
            config = readiness(exec=[sys.executable, "-c", script, "{port}"], timeout=8)
            await probe(config, reaper, 4321, env=env)


async def test_exec_that_hangs_is_killed_at_the_timeout() -> None:
    before = children()
    async with running_reaper() as reaper:
        started = time.monotonic()
        config = readiness(exec=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
        with pytest.raises(
            ProbeFailed, match=r"^not ready after 0\.5s: `.*` did not finish within 0\.5s$"
        ):
            await probe(config, reaper, 1234)
        assert time.monotonic() - started < 3
        assert not new_children(before)


async def test_exec_missing_command_fails_at_once() -> None:
    async with running_reaper() as reaper:
        with anyio.fail_after(5), pytest.raises(ProbeFailed, match="cannot run"):
            await probe(readiness(exec=["no-such-check-command"], timeout=30), reaper, 1234)


async def test_exec_probe_cancelled_leaves_no_process() -> None:
    before = children()
    async with running_reaper() as reaper:
        config = readiness(exec=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe, config, reaper, 1234)
            await await_until(
                _async(lambda: bool(new_children(before))), message="the exec probe to run"
            )
            tg.cancel_scope.cancel()
        # run_command kills and reaps its child before the cancellation gets out.
        assert not new_children(before)


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children()}


def new_children(before: set[int]) -> set[int]:
    """Our children that were not there before (session fixtures' daemons may be running)."""
    return children() - before


# --- notify -------------------------------------------------------------------------------------


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "n.sock")
    yield sock
    sock.close()
    assert not sock.path.exists()


def notify_env(notify: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(notify.path)}


async def test_notify_requires_every_worker(tmp_path: Path, notify: NotifySocket) -> None:
    trigger = tmp_path / "go"
    env = notify_env(notify)
    done = anyio.Event()

    async def probe_then_flag(reaper: Reaper, pids: set[int]) -> None:
        config = readiness(notify=True, timeout=20)
        await probe(config, reaper, 1, notify=notify, pids=pids, numprocs=2)
        done.set()

    async with (
        running_reaper() as reaper,
        running(reaper, NOTIFY_WORKER, "ready", env=env) as first,
        running(reaper, NOTIFY_WORKER, f"after:{trigger}", env=env) as second,
    ):
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(probe_then_flag, reaper, {first.pid, second.pid})
                await await_until(_async(lambda: notify.ready_workers == {first.pid}))
                # The first READY=1 was handled, and the probe is still waiting for the second.
                assert not done.is_set()
                trigger.touch()
                await done.wait()
        assert notify.ready_workers == {first.pid, second.pid}
        assert notify.statuses == {first.pid: "serving"}


async def test_notify_times_out_with_the_workers_status(
    tmp_path: Path, notify: NotifySocket
) -> None:
    env = notify_env(notify)
    ready, sent = tmp_path / "ready", tmp_path / "sent"
    async with (
        running_reaper() as reaper,
        running(reaper, NOTIFY_WORKER, "ready", str(ready), env=env) as first,
        running(reaper, NOTIFY_WORKER, "status", str(sent), env=env) as second,
    ):
        # Both messages queued before the probe starts: its 0.5 s are not spent on the workers'
        # start-up, which a loaded machine can make longer than that.
        await await_until(_async(lambda: ready.exists() and sent.exists()))
        config = readiness(notify=True, timeout=0.5)
        with pytest.raises(ProbeFailed) as failed:
            await probe(config, reaper, 1, notify=notify, pids={first.pid, second.pid}, numprocs=2)
    assert "1 of 2 workers sent READY=1" in str(failed.value)
    assert f"pid {second.pid}: STATUS=loading model" in str(failed.value)


async def test_notify_from_a_non_worker_is_ignored(tmp_path: Path, notify: NotifySocket) -> None:
    env = notify_env(notify)
    sent = tmp_path / "sent"
    async with (
        running_reaper() as reaper,
        running(reaper, SILENT_WORKER, env=env) as worker,
        running(reaper, NOTIFY_WORKER, "ready", str(sent), env=env) as stray,
    ):
        await await_until(_async(sent.exists))  # queued before the probe starts
        with pytest.raises(ProbeFailed) as failed:
            config = readiness(notify=True, timeout=0.5)
            await probe(config, reaper, 1, notify=notify, pids={worker.pid})
    assert "0 of 1 workers sent READY=1" in str(failed.value)
    assert f"ignored pid {stray.pid} (not a worker of this generation)" in str(failed.value)
    assert not notify.ready_workers


async def test_notify_from_a_sender_gone_before_it_is_read_is_ignored(
    notify: NotifySocket,
) -> None:
    # A helper like `systemd-notify --ready` that exits at once cannot be traced to a worker.
    send = (
        "import os, socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"
        ".sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])"
    )
    async with running_reaper() as reaper:
        async with running(reaper, send, env=notify_env(notify)) as helper:
            with anyio.fail_after(10):
                assert await helper.wait() == 0
        # Had it been alive, it would count: it descends from this process, named as the worker.
        with pytest.raises(ProbeFailed) as failed:
            config = readiness(notify=True, timeout=0.3)
            await probe(config, reaper, 1, notify=notify, pids={os.getpid()})
    assert f"ignored pid {helper.pid} (it exited before it could be identified)" in str(
        failed.value
    )


async def test_notify_from_a_workers_child_counts_for_the_worker(notify: NotifySocket) -> None:
    async with (
        running_reaper() as reaper,
        running(reaper, NOTIFY_WORKER, "child", env=notify_env(notify)) as worker,
    ):
        with anyio.fail_after(10):
            config = readiness(notify=True, timeout=8)
            await probe(config, reaper, 1, notify=notify, pids={worker.pid})
        assert notify.ready_workers == {worker.pid}


# Sends STATUS=1 .. STATUS=<argv[1]> through one blocking datagram socket (as sd_notify sends),
# as fast as it can, then exits.
STATUS_FLOOD = r"""
import os, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    for sent in range(1, int(sys.argv[1]) + 1):
        s.sendto(f"STATUS={sent}".encode(), os.environ["NOTIFY_SOCKET"])
"""


async def test_notify_read_slows_a_flood_down_without_stopping_it(notify: NotifySocket) -> None:
    # Past what the queue takes in (measured: the sysctl's qlen plus one, or less), the sender
    # goes on only as fast as the socket is read: at most FLOOD_LIMIT datagrams a window. Four
    # windows' worth and one more need a fifth window, which starts 4 windows after the first.
    # Without the limit, the whole flood is read as fast as it is sent.
    messages = unix_dgram_capacity() + 4 * FLOOD_LIMIT + 1
    async with running_reaper() as reaper, anyio.create_task_group() as generation:
        began = anyio.current_time()
        generation.start_soon(notify.read, set)
        async with running(reaper, STATUS_FLOOD, str(messages), env=notify_env(notify)) as flood:
            with anyio.fail_after(30):
                assert await flood.wait() == 0  # slowed down, never stopped
            took = anyio.current_time() - began
            # What it left in the queue is read too, in the windows after.
            await await_until(_async(lambda: notify.statuses.get(flood.pid) == str(messages)))
        generation.cancel_scope.cancel()
    assert took >= 4 * FLOOD_WINDOW * 0.99, f"{messages} datagrams read in {took:.3f}s"


async def test_notify_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stale:
        stale.bind(str(path))  # a socket file left behind by a dead supervisor
    notify = NotifySocket(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        notify.close()
    assert not path.exists()
    notify.close()  # twice is fine
    with pytest.raises(ProbeFailed, match="shorter state_dir"):
        NotifySocket(tmp_path / ("x" * 120))


async def test_notify_closes_fds_a_sender_attaches(notify: NotifySocket) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendmsg(
            [b"FDSTORE=1\nREADY=1"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [devnull]).tobytes())],
            0,
            str(notify.path),
        )
    before = set(os.listdir("/proc/self/fd"))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as generation:
            # This process is the sender: count it as the worker.
            generation.start_soon(notify.read, lambda: {os.getpid()})
            await notify.wait_ready(lambda: {os.getpid()}, 1)
            generation.cancel_scope.cancel()
    assert set(os.listdir("/proc/self/fd")) <= before
    os.close(devnull)


async def test_notify_close_wakes_a_waiter(notify: NotifySocket) -> None:
    with anyio.fail_after(5), pytest.RaisesGroup(anyio.ClosedResourceError):
        async with anyio.create_task_group() as tg:
            tg.start_soon(notify.wait_ready, lambda: {1}, 1)
            await anyio.wait_all_tasks_blocked()  # the waiter is parked on the socket
            notify.close()


async def test_notify_probe_cancelled(notify: NotifySocket) -> None:
    async with running_reaper() as reaper:
        with anyio.move_on_after(0.2) as scope:
            config = readiness(notify=True, timeout=10)
            await probe(config, reaper, 1, notify=notify, pids={1})
    assert scope.cancelled_caught


def _async(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


async def test_notify_read_logs_an_unexpected_error_and_reads_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``read`` runs in the generation's task group for its whole life: an exception out of it
    cancelled every worker of a serving generation, with no drain. Here the generation's
    ``pids`` (our seam) fails at the first READY=1: logged, with the generation, and the next
    READY=1 is read and counts."""
    notify = NotifySocket(tmp_path / "n.sock", owner="program=web generation=3")
    calls = 0

    def pids() -> set[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the workers could not be listed")
        return {os.getpid()}

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"READY=1", str(notify.path))
            sender.sendto(b"READY=1", str(notify.path))
        with anyio.fail_after(5):
            async with anyio.create_task_group() as generation:
                generation.start_soon(notify.read, pids)
                await notify.wait_ready(lambda: {os.getpid()}, 1)
                generation.cancel_scope.cancel()
    finally:
        notify.close()
    assert calls >= 2
    assert "program=web generation=3: unexpected error handling its datagrams" in caplog.text
    assert "the workers could not be listed" in caplog.text
