"""The control socket end to end with a fake dispatcher: permissions, one server per path, stale
files, clients that misbehave or vanish, and the blocking client's errors."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from anyio.abc import SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from flipvisor import control, lasting
from flipvisor.client import call, converse
from flipvisor.control import AlreadyRunning, ControlServer, Send, peer_allowed
from flipvisor.errors import EXIT_USAGE, ControlUnreachable
from flipvisor.protocol import MAX_LINE, Request, result
from flipvisor.runrecord import remove_record, write_record
from tests.clock import step_loop_clock
from tests.waiting import await_until, holds

DEADLINE = 10.0


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """A socket path short enough for sun_path (pytest's tmp_path may not be)."""
    with tempfile.TemporaryDirectory(prefix="fvc-", dir="/tmp") as folder:
        yield Path(folder) / "flipvisor.sock"


def exists(path: Path) -> bool:
    return path.exists()


def remove(path: Path) -> None:
    """What a temp cleaner, or an `rm` by hand, does to the socket file."""
    path.unlink()


def folder_instead(path: Path) -> None:
    """The socket file replaced by a folder (a container's bind mount of its path made while
    no socket was there)."""
    path.unlink()
    path.mkdir()


class FakeSupervisor:
    """A dispatcher that records requests and answers with progress then a result."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.send_failures: list[BaseException] = []
        self.send_failed = anyio.Event()
        self.progress = 2
        self.pause = 0.0

    async def dispatch(self, request: Request, send: Send) -> dict[str, Any]:
        self.requests.append(request)
        if request.command == "events":  # an endless stream, until the client goes away
            index = 0
            try:
                while True:
                    await send({"type": "event", "index": index})
                    index += 1
                    await anyio.sleep(0.01)
            except BaseException as exc:
                self.send_failures.append(exc)
                self.send_failed.set()
                raise
        if request.command == "shutdown":
            raise RuntimeError("a bug in the dispatcher")
        for step in range(self.progress):
            await send({"type": "progress", "step": step})
        return result({"command": request.command, "program": request.program})


@asynccontextmanager
async def serving(path: Path, dispatch: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, dispatch)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def ask(path: Path, request: Request) -> list[dict[str, Any]]:
    """The whole answer, read with the real (blocking) client in a worker thread."""
    with anyio.fail_after(DEADLINE):
        return await anyio.to_thread.run_sync(lambda: list(converse(path, request, timeout=5)))


async def raw_exchange(path: Path, data: bytes) -> bytes:
    """Send raw bytes (then EOF) and return whatever comes back before the server closes."""
    with anyio.fail_after(DEADLINE):
        async with await anyio.connect_unix(path) as stream:
            await stream.send(data)
            await stream.send_eof()
            received = b""
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


async def test_round_trip_progress_then_result(sock_path: Path) -> None:
    fake = FakeSupervisor()
    async with serving(sock_path, fake.dispatch):
        answer = await ask(sock_path, Request("flip", "web", {"timeout": 5}))
        final = await anyio.to_thread.run_sync(lambda: call(sock_path, Request("status")))
    assert answer == [
        {"type": "progress", "step": 0},
        {"type": "progress", "step": 1},
        {
            "type": "result",
            "ok": True,
            "exit_code": 0,
            "result": {"command": "flip", "program": "web"},
            "error": None,
        },
    ]
    assert final["type"] == "result"
    assert final["result"] == {"command": "status", "program": None}
    assert fake.requests == [Request("flip", "web", {"timeout": 5}), Request("status")]


async def test_socket_is_0600_and_removed_after(sock_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive caller: the server must not rely on ours
    try:
        async with serving(sock_path, FakeSupervisor().dispatch):
            mode = os.stat(sock_path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
    finally:
        os.umask(old_umask)
    assert not exists(sock_path)


async def test_a_second_server_on_the_same_path_is_refused(sock_path: Path) -> None:
    first = FakeSupervisor()
    async with serving(sock_path, first.dispatch):
        second = ControlServer(sock_path, FakeSupervisor().dispatch)
        with pytest.raises(AlreadyRunning, match=str(sock_path)), anyio.fail_after(DEADLINE):
            await second.serve()
        assert AlreadyRunning.exit_code == EXIT_USAGE
        # The refused one did not take the socket file away from the live one.
        answer = await ask(sock_path, Request("status"))
        assert answer[-1]["ok"]
    assert len(first.requests) == 1


async def test_a_stale_socket_file_is_replaced(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))  # a supervisor that died without cleaning up
    dead.close()
    assert exists(sock_path)
    async with serving(sock_path, FakeSupervisor().dispatch):
        answer = await ask(sock_path, Request("status"))
    assert answer[-1]["ok"]


async def next_event(reader: BufferedByteReceiveStream) -> dict[str, Any]:
    with anyio.fail_after(DEADLINE):
        message: dict[str, Any] = json.loads(await reader.receive_until(b"\n", MAX_LINE))
    return message


async def test_a_removed_socket_file_is_listened_on_again_at_relisten(sock_path: Path) -> None:
    """SIGHUP's part: the socket file removed (a temp cleaner, an `rm`), nobody can connect
    until the server binds the path again; a conversation under way goes on meanwhile."""
    fake = FakeSupervisor()
    async with serving(sock_path, fake.dispatch) as server:
        assert not server.relisten()  # its own file is there: nothing to do
        async with await anyio.connect_unix(sock_path) as follower:
            await follower.send(Request("events").encode())
            reader = BufferedByteReceiveStream(follower)
            assert (await next_event(reader))["type"] == "event"
            remove(sock_path)
            with pytest.raises(ControlUnreachable, match="no supervisor is listening"):
                await ask(sock_path, Request("status"))

            assert server.relisten()
            answer = await wait_for_answer(sock_path)
            assert answer[-1]["ok"]
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
            first = (await next_event(reader))["index"]
            assert (await next_event(reader))["index"] == first + 1  # the follower goes on
        assert not server.relisten()
    assert not exists(sock_path)


async def wait_for_answer(path: Path) -> list[dict[str, Any]]:
    """The answer to a status, once the server listens on ``path`` (within DEADLINE)."""
    with anyio.fail_after(DEADLINE):
        while True:
            try:
                return await ask(path, Request("status"))
            except ControlUnreachable:
                await anyio.sleep(0.01)


async def test_relisten_leaves_the_path_to_a_server_that_took_it(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another supervisor started on the path while the file was gone: the first one keeps
    away from it at relisten, and at its exit leaves the other's file in place. Its warning does
    not name its own config file (its own record names the path too) as the one to stop."""
    first, second = FakeSupervisor(), FakeSupervisor()
    server = ControlServer(sock_path, first.dispatch)
    own_config = sock_path.with_name("own.yaml")
    own_config.touch()
    first_scope, first_gone = anyio.CancelScope(), anyio.Event()

    async def serve_first(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with first_scope:
            await server.serve(task_status=task_status)
        first_gone.set()

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(serve_first)
        own_record = write_record(own_config, sock_path)  # what `run` records once it listens
        remove(sock_path)
        async with serving(sock_path, second.dispatch):
            assert server.relisten()
            await await_until(lambda: holds("cannot listen on the control socket" in caplog.text))
            assert "a supervisor not recorded as this user's listens there now" in caplog.text
            assert f"pid {os.getpid()}" in caplog.text and str(own_config) not in caplog.text
            assert (await ask(sock_path, Request("status")))[-1]["ok"]
            first_scope.cancel()
            with anyio.fail_after(DEADLINE):
                await first_gone.wait()
            assert (await ask(sock_path, Request("status")))[-1]["ok"]
    remove_record(own_record)
    assert (len(first.requests), len(second.requests)) == (0, 2)


async def test_relisten_changes_no_umask_the_other_tasks_see(sock_path: Path) -> None:
    """The socket file is made 0600 without a umask: a umask is the whole process's, and a
    worker that a task started meanwhile (the reload the same SIGHUP starts, a restart) kept
    0177 for life."""
    fake = FakeSupervisor()
    seen: set[int] = set()
    relistened = anyio.Event()

    async def watch_umask() -> None:
        while not relistened.is_set():
            mask = os.umask(0o022)
            os.umask(mask)
            seen.add(mask)
            await anyio.lowlevel.checkpoint()

    before = os.umask(0o022)
    try:
        async with serving(sock_path, fake.dispatch) as server, anyio.create_task_group() as tg:
            tg.start_soon(watch_umask)
            for _ in range(5):
                remove(sock_path)
                assert server.relisten()
                assert (await wait_for_answer(sock_path))[-1]["ok"]
                assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
            relistened.set()
    finally:
        os.umask(before)
    assert seen == {0o022}


async def test_a_server_bound_at_the_path_meanwhile_is_left_alone_at_relisten(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another supervisor binds the path after the relisten began (another host's `run`, a
    race): it keeps its socket file, and at this one's exit too (the file recorded as bound is
    this one's, not the other's)."""
    fake = FakeSupervisor()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bind_aside = control._bind_aside

    def bound_meanwhile(folder: Path) -> tuple[socket.socket, Path]:
        aside = bind_aside(folder)
        other.bind(str(sock_path))  # between this server's bind and its claim of the path
        other.listen()
        return aside

    try:
        async with serving(sock_path, fake.dispatch) as server:
            remove(sock_path)
            monkeypatch.setattr(control, "_bind_aside", bound_meanwhile)
            assert server.relisten()
            await await_until(lambda: holds("cannot listen on the control socket" in caplog.text))
            assert [name for name in os.listdir(sock_path.parent)] == [sock_path.name]
            theirs = os.stat(sock_path).st_ino
        assert os.stat(sock_path).st_ino == theirs  # left in place at this one's exit
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(sock_path))  # theirs still answers
    finally:
        other.close()
    assert fake.requests == []


async def test_malformed_and_unknown_requests_are_answered(sock_path: Path) -> None:
    fake = FakeSupervisor()
    async with serving(sock_path, fake.dispatch):
        garbage = await raw_exchange(sock_path, b"this is not json\n")
        unknown = await raw_exchange(sock_path, b'{"command": "explode"}\n')
        answer = await ask(sock_path, Request("status"))
    for raw, words in ((garbage, "malformed control message"), (unknown, "unknown command")):
        lines = raw.splitlines()
        assert len(lines) == 1
        message = json.loads(lines[0])
        assert message["type"] == "result"
        assert message["ok"] is False
        assert message["exit_code"] == EXIT_USAGE
        assert words in message["error"]
    assert answer[-1]["ok"], "still serving"
    assert fake.requests == [Request("status")], "bad requests never reach the dispatcher"


async def test_clients_that_say_nothing_or_too_much_do_not_hurt(sock_path: Path) -> None:
    fake = FakeSupervisor()
    async with serving(sock_path, fake.dispatch):
        assert await raw_exchange(sock_path, b"") == b""
        assert await raw_exchange(sock_path, b'{"command": "sta') == b""  # EOF mid-line
        too_long = await raw_exchange(sock_path, b"x" * (MAX_LINE + 10))
        answer = await ask(sock_path, Request("status"))
    assert answer[-1]["ok"]
    assert f"request longer than {MAX_LINE} bytes".encode() in too_long  # said, then closed
    assert fake.requests == [Request("status")]


async def test_a_client_that_does_not_finish_its_request_in_time_is_told_and_closed(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request line must come within REQUEST_TIMEOUT; the answer, an endless `events` here,
    has no deadline."""
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.3)
    fake = FakeSupervisor()
    async with serving(sock_path, fake.dispatch):
        async with await anyio.connect_unix(sock_path) as silent:
            await silent.send(b'{"command": "sta')  # and nothing more, the connection held
            with anyio.fail_after(DEADLINE):
                told = await BufferedByteReceiveStream(silent).receive_until(b"\n", MAX_LINE)
                with pytest.raises(anyio.EndOfStream):
                    await silent.receive()
        message = json.loads(told)
        assert message["ok"] is False
        assert message["exit_code"] == EXIT_USAGE
        assert "no complete request line within 0.3s" in message["error"]
        async with await anyio.connect_unix(sock_path) as follower:
            await follower.send(Request("events").encode())
            reader = BufferedByteReceiveStream(follower)
            # Events keep coming for longer than the request's deadline.
            going_on_since = anyio.current_time()
            while anyio.current_time() - going_on_since < 0.6:
                await next_event(reader)
    assert fake.requests == [Request("events")]


async def test_a_client_leaving_mid_answer_does_not_crash_the_server(sock_path: Path) -> None:
    fake = FakeSupervisor()
    async with serving(sock_path, fake.dispatch):

        def read_one_then_leave() -> dict[str, Any]:
            answer = converse(sock_path, Request("events"), timeout=5)
            first = next(answer)
            assert isinstance(answer, Generator)
            answer.close()  # closes the socket with the stream still going
            return first

        with anyio.fail_after(DEADLINE):
            first = await anyio.to_thread.run_sync(read_one_then_leave)
        assert first == {"type": "event", "index": 0}

        with anyio.fail_after(DEADLINE):
            await fake.send_failed.wait()
        answer = await ask(sock_path, Request("status"))
    assert answer[-1]["ok"], "the server outlived the vanished client"


async def test_an_unhashable_command_does_not_crash_the_server(sock_path: Path) -> None:
    async with serving(sock_path, FakeSupervisor().dispatch):
        raw = await raw_exchange(sock_path, b'{"command": ["status"]}\n')
        answer = await ask(sock_path, Request("status"))
        assert answer[-1]["ok"], "still serving"
        assert b"unknown command" in raw


async def test_a_dispatch_bug_fails_only_its_request(sock_path: Path) -> None:
    async with serving(sock_path, FakeSupervisor().dispatch):
        answer = await ask(sock_path, Request("shutdown"))  # the fake raises RuntimeError
        assert answer[-1]["ok"] is False
        again = await ask(sock_path, Request("status"))
        assert again[-1]["ok"]


async def test_an_answer_that_cannot_be_encoded_fails_only_its_request(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Outside ``dispatch``, its answer's encoding failed the conversations' task group: the
    # control socket ended, and the supervisor drained every program with it. Then it closed
    # the connection unanswered: the client said the supervisor hung up, not why.
    async def dispatch(request: Request, send: Send) -> dict[str, Any]:
        if request.command == "stop":
            return result({"not json": {1, 2}})  # a set: json cannot encode it
        return result({"command": request.command})

    async with serving(sock_path, dispatch):
        answer = await ask(sock_path, Request("stop", "web"))
        assert answer[-1]["ok"] is False
        assert "internal error: the answer cannot be encoded" in answer[-1]["error"]
        again = await ask(sock_path, Request("status"))
        assert again[-1]["ok"], "still serving"
    assert "a control answer cannot be encoded" in caplog.text


class ListenerFailing:
    """Our ``serve_listener`` seam: the first ``times`` listeners serve until ``fail`` is set (at
    once if it is set already), then fail with EBADF (the listener itself broken); ``closing``,
    if given, is called as such a failed listener is closed (before the close itself awaits);
    ``replaced`` is set once the next one serves (the path bound again)."""

    def __init__(self, times: int = 1) -> None:
        self.real = control.serve_listener
        self.times = times
        self.calls = 0
        self.fail = anyio.Event()
        self.replaced = anyio.Event()
        self.closing: Callable[[], None] | None = None

    def _on_close(self, listener: SocketListener) -> None:
        """Call ``closing`` as ``listener`` is closed, then close it."""
        real_close, closing = listener.aclose, self.closing
        if closing is None:
            return

        async def aclose() -> None:
            closing()
            await real_close()

        listener.aclose = aclose  # type: ignore[method-assign]

    async def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls <= self.times:
            self._on_close(args[0])
            async with anyio.create_task_group() as served:
                served.start_soon(partial(self.real, *args, **kwargs))
                await self.fail.wait()
                served.cancel_scope.cancel()
            raise OSError(errno.EBADF, "Bad file descriptor")
        self.replaced.set()
        await self.real(*args, **kwargs)


async def _answers_once_replaced(sock_path: Path, failing: ListenerFailing) -> None:
    """Serve the control socket at ``sock_path`` until ``failing``'s failed listeners are
    replaced, then see that it answers."""
    async with serving(sock_path, FakeSupervisor().dispatch):
        with anyio.fail_after(DEADLINE):
            await failing.replaced.wait()
        answer = await ask(sock_path, Request("status"))
    assert answer[-1]["ok"]


async def test_the_control_socket_ending_is_listened_on_again(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # It drained every program and exited 1: the operator's one channel is given back instead.
    # A request under way meanwhile (a reload between its steps) goes on and is answered: when
    # run_lasting started the whole server again, it was cancelled with its connection.
    failing = ListenerFailing()
    request_began = anyio.Event()

    async def slow_dispatch(request: Request, send: Send) -> dict[str, Any]:
        if request.command == "reload":
            request_began.set()
            await send({"type": "progress", "step": 0})
            with anyio.fail_after(DEADLINE):
                await failing.replaced.wait()
        return result({"command": request.command})

    monkeypatch.setattr(control, "serve_listener", failing)
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 0.05)
    server = ControlServer(sock_path, slow_dispatch)
    reloading: list[list[dict[str, Any]]] = []

    async def reload() -> None:
        reloading.append(await ask(sock_path, Request("reload")))

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(lasting.run_lasting, "the control socket", server.serve)
            tg.start_soon(reload)
            await request_began.wait()
            failing.fail.set()
            await failing.replaced.wait()
        answer = await ask(sock_path, Request("status"))
        await await_until(lambda: holds(reloading), DEADLINE)
        tg.cancel_scope.cancel()
    assert answer[-1]["ok"]
    assert reloading[0][-1] == result({"command": "reload"}), "answered, not cut"
    assert (
        f"the control socket {sock_path} failed: OSError: [Errno 9] Bad file descriptor"
        in caplog.text
    )


async def test_a_failed_listener_is_replaced_at_once_without_a_sighup(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A pause there left a stale socket file: another `run` on the state_dir found nothing
    # answering and took the path over.
    failing = ListenerFailing()
    failing.fail.set()
    monkeypatch.setattr(control, "serve_listener", failing)
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 3600.0)
    await _answers_once_replaced(sock_path, failing)
    assert "Bad file descriptor; listening on it again now" in caplog.text
    assert "listening on it again in" not in caplog.text


async def test_a_listener_failing_after_30_s_served_is_replaced_at_once_again(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Not one more failure in a row: after half a minute served, a failure is a first one
    # again, its listener replaced at once (a pause leaves a stale socket file meanwhile).
    failing = ListenerFailing(times=3)
    failing.fail.set()
    real_failing = failing.__call__

    async def serves_30_s_the_third_time(*args: Any, **kwargs: Any) -> None:
        if failing.calls == 2:
            step_loop_clock(monkeypatch, lasting.LONGEST_PAUSE)
        await real_failing(*args, **kwargs)

    monkeypatch.setattr(control, "serve_listener", serves_30_s_the_third_time)
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 0.05)
    await _answers_once_replaced(sock_path, failing)
    again = [
        r.getMessage().rpartition("; ")[2] for r in caplog.records if "failed:" in r.getMessage()
    ]
    assert [each.split(" (")[0] for each in again] == [
        "listening on it again now",
        "listening on it again in 0.05 s",
        "listening on it again now",
    ]


async def test_sighup_ends_the_pause_before_listening_again(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The CLI tells the user to send SIGHUP when the socket is gone: during the pause after a
    # listener failed again (the one that replaced the failed one) it did nothing, up to 30 s.
    failing = ListenerFailing(times=2)
    failing.fail.set()
    monkeypatch.setattr(control, "serve_listener", failing)
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 3600.0)
    async with serving(sock_path, FakeSupervisor().dispatch) as server:
        pausing = "listening on it again in 3600 s"
        await await_until(lambda: holds(pausing in caplog.text), DEADLINE)
        assert server.relisten()
        with anyio.fail_after(DEADLINE):
            await failing.replaced.wait()
        answer = await ask(sock_path, Request("status"))
    assert answer[-1]["ok"]


async def test_a_sighup_while_the_failed_listener_closes_ends_the_pause_too(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the failure and the pause (the failed listener's close awaits) neither the
    # listener nor the pause could be cancelled: relisten said no, and the pause ran in full.
    failing = ListenerFailing(times=2)
    failing.fail.set()
    monkeypatch.setattr(control, "serve_listener", failing)
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 3600.0)
    said: list[bool] = []

    def sighup() -> None:
        # The window itself: the failed listener closing (the second failure's: the first is
        # bound again at once, no pause to end).
        if failing.calls == 2:
            said.append(server.relisten())

    failing.closing = sighup
    async with serving(sock_path, FakeSupervisor().dispatch) as server:
        with anyio.fail_after(DEADLINE):
            await failing.replaced.wait()
        answer = await ask(sock_path, Request("status"))
    assert said == [True]
    assert answer[-1]["ok"]


async def test_a_sighup_after_a_failed_listener_was_replaced_listens_on_the_path_again(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SIGHUP ends a pause only while the failed listener is not replaced yet: once its
    # replacement serves, it is for a removed socket file again (it said yes to one, as if
    # ending a pause, and nobody could connect).
    failing = ListenerFailing()
    failing.fail.set()
    monkeypatch.setattr(control, "serve_listener", failing)
    async with serving(sock_path, FakeSupervisor().dispatch) as server:
        with anyio.fail_after(DEADLINE):
            await failing.replaced.wait()
        remove(sock_path)
        assert server.relisten()
        answer = await wait_for_answer(sock_path)
    assert answer[-1]["ok"]


async def test_a_path_that_cannot_be_bound_again_is_tried_after_growing_pauses(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The listener failed, and a folder was made at the path meanwhile: it is tried again at
    # once, then after a pause doubling at each try that fails (no spin on the event loop), and
    # listened on again once the path is free.
    failing = ListenerFailing()
    failing.fail.set()

    async def with_a_folder_put_there(*args: Any, **kwargs: Any) -> None:
        if failing.calls == 0:
            folder_instead(sock_path)
        await failing(*args, **kwargs)

    monkeypatch.setattr(control, "serve_listener", with_a_folder_put_there)
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 0.05)
    async with serving(sock_path, FakeSupervisor().dispatch):
        await await_until(lambda: holds("listening on it again in 0.2 s" in caplog.text), DEADLINE)
        await anyio.Path(sock_path).rmdir()
        with anyio.fail_after(DEADLINE):
            await failing.replaced.wait()
        answer = await ask(sock_path, Request("status"))
    assert answer[-1]["ok"]
    failed = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert "Bad file descriptor" in failed[0] and "UnusableStateFile" in failed[1]
    assert [each.rpartition("; ")[2].split(" (")[0] for each in failed][:4] == [
        "listening on it again now",
        "listening on it again in 0.05 s",
        "listening on it again in 0.1 s",
        "listening on it again in 0.2 s",
    ]


def test_peer_allowed() -> None:
    assert peer_allowed(os.getuid())
    assert peer_allowed(0)
    assert not peer_allowed(os.getuid() + 12345)


# -- the client ------------------------------------------------------------------------------


def test_converse_with_nothing_listening(sock_path: Path) -> None:
    with pytest.raises(ControlUnreachable, match="no supervisor is listening on") as info:
        list(converse(sock_path, Request("status"), timeout=5))
    assert str(sock_path) in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


def test_converse_with_a_stale_socket_file(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    with pytest.raises(ControlUnreachable, match="no supervisor is listening on") as info:
        call(sock_path, Request("status"), timeout=5)
    assert str(sock_path) in str(info.value)


@pytest.mark.parametrize("half_line", [b"", b'{"type": "res'], ids=["at-a-line-end", "mid-line"])
async def test_converse_when_the_server_hangs_up_without_a_result(
    sock_path: Path, half_line: bytes
) -> None:
    """Mid-line (it died while writing): the same "closed the connection", which `flip` turns
    into "how the flip ended is unknown", not a malformed message (review)."""

    async def hang_up(stream: SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b'{"type": "progress", "step": "spawn"}\n' + half_line)

    listener = await anyio.create_unix_listener(sock_path)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hang_up)
        messages: list[dict[str, Any]] = []

        def talk() -> None:
            for message in converse(sock_path, Request("flip", "web"), timeout=5):
                messages.append(message)

        with (
            pytest.raises(ControlUnreachable, match="closed the connection"),
            anyio.fail_after(DEADLINE),
        ):
            await anyio.to_thread.run_sync(talk)
        tg.cancel_scope.cancel()
    assert messages == [{"type": "progress", "step": "spawn"}]


def test_converse_with_a_server_that_never_answers_says_so(sock_path: Path) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with silent:
        silent.bind(str(sock_path))
        silent.listen()  # accepted by the kernel's backlog, never answered
        with pytest.raises(ControlUnreachable, match=r"did not answer within 0\.3 s") as info:
            call(sock_path, Request("status"), timeout=0.3)
    assert str(sock_path) in str(info.value)
