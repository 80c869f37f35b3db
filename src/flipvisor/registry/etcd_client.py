"""One connection to one etcd endpoint: channel, TLS, auth, and calls bounded by a deadline.

Built on aetcd's generated etcd v3 stubs (``aetcd.rpc``) over a ``grpc.aio`` channel rather than
on ``aetcd.Client``: the client speaks plaintext only, has no deadline by default, and runs its
watches in background tasks of its own. Here every call is bounded by ``fail_after`` (and the
same gRPC deadline, so etcd gives up too) and every failure becomes a ``RegistryError`` naming
etcd and the endpoint (``etcd_errors`` says which, and what to do about it).

A broken connection is not closed while anybody still uses it: closing a ``grpc.aio`` channel
cancels its calls with a bare ``CancelledError``, which would look like a cancellation of the
task reading them.

A unary call is awaited through ``settled``, never directly: cancelled by an anyio scope (a
``fail_after`` deadline, a flip's ``--timeout``), ``grpc.aio`` raises a ``CancelledError`` of its
own, without the message by which anyio tells its scopes' cancellations from foreign ones. Such
an error goes through every scope up to the task group, which takes it for a cancellation of the
whole task: a registry call that timed out would end the flip, and the program with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import grpc  # type: ignore[import-untyped]
from aetcd import rpc
from aetcd.utils import prefix_range_end

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryError, RegistryUnanswered

from .etcd_errors import TokenExpired, describe_rpc_error, login_error, none_connected

log = logging.getLogger(__name__)

# Reconnect quickly after an outage (gRPC's default backoff grows to 2 minutes), and notice a
# silent peer through HTTP/2 keepalive pings; etcd refuses pings more often than every 5 s.
# Not "grpc.min_reconnect_backoff_ms": gRPC takes it as the deadline of each connection attempt
# (20 s by default), so a small one fails every endpoint whose handshake is slower than that (a
# remote etcd over TLS) however long registry.timeout is. Each request is bounded by that instead.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
)
CLOSE_GRACE = 1.0
# Between attempts to reach etcd again (reconnecting, resuming a watch), doubling.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 1.0  # the contract wants the keys right within 5 s of etcd's return


def split_endpoint(endpoint: str) -> tuple[str, bool]:
    """``host:port`` and whether the endpoint asked for TLS (an ``https://`` prefix)."""
    if endpoint.startswith("https://"):
        return endpoint.removeprefix("https://").rstrip("/"), True
    return endpoint.removeprefix("http://").rstrip("/"), False


def range_of(pattern: str) -> tuple[bytes, bytes]:
    """``(key, range_end)`` for a key, or for every key under a prefix ending in "/"."""
    key = pattern.encode()
    return (key, prefix_range_end(key)) if pattern.endswith("/") else (key, b"")


def _read_file(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read the etcd {what} {path}: {exc.strerror}") from exc


def _credentials(config: RegistryConfig, https: bool) -> Any | None:
    """gRPC channel credentials when TLS is asked for (``https://``, ``ca`` or ``cert``), else None.

    Raises:
        RegistryError: a certificate file cannot be read.
    """
    if not (https or config.ca or config.cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(config.ca, "CA file"),
        private_key=_read_file(config.key, "key file"),
        certificate_chain=_read_file(config.cert, "certificate file"),
    )


async def settled(call: Any, endpoint: str) -> Any:
    """The outcome of the unary ``grpc.aio`` call ``call``, awaited so that anyio's cancellation
    reaches the caller as anyio's own (see the module docstring); the call is cancelled with it.

    Raises:
        grpc.aio.AioRpcError: the call failed (its own deadline included).
        RegistryError: gRPC cancelled the call itself (its channel was closed).
    """
    done = anyio.Event()
    call.add_done_callback(lambda _: done.set())
    try:
        await done.wait()
    finally:
        if not call.done():
            call.cancel()
    try:
        return await call  # done: returns or raises at once
    except asyncio.CancelledError:
        # Not ours (``done.wait`` returned): the channel under the call was closed.
        raise RegistryUnanswered(f"etcd at {endpoint}: the connection closed mid-request") from None


@dataclass(eq=False)
class EtcdConnection:
    """A channel to one endpoint with its stubs and auth token; ``broken`` once a call failed.
    ``login`` (with registry.user) gets a new token into ``metadata``."""

    endpoint: str
    timeout: float
    channel: Any
    metadata: tuple[tuple[str, str], ...] = ()
    login: Callable[[], Awaitable[None]] | None = None
    broken: anyio.Event = field(default_factory=anyio.Event)
    users: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self.kv = rpc.KVStub(self.channel)
        self.watch_stub = rpc.WatchStub(self.channel)

    async def call(self, method: str, request: Any) -> Any:
        """Call the KV stub's ``method`` (``Range``, ``Txn``...) within the request timeout; once
        more after logging in again if etcd no longer knew the auth token (past its TTL: etcd
        refused the request before applying it, so it is safe to send again).

        Raises:
            RegistryError: etcd did not answer in time, is unreachable, or refused; the
                connection is then marked broken (unless etcd merely refused).
        """
        try:
            return await self._call_once(method, request)
        except TokenExpired as exc:
            if self.login is None:
                self.broken.set()
                raise
            log.info("%s; logging in again", exc)
        try:
            await self.login()
            return await self._call_once(method, request)
        except RegistryError:
            # Retired: the next request connects anew, and logs in again (``connect``).
            self.broken.set()
            raise

    async def _call_once(self, method: str, request: Any) -> Any:
        """``call`` without the second attempt; an expired token leaves the connection whole.

        Raises:
            RegistryError: as ``call``.
        """
        try:
            with anyio.fail_after(self.timeout):
                return await settled(
                    getattr(self.kv, method)(request, timeout=self.timeout, metadata=self.metadata),
                    self.endpoint,
                )
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            error = describe_rpc_error(exc, self.endpoint, self.timeout)
            if not isinstance(error, TokenExpired) and (
                not isinstance(exc, grpc.aio.AioRpcError)
                or exc.code()
                not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
            ):
                self.broken.set()
            raise error from exc

    def open_watch(self) -> Any:
        """A bidirectional Watch stream on this channel (the caller cancels it when done)."""
        return self.watch_stub.Watch(metadata=self.metadata)

    async def watch_until_broken(self, key: str) -> None:
        """Hold a watch stream on ``key`` open until it breaks (a TCP reset, or HTTP/2 keepalive
        for a silent peer: an outage noticed with no polling), then mark this connection broken.
        """
        call = self.open_watch()
        try:
            key_bytes, range_end = range_of(key)
            create = rpc.WatchCreateRequest(key=key_bytes, range_end=range_end)
            await call.write(rpc.WatchRequest(create_request=create))
            while await call.read() is not grpc.aio.EOF:
                pass
            log.warning("etcd at %s closed the watch stream", self.endpoint)
        except grpc.aio.AioRpcError as exc:
            log.warning("%s", describe_rpc_error(exc, self.endpoint, self.timeout))
        finally:
            call.cancel()
            self.broken.set()

    async def close(self) -> None:
        """Close the channel now (only when nobody uses it; see the module docstring)."""
        if self.closed:
            return
        self.closed = True
        self.broken.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_GRACE):
            await self.channel.close()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[EtcdConnection]:
        """Hold the connection open while in the block; the last user closes a broken one."""
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1
            if self.broken.is_set() and self.users == 0:
                await self.close()

    async def retire(self) -> None:
        """Mark broken; close now if nobody uses it, else when its last user leaves."""
        self.broken.set()
        if self.users == 0:
            await self.close()


async def connect_endpoint(config: RegistryConfig, endpoint: str, probe_key: str) -> EtcdConnection:
    """Open a channel to ``endpoint``, authenticate, and prove it answers by reading ``probe_key``.

    Raises:
        RegistryError: unreachable, TLS or auth refused, or no answer within ``config.timeout``.
    """
    target, https = split_endpoint(endpoint)
    credentials = _credentials(config, https)
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    conn = EtcdConnection(endpoint=target, timeout=config.timeout, channel=channel)
    try:
        if config.user is not None:
            conn.login = functools.partial(_login, conn, config)
            await conn.login()
        key, range_end = range_of(probe_key)
        await conn.call("Range", rpc.RangeRequest(key=key, range_end=range_end, count_only=True))
    except BaseException:
        await conn.close()
        raise
    return conn


async def _login(conn: EtcdConnection, config: RegistryConfig) -> None:
    """Authenticate as ``registry.user`` and put the token into ``conn.metadata``.

    Raises:
        RegistryError: no answer within the timeout, or etcd refused the login.
    """
    request = rpc.AuthenticateRequest(name=config.user, password=config.password or "")
    try:
        with anyio.fail_after(config.timeout):
            reply = await settled(
                rpc.AuthStub(conn.channel).Authenticate(request, timeout=config.timeout),
                conn.endpoint,
            )
    except grpc.aio.AioRpcError as exc:
        raise login_error(exc, config, conn.endpoint) from exc
    except TimeoutError as exc:
        raise describe_rpc_error(exc, conn.endpoint, config.timeout) from exc
    conn.metadata = (("token", reply.token),)


async def connect(config: RegistryConfig, probe_key: str) -> EtcdConnection:
    """A connection to the first of ``config.endpoints`` that answers, tried in order.

    Raises:
        RegistryError: none answered; the message names every endpoint and why.
    """
    errors: list[RegistryError] = []
    for endpoint in config.endpoints:
        try:
            return await connect_endpoint(config, endpoint, probe_key)
        except RegistryError as exc:
            errors.append(exc)
    raise none_connected(errors)


def text_of(value: bytes) -> str:
    """A key's or value's bytes as text. Bytes that are not UTF-8 (written by someone else) are
    kept as surrogates, which ``bytes_of`` turns back into the same bytes: such a value is
    compared exactly, and overwritten as garbage, never a crash."""
    return value.decode("utf-8", "surrogateescape")


def readable_text(value: bytes) -> str:
    """A value as text to render or parse (a watch's templates, a message): bytes that are not
    UTF-8 shown as U+FFFD, never a crash of the watch."""
    return value.decode("utf-8", "replace")


def bytes_of(text: str) -> bytes:
    """``text`` as the bytes etcd holds (``text_of``'s inverse)."""
    return text.encode("utf-8", "surrogateescape")


def txn_compare_value(key: str, value: str | None) -> Any:
    """A Txn comparison: ``key`` holds ``value``, or (None) does not exist (version 0)."""
    if value is None:
        return rpc.Compare(
            key=key.encode(), target=rpc.Compare.VERSION, result=rpc.Compare.EQUAL, version=0
        )
    return rpc.Compare(
        key=key.encode(), target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=bytes_of(value)
    )


def txn_compare_unchanged_since(key: str, revision: int) -> Any:
    """A Txn comparison: ``key`` was last modified at ``revision`` or before (or is absent)."""
    return rpc.Compare(
        key=key.encode(),
        target=rpc.Compare.MOD,
        result=rpc.Compare.LESS,
        mod_revision=revision + 1,
    )


def txn_write(key: str, value: str | None) -> Any:
    """A Txn operation that puts ``value`` into ``key``, or deletes it for None."""
    if value is None:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=bytes_of(value)))


def txn_read(patterns: Sequence[str]) -> list[Any]:
    """Txn operations reading every key matching ``patterns``."""
    ops = []
    for pattern in patterns:
        key, range_end = range_of(pattern)
        ops.append(rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end)))
    return ops


def txn_values(response: Any, decode: Callable[[bytes], str] = readable_text) -> dict[str, str]:
    """The keys and values that the range operations of a Txn response read, as ``decode``
    makes them text."""
    values: dict[str, str] = {}
    for op in response.responses:
        if op.WhichOneof("response") == "response_range":
            for kv in op.response_range.kvs:
                values[decode(kv.key)] = decode(kv.value)
    return values
