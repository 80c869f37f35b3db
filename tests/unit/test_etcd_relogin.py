"""An auth token etcd expired (past --auth-token-ttl, 300 s idle by default) is no problem of the
settings: the connection logs in again and sends the request once more, and `status` shows no
problem; a connection that cannot is retired, so the next request connects and logs in anew."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import grpc  # type: ignore[import-untyped]
import pytest

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryError
from flipvisor.registry.etcd import EtcdRegistry
from flipvisor.registry.etcd_client import EtcdConnection
from flipvisor.registry.etcd_errors import describe_rpc_error

pytestmark = pytest.mark.anyio

EXPIRED = grpc.aio.AioRpcError(
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.aio.Metadata(),
    grpc.aio.Metadata(),
    details="etcdserver: invalid auth token",
)


def settled_call(outcome: Any) -> asyncio.Future[Any]:
    """A finished call, as ``settled`` awaits one: the reply, or the error it raises."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return future


class FakeKV:
    """``Range`` answers with the next of ``outcomes``, noting the token each request carried."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.tokens: list[str] = []

    def Range(self, request: Any, *, timeout: float, metadata: Any) -> asyncio.Future[Any]:
        self.tokens.append(dict(metadata)["token"])
        return settled_call(self.outcomes.pop(0))


def connection(outcomes: list[Any], login: Callable[[EtcdConnection], None]) -> EtcdConnection:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never called: the stub is fake
    conn = EtcdConnection(
        endpoint="h:2379", timeout=2, channel=channel, metadata=(("token", "old"),)
    )
    conn.kv = FakeKV(outcomes)

    async def relogin() -> None:
        login(conn)

    conn.login = relogin
    return conn


async def test_an_expired_token_logs_in_again_and_the_request_is_sent_once_more() -> None:
    def login(conn: EtcdConnection) -> None:
        conn.metadata = (("token", "new"),)

    conn = connection([EXPIRED, "reply"], login)
    assert await conn.call("Range", None) == "reply"
    assert conn.kv.tokens == ["old", "new"]
    assert not conn.broken.is_set()  # kept: it has a good token again
    await conn.close()


async def test_a_connection_that_cannot_log_in_again_is_retired() -> None:
    def login(conn: EtcdConnection) -> None:
        raise RegistryError("etcd at h:2379 refused the login")

    conn = connection([EXPIRED], login)
    with pytest.raises(RegistryError, match="refused the login"):
        await conn.call("Range", None)
    assert conn.broken.is_set()  # the next request connects, and logs in, anew
    await conn.close()


def test_an_expired_token_is_no_problem_for_status() -> None:
    registry = EtcdRegistry(RegistryConfig.model_validate({"backend": "etcd", "prefix": "p"}))
    registry._outcome(describe_rpc_error(EXPIRED, "h:2379", 2))
    assert registry.health()["problem"] is None
    assert registry.unanswered() is None


async def test_a_round_that_wrote_nothing_keeps_the_problem() -> None:
    """``_keep_written`` clears ``problem`` only after a request etcd took, not after a round
    with nothing due."""
    registry = EtcdRegistry(RegistryConfig.model_validate({"backend": "etcd", "prefix": "p"}))
    registry.problem = "etcd at h:2379 failed the request (RESOURCE_EXHAUSTED): full"
    conn = connection([], lambda conn: None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(registry._keep_written, conn)
        await anyio.wait_all_tasks_blocked()
        conn.broken.set()
        registry._wake()
    assert registry.problem is not None
    await conn.close()
