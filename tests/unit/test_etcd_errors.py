"""What a failed etcd call is called, by what etcd (or whatever answered) said: an endpoint that
is not etcd and an etcd that wants credentials are named as such, with the setting to fix, not
"unreachable" with the advice to make it reachable (QA 15)."""

from __future__ import annotations

import grpc  # type: ignore[import-untyped]
import pytest

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryUnanswered
from flipvisor.registry.etcd_errors import (
    TokenExpired,
    describe_rpc_error,
    login_error,
    none_connected,
)


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


def test_an_expired_auth_token_is_no_credentials_problem() -> None:
    """etcd forgets an idle token after --auth-token-ttl: the credentials are right, a new login
    fixes it; no advice to fix the password and restart."""
    details = "etcdserver: invalid auth token"
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNAUTHENTICATED, details), "h:2379", 2)
    assert isinstance(error, TokenExpired), error
    assert error.next_step is None


def test_a_refused_token_still_names_the_credentials() -> None:
    details = "etcdserver: authentication failed, invalid user ID or password"
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNAUTHENTICATED, details), "h:2379", 2)
    assert not isinstance(error, TokenExpired)
    assert error.next_step is not None and "registry.password" in error.next_step


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:2379: "
        "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
        "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: "
        "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
        "routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
        "last error: UNAVAILABLE: Handshake read failed",
        "last error: UNAVAILABLE: Peer name h is not in peer certificate (Hostname Verification)",
        "last error: UNAVAILABLE: Cannot check peer: missing selected ALPN property.",
    ],
)
def test_a_failed_tls_handshake_answered_and_names_the_tls_settings(details: str) -> None:
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details), "h:2379", 2)
    assert not isinstance(error, RegistryUnanswered), error
    assert "TLS handshake failed" in str(error) and "unreachable" not in str(error)
    assert error.next_step is not None
    for setting in ("https://", "registry.endpoints", "registry.ca", "registry.cert"):
        assert setting in error.next_step, setting


@pytest.mark.parametrize("details", ["last error: Socket closed", "Connection reset by peer"])
def test_a_closed_connection_stays_unreachable_with_a_tls_hint(details: str) -> None:
    error = describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details), "h:2379", 2)
    assert isinstance(error, RegistryUnanswered), error
    assert "https://" in str(error) and "registry.ca" in str(error)


def test_several_endpoints_that_are_not_etcd_share_one_step() -> None:
    details = "last error: UNAVAILABLE: Failed parsing HTTP/2"
    errors = [
        describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details), endpoint, 2)
        for endpoint in ("a:80", "b:80")
    ]
    combined = none_connected(errors)
    assert not isinstance(combined, RegistryUnanswered)
    assert str(combined).startswith("no etcd endpoint could be used: "), combined
    assert "a:80" in str(combined) and "b:80" in str(combined)
    assert combined.next_step is not None and "registry.endpoints" in combined.next_step


def test_several_endpoints_that_did_not_answer_say_so() -> None:
    errors = [
        describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "refused"), endpoint, 2)
        for endpoint in ("a:2379", "b:2379")
    ]
    combined = none_connected(errors)
    assert isinstance(combined, RegistryUnanswered)
    assert str(combined).startswith("no etcd endpoint answered: "), combined


def test_a_user_for_an_etcd_without_authentication_is_said_to_be_one() -> None:
    details = "etcdserver: authentication is not enabled"
    config = RegistryConfig.model_validate({"backend": "etcd", "user": "u", "password": "p"})
    error = login_error(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, details), config, "h:2379")
    assert error.next_step is not None
    assert "remove registry.user and registry.password" in error.next_step, error.next_step
    assert "enable authentication" in error.next_step


def test_a_login_that_failed_its_tls_handshake_names_the_tls_settings() -> None:
    """gRPC may give a failed handshake the code UNKNOWN: still no refused password."""
    details = "last error: UNKNOWN: Tls handshake failed: CERTIFICATE_VERIFY_FAILED"
    config = RegistryConfig.model_validate({"backend": "etcd", "user": "u", "password": "p"})
    error = login_error(rpc_error(grpc.StatusCode.UNKNOWN, details), config, "h:2379")
    assert "TLS handshake failed" in str(error), error
    assert error.next_step is not None and "registry.ca" in error.next_step
