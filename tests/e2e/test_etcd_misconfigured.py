"""An etcd endpoint that answers but cannot be used as configured: no etcd there (a web server,
a wrong port), or an etcd that wants credentials the config does not give. Each is named as
such, with the setting to fix, never "unreachable ... make the registry reachable" (QA 15)."""

from __future__ import annotations

from tests.e2e.test_etcd import quick_web, start_registered
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.flipvisor import Flipvisor
from tests.waiting import wait_until


def test_an_endpoint_that_is_not_etcd_is_not_called_unreachable(
    flipvisor: Flipvisor, http_server: str, etcd_prefix: str
) -> None:
    flipvisor.start(
        {
            "registry": {
                "backend": "etcd",
                "endpoints": [http_server],
                "prefix": etcd_prefix,
                "timeout": 2,
            },
            "programs": {"web": quick_web()},
        }
    )
    flipvisor.wait_serving("web")
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 1, flipped.stdout + flipped.stderr
    message = flipped.stderr
    assert http_server in message, message
    assert "unreachable" not in message and "make the registry reachable" not in message, message
    assert "not etcd" in message or "not an etcd" in message, message


def test_an_etcd_that_wants_credentials_is_named_as_such(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    start_registered(flipvisor, etcd, etcd_prefix)
    etcd.etcdctl("user", "add", "root:qa15-password")
    etcd.etcdctl("auth", "enable")  # an operator turns auth on; the config has no user yet
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 1, flipped.stdout + flipped.stderr
    message = flipped.stderr
    assert "make the registry reachable" not in message, message
    assert "registry.user" in message or "registry.password" in message, message
    assert "authentication is enabled" in message, message
    wait_until(
        lambda: "registry.user" in flipvisor.cli("status").stdout,
        timeout=10,
        message="status naming registry.user",
    )
    status = flipvisor.cli("status").stdout
    assert "once it answers" not in status and "unreachable" not in status, status
