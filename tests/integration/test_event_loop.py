"""The tests' event loop (tests/event_loop.py): a gRPC completion of a call cancelled after its
test's loop closed is dropped, and does not fail the test running then."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from aetcd import rpc

from tests.event_loop import GrpcTolerantEventLoop
from tests.fixtures.etcd import EtcdServer
from tests.waiting import await_until

DEADLINE = 10.0


def test_a_late_grpc_completion_of_a_closed_loop_is_dropped(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    kept: dict[str, Any] = {}

    async def leave_a_watch_s_read_pending() -> None:
        channel = grpc.aio.insecure_channel(etcd_server.endpoint)
        call = rpc.WatchStub(channel).Watch()
        key = f"{etcd_prefix}/late".encode()
        await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key)))
        created = await asyncio.wait_for(call.read(), DEADLINE)
        assert created.created
        reading = asyncio.ensure_future(call.read())  # waits in gRPC for the next change
        await asyncio.sleep(0.1)
        # The loop closes under it (as a test's loop ends with a read gRPC has not completed):
        # the task never finishes, and asyncio need not say so when it is collected.
        reading._log_destroy_pending = False  # type: ignore[attr-defined]
        kept.update(channel=channel, call=call, reading=reading)

    async def change_the_key_from_the_next_loop() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        dropped = GrpcTolerantEventLoop.late_grpc_completions
        channel = grpc.aio.insecure_channel(etcd_server.endpoint)
        kv = rpc.KVStub(channel)
        # Completes the first loop's read: gRPC hands that completion to the closed loop.
        await asyncio.wait_for(
            kv.Put(rpc.PutRequest(key=f"{etcd_prefix}/late".encode(), value=b"1")), DEADLINE
        )

        async def dropped_or_failed() -> bool:
            return GrpcTolerantEventLoop.late_grpc_completions > dropped or bool(errors)

        await await_until(dropped_or_failed, DEADLINE, message="the first loop's completion")
        assert errors == []  # without the drop: "Event loop is closed", raised on this loop
        # This loop's own completions, queued after the dropped one, still arrive.
        await asyncio.wait_for(kv.Range(rpc.RangeRequest(key=b"x")), DEADLINE)
        await channel.close()
        return errors

    first = GrpcTolerantEventLoop()
    first.run_until_complete(leave_a_watch_s_read_pending())
    first.close()
    with asyncio.Runner(loop_factory=GrpcTolerantEventLoop) as runner:
        errors = runner.run(change_the_key_from_the_next_loop())
    assert errors == []
    kept["call"].cancel()


def test_anything_else_scheduled_on_a_closed_loop_still_raises() -> None:
    loop = GrpcTolerantEventLoop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.call_soon_threadsafe(print)
