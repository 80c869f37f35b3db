"""The control socket: a unix stream socket (0600, in a 0700 state_dir) that accepts only its
owner's uid or root (checked with SO_PEERCRED), reads one request per connection and hands it
to the supervisor's dispatcher. The request line must come within REQUEST_TIMEOUT; the answer
takes as long as it needs. Accepts that fail for lack of fds are retried (``accepting.py``).

A socket file removed while the supervisor runs (by hand, by a temp cleaner) leaves it listening
on a file nobody can reach; SIGHUP (``ControlServer.relisten``) makes it listen on the path again,
unless another supervisor listens there by then. A listener that fails (an accept's EBADF, EINVAL)
is replaced at once (a pause there left a stale socket file, which another `run` on the state_dir
takes over); one that fails again within ``lasting.LONGEST_PAUSE`` (30 s), or a path that cannot
be bound, after a pause (``lasting.RestartPause``: 1 s, doubling to 30 s; SIGHUP cuts it short):
only the listener, the conversations under way (a reload, a revive, an ``events -f``) go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from .accepting import serve_listener
from .errors import EXIT_USAGE, FlipvisorError, is_own
from .file_identity import Identity, identity_of, unlink_if_ours
from .lasting import RestartPause, describe
from .protocol import MAX_LINE, ProtocolError, Request, decode_request, encode, result
from .runrecord import answers, listening_already, record_listening_on
from .state_files import UnusableStateFile, socket_path_problem

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128  # anyio's create_unix_listener default
# How long a client has to send its whole request line: the CLI sends it at once, as it
# connects. A client that sends nothing, or part of a line, and stays (a CLI stopped with ^Z, a
# wedged script, a `socat` left open) would otherwise hold an fd, a task and up to MAX_LINE of
# buffer for as long as it stays. Only the request: an answer (`events -f`, `logs -f`, a flip's
# progress) goes on as long as it needs.
REQUEST_TIMEOUT = 5.0

Send = Callable[[dict[str, Any]], Awaitable[None]]
Dispatch = Callable[[Request, Send], Awaitable[dict[str, Any]]]


class AlreadyRunning(FlipvisorError):
    """Another supervisor already answers on the control socket."""

    exit_code = EXIT_USAGE


def peer_uid(stream: SocketStream) -> int:
    """The uid of the process on the other end of a unix socket."""
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
    creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int) -> bool:
    """Only the supervisor's own user, or root."""
    return uid in (os.getuid(), 0)


# How long a probe of the socket path waits to connect (``runrecord.answers``): it runs on the
# event loop (at a re-listen, with conversations under way).
PROBE_TIMEOUT = 0.5


def _bind_aside(folder: Path) -> tuple[socket.socket, Path]:
    """A unix socket listening at a new temporary name in ``folder``, mode 0600.

    Bound with the process's umask, which is never changed: a change is process-wide, and the
    workers started meanwhile (a reload, a restart) kept it for life. Nobody can connect before
    ``listen`` (refused), and it is made 0600 before that (the state_dir is 0700 anyway). The
    name is as long as ``flipvisor.sock``: a state_dir short enough for one is for the other.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = folder / f".fv{secrets.token_hex(5)}.s"
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise
    return sock, temporary


def _link(source: Path, target: Path) -> bool:
    """Hard-link ``source`` to ``target``; False if something is at ``target`` (left alone)."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    return True


class ControlServer:
    """Serves the control socket until cancelled."""

    def __init__(self, path: Path, dispatch: Dispatch) -> None:
        self.path = path
        self.dispatch = dispatch
        self._active = 0  # conversations under way
        self._quiet: anyio.Event | None = None  # set when the last one ends, for wait_idle
        # A socket file was left behind: the previous supervisor was killed (SIGKILL, OOM).
        self.found_stale = False
        self._bound: Identity | None = None  # the socket file this one listens on
        self._accepting: anyio.CancelScope | None = None  # cancelled to listen again
        # Before listening again after the listener failed: at once, unless it is a failure in
        # a row (the socket file is stale meanwhile, the one guard against another `run` gone).
        # A SIGHUP (``relisten``) wakes it: the pause under way ends, or the next one, if it
        # comes while the failed listener is still closing.
        self._restarts = RestartPause(at_once_first=True)

    async def wait_idle(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until no conversation is under way (at shutdown:
        until the final answers, such as an ``events -f`` follower's, have been sent)."""
        with anyio.move_on_after(timeout):
            while self._active:
                self._quiet = anyio.Event()
                await self._quiet.wait()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (mode 0600) and serve connections, each in its own task; bind again when
        ``relisten`` says the socket file is gone.

        Raises:
            AlreadyRunning: another supervisor holds the socket.
            UnusableStateFile: something else than a socket is at the path.
        """
        listener, self.found_stale = await self._listen()
        try:
            # The conversations outlive a listener replaced (at SIGHUP, or after it failed): an
            # `events -f` follower, a flip's progress, a reload half done, go on.
            async with anyio.create_task_group() as conversations:
                task_status.started()
                while True:
                    listener = await self._serve_until_replaced(listener, conversations)
        finally:
            self._accepting = None
            # Not one another supervisor bound since ours went.
            unlink_if_ours(self.path, self._bound)
            with anyio.CancelScope(shield=True):
                await listener.aclose()  # closing a closed one again does nothing

    async def _serve_until_replaced(
        self, listener: SocketListener, conversations: anyio.abc.TaskGroup
    ) -> SocketListener:
        """Serve ``listener`` until ``relisten`` asks for a new one, or it fails; the listener
        to serve next."""
        self._restarts.serving()
        try:
            with anyio.CancelScope() as self._accepting:
                await serve_listener(
                    listener, self._handle, conversations, what=f"the control socket {self.path}"
                )
        except Exception as exc:  # the listener itself (EBADF, EINVAL), or a bug in accepting
            self._accepting = None
            pause = self._restarts.ended()  # before the close awaits: a SIGHUP then counts
            await listener.aclose()  # unusable: the path is bound anew
            return await self._listen_after(exc, pause)
        return await self._listen_again(listener)

    async def _listen_after(self, failure: Exception, pause: float) -> SocketListener:
        """A new listener on the path, after ``failure`` ended the one before: after ``pause``
        (0: at once, not a failure in a row), and while none can be made (the path taken by
        another supervisor, a folder made there, logged at each try) after a growing pause."""
        traced = not is_own(failure)  # a bug to trace, once
        while True:
            log.error(
                "the control socket %s failed: %s; listening on it again %s (the "
                "conversations under way and the programs go on)",
                self.path,
                describe(failure),
                f"in {pause:g} s" if pause else "now",
                exc_info=failure if traced else None,
            )
            traced = False  # a path that cannot be bound again (OSError) is a sentence
            await self._restarts.pause()
            try:
                listener, _replaced = await self._listen()
            except (FlipvisorError, OSError) as exc:
                failure = exc
                pause = self._restarts.ended()
                continue
            log.warning("listening on the control socket %s again", self.path)
            return listener  # serving it counts from now (``_serve_until_replaced``)

    def relisten(self) -> bool:
        """Listen on the path again if the socket file there is not the one bound (removed by
        hand or by a temp cleaner: nobody could connect), or now if it waits to after the
        listener failed; True if so. For SIGHUP (the CLI says to send it)."""
        if self._restarts.wake():  # the listener failed: it is not listened on again yet
            return True
        if self._accepting is None or identity_of(self.path) == self._bound:
            return False
        self._accepting.cancel()  # ``serve`` binds anew
        return True

    async def _listen(self) -> tuple[SocketListener, bool]:
        """A listener on the path, and whether a stale socket file (one nothing answers on: the
        supervisor before us did not exit cleanly) was replaced there.

        Bound at a temporary name, then hard-linked to the path: a link fails if anything is
        there, where binding the path itself (after an unlink, as anyio's listener does) could
        take it from another supervisor that bound it meanwhile, and record its file as ours.

        Raises:
            AlreadyRunning: another supervisor answers on the path.
            UnusableStateFile: something else than a socket is there.
            OSError: the path cannot be bound.
        """
        sock, temporary = _bind_aside(self.path.parent)
        try:
            bound = identity_of(temporary)  # the path's too, once linked
            replaced = self._link_into_place(temporary)
        except BaseException:
            sock.close()
            raise
        finally:
            temporary.unlink(missing_ok=True)
        self._bound = bound
        return await SocketListener.from_socket(sock), replaced

    def _link_into_place(self, temporary: Path) -> bool:
        """Link the socket bound at ``temporary`` to the path; whether a stale socket file was
        replaced there.

        Raises:
            AlreadyRunning: another supervisor answers on the path, or bound it meanwhile.
            UnusableStateFile: something else than a socket is there.
            OSError: the path cannot be linked.
        """
        if _link(temporary, self.path):
            return False
        self._remove_stale()
        if not _link(temporary, self.path):  # once: what is there now is left alone
            raise AlreadyRunning(self._taken_message())
        return True

    def _remove_stale(self) -> None:
        """Remove the socket file at the path: a stale one, that nothing answers on.

        Raises:
            UnusableStateFile: what is there is no socket (a folder, a FIFO, a symlink): not
                flipvisor's to remove.
            AlreadyRunning: another supervisor answers there.
        """
        if (why := socket_path_problem(self.path)) is not None:
            raise UnusableStateFile(why)
        if answers(self.path, PROBE_TIMEOUT):
            raise AlreadyRunning(self._taken_message())
        self.path.unlink(missing_ok=True)

    def _taken_message(self) -> str:
        """Why the path cannot be listened on: another supervisor answers there (named if
        recorded; not this process, whose record names the path too)."""
        other = record_listening_on(self.path, besides=os.getpid())
        if self._bound is None:  # starting: another config file's (``run`` refused this file's)
            return listening_already(self.path, other)
        # A re-listen: it was started there while this one's socket file was gone.
        who = (
            f"the supervisor of {other.config} (pid {other.pid})"
            if other is not None
            else "a supervisor not recorded as this user's"
        )
        return (
            f"{who} listens there now, started while this supervisor's (pid {os.getpid()}) "
            "socket file was gone: this one stays reachable by no client. Stop one of them "
            "(SIGTERM to this one)"
        )

    async def _listen_again(self, listener: SocketListener) -> SocketListener:
        """A new listener on the path, the old one closed; the old one if the path is taken (a
        supervisor another `run` started there meanwhile), holds something else than a socket
        (a folder made there), or cannot be bound."""
        try:
            new, _replaced = await self._listen()
        except (FlipvisorError, OSError) as exc:
            log.warning("cannot listen on the control socket %s again: %s", self.path, str(exc))
            return listener
        log.warning("the control socket %s was gone (removed?): listening on it again", self.path)
        await listener.aclose()
        return new

    async def _handle(self, stream: SocketStream) -> None:
        # A client that goes away mid-answer ends only its conversation: what it started goes on.
        self._active += 1
        try:
            async with stream:
                with contextlib.suppress(*_CLIENT_GONE):
                    await self._converse(stream)
        except Exception:
            # The boundary of one connection: what fails outside ``dispatch`` (an answer that
            # cannot be encoded) closes that connection, not the control socket with the rest.
            log.exception("a control connection failed; closed")
        finally:
            self._active -= 1
            if not self._active and self._quiet is not None:
                self._quiet.set()

    async def _converse(self, stream: SocketStream) -> None:
        uid = peer_uid(stream)

        async def send(message: dict[str, Any]) -> None:
            await stream.send(encode(message))

        if not peer_allowed(uid):
            log.warning("refused control connection from uid %d", uid)
            await send(result(error=f"permission denied for uid {uid}", exit_code=EXIT_USAGE))
            return
        try:
            line = await _request_line(stream)
            answer = await self.dispatch(decode_request(line), send)
        except ProtocolError as exc:
            answer = result(error=str(exc), exit_code=EXIT_USAGE)
        except _CLIENT_GONE:
            raise
        except Exception as exc:
            # The boundary of one request: a bug in answering it must fail that request, not
            # the control socket and the supervisor with it.
            log.exception("control request failed")
            answer = result(error=f"internal error: {exc!r}")
        try:
            data = encode(answer)
        except TypeError as exc:  # orjson's JSONEncodeError: a value JSON has no form for
            log.exception("a control answer cannot be encoded")
            data = encode(result(error=f"internal error: the answer cannot be encoded: {exc}"))
        await stream.send(data)


async def _request_line(stream: SocketStream) -> bytes:
    """The request line a client sent, within REQUEST_TIMEOUT.

    Raises:
        ProtocolError: none came in time, or it is longer than MAX_LINE (said to the client
            if it still listens, then the connection is closed).
        anyio.EndOfStream, anyio.IncompleteRead: the client went away first.
    """
    try:
        with anyio.fail_after(REQUEST_TIMEOUT):
            return await BufferedByteReceiveStream(stream).receive_until(b"\n", MAX_LINE)
    except TimeoutError:
        raise ProtocolError(f"no complete request line within {REQUEST_TIMEOUT:g}s") from None
    except anyio.DelimiterNotFound:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes") from None


_CLIENT_GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
)
