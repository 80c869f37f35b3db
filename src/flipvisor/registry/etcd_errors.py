"""What a failed etcd call is called: the ``RegistryError`` naming etcd and the endpoint, with the
operator's next step where the failure says what it is.

Two questions are answered for every failure. Did anything answer? A timeout or an unreachable
etcd (gRPC's UNAVAILABLE, DEADLINE_EXCEEDED) did not: a ``RegistryUnanswered``, as asking again
may cost another whole timeout. A refusal did, and so did an endpoint that is not etcd (a web
server, a wrong port: gRPC's HTTP/2 parse failure comes as UNAVAILABLE, but the peer answered at
once), and so did one whose TLS handshake failed at once (a certificate, ``https://`` or not).
And what can the operator do? For an endpoint that is not etcd, a TLS mismatch, or an etcd that
wants credentials or refuses them: the setting to fix (``next_step``), never "make it reachable".
An expired auth token is none of these (``TokenExpired``): the connection logs in again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc  # type: ignore[import-untyped]

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryError, RegistryUnanswered

# What gRPC says of a peer that answered, but not in HTTP/2 (a web server, a wrong port).
NOT_HTTP2 = ("Failed parsing HTTP/2", "Trying to connect an http1.x server")
# etcd (auth enabled) to a request that carries no token: no registry.user was configured.
NO_USER = "user name is empty"
# etcd to a token past --auth-token-ttl (idle 300 s by default): the credentials are right.
EXPIRED_TOKEN = "invalid auth token"
# etcd to a login while its authentication is off.
AUTH_DISABLED = "authentication is not enabled"
# What gRPC says of a TLS handshake that failed: the peer answered (at once), TLS settings differ.
TLS_FAILED = (
    "Tls handshake failed",
    "Ssl handshake failed",
    "Handshake read failed",
    "CERTIFICATE_VERIFY_FAILED",
    "Hostname Verification",
    "WRONG_VERSION_NUMBER",
    "missing selected ALPN",
)
# A peer that closed the connection: down, or a TLS mismatch (a TLS etcd asked in plaintext).
MAYBE_TLS = ("Socket closed", "Connection reset by peer")
# Registry settings are read at start-up only (reload.RESTART_ONLY).
RESTART = "restart `flipvisor run` (registry settings are read at start-up)"
CREDENTIALS_STEP = (
    "set registry.user and registry.password (an etcd user that may read and write the keys "
    "under registry.prefix) and " + RESTART
)
LOGIN_STEP = f"fix registry.user or registry.password and {RESTART}"
TLS_STEP = (
    "check the TLS settings: `https://` in registry.endpoints for an etcd that serves TLS (none "
    "for one that does not), registry.ca for the CA that signed its certificate (issued for the "
    "host named), registry.cert and registry.key for a client certificate; and " + RESTART
)
TLS_HINT = "if etcd serves TLS, or does not: check `https://` in registry.endpoints and registry.ca"
AUTH_DISABLED_STEP = (
    "remove registry.user and registry.password (this etcd has no authentication), or enable "
    "authentication in etcd (etcdctl auth enable), and " + RESTART
)
NOT_ETCD_STEP = (
    "point registry.endpoints at etcd's client address (port 2379 by default) and " + RESTART
)
PERMISSION_STEP = (
    "grant registry.user's etcd role read and write on the keys under registry.prefix "
    "(etcdctl role grant-permission --prefix)"
)
NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TokenExpired(RegistryError):
    """etcd no longer knows the connection's auth token (past --auth-token-ttl): no problem of
    the settings; the connection logs in again (``EtcdConnection.call``), or a new one does."""


def describe_rpc_error(exc: BaseException, endpoint: str, timeout: float) -> RegistryError:
    """A ``RegistryError`` naming etcd and ``endpoint`` for a failed call, with the next step
    where the failure says what it is (no etcd there, credentials missing or refused); a
    ``RegistryUnanswered`` when nothing answered (a timeout, unreachable)."""
    if isinstance(exc, TimeoutError):
        return RegistryUnanswered(f"etcd at {endpoint} did not answer within {timeout:g} s")
    if not isinstance(exc, grpc.aio.AioRpcError):
        return RegistryError(f"etcd at {endpoint} failed: {exc}")
    code = exc.code()
    details = exc.details() or code.name
    if any(marker in details for marker in NOT_HTTP2) or code == grpc.StatusCode.UNIMPLEMENTED:
        # It answered (at once: not unanswered, whatever gRPC's code): making it "reachable"
        # is no help, pointing at etcd is.
        return RegistryError(
            f"{endpoint} answered, but is not etcd (not etcd's gRPC API): {details}",
            NOT_ETCD_STEP,
        )
    if any(marker in details for marker in TLS_FAILED):
        # Failed at once, in the handshake: an answer, and no outage to wait for.
        return RegistryError(
            f"{endpoint} answered, but the TLS handshake failed: {details}", TLS_STEP
        )
    if code in NO_ANSWER:
        hint = f" ({TLS_HINT})" if any(marker in details for marker in MAYBE_TLS) else ""
        return RegistryUnanswered(f"etcd at {endpoint} is unreachable: {details}{hint}")
    if NO_USER in details:
        return RegistryError(
            f"etcd at {endpoint} requires a user and password (its authentication is enabled), "
            f"and the config names none: {details}",
            CREDENTIALS_STEP,
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return RegistryError(f"etcd at {endpoint} refused the request: {details}", PERMISSION_STEP)
    if code == grpc.StatusCode.UNAUTHENTICATED and EXPIRED_TOKEN in details:
        return TokenExpired(f"etcd at {endpoint} no longer knows the auth token: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RegistryError(f"etcd at {endpoint} refused the request: {details}", LOGIN_STEP)
    return RegistryError(f"etcd at {endpoint} failed the request ({code.name}): {details}")


def login_error(exc: Any, config: RegistryConfig, target: str) -> RegistryError:
    """Why the login as ``registry.user`` (an ``AioRpcError``) failed: no etcd answered
    (unreachable, not etcd, a failed TLS handshake, whatever gRPC's code), etcd has no
    authentication, or etcd refused the user or password."""
    handshake = any(marker in (exc.details() or "") for marker in (*TLS_FAILED, *NOT_HTTP2))
    if handshake or exc.code() in (*NO_ANSWER, grpc.StatusCode.UNIMPLEMENTED):
        return describe_rpc_error(exc, target, config.timeout)
    if AUTH_DISABLED in (exc.details() or ""):
        return RegistryError(
            f"etcd at {target} has no authentication enabled, yet registry.user is set: "
            f"{exc.details()}",
            AUTH_DISABLED_STEP,
        )
    return RegistryError(
        f"etcd at {target} refused the login of user {config.user!r}: {exc.details()}",
        LOGIN_STEP,
    )


def none_connected(errors: Sequence[RegistryError]) -> RegistryError:
    """The error of a connection attempt that every endpoint failed, each with ``errors``: one
    endpoint's own (its next step kept), else all of them named. A ``RegistryUnanswered``
    only if none answered: a refusal is an answer, given at once."""
    if len(errors) == 1:
        return errors[0]
    unanswered = all(isinstance(exc, RegistryUnanswered) for exc in errors)
    kind = RegistryUnanswered if unanswered else RegistryError
    steps = {exc.next_step for exc in errors}
    said = "no etcd endpoint answered: " if unanswered else "no etcd endpoint could be used: "
    return kind(
        said + "; ".join(map(str, errors)),
        steps.pop() if len(steps) == 1 else None,  # one next step for all of them, or none
    )
