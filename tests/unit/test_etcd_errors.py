"""What a failed etcd call is called, by what etcd (or whatever answered) said: an endpoint that
is not etcd and an etcd that wants credentials are named as such, with the setting to fix, not
"unreachable" with the advice to make it reachable (QA 15)."""

from __future__ import annotations

import grpc  # type: ignore[import-untyped]

from flipvisor.registry.etcd_errors import describe_rpc_error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def test_an_http1_server_is_not_etcd() -> None:
    details = "failed to connect to all addresses; last error: UNAVAILABLE: Failed parsing HTTP/2"
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details), "h:80", 2)
    assert str(error).startswith("h:80 answered, but is not etcd"), error
    assert "unreachable" not in str(error)
    assert error.next_step is not None and "registry.endpoints" in error.next_step


def test_a_grpc_server_without_etcd_s_api_is_not_etcd() -> None:
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNIMPLEMENTED, "no"), "h:9000", 2)
    assert "is not etcd" in str(error) and error.next_step is not None


def test_etcd_with_auth_enabled_and_no_user_names_the_credentials_settings() -> None:
    details = "etcdserver: user name is empty"
    error = describe_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, details), "h:2379", 2)
    assert "requires a user and password" in str(error), error
    assert error.next_step is not None and "registry.user and registry.password" in error.next_step


def test_a_denied_request_says_which_permission_to_grant() -> None:
    error = describe_rpc_error(rpc_error(grpc.StatusCode.PERMISSION_DENIED, "denied"), "h:2379", 2)
    assert error.next_step is not None and "registry.prefix" in error.next_step


def test_an_unreachable_etcd_keeps_the_default_advice() -> None:
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "refused"), "h:2379", 2)
    assert str(error) == "etcd at h:2379 is unreachable: refused"
    assert error.next_step is None
