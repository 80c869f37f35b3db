"""The etcd registry against a real etcd: layout, swap conflicts, outages, watches, TLS + auth."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest

from flipvisor.config import RegistryConfig
from flipvisor.errors import RegistryConflict, RegistryError, RegistryUnanswered
from flipvisor.lineage import this_supervisor
from flipvisor.registry import KEY_SUFFIXES, Snapshot, WatchEvent, WatchLost
from flipvisor.registry.etcd import EtcdRegistry
from flipvisor.registry.etcd_client import EtcdConnection
from flipvisor.starttime import recorded_now
from tests.fixtures.etcd import (
    FOREIGN_KEYS,
    FOREIGN_VALUE_BYTES,
    TLS_PASSWORD,
    TLS_USER,
    EtcdServer,
    free_port,
    put_large,
)
from tests.fixtures.slow_link import SlowLink
from tests.waiting import await_until, holds

pytestmark = pytest.mark.etcd


def record(generation: int, port: int, pids: list[int]) -> Snapshot:
    """What a promotion writes: the seed's keys plus the JSON generation record."""
    doc = {
        "generation": generation,
        "port": port,
        "pids": [{"pid": pid, "started": 1764490000.12} for pid in pids],
        "host": "web-1",
        "command": ["python3", "app.py"],
        "promoted_at": 1764490001.5,
    }
    return Snapshot(
        {
            "port/current": str(port),
            "pid/current": ",".join(map(str, pids)),
            "generation/current": json.dumps(doc),
        }
    )


def promoted(old: Snapshot, new: Snapshot) -> Snapshot:
    values = dict(new.values)
    for what in ("port", "pid"):
        if old.get(f"{what}/current") is not None:
            values[f"{what}/previous"] = old.values[f"{what}/current"]
    return Snapshot(values)


def registry_for(endpoint: str, prefix: str, **extra: object) -> EtcdRegistry:
    return EtcdRegistry(
        RegistryConfig.model_validate(
            {"backend": "etcd", "endpoints": [endpoint], "prefix": prefix, **extra}
        )
    )


def tls_files(etcd: EtcdServer) -> dict[str, Path]:
    """The registry's TLS settings for ``etcd``: the CA to trust, the certificate to present."""
    assert etcd.tls is not None
    return {"ca": etcd.tls.ca, "cert": etcd.tls.client_cert, "key": etcd.tls.client_key}


def tls_registry(etcd: EtcdServer, prefix: str) -> EtcdRegistry:
    """A registry on ``etcd`` over TLS, logged in as its root user."""
    return registry_for(
        f"https://{etcd.endpoint}",
        prefix,
        timeout=3,
        user=TLS_USER,
        password=TLS_PASSWORD,
        **tls_files(etcd),
    )


async def test_key_layout_and_record_round_trip(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    registry = registry_for(f"http://{etcd_server.endpoint}", etcd_prefix)
    try:
        first = record(1, 41000, [101])
        await registry.swap("experiment", Snapshot(), first)
        second = promoted(first, record(2, 41234, [201, 202]))
        await registry.swap("experiment", await registry.snapshot("experiment"), second)

        assert etcd_server.get(f"{etcd_prefix}/experiment/port/current") == "41234"
        assert etcd_server.get(f"{etcd_prefix}/experiment/port/previous") == "41000"
        assert etcd_server.get(f"{etcd_prefix}/experiment/pid/current") == "201,202"
        assert etcd_server.get(f"{etcd_prefix}/experiment/pid/previous") == "101"
        doc = json.loads(etcd_server.get(f"{etcd_prefix}/experiment/generation/current") or "")
        assert doc["generation"] == 2 and doc["pids"][1] == {"pid": 202, "started": 1764490000.12}
        assert (await registry.snapshot("experiment")).values == second.values
        assert set(second.values) == set(KEY_SUFFIXES)
    finally:
        await registry.aclose()


async def test_swap_loses_to_a_concurrent_writer(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    registry = registry_for(etcd_server.endpoint, etcd_prefix)
    try:
        await registry.swap("app", Snapshot(), record(1, 41000, [101]))
        seen = await registry.snapshot("app")
        etcd_server.put(f"{etcd_prefix}/app/pid/current", "999")  # somebody else, in between
        with pytest.raises(RegistryConflict, match=f"{etcd_prefix}/app/pid/current"):
            await registry.swap("app", seen, promoted(seen, record(2, 42000, [202])))
        assert etcd_server.get(f"{etcd_prefix}/app/port/current") == "41000"
        # A key that appeared where the caller saw none also loses the compare.
        etcd_server.put(f"{etcd_prefix}/fresh/port/current", "1")
        with pytest.raises(RegistryConflict, match=f"{etcd_prefix}/fresh/port/current"):
            await registry.swap("fresh", Snapshot(), record(1, 2, [3]))
    finally:
        await registry.aclose()


async def test_a_lost_swap_names_the_key_with_large_foreign_keys_in_the_folder(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Another tool's keys under the program's folder, more than a gRPC reply takes (4 MiB): the
    swap's failure branch reads back the program's keys alone (QA 15: it read the folder, and a
    lost compare failed with RESOURCE_EXHAUSTED instead of naming the key that changed)."""
    registry = registry_for(etcd_server.endpoint, etcd_prefix)
    try:
        await registry.swap("app", Snapshot(), record(1, 41000, [101]))
        for n in range(FOREIGN_KEYS):
            put_large(etcd_server, f"{etcd_prefix}/app/extra/{n}", FOREIGN_VALUE_BYTES)
        seen = await registry.snapshot("app")
        assert seen.values == record(1, 41000, [101]).values
        etcd_server.put(f"{etcd_prefix}/app/pid/current", "999")  # somebody else, in between
        with pytest.raises(RegistryConflict, match=f"{etcd_prefix}/app/pid/current"):
            await registry.swap("app", seen, promoted(seen, record(2, 42000, [202])))
    finally:
        await registry.aclose()


async def test_endpoints_are_tried_in_order(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    registry = EtcdRegistry(
        RegistryConfig(
            backend="etcd",
            endpoints=[dead, etcd_server.endpoint],
            prefix=etcd_prefix,
            timeout=2,
        )
    )
    try:
        await registry.publish("app", record(1, 1234, [1]))
        assert etcd_server.get(f"{etcd_prefix}/app/port/current") == "1234"
    finally:
        await registry.aclose()


async def test_outage_fails_swaps_cleanly_and_heals_afterwards(
    restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=2)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            first = record(1, 41000, [101])
            await registry.swap("app", Snapshot(), first)
            await await_until(lambda: holds(registry.connected), message="run() to connect")

            restartable_etcd.stop()
            began = time.monotonic()
            down = rf"etcd at 127\.0\.0\.1:{restartable_etcd.client_port}"
            with pytest.raises(RegistryError, match=down):
                await registry.swap("app", first, promoted(first, record(2, 42000, [202])))
            assert time.monotonic() - began < 2 + 1
            # A crashed worker's replacement during the outage: published once etcd is back.
            healed = Snapshot({**first.values, "pid/current": "103"})
            with anyio.fail_after(3):
                await registry.publish("app", healed)

            restartable_etcd.start()
            back = time.monotonic()
            await await_until(
                lambda: _value(restartable_etcd, f"{etcd_prefix}/app/pid/current", "103"),
                timeout=5,
                message="the published pid to land after etcd's return",
            )
            assert time.monotonic() - back < 5
            assert restartable_etcd.get(f"{etcd_prefix}/app/port/current") == "41000"
            assert restartable_etcd.get(f"{etcd_prefix}/app/port/previous") is None

            # Keys changed behind our back while we were connected are put right after the next
            # reconnect too ("after an outage, every key is made to match what is serving").
            restartable_etcd.put(f"{etcd_prefix}/app/port/current", "6666")
            restartable_etcd.stop()
            restartable_etcd.start()
            await await_until(
                lambda: _value(restartable_etcd, f"{etcd_prefix}/app/port/current", "41000"),
                timeout=5,
                message="the keys to match what is serving",
            )
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def test_an_etcd_that_stops_answering_fails_requests_at_the_timeout(
    restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """A hung etcd (SIGSTOP: the connection stays open, nothing answers) fails each request
    with a RegistryError at the request timeout, and an outer cancel scope (a flip's --timeout)
    cancels a request as its own. gRPC raises a cancellation anyio does not recognise; before
    it was translated, it went through every scope and ended the caller's whole task."""
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=1)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            first = record(1, 41000, [101])
            await registry.swap("app", Snapshot(), first)
            restartable_etcd.pause()
            hung = rf"etcd at 127\.0\.0\.1:{restartable_etcd.client_port} did not answer within 1 s"
            with pytest.raises(RegistryError, match=hung):
                await registry.swap("app", first, promoted(first, record(2, 42000, [202])))
            # Known not to answer: a first start defers its registration without waiting.
            assert re.search(hung, str(registry.unanswered()))
            with pytest.raises(RegistryError, match=hung):
                await registry.snapshot("app")
            with pytest.raises(RegistryError, match=hung):
                await registry.read_keys([f"{etcd_prefix}/app/"])
            with anyio.move_on_after(0.3) as flip:
                await registry.swap("app", first, promoted(first, record(3, 43000, [303])))
            assert flip.cancelled_caught
            restartable_etcd.resume()
            # etcd may apply the transactions it held once it runs again: they are put back.
            port_key = f"{etcd_prefix}/app/port/current"
            await await_until(
                lambda: _value(restartable_etcd, port_key, "41000"),
                timeout=5,
                message="the keys to be put back to what still serves",
            )
            assert await registry.snapshot("app") == first
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def test_a_withdrawal_etcd_does_not_answer_returns_at_the_timeout_and_lands_later(
    restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """A program stops while etcd hangs: the withdrawal of its keys gives up waiting at the
    request timeout (the stop goes on), stays pending, and is written once etcd answers again:
    `current` gone, what it named `previous`. Then the program is forgotten: a key somebody
    else writes afterwards is not withdrawn again at the next reconnect."""
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=1)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            await registry.swap(
                "app", Snapshot(), promoted(record(1, 41000, [101]), record(2, 42000, [202]))
            )
            restartable_etcd.pause()
            began = time.monotonic()
            await registry.withdraw("app")
            assert time.monotonic() - began < 1 + 0.5
            assert registry.health()["pending"] == ["app"]
            restartable_etcd.resume()
            await await_until(
                lambda: holds(not registry.health()["pending"]),
                timeout=5,
                message="the withdrawal to land once etcd answers",
            )
            got = {s: restartable_etcd.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
            assert got == {
                "port/current": None,
                "port/previous": "42000",
                "pid/current": None,
                "pid/previous": "202",
                "generation/current": None,
            }
            # Forgotten once landed: a key another writer puts afterwards survives reconnects.
            # "zzz" is reconciled after "app" at each reconnect: once its stray value is put
            # right, "app" has been looked at too.
            await registry.publish("zzz", record(1, 43000, [303]))
            restartable_etcd.put(f"{etcd_prefix}/app/port/current", "6666")
            restartable_etcd.put(f"{etcd_prefix}/zzz/port/current", "7777")
            restartable_etcd.stop()
            restartable_etcd.start()
            await await_until(
                lambda: _value(restartable_etcd, f"{etcd_prefix}/zzz/port/current", "43000"),
                timeout=5,
                message="the reconnect to rewrite what serves",
            )
            assert restartable_etcd.get(f"{etcd_prefix}/app/port/current") == "6666"
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def test_a_late_withdrawal_leaves_keys_another_writer_promoted_meanwhile(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The program stops while this supervisor cannot reach etcd, and another writer (a
    self-registering service, another supervisor) promotes the same program meanwhile: once the
    link is back, the withdrawal finds keys that no longer name what it published and leaves
    them (a drain_pid watcher would drain the PIDs it moved to pid/previous); nor does any later
    reconnect touch them."""
    with SlowLink(("127.0.0.1", etcd_server.client_port), delay=0) as link:
        registry = registry_for(link.endpoint, etcd_prefix, timeout=1)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(registry.run)
                await registry.swap("app", Snapshot(), record(1, 41000, [101]))
                await registry.publish("zzz", record(1, 43000, [303]))
                link.cut()
                with anyio.fail_after(1 + 0.5):
                    await registry.withdraw("app")
                assert registry.health()["pending"] == ["app"]
                theirs = promoted(record(1, 41000, [101]), record(7, 50000, [5555]))
                for suffix, value in theirs.values.items():
                    etcd_server.put(f"{etcd_prefix}/app/{suffix}", value)
                link.restore()
                await await_until(
                    lambda: holds(not registry.health()["pending"]),
                    timeout=5,
                    message="the withdrawal to be decided once etcd answers",
                )
                got = {s: etcd_server.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
                assert got == dict(theirs.values)
                # A reconnect: "zzz" (reconciled after "app") is put right, "app" left alone.
                etcd_server.put(f"{etcd_prefix}/zzz/port/current", "7777")
                link.cut()
                link.restore()
                await await_until(
                    lambda: _value(etcd_server, f"{etcd_prefix}/zzz/port/current", "43000"),
                    timeout=5,
                    message="the reconnect to rewrite what serves",
                )
                assert etcd_server.get(f"{etcd_prefix}/app/pid/current") == "5555"
                tg.cancel_scope.cancel()
        finally:
            await registry.aclose()


async def test_a_late_withdrawal_applies_to_what_etcd_holds_of_ours_before_a_pending_publish(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """A worker restarted during the outage (its PIDs published, pending) and then the program
    stopped: etcd still holds the PIDs this registry wrote before. They are ours: withdrawn once
    the link is back, not left naming a stopped program as if another writer owned them."""
    with SlowLink(("127.0.0.1", etcd_server.client_port), delay=0) as link:
        registry = registry_for(link.endpoint, etcd_prefix, timeout=1)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(registry.run)
                await registry.swap("app", Snapshot(), record(1, 41000, [101]))
                link.cut()
                with anyio.fail_after(1 + 0.5):
                    await registry.publish("app", record(1, 41000, [102]))
                with anyio.fail_after(1 + 0.5):
                    await registry.withdraw("app")
                link.restore()
                await await_until(
                    lambda: holds(not registry.health()["pending"]),
                    timeout=5,
                    message="the withdrawal to land once etcd answers",
                )
                got = {s: etcd_server.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
                assert got["port/current"] is None and got["pid/current"] is None, got
                assert (got["port/previous"], got["pid/previous"]) == ("41000", "101"), got
                tg.cancel_scope.cancel()
        finally:
            await registry.aclose()


async def test_an_etcd_behind_a_slow_link_is_reached_within_the_request_timeout(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Connecting takes as long as the path to etcd does, up to registry.timeout: each new
    connection here is held 0.5 s before it reaches etcd (a remote member, a slow TLS handshake).
    gRPC used to give each connection attempt 200 ms (it reads its minimum reconnect backoff as
    the attempt's deadline) and such an etcd was unreachable whatever the timeout said."""
    with SlowLink(("127.0.0.1", etcd_server.client_port), delay=0.5) as link:
        registry = registry_for(link.endpoint, etcd_prefix, timeout=3)
        try:
            first = record(1, 41000, [101])
            await registry.swap("app", Snapshot(), first)
            assert await registry.snapshot("app") == first
        finally:
            await registry.aclose()


async def test_a_swap_cancelled_after_etcd_applied_it_is_put_back(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flip's --timeout can cancel a swap whose transaction etcd applied but whose reply has
    # not arrived: the flip then rolls back, so the keys must go back to what still serves.
    registry = registry_for(etcd_server.endpoint, etcd_prefix)
    reply_lost = anyio.Event()
    call = EtcdConnection.call

    async def call_then_hang(self: EtcdConnection, method: str, request: object) -> object:
        reply = await call(self, method, request)
        if method == "Txn" and not reply_lost.is_set():
            reply_lost.set()
            await anyio.sleep_forever()
        return reply

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            first = record(1, 41000, [101])
            await registry.swap("app", Snapshot(), first)
            monkeypatch.setattr(EtcdConnection, "call", call_then_hang)
            with anyio.CancelScope() as flip:
                tg.start_soon(_cancel_when_set, reply_lost, flip)
                await registry.swap("app", first, promoted(first, record(2, 42000, [202])))
            assert flip.cancelled_caught
            port_key = f"{etcd_prefix}/app/port/current"
            assert etcd_server.get(port_key) == "42000", "etcd applied the transaction"
            await await_until(
                lambda: _value(etcd_server, port_key, "41000"),
                timeout=5,
                message="the keys to be put back to what still serves",
            )
            assert etcd_server.get(f"{etcd_prefix}/app/port/previous") is None
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def test_a_swap_that_lands_after_the_keys_were_put_back_is_refused(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worst order after a lost outcome: the swap's transaction reaches etcd only after the
    # keys were put back (etcd queued it, or a partition held it). It must not apply then.
    registry = registry_for(etcd_server.endpoint, etcd_prefix)
    swap_sent, put_back = anyio.Event(), anyio.Event()
    late: list[Any] = []
    call = EtcdConnection.call

    async def deliver_late(conn: EtcdConnection, request: object) -> None:
        await put_back.wait()
        late.append(await call(conn, "Txn", request))

    async def hold_the_swap(self: EtcdConnection, method: str, request: object) -> object:
        if method == "Txn" and not swap_sent.is_set():
            swap_sent.set()
            tg.start_soon(deliver_late, self, request)  # etcd holds it, whatever we do
            await anyio.sleep_forever()
        return await call(self, method, request)

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            first = record(1, 41000, [101])
            await registry.swap("app", Snapshot(), first)
            await registry.snapshot("app")  # what a promotion reads before it swaps
            monkeypatch.setattr(EtcdConnection, "call", hold_the_swap)
            port_key = f"{etcd_prefix}/app/port/current"
            with anyio.CancelScope() as flip:
                tg.start_soon(_cancel_when_set, swap_sent, flip)
                await registry.swap("app", first, promoted(first, record(2, 42000, [202])))
            await await_until(
                lambda: holds(not registry.health()["pending"]),
                timeout=5,
                message="the keys to be put back",
            )
            put_back.set()
            await await_until(lambda: holds(bool(late)), timeout=5, message="the late swap")
            assert not late[0].succeeded, "the late transaction applied"
            assert etcd_server.get(port_key) == "41000"
            assert etcd_server.get(f"{etcd_prefix}/app/port/previous") is None
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def test_watch_resumes_after_an_outage(
    restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=2)
    restartable_etcd.put(f"{etcd_prefix}/app/port/current", "1")
    try:
        start = await registry.read_keys([f"{etcd_prefix}/app/", f"{etcd_prefix}/other"])
        assert start.values == {f"{etcd_prefix}/app/port/current": "1"}
        seen: list[WatchEvent] = []
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                watched = [f"{etcd_prefix}/app/", f"{etcd_prefix}/other"]
                async with aclosing(registry.watch(watched, since=start)) as events:
                    async for batch in events:
                        seen.extend(batch)

            tg.start_soon(consume)
            restartable_etcd.put(f"{etcd_prefix}/app/port/current", "2")
            restartable_etcd.put(f"{etcd_prefix}/unwatched", "x")
            await await_until(lambda: holds(len(seen) == 1), message="the first event")
            restartable_etcd.stop()
            restartable_etcd.start()
            # Written while the watcher is still reconnecting: it must not be missed.
            restartable_etcd.put(f"{etcd_prefix}/other", "3")
            restartable_etcd.etcdctl("del", f"{etcd_prefix}/app/port/current")
            await await_until(lambda: holds(len(seen) == 3), timeout=8, message="resumed events")
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()
    # Each pattern's events arrive in order; after a resume two patterns may interleave.
    seen.sort(key=lambda event: event.revision)
    assert [(e.key.removeprefix(etcd_prefix), e.value) for e in seen] == [
        ("/app/port/current", "2"),
        ("/other", "3"),
        ("/app/port/current", None),
    ]


async def test_watch_is_lost_when_etcd_comes_back_with_an_earlier_revision(
    restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=2)
    for n in range(5):  # history the replacement will not have
        restartable_etcd.put(f"{etcd_prefix}/app/port/current", str(n))
    seen: list[WatchEvent] = []
    lost: list[WatchLost] = []
    try:
        start = await registry.read_keys([f"{etcd_prefix}/app/"])
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                watched = [f"{etcd_prefix}/app/"]
                try:
                    async with aclosing(registry.watch(watched, since=start)) as events:
                        async for batch in events:
                            seen.extend(batch)
                except WatchLost as exc:
                    lost.append(exc)

            tg.start_soon(consume)
            restartable_etcd.put(f"{etcd_prefix}/app/port/current", "5")
            await await_until(lambda: holds(bool(seen)), message="the watch to run")
            # Blocking calls: the watch cannot resume before the new etcd holds the key (at a
            # revision below the one it resumes from, which etcd would wait for).
            restartable_etcd.restart_empty()
            restartable_etcd.put(f"{etcd_prefix}/app/port/current", "new")
            await await_until(lambda: holds(bool(lost)), timeout=8, message="WatchLost")
    finally:
        await registry.aclose()
    assert "etcd's revision went back" in str(lost[0])


async def test_tls_and_auth(tls_etcd: EtcdServer, etcd_prefix: str) -> None:
    registry = tls_registry(tls_etcd, etcd_prefix)
    try:
        await registry.swap("app", Snapshot(), record(1, 41000, [101]))
        assert (await registry.snapshot("app")).get("port/current") == "41000"
        out = tls_etcd.etcdctl(
            "get",
            f"{etcd_prefix}/app/port/current",
            "--print-value-only",
            user=f"{TLS_USER}:{TLS_PASSWORD}",
        )
        assert out.strip() == "41000"
    finally:
        await registry.aclose()

    wrong = registry_for(
        tls_etcd.endpoint,
        etcd_prefix,
        timeout=3,
        user=TLS_USER,
        password="wrong",
        **tls_files(tls_etcd),
    )
    with pytest.raises(RegistryError, match=r"etcd at 127\.0\.0\.1:\d+ refused"):
        await wrong.snapshot("app")
    await wrong.aclose()
    plaintext = registry_for(
        tls_etcd.endpoint, etcd_prefix, timeout=3, user=TLS_USER, password=TLS_PASSWORD
    )
    with pytest.raises(RegistryError, match="etcd at") as raised:
        await plaintext.snapshot("app")
    await plaintext.aclose()
    # A TLS etcd asked in plaintext closes the connection: said with the TLS hint.
    assert "https://" in str(raised.value), raised.value


async def _value(server: EtcdServer, key: str, want: str | None) -> bool:
    return await anyio.to_thread.run_sync(server.get, key) == want


@pytest.mark.etcd
async def test_watch_marks_replayed_history_not_live_and_new_changes_live(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    # drain_pid trusts a bare PID only from a change received as it happened.
    registry = registry_for(etcd_server.endpoint, etcd_prefix, timeout=2)
    key = f"{etcd_prefix}/app/pid/current"
    try:
        start = await registry.read_keys([f"{etcd_prefix}/app/"])
        etcd_server.put(key, "1")  # made before the watch: replayed from history
        with anyio.fail_after(10):
            async with aclosing(registry.watch([f"{etcd_prefix}/app/"], since=start)) as events:
                replayed = await anext(events)
                etcd_server.put(key, "2")
                received = await anext(events)
    finally:
        await registry.aclose()
    assert [(e.value, e.live) for e in replayed] == [("1", False)]
    assert [(e.value, e.live) for e in received] == [("2", True)]


def supervised(generation: int, port: int, pids: list[int], supervisor: dict[str, Any]) -> Snapshot:
    """``record`` as flipvisor writes it: naming the ``supervisor`` whose workers these are."""
    values = dict(record(generation, port, pids).values)
    doc = json.loads(values["generation/current"])
    doc["supervisor"] = supervisor
    doc["host"] = socket.gethostname()  # as published_keys writes it: this host's supervisor
    values["generation/current"] = json.dumps(doc)
    return Snapshot(values)


@pytest.fixture
def other_supervisor() -> Iterator[subprocess.Popen[bytes]]:
    """A process that stands for another supervisor on the prefix, running on this host."""
    process = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


async def test_a_publish_leaves_keys_another_running_supervisor_promoted_and_heals_the_rest(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
    other_supervisor: subprocess.Popen[bytes],
) -> None:
    """A republication (a replaced worker's PIDs, the healing after an outage) writes keys that
    are this supervisor's (a hand edit is put right), missing, garbage, or left by a supervisor
    of this boot that no longer runs; keys another running supervisor on the prefix promoted
    since are left to it, with one warning."""
    registry = registry_for(f"http://{etcd_server.endpoint}", etcd_prefix)
    other = other_supervisor
    try:
        found = recorded_now(other.pid)
        assert found is not None
        theirs = supervised(3, 50000, [5555], found.to_json())
        ours = supervised(1, 41000, [101], this_supervisor())

        def got() -> dict[str, str]:
            keys = {s: etcd_server.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
            return {s: value for s, value in keys.items() if value is not None}

        await registry.publish("app", ours)  # missing: written
        assert got() == dict(ours.values)
        etcd_server.put(f"{etcd_prefix}/app/port/current", "9999")  # a hand edit of ours
        await registry.publish("app", ours)
        assert got() == dict(ours.values)

        for suffix, value in promoted(ours, theirs).values.items():
            etcd_server.put(f"{etcd_prefix}/app/{suffix}", value)
        ours = supervised(1, 41000, [102], this_supervisor())  # a worker replaced
        with caplog.at_level(logging.WARNING, logger="flipvisor.registry.etcd"):
            await registry.publish("app", ours)
            await registry.publish("app", ours)
        assert got() == dict(promoted(record(1, 41000, [101]), theirs).values)
        warnings = [r.getMessage() for r in caplog.records if "left to it" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert f"supervisor pid {other.pid}" in warnings[0]
        assert registry.health()["pending"] == []

        other.kill()
        await anyio.to_thread.run_sync(other.wait)
        await registry.publish("app", ours)  # a supervisor of this boot that is gone: stale
        assert got() == dict(ours.values)

        etcd_server.put(f"{etcd_prefix}/app/generation/current", "not json")
        await registry.publish("app", ours)  # garbage
        assert got() == dict(ours.values)
    finally:
        await registry.aclose()


async def test_keys_that_are_not_utf8_are_overwritten_as_garbage(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Review: a value someone wrote that is not UTF-8 made the republication's read raise
    UnicodeDecodeError out of ``publish`` (which never raises) and out of the registry's task;
    it is garbage like any value flipvisor did not write, and overwritten."""
    registry = registry_for(f"http://{etcd_server.endpoint}", etcd_prefix)
    try:
        ours = supervised(1, 41000, [101], this_supervisor())
        # Surrogates: etcdctl's argument holds the raw bytes 0xff 0xfe.
        etcd_server.put(f"{etcd_prefix}/app/generation/current", "\udcff\udcfe")
        etcd_server.put(f"{etcd_prefix}/app/port/previous", "\udcff")
        with anyio.fail_after(10):
            await registry.publish("app", ours)
        keys = {s: etcd_server.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
        assert {s: v for s, v in keys.items() if v is not None} == dict(ours.values)
    finally:
        await registry.aclose()


async def test_a_replaced_worker_s_republication_puts_only_the_keys_that_changed(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The contract: a crashed worker's replacement updates `pid/current` and the
    `generation/current` record, nothing else. The republication put all five keys, the
    `previous` ones with the values they held: a watcher of `pid/previous` saw a put (review)."""
    registry = registry_for(f"http://{etcd_server.endpoint}", etcd_prefix)

    def revision(suffix: str) -> int:
        out = etcd_server.etcdctl("get", f"{etcd_prefix}/app/{suffix}", "-w", "json")
        return int(json.loads(out)["kvs"][0]["mod_revision"])

    try:
        before = supervised(1, 41000, [101], this_supervisor())
        ours = promoted(record(0, 40000, [100]), before)
        with anyio.fail_after(10):
            await registry.publish("app", ours)
        kept = {s: revision(s) for s in ("port/previous", "pid/previous", "port/current")}
        replaced = promoted(record(0, 40000, [100]), supervised(1, 41000, [102], this_supervisor()))
        with anyio.fail_after(10):
            await registry.publish("app", replaced)
        assert etcd_server.get(f"{etcd_prefix}/app/pid/current") == "102"
        assert {s: revision(s) for s in kept} == kept
    finally:
        await registry.aclose()


async def test_a_tls_mismatch_is_said_to_be_one(tls_etcd: EtcdServer, etcd_prefix: str) -> None:
    """A certificate the client does not trust fails the handshake at once: an answer with the
    TLS settings to fix, not "unreachable"."""
    untrusted = registry_for(f"https://{tls_etcd.endpoint}", etcd_prefix, timeout=3)
    try:
        with pytest.raises(RegistryError) as raised:
            await untrusted.snapshot("app")
    finally:
        await untrusted.aclose()
    assert not isinstance(raised.value, RegistryUnanswered), raised.value
    assert "TLS handshake failed" in str(raised.value), raised.value
    assert raised.value.next_step is not None and "registry.ca" in raised.value.next_step
    assert untrusted.problem is not None and "registry.ca" in untrusted.problem


async def test_an_expired_auth_token_logs_in_again(tls_etcd: EtcdServer, etcd_prefix: str) -> None:
    """etcd forgets every token when its authentication is turned off and on (as it forgets an
    idle one after --auth-token-ttl): the next request logs in again and succeeds, with no
    advice to fix the password and no `status` problem."""
    registry = tls_registry(tls_etcd, etcd_prefix)
    try:
        await registry.swap("app", Snapshot(), record(1, 41000, [101]))
        root = f"{TLS_USER}:{TLS_PASSWORD}"
        await anyio.to_thread.run_sync(lambda: tls_etcd.etcdctl("auth", "disable", user=root))
        await anyio.to_thread.run_sync(lambda: tls_etcd.etcdctl("auth", "enable"))
        assert (await registry.snapshot("app")).get("port/current") == "41000"
        assert registry.problem is None
    finally:
        await registry.aclose()
