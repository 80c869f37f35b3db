"""Which failed etcd calls count as unanswered (``RegistryUnanswered``: ``Registry.unanswered``
then makes a first start defer its registration at once): a timeout or an unreachable etcd, not
an error etcd answered with."""

from __future__ import annotations

import grpc  # type: ignore[import-untyped]
import pytest

from flipvisor.errors import RegistryUnanswered
from flipvisor.registry.etcd_client import describe_rpc_error


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "details")


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        rpc_error(grpc.StatusCode.UNAVAILABLE),
        rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_no_answer_is_unanswered(exc: BaseException) -> None:
    assert isinstance(describe_rpc_error(exc, "127.0.0.1:2379", 1), RegistryUnanswered)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    ],
)
def test_an_error_etcd_answered_with_is_not_unanswered(code: grpc.StatusCode) -> None:
    assert not isinstance(
        describe_rpc_error(rpc_error(code), "127.0.0.1:2379", 1), RegistryUnanswered
    )
