"""``EtcdRegistry.unanswered`` against a real etcd: set while etcd gives no answer, cleared
once it answers again (with no request needed), never set by an error etcd answered with; and
a lost swap over keys that are not UTF-8 names the key that changed."""

from __future__ import annotations

import re

import anyio
import pytest

from flipvisor.errors import RegistryConflict, RegistryError, RegistryUnanswered
from flipvisor.registry import Snapshot
from tests.fixtures.etcd import EtcdServer, free_port
from tests.integration.test_registry_etcd import promoted, record, registry_for
from tests.waiting import await_until, holds

pytestmark = pytest.mark.etcd


async def test_unanswered_clears_once_etcd_answers_again_without_a_request(
    restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """Review: a request past its deadline (SIGSTOP) left its connection looking healthy (its
    own deadline had not passed yet; the liveness watch outlives a short stall), so nothing
    reconnected once etcd ran again, and ``unanswered`` named the old timeout for good: every
    later first start deferred its registration while etcd answered."""
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=1)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            await registry.swap("app", Snapshot(), record(1, 41000, [101]))
            restartable_etcd.pause()
            hung = rf"etcd at 127\.0\.0\.1:{restartable_etcd.client_port} did not answer"
            with pytest.raises(RegistryError, match=hung):
                await registry.snapshot("app")
            assert re.search(hung, str(registry.unanswered()))
            restartable_etcd.resume()
            # No request of ours follows: the registry finds out on its own.
            await await_until(
                lambda: holds(registry.unanswered() is None),
                timeout=8,
                message="unanswered() to clear once etcd answers again",
            )
            assert registry.connected
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def test_an_error_etcd_answered_with_is_not_unanswered(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Review: a refusal (here INVALID_ARGUMENT: more operations in one transaction than etcd
    takes) or a lost compare is an answer: a first start need not defer for it."""
    registry = registry_for(etcd_server.endpoint, etcd_prefix)
    try:
        many = [f"{etcd_prefix}/app/key{n}" for n in range(1000)]
        with pytest.raises(RegistryError, match="INVALID_ARGUMENT"):
            await registry.read_keys(many)
        assert registry.unanswered() is None
        first = record(1, 41000, [101])
        await registry.swap("app", Snapshot(), first)
        with pytest.raises(RegistryConflict):
            await registry.swap("app", Snapshot(), first)
        assert registry.unanswered() is None
    finally:
        await registry.aclose()

    nobody = registry_for(f"127.0.0.1:{free_port()}", etcd_prefix, timeout=1)
    try:
        with pytest.raises(RegistryError):
            await nobody.snapshot("app")
        assert isinstance(nobody.unanswered(), RegistryUnanswered)  # nothing listens
    finally:
        await nobody.aclose()


async def test_a_lost_swap_over_a_key_that_is_not_utf8_names_the_key_that_changed(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Review: the failure branch's read was decoded otherwise than the snapshot (U+FFFD, not
    surrogates), so an unchanged key holding bytes that are not UTF-8 was named as changed."""
    registry = registry_for(etcd_server.endpoint, etcd_prefix)
    try:
        # Surrogates: etcdctl's argument holds the raw byte 0xff.
        etcd_server.put(f"{etcd_prefix}/app/port/current", "\udcff")
        etcd_server.put(f"{etcd_prefix}/app/pid/current", "101")
        seen = await registry.snapshot("app")
        assert seen.get("port/current") == "\udcff"
        etcd_server.put(f"{etcd_prefix}/app/pid/current", "999")  # somebody else, in between
        with pytest.raises(RegistryConflict, match=f"{etcd_prefix}/app/pid/current changed"):
            await registry.swap("app", seen, promoted(seen, record(2, 42000, [202])))
    finally:
        await registry.aclose()


async def test_an_endpoint_that_is_not_etcd_answered_and_is_the_registry_s_problem(
    http_server: str, etcd_prefix: str
) -> None:
    """A web server in registry.endpoints answers at once (gRPC calls it UNAVAILABLE: HTTP/2
    cannot be parsed): a first start need not defer for it, and `status` says it is no etcd."""
    registry = registry_for(http_server, etcd_prefix, timeout=2)
    try:
        with pytest.raises(RegistryError, match="is not etcd"):
            await registry.snapshot("app")
        assert registry.unanswered() is None
        problem = registry.health()["problem"]
        assert problem is not None and "registry.endpoints" in problem, problem
    finally:
        await registry.aclose()
