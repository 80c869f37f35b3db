"""Which failed etcd calls count as unanswered (``RegistryUnanswered``: ``Registry.unanswered``
then makes a first start defer its registration at once): a timeout or an unreachable etcd, not
an error etcd answered with, nor an endpoint that answered but is not etcd (which is the
registry's ``problem`` for `status` instead)."""

from __future__ import annotations

import grpc  # type: ignore[import-untyped]
import pytest

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryUnanswered
from flipvisor.registry.etcd import EtcdRegistry
from flipvisor.registry.etcd_errors import describe_rpc_error, none_connected


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


def rpc_said(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


# gRPC's UNAVAILABLE for a plain HTTP/1 server: a peer that answered, at once.
NOT_ETCD = rpc_said(grpc.StatusCode.UNAVAILABLE, "last error: UNAVAILABLE: Failed parsing HTTP/2")


def test_an_endpoint_that_is_not_etcd_answered() -> None:
    """It answered (whatever gRPC's code): not an etcd to wait for, but a setting to fix."""
    error = describe_rpc_error(NOT_ETCD, "127.0.0.1:80", 1)
    assert not isinstance(error, RegistryUnanswered), error
    assert "not etcd" in str(error) and error.next_step is not None


def test_a_connection_is_unanswered_only_if_no_endpoint_answered() -> None:
    hung = describe_rpc_error(TimeoutError(), "127.0.0.1:2379", 1)
    down = describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE), "127.0.0.1:2380", 1)
    not_etcd = describe_rpc_error(NOT_ETCD, "127.0.0.1:80", 1)
    assert none_connected([not_etcd]) is not_etcd  # its next step kept
    assert isinstance(none_connected([hung, down]), RegistryUnanswered)
    mixed = none_connected([hung, not_etcd])
    assert not isinstance(mixed, RegistryUnanswered)
    assert "127.0.0.1:2379" in str(mixed) and "127.0.0.1:80" in str(mixed)
    assert mixed.next_step is None  # not one for both of them


def test_a_request_s_outcome_is_unanswered_or_a_problem_and_success_clears_both() -> None:
    """``unanswered``: etcd gave no answer; ``problem`` (`status`): what whatever answered said
    that is no outage. One request's outcome sets at most one of them."""
    registry = EtcdRegistry(RegistryConfig.model_validate({"backend": "etcd", "prefix": "p"}))
    not_etcd = describe_rpc_error(NOT_ETCD, "127.0.0.1:80", 1)
    registry._outcome(not_etcd)
    assert registry.unanswered() is None
    assert registry.health()["problem"] == f"{not_etcd}; {not_etcd.next_step}"
    hung = describe_rpc_error(TimeoutError(), "127.0.0.1:2379", 1)
    registry._outcome(hung)
    assert registry.unanswered() is hung
    assert registry.health()["problem"] is None  # `status` says "unreachable" instead
    registry._outcome(not_etcd)
    assert registry.unanswered() is None  # it answered
    registry._outcome(None)
    assert registry.unanswered() is None and registry.health()["problem"] is None


def test_whatever_etcd_answered_with_is_a_problem_with_or_without_a_next_step() -> None:
    """A full database has no setting to fix, yet `status` must say it rather than "connected;
    keys ... written once it answers"."""
    registry = EtcdRegistry(RegistryConfig.model_validate({"backend": "etcd", "prefix": "p"}))
    full = describe_rpc_error(
        rpc_said(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"),
        "127.0.0.1:2379",
        1,
    )
    registry._outcome(full)
    assert registry.health()["problem"] == str(full)
    assert "database space exceeded" in str(full)
