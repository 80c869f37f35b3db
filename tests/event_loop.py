"""The event loop each async test runs on: asyncio's, except that a gRPC completion handed to it
after it closed is dropped instead of failing whichever test runs next.

A process that runs one event loop (``flipvisor run``, ``flipvisor watch``) never meets this; a
test session runs a loop per test. gRPC's poller thread hands each completion to the loop of the
call it belongs to (``loop.call_soon_threadsafe``), and a call cancelled as its test's loop ended
(a watch stream's pending read, cancelled by a finalizer or by the garbage collector of a later
test) completes after that loop closed. asyncio raises "Event loop is closed" for it, inside gRPC's
event handler running on the *current* test's loop: anyio's plugin fails that test, and the other
completions queued behind it wait for the next wake-up. Nothing awaits such a completion any
more (its test is over), so dropping it loses nothing. Only gRPC's callbacks are dropped: anything
else scheduled on a closed loop is a bug of ours and still raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import Context
from typing import Any

# The module of gRPC's Cython core, whose poller thread schedules completions.
GRPC_CORE_MODULE = "grpc._cython.cygrpc"


class GrpcTolerantEventLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, dropping gRPC's completions for calls of a test that is over."""

    late_grpc_completions = 0  # dropped so far, in this process (for tests of this loop)

    def call_soon_threadsafe(
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.Handle:
        if self.is_closed() and getattr(callback, "__module__", None) == GRPC_CORE_MODULE:
            GrpcTolerantEventLoop.late_grpc_completions += 1
            return asyncio.Handle(callback, args, self, context)  # never run
        return super().call_soon_threadsafe(callback, *args, context=context)
