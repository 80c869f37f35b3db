"""The built-in confd against a real etcd (and the local file): render/check/reload on change,
resume, drain_pid, retries of a failed apply."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from flipvisor import proxy_file, watch_drain, watch_drain_hold, watch_template
from flipvisor.config import Config
from flipvisor.errors import ProxyError
from flipvisor.reaper import Reaper
from flipvisor.registry import KeyRange, Snapshot, WatchEvent, open_registry
from flipvisor.registry.etcd import EtcdRegistry
from flipvisor.registry.local_file import write_registry_file
from flipvisor.spawn import Child, spawn_process
from flipvisor.starttime import Recorded, boot_id, start_ticks_of, start_time_of
from flipvisor.watch import watches_running
from tests.clock import step_clock
from tests.fixtures.etcd import EtcdServer, free_port
from tests.stand_in_master import stand_in_master
from tests.waiting import await_until, holds

TEMPLATE = """upstream app {
{%- if get("PFX/app/port/current") != "bad" %}
  server 127.0.0.1:{{ get("PFX/app/port/current") }};
{%- endif %}
}  # {{ keys | length }} keys
"""


def make_config(
    tmp_path: Path,
    endpoint: str,
    prefix: str,
    *,
    slow_reload: bool = False,
    drain: bool = False,
    hang_on: str | None = None,
    broken_while: Path | None = None,
    mode_key: bool = False,
    pidfile: Path | None = None,
) -> Config:
    """One template entry (plus a ``drain_pid`` entry with ``drain``). ``hang_on``: a reload of
    a file holding that text hangs (until the watches are stopped). ``broken_while``: the check
    fails while that file exists, whatever the render (as ``nginx -t`` does while another file of
    nginx's config is broken). ``mode_key``: the template waits for ``app/mode`` too. Every check
    run appends a line to ``checks.log``."""
    template = tmp_path / "app.conf.j2"
    template.write_text(TEMPLATE.replace("PFX", prefix))
    dest, reload_log = tmp_path / "out" / "app.conf", tmp_path / "reloads.log"
    checks = tmp_path / "checks.log"
    broken = (
        f'if [ -e "{broken_while}" ]; then echo "{broken_while} is broken"; exit 1; fi; '
        if broken_while is not None
        else ""
    )
    pause = "sleep 0.5; " if slow_reload else ""
    if hang_on is not None:
        pause += f'if grep -q "{hang_on}" "{dest}"; then exec sleep 60; fi; '
    watch: list[dict[str, object]] = [
        {
            "keys": [
                f"{prefix}/app/port/current",
                f"{prefix}/shared/",
                *([f"{prefix}/app/mode"] if mode_key else []),
            ],
            "template": str(template),
            "dest": str(dest),
            "check_cmd": ["sh", "-c", f'echo run >> "{checks}"; {broken}grep -q server "{{path}}"'],
            "reload_cmd": ["sh", "-c", f'{pause}cat "{dest}" >> "{reload_log}"'],
            **({"pidfile": str(pidfile)} if pidfile is not None else {}),
        }
    ]
    if drain:
        watch.append(
            {
                "keys": [f"{prefix}/app/pid/previous"],
                "drain_pid": {"signal": "SIGTERM", "timeout": 5},
            }
        )
    return Config.model_validate(
        {
            "state_dir": str(tmp_path / "state"),
            "registry": {
                "backend": "etcd",
                "endpoints": [endpoint],
                "prefix": prefix,
                "timeout": 2,
            },
            "watch": watch,
        }
    )


@asynccontextmanager
async def watching(config: Config) -> AsyncIterator[tuple[Reaper, EtcdRegistry]]:
    """The watches of ``config`` running as ``flipvisor watch`` runs them."""
    reaper = Reaper(reap_orphans=False)
    registry = EtcdRegistry(config.registry)
    try:
        async with watches_running(config, registry, reaper):
            yield reaper, registry
    finally:
        await registry.aclose()  # a channel left open would outlive this test's event loop


async def _file_holds(path: Path, text: str) -> bool:
    file = anyio.Path(path)
    return await file.exists() and text in await file.read_text()


@pytest.mark.etcd
async def test_renders_when_keys_appear_and_on_change(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix)
    dest, reload_log = tmp_path / "out" / "app.conf", tmp_path / "reloads.log"
    async with watching(config):
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
        # Not yet: the prefix `shared/` has no key under it.
        etcd_server.put(f"{etcd_prefix}/shared/x", "1")
        await await_until(lambda: _file_holds(dest, "127.0.0.1:41000;"), message="first render")
        await await_until(lambda: _file_holds(reload_log, "41000"), message="first reload")
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41234")
        await await_until(lambda: _file_holds(reload_log, "41234"), message="reload on change")
        assert "127.0.0.1:41234;" in dest.read_text()

        # A render that fails the check keeps the previous file and does not reload.
        etcd_server.put(f"{etcd_prefix}/app/port/current", "bad")
        etcd_server.put(f"{etcd_prefix}/shared/y", "2")  # a later change, to know "bad" passed
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41300")
        await await_until(lambda: _file_holds(reload_log, "41300"), message="recovery")
        assert "upstream app {\n}" not in dest.read_text()
    assert reload_log.read_text().count("upstream app") == 3  # the failed checks never reloaded


@pytest.mark.etcd
async def test_resumes_after_etcd_restart_without_missing_a_change(
    restartable_etcd: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, restartable_etcd.endpoint, etcd_prefix)
    reload_log = tmp_path / "reloads.log"
    restartable_etcd.put(f"{etcd_prefix}/app/port/current", "41000")
    restartable_etcd.put(f"{etcd_prefix}/shared/x", "1")
    async with watching(config):
        await await_until(lambda: _file_holds(reload_log, "41000"), message="first reload")
        restartable_etcd.stop()
        restartable_etcd.start()
        restartable_etcd.put(f"{etcd_prefix}/app/port/current", "42000")  # before it reconnects
        await await_until(
            lambda: _file_holds(reload_log, "42000"),
            timeout=8,
            message="the change made while the watcher was away",
        )


@pytest.mark.etcd
async def test_renders_a_change_after_etcd_came_back_with_an_empty_data_dir(
    restartable_etcd: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, restartable_etcd.endpoint, etcd_prefix)
    reload_log = tmp_path / "reloads.log"
    for n in range(5):  # history the replacement will not have
        restartable_etcd.put(f"{etcd_prefix}/shared/x", str(n))
    restartable_etcd.put(f"{etcd_prefix}/app/port/current", "41000")
    async with watching(config):
        await await_until(lambda: _file_holds(reload_log, "41000"), message="first reload")
        # Blocking calls: the watcher resumes only once the new etcd holds the keys, at
        # revisions below the one it resumes from.
        restartable_etcd.restart_empty()
        restartable_etcd.put(f"{etcd_prefix}/shared/x", "1")
        restartable_etcd.put(f"{etcd_prefix}/app/port/current", "42000")
        await await_until(
            lambda: _file_holds(reload_log, "42000"),
            timeout=8,
            message="the change made in the replaced etcd",
        )


def start_sleeper(reaper: Reaper) -> Child:
    code = "import time\nwhile True: time.sleep(1)"
    return spawn_process([sys.executable, "-c", code], reaper=reaper, env=dict(os.environ))


def generation_record(children: list[Child], *, ticks: bool = False) -> str:
    """A ``generation/current`` record naming ``children`` by start time, as another writer
    (the seed's self-registering service) writes it; with ``ticks``, also by start tick and
    boot id, as flipvisor writes it."""
    return json.dumps({"generation": 1, "pids": [entry(c.pid, ticks=ticks) for c in children]})


def entry(pid: int, *, ticks: bool = False) -> dict[str, object]:
    """A record's entry for the running process ``pid`` (see ``generation_record``)."""
    started = start_time_of(pid)
    assert started is not None
    if not ticks:
        return {"pid": pid, "started": started}
    return {"pid": pid, "started": started, "ticks": start_ticks_of(pid), "boot_id": boot_id()}


@pytest.mark.etcd
async def test_drain_pid_refuses_a_pid_it_never_saw_serving(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    async with watching(config) as (reaper, _):
        bystander = start_sleeper(reaper)
        try:
            etcd_server.put(f"{etcd_prefix}/app/pid/previous", str(bystander.pid))

            async def refused() -> bool:
                return f"refusing to signal pid={bystander.pid}" in caplog.text

            await await_until(refused, message="the refusal to be logged")
            assert bystander.returncode is None
        finally:
            await bystander.stop(timeout=5)
            bystander.close()


@pytest.mark.etcd
async def test_drain_pid_drains_a_seen_process_after_the_reload(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True, slow_reload=True)
    reload_log = tmp_path / "reloads.log"
    async with watching(config) as (reaper, registry):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            etcd_server.put(f"{etcd_prefix}/shared/x", "1")
            etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
            etcd_server.put(f"{etcd_prefix}/app/generation/current", generation_record([old]))
            etcd_server.put(f"{etcd_prefix}/app/pid/current", str(old.pid))
            await await_until(lambda: _file_holds(reload_log, "41000"), message="first reload")

            # The promotion, as a flip writes it: one transaction.
            seen = await registry.snapshot("app")
            promoted = {
                **seen.values,
                "port/current": "42000",
                "port/previous": "41000",
                "pid/current": str(new.pid),
                "pid/previous": str(old.pid),
                "generation/current": generation_record([new]),
            }
            await registry.swap("app", seen, Snapshot(promoted))
            with anyio.fail_after(10):
                assert await old.wait() == -signal.SIGTERM
            # Drained only after the reload for the same change had finished.
            assert "42000" in reload_log.read_text()
            assert new.returncode is None
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


async def _serve_old(
    etcd: EtcdServer, prefix: str, old: Child, reload_log: Path, *, ticks: bool = False
) -> None:
    """The keys of ``old`` serving on port 41000, and the template's reload of them done."""
    etcd.put(f"{prefix}/shared/x", "1")
    etcd.put(f"{prefix}/app/port/current", "41000")
    etcd.put(f"{prefix}/app/generation/current", generation_record([old], ticks=ticks))
    etcd.put(f"{prefix}/app/pid/current", str(old.pid))
    await await_until(lambda: _file_holds(reload_log, "41000"), message="first reload")


async def _promote(registry: EtcdRegistry, port: str, new: Child, *, ticks: bool = False) -> None:
    """The promotion of ``new`` on ``port``, as a flip writes it: one transaction."""
    seen = await registry.snapshot("app")
    promoted = {
        **seen.values,
        "port/current": port,
        "port/previous": seen.values["port/current"],
        "pid/current": str(new.pid),
        "pid/previous": seen.values["pid/current"],
        "generation/current": generation_record([new], ticks=ticks),
    }
    await registry.swap("app", seen, Snapshot(promoted))


@pytest.mark.etcd
@pytest.mark.parametrize("ticks", [True, False], ids=["flipvisor-record", "start-time-record"])
async def test_drain_pid_drains_the_process_it_saw_serving_after_a_clock_step(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    ticks: bool,
) -> None:
    """After a wall-clock step every start time in seconds reads as another
    (``tests/clock.py``). The process seen as pid/current is known by its start tick and boot
    id: the record's (flipvisor's), or, from a record with start times only (another writer's),
    read when the watcher saw it there."""
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    reload_log = tmp_path / "reloads.log"
    async with watching(config) as (reaper, registry):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            await _serve_old(etcd_server, etcd_prefix, old, reload_log, ticks=ticks)
            await await_until(
                lambda: holds(f"pid={old.pid} is pid/current" in caplog.text),
                message="the drain entry to see the old process serving",
            )
            step_clock(monkeypatch, -3600.0)
            await _promote(registry, "42000", new, ticks=ticks)
            with anyio.fail_after(10):
                assert await old.wait() == -signal.SIGTERM
            assert new.returncode is None
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


@pytest.mark.etcd
async def test_drain_pid_is_held_while_a_template_failed_until_it_applies_a_change(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The promotion's render fails its check, so the proxy still routes only to the old
    # process: draining it would be an outage.
    monkeypatch.setattr(watch_drain_hold, "CATCH_UP_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    dest, reload_log = tmp_path / "out" / "app.conf", tmp_path / "reloads.log"
    async with watching(config) as (reaper, registry):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            await _serve_old(etcd_server, etcd_prefix, old, reload_log)
            await _promote(registry, "bad", new)  # "bad" renders no server: the check fails

            def held() -> int:
                return sum(
                    f"not draining pid={old.pid}: watch {dest} failed" in r.getMessage()
                    for r in caplog.records
                    if r.levelno == logging.ERROR
                )

            # Held past several CATCH_UP_TIMEOUTs, saying so each time (not "draining anyway").
            await await_until(lambda: holds(held() >= 3), message="the drain to be held")
            assert old.returncode is None
            assert "draining anyway" not in caplog.text

            etcd_server.put(f"{etcd_prefix}/app/port/current", "42000")  # a render that works
            with anyio.fail_after(10):
                assert await old.wait() == -signal.SIGTERM
            assert "127.0.0.1:42000;" in dest.read_text()
            assert new.returncode is None
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


@pytest.mark.etcd
async def test_drain_pid_goes_ahead_after_a_slow_template_gets_catch_up_timeout(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch_drain_hold, "CATCH_UP_TIMEOUT", 0.5)
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True, hang_on="42000")
    reload_log = tmp_path / "reloads.log"
    async with watching(config) as (reaper, registry):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            await _serve_old(etcd_server, etcd_prefix, old, reload_log)
            await _promote(registry, "42000", new)  # its reload hangs: slow, not failed
            with anyio.fail_after(10):
                assert await old.wait() == -signal.SIGTERM
            assert "did not catch up within 0.5 s; draining anyway" in caplog.text
            assert "42000" not in reload_log.read_text()  # the reload was still running
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


@pytest.mark.etcd
async def test_drain_pid_drains_after_a_re_read_a_process_it_saw_before(
    restartable_etcd: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The promotion happens while the watcher is away, in an etcd whose revision went back:
    # the watcher reads the keys again, and the promotion is in what it reads.
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, restartable_etcd.endpoint, etcd_prefix, drain=True)
    reload_log = tmp_path / "reloads.log"
    for n in range(5):  # history the replacement will not have
        restartable_etcd.put(f"{etcd_prefix}/filler", str(n))
    async with watching(config) as (reaper, _):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            await _serve_old(restartable_etcd, etcd_prefix, old, reload_log)
            await await_until(
                lambda: holds(f"pid={old.pid} is pid/current" in caplog.text),
                message="the drain entry to see the old process serving",
            )
            # Blocking calls: the watcher comes back only once the promotion is in place.
            restartable_etcd.restart_empty()
            app = f"{etcd_prefix}/app"
            for key, value in [
                (f"{etcd_prefix}/shared/x", "1"),
                (f"{app}/port/current", "42000"),
                (f"{app}/generation/current", generation_record([new])),
                (f"{app}/pid/current", str(new.pid)),
                (f"{app}/pid/previous", str(old.pid)),
            ]:
                restartable_etcd.put(key, value)
            with anyio.fail_after(15):
                assert await old.wait() == -signal.SIGTERM
            assert "42000" in reload_log.read_text()
            assert new.returncode is None
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


def popen_sleeper() -> subprocess.Popen[bytes]:
    """A process started before the watcher (and its reaper) runs; ``subprocess`` reaps it."""
    return subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)


def record_of(process: subprocess.Popen[bytes]) -> str:
    started = start_time_of(process.pid)
    assert started is not None
    return json.dumps({"generation": 1, "pids": [{"pid": process.pid, "started": started}]})


def promote_by_hand(
    etcd: EtcdServer, prefix: str, new: subprocess.Popen[bytes], old_pid: int
) -> None:
    """The promotion of ``new`` over ``old_pid``, written key by key."""
    etcd.put(f"{prefix}/app/generation/current", record_of(new))
    etcd.put(f"{prefix}/app/pid/current", str(new.pid))
    etcd.put(f"{prefix}/app/pid/previous", str(old_pid))


@pytest.mark.etcd
async def test_drain_pid_does_not_trust_a_bare_pid_current_found_at_start(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pid/current without a generation record naming it, there before the watcher: perhaps
    # stale, its PID reused by the process now running under it.
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    bystander, new = popen_sleeper(), popen_sleeper()
    try:
        etcd_server.put(f"{etcd_prefix}/app/pid/current", str(bystander.pid))
        async with watching(config):
            await await_until(
                lambda: holds(f"pid={bystander.pid}" in caplog.text),
                message="the drain entry to read pid/current",
            )
            promote_by_hand(etcd_server, etcd_prefix, new, bystander.pid)
            await await_until(
                lambda: holds(f"refusing to signal pid={bystander.pid}" in caplog.text),
                message="the refusal",
            )
        assert f"not trusting pid={bystander.pid} found in pid/current at start" in caplog.text
        assert bystander.poll() is None
    finally:
        for process in (bystander, new):
            process.kill()
            process.wait(timeout=5)


@pytest.mark.etcd
async def test_drain_pid_trusts_the_generation_record_found_at_start(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    old, new = popen_sleeper(), popen_sleeper()
    try:
        etcd_server.put(f"{etcd_prefix}/app/generation/current", record_of(old))
        etcd_server.put(f"{etcd_prefix}/app/pid/current", str(old.pid))
        async with watching(config):
            await await_until(
                lambda: holds(f"pid={old.pid} is pid/current" in caplog.text),
                message="the drain entry to read pid/current",
            )
            promote_by_hand(etcd_server, etcd_prefix, new, old.pid)
            await await_until(lambda: holds(old.poll() is not None), message="the drain")
        assert old.returncode == -signal.SIGTERM
        assert new.poll() is None
    finally:
        for process in (old, new):
            process.kill()
            process.wait(timeout=5)


async def test_local_registry_change_during_the_initial_reload_is_rendered(tmp_path: Path) -> None:
    # The watch opens only after the initial render, check and reload; the file keeps no
    # history, so it must continue from the read the render used, not from the file as it is.
    template, dest = tmp_path / "port.j2", tmp_path / "out" / "port.txt"
    template.write_text('port={{ get("p/app/port/current") }}\n')
    reloading, go = tmp_path / "reloading", tmp_path / "go"
    # The first reload holds until the test says go (10 s at most).
    first_reload_waits = (
        f'[ -e "{reloading}" ] && exit 0; touch "{reloading}"; i=0; '
        f'while [ ! -e "{go}" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done'
    )
    config = Config.model_validate(
        {
            "state_dir": str(tmp_path / "state"),
            "registry": {"backend": "local", "prefix": "p"},
            "watch": [
                {
                    "keys": ["p/app/port/current"],
                    "template": str(template),
                    "dest": str(dest),
                    "reload_cmd": ["sh", "-c", first_reload_waits],
                }
            ],
        }
    )
    registry_file = config.state_dir / "registry.json"
    write_registry_file(registry_file, {"p/app/port/current": "41000"})
    async with watches_running(config, open_registry(config), Reaper(reap_orphans=False)):
        await await_until(lambda: anyio.Path(reloading).exists(), message="the first reload")
        write_registry_file(registry_file, {"p/app/port/current": "42000"})
        go.touch()
        await await_until(
            lambda: _file_holds(dest, "port=42000"), message="the change made during the reload"
        )


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The flipvisor warnings and errors logged so far."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("flipvisor")
    ]


def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch's failed apply retried within 50-200 ms, so that tests see several retries."""
    monkeypatch.setattr(watch_template, "APPLY_RETRY_FIRST", 0.05)
    monkeypatch.setattr(watch_template, "APPLY_RETRY_MAX", 0.2)


def outputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """What ``make_config``'s watch writes: the rendered file, the reload log, the check log."""
    return tmp_path / "out" / "app.conf", tmp_path / "reloads.log", tmp_path / "checks.log"


@pytest.mark.etcd
async def test_a_failed_check_is_retried_until_it_passes_without_a_key_change(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another file of the proxy's config is broken, so every check fails until the operator
    # fixes it; nothing in the registry changes after that.
    fast_retries(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="flipvisor")
    broken = tmp_path / "broken-elsewhere"
    broken.touch()
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, broken_while=broken)
    dest, reload_log, checks = outputs(tmp_path)
    async with watching(config):
        etcd_server.put(f"{etcd_prefix}/shared/x", "1")
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
        await await_until(lambda: holds(_lines(checks) >= 4), message="the check to be retried")
        assert not reload_log.exists()
        # One warning (the proxy step) and one error (the watch) for the first failure; the
        # retries that failed the same way are logged at DEBUG only.
        loud = _loud(caplog)
        assert len(loud) == 2, loud
        assert f"{broken} is broken" in loud[-1]

        broken.unlink()  # the operator's fix
        await await_until(lambda: _file_holds(reload_log, "41000"), message="a retry to apply")
        assert "127.0.0.1:41000;" in dest.read_text()
        await await_until(
            lambda: holds("applied on retry" in caplog.text), message="the recovery to be logged"
        )
        checks_after = _lines(checks)
    assert _lines(checks) == checks_after  # no retry once it applied
    assert reload_log.read_text().count("upstream app") == 1


@pytest.mark.etcd
async def test_a_reload_the_proxy_did_not_apply_fails_and_is_retried_until_it_does(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a pidfile, a reload whose command succeeded but that the master did not apply (no
    new worker) fails like a failed reload: the previous file is put back, and the render is
    retried until the proxy takes it."""
    fast_retries(monkeypatch)
    monkeypatch.setattr(watch_template, "COMMAND_TIMEOUT", 1.0)  # the wait for a new worker too
    caplog.set_level(logging.INFO, logger="flipvisor")
    applies = tmp_path / "applies"
    dest, reload_log, _ = outputs(tmp_path)
    # A master that rejects every reload (no new worker) until ``applies`` exists.
    with stand_in_master(tmp_path, applies_while=applies) as pidfile:
        config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, pidfile=pidfile)
        entry = config.watch[0]
        assert entry.reload_cmd is not None
        *shell, script = entry.reload_cmd  # sh -c SCRIPT: the reload signals the master too
        reload_cmd = [*shell, f'{script}; kill -HUP "$(cat {pidfile})"']
        entry = entry.model_copy(update={"reload_cmd": reload_cmd})
        async with watching(config.model_copy(update={"watch": [entry]})):
            etcd_server.put(f"{etcd_prefix}/shared/x", "1")
            etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
            await await_until(
                lambda: holds("nginx has not applied the reload" in caplog.text),
                message="the reload the proxy did not apply, reported",
            )
            assert reload_log.exists()  # the command ran, and succeeded
            assert not dest.exists()  # put back as it was: no file
            applies.touch()  # the operator frees the port, say
            await await_until(
                lambda: holds("applied on retry" in caplog.text), message="a retry to apply"
            )
            assert "127.0.0.1:41000;" in dest.read_text()


@pytest.mark.etcd
async def test_a_retry_after_a_failed_restore_still_checks_and_reloads(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check fails, and putting the previous file back fails too (the disk filled up
    # meanwhile): the unchecked render stays in place. A retry that found it "already in place"
    # would count as applied, never checked nor reloaded, and release any drain it holds.
    fast_retries(monkeypatch)
    restore, failed = proxy_file.Installed.restore, []

    def restore_fails_once(self: proxy_file.Installed, *, quiet: bool = False) -> None:
        if not failed:
            failed.append(self.dest)
            raise ProxyError(f"cannot restore the previous {self.dest}: No space left on device")
        restore(self, quiet=quiet)

    monkeypatch.setattr(proxy_file.Installed, "restore", restore_fails_once)
    broken = tmp_path / "broken-elsewhere"
    broken.touch()
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, broken_while=broken)
    dest, reload_log, checks = outputs(tmp_path)
    async with watching(config):
        etcd_server.put(f"{etcd_prefix}/shared/x", "1")
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
        await await_until(lambda: holds(bool(failed)), message="the failed restore")
        assert "127.0.0.1:41000;" in dest.read_text()  # left in place, unchecked
        await await_until(
            lambda: holds(_lines(checks) >= 3), timeout=5, message="the retries to check again"
        )
        assert not reload_log.exists()
        broken.unlink()
        await await_until(lambda: _file_holds(reload_log, "41000"), message="a retry to reload")


@pytest.mark.etcd
async def test_a_render_error_is_retried_with_the_template_as_it_is_then(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A retry renders again, from the template and the keys as they are at that time.
    fast_retries(monkeypatch)
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix)
    template, reload_log = tmp_path / "app.conf.j2", tmp_path / "reloads.log"
    good = template.read_text()
    template.write_text(good.replace("{%- endif %}", ""))  # a syntax error
    async with watching(config):
        etcd_server.put(f"{etcd_prefix}/shared/x", "1")
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
        await await_until(lambda: holds(bool(_loud(caplog))), message="the render error")
        template.write_text(good)  # the operator's fix
        await await_until(lambda: _file_holds(reload_log, "41000"), message="a retry to apply")


@pytest.mark.etcd
async def test_a_key_change_during_the_backoff_applies_at_once_and_restarts_it(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch_template, "APPLY_RETRY_FIRST", 60.0)
    monkeypatch.setattr(watch_template, "APPLY_RETRY_MAX", 60.0)
    broken = tmp_path / "broken-elsewhere"
    broken.touch()
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, broken_while=broken)
    dest, reload_log, checks = outputs(tmp_path)
    async with watching(config):
        etcd_server.put(f"{etcd_prefix}/shared/x", "1")
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
        await await_until(
            lambda: holds("retrying in 60 s" in caplog.text), message="the first failure"
        )
        ran = _lines(checks)
        # The change's own failure starts a new backoff, from the first delay.
        monkeypatch.setattr(watch_template, "APPLY_RETRY_FIRST", 0.05)
        etcd_server.put(f"{etcd_prefix}/app/port/current", "42000")
        # At once: the backoff had about a minute left.
        await await_until(
            lambda: holds(_lines(checks) > ran), timeout=5, message="the change to be checked"
        )
        broken.unlink()
        await await_until(
            lambda: _file_holds(reload_log, "42000"), message="a retry of the change to apply"
        )
        assert "127.0.0.1:42000;" in dest.read_text()
    assert "41000" not in reload_log.read_text()  # never the failed attempt's stale values


@pytest.mark.etcd
async def test_stopping_during_the_backoff_is_prompt(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch_template, "APPLY_RETRY_FIRST", 60.0)
    broken = tmp_path / "broken-elsewhere"
    broken.touch()
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, broken_while=broken)
    async with watching(config):
        etcd_server.put(f"{etcd_prefix}/shared/x", "1")
        etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
        await await_until(
            lambda: holds("retrying in 60 s" in caplog.text), message="the first failure"
        )
        stopping = anyio.current_time()
    assert anyio.current_time() - stopping < 2.0


@pytest.mark.etcd
async def test_a_held_drain_proceeds_once_a_retry_applies_the_change(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch_drain_hold, "CATCH_UP_TIMEOUT", 0.5)
    fast_retries(monkeypatch)
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    broken = tmp_path / "broken-elsewhere"
    config = make_config(
        tmp_path, etcd_server.endpoint, etcd_prefix, drain=True, broken_while=broken
    )
    dest, reload_log, checks = outputs(tmp_path)
    async with watching(config) as (reaper, registry):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            await _serve_old(etcd_server, etcd_prefix, old, reload_log)
            broken.touch()
            await _promote(registry, "42000", new)  # its check fails until the fix

            def held() -> int:
                return sum(
                    f"not draining pid={old.pid}: watch {dest} failed" in r.getMessage()
                    for r in caplog.records
                    if r.levelno == logging.ERROR
                )

            await await_until(lambda: holds(held() >= 2), message="the drain to be held")
            ran = _lines(checks)
            await await_until(lambda: holds(_lines(checks) > ran + 1), message="retries")
            assert old.returncode is None

            broken.unlink()  # the operator's fix; no key changes
            with anyio.fail_after(10):
                assert await old.wait() == -signal.SIGTERM
            # Drained only after the retry had reloaded the proxy.
            assert "42000" in reload_log.read_text()
            assert "127.0.0.1:42000;" in dest.read_text()
            assert new.returncode is None
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


@pytest.mark.etcd
@pytest.mark.parametrize("then", ["the key is back", "the process is gone"])
async def test_drain_pid_is_held_while_a_template_waits_for_a_deleted_key(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    then: str,
) -> None:
    """A key of the template is deleted, then the program is promoted: nothing is rendered, so
    the file still routes to the old process only, and its drain is held until the key is back.
    Or until the old process exits by itself (its supervisor stopped it, which withdrew the key):
    then the hold ends, quietly, instead of an error every CATCH_UP_TIMEOUT while the key stays
    away."""
    monkeypatch.setattr(watch_drain_hold, "CATCH_UP_TIMEOUT", 0.3)
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True, mode_key=True)
    dest, reload_log, _ = outputs(tmp_path)
    async with watching(config) as (reaper, registry):
        old, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            etcd_server.put(f"{etcd_prefix}/app/mode", "on")
            await _serve_old(etcd_server, etcd_prefix, old, reload_log)
            etcd_server.etcdctl("del", f"{etcd_prefix}/app/mode")
            await _promote(registry, "42000", new)
            held = f"not draining pid={old.pid}: watch {dest} is waiting"
            await await_until(lambda: holds(held in caplog.text), message="the drain to be held")
            assert old.returncode is None
            assert "draining anyway" not in caplog.text

            if then == "the key is back":
                etcd_server.put(f"{etcd_prefix}/app/mode", "on")
                with anyio.fail_after(10):
                    assert await old.wait() == -signal.SIGTERM
                assert "42000" in reload_log.read_text()
            else:
                await old.stop(timeout=5)
                await await_until(
                    lambda: holds(f"pid={old.pid} gone already while watch" in caplog.text),
                    message="the hold to end",
                )
                errors = caplog.text.count(held)
                with anyio.move_on_after(1.0):  # > 3 CATCH_UP_TIMEOUTs: no error comes any more
                    await await_until(lambda: holds(caplog.text.count(held) > errors), timeout=2)
                assert caplog.text.count(held) == errors
            assert new.returncode is None
        finally:
            for child in (old, new):
                await child.stop(timeout=5)
                child.close()


@pytest.mark.etcd
async def test_drain_pid_never_drains_the_process_pid_current_still_names(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A seed-style service running its swap again for the same process: previous = current.
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    async with watching(config) as (reaper, _):
        serving = start_sleeper(reaper)
        try:
            await _serve_old(etcd_server, etcd_prefix, serving, tmp_path / "reloads.log")
            etcd_server.put(f"{etcd_prefix}/app/pid/previous", str(serving.pid))
            await await_until(
                lambda: holds(f"not signalling pid={serving.pid}: " in caplog.text),
                message="the drain to be refused",
            )
            assert serving.returncode is None
        finally:
            await serving.stop(timeout=5)
            serving.close()


@pytest.mark.etcd
async def test_drain_pid_refuses_the_proxy_master_even_seen_as_pid_current(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "proxy.pid"
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True, pidfile=pidfile)
    async with watching(config) as (reaper, registry):
        master, new = start_sleeper(reaper), start_sleeper(reaper)
        try:
            pidfile.write_text(f"{master.pid}\n")
            # pid/current set by hand to the proxy's master, then a promotion replaces it.
            await _serve_old(etcd_server, etcd_prefix, master, tmp_path / "reloads.log")
            await _promote(registry, "42000", new)
            await await_until(
                lambda: holds(
                    f"refusing to signal pid={master.pid}: it is the proxy's master" in caplog.text
                ),
                message="the refusal",
            )
            assert master.returncode is None
        finally:
            for child in (master, new):
                await child.stop(timeout=5)
                child.close()


def test_drain_pid_refuses_the_watcher_its_parent_and_init(tmp_path: Path) -> None:
    # Not signalled for real: without the guard the test would kill itself (or its shell).
    config = make_config(tmp_path, "127.0.0.1:1", "p", drain=True)
    registry = EtcdRegistry(config.registry)
    assert config.watch[1].drain_pid is not None
    drain = watch_drain.DrainWatch(config.watch[1].keys[0], config.watch[1].drain_pid, registry, [])
    for pid, what in [(os.getpid(), "watcher itself"), (os.getppid(), "parent"), (1, "init")]:
        protected = drain._protected(pid)
        assert protected is not None and what in protected


async def test_drain_pid_trusts_a_bare_pid_only_from_a_live_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The seed's layout (no generation record), fed to the entry as its registry watch would.
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, "127.0.0.1:1", "p", drain=True)
    entry = config.watch[1]
    assert entry.drain_pid is not None
    drain = watch_drain.DrainWatch(
        entry.keys[0], entry.drain_pid, EtcdRegistry(config.registry), []
    )
    current, previous = "p/app/pid/current", "p/app/pid/previous"
    late, old, reused, new = (popen_sleeper() for _ in range(4))
    try:
        async with anyio.create_task_group() as tg:
            drain._tg = tg
            await drain.started(KeyRange({}, 1))
            # Received late (replayed after an outage, or a new read): the process running under
            # the PID now may not be the one the key named when it was written.
            await drain.changed([WatchEvent(current, str(late.pid), 2)])
            await drain.changed([WatchEvent(current, str(old.pid), 3, live=True)])
            await drain.changed(
                [WatchEvent(current, str(new.pid), 4), WatchEvent(previous, str(late.pid), 4)]
            )
            assert f"refusing to signal pid={late.pid}: never seen" in caplog.text
            # A live change whose process started after it arrived: the PID was reused.
            monkeypatch.setattr(watch_drain, "ticks_now", lambda: 0)
            await drain.changed([WatchEvent(current, str(reused.pid), 5, live=True)])
            assert f"not trusting pid={reused.pid} in pid/current" in caplog.text
            # The process seen live is drained.
            await drain.changed([WatchEvent(previous, str(old.pid), 6, live=True)])
            await await_until(lambda: holds(old.poll() is not None), message="the drain")
            tg.cancel_scope.cancel()
        assert old.returncode == -signal.SIGTERM
        assert late.poll() is None and reused.poll() is None and new.poll() is None
    finally:
        for process in (late, old, reused, new):
            process.kill()
            process.wait(timeout=5)


def drain_watch(tmp_path: Path) -> watch_drain.DrainWatch:
    """A drain_pid entry on p/app/pid/previous, to feed changes to as its registry watch would."""
    config = make_config(tmp_path, "127.0.0.1:1", "p", drain=True)
    entry = config.watch[1]
    assert entry.drain_pid is not None
    return watch_drain.DrainWatch(entry.keys[0], entry.drain_pid, EtcdRegistry(config.registry), [])


async def test_drain_pid_drains_a_bare_pid_seen_live_after_a_clock_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare PID (no record) seen in a live change is known by the start tick and boot id of
    the process running under it then: a wall-clock step before the drain (``tests/clock.py``)
    does not make it another."""
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    drain = drain_watch(tmp_path)
    current, previous = "p/app/pid/current", "p/app/pid/previous"
    old, new = popen_sleeper(), popen_sleeper()
    try:
        async with anyio.create_task_group() as tg:
            drain._tg = tg
            await drain.started(KeyRange({}, 1))
            await drain.changed([WatchEvent(current, str(old.pid), 2, live=True)])
            step_clock(monkeypatch, 3600.0)
            await drain.changed(
                [
                    WatchEvent(current, str(new.pid), 3, live=True),
                    WatchEvent(previous, str(old.pid), 3, live=True),
                ]
            )
            await await_until(lambda: holds(old.poll() is not None), message="the drain")
            tg.cancel_scope.cancel()
        assert old.returncode == -signal.SIGTERM
        assert new.poll() is None
    finally:
        for process in (old, new):
            process.kill()
            process.wait(timeout=5)


@pytest.mark.parametrize("other", ["tick", "boot"])
async def test_drain_pid_refuses_a_process_the_record_s_start_tick_does_not_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, other: str
) -> None:
    """The record's start tick and boot id decide, even where its start time matches the process
    running under the PID: another tick is a recycled PID, another boot id another boot's."""
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    drain = drain_watch(tmp_path)
    old = popen_sleeper()
    try:
        named = entry(old.pid, ticks=True)
        if other == "tick":
            named["ticks"] = int(str(named["ticks"])) + 1
        else:
            named["boot_id"] = "0" * 8 + boot_id()[8:]
        record = json.dumps({"generation": 1, "pids": [named]})
        async with anyio.create_task_group() as tg:
            drain._tg = tg
            keys = {"p/app/pid/current": str(old.pid), "p/app/generation/current": record}
            await drain.started(KeyRange(keys, 1))
            assert f"pid={old.pid} is pid/current" in caplog.text
            await drain.changed(
                [
                    WatchEvent("p/app/pid/current", None, 2, live=True),
                    WatchEvent("p/app/pid/previous", str(old.pid), 2, live=True),
                ]
            )
            await await_until(
                lambda: holds(f"pid={old.pid} is gone already (or is another" in caplog.text),
                message="the refusal",
            )
            tg.cancel_scope.cancel()
        assert old.poll() is None
    finally:
        old.kill()
        old.wait(timeout=5)


@pytest.mark.etcd
async def test_a_restarted_watcher_reloads_the_render_it_finds_in_place(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    # An earlier run was killed during its reload: the file is in place, the proxy may never
    # have loaded it. The first apply after start checks and reloads it all the same.
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix)
    _, reload_log, checks = outputs(tmp_path)
    etcd_server.put(f"{etcd_prefix}/shared/x", "1")
    etcd_server.put(f"{etcd_prefix}/app/port/current", "41000")
    async with watching(config):
        await await_until(lambda: _file_holds(reload_log, "41000"), message="the first reload")
    reload_log.unlink()
    checks.unlink()
    async with watching(config):
        await await_until(lambda: _file_holds(reload_log, "41000"), message="a reload at start")
    assert _lines(checks) == 1


@pytest.mark.etcd
async def test_drain_pid_warns_of_a_running_pid_previous_it_never_saw_but_not_of_a_gone_one(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A promotion made while no watcher ran: the replaced process is left to the operator.
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    config = make_config(tmp_path, etcd_server.endpoint, etcd_prefix, drain=True)
    running, gone = popen_sleeper(), popen_sleeper()
    gone.kill()
    gone.wait(timeout=5)
    try:
        etcd_server.put(f"{etcd_prefix}/app/pid/previous", f"{running.pid},{gone.pid}")
        async with watching(config):
            await await_until(
                lambda: holds(f"pid={gone.pid} found at start" in caplog.text),
                message="the drain entry to read pid/previous",
            )
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(f"pid={running.pid} found at start" in w and "still runs" in w for w in warnings)
        assert not any(f"pid={gone.pid}" in w for w in warnings), warnings
        assert running.poll() is None
    finally:
        running.kill()
        running.wait(timeout=5)


async def test_an_unreachable_registry_is_warned_about_once_per_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flipvisor.watch_follow")
    config = make_config(tmp_path, f"127.0.0.1:{free_port()}", "p", drain=True)
    dest = tmp_path / "out" / "app.conf"

    def said(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "flipvisor.watch_follow"
            and r.levelno == level
            and "retrying" in r.getMessage()
        ]

    async with watching(config):
        await await_until(
            lambda: holds(sum(f"watch {dest}" in m for m in said(logging.DEBUG)) >= 2),
            message="the entries to retry a few times",
        )
    warned = said(logging.WARNING)
    assert sum(f"watch {dest}" in m for m in warned) == 1, warned
    assert sum("drain_pid p/app/pid/previous" in m for m in warned) == 1, warned


async def test_drain_pid_keeps_a_serving_previous_pending_when_pid_current_is_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A swap in two puts, ``pid/previous`` first, holds the drain until ``pid/current`` moves
    on. A ``pid/current`` deleted by hand meanwhile has not moved on to another process: the one
    still serving is not drained then, only once ``pid/current`` names another one."""
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    drain = drain_watch(tmp_path)
    current, previous = "p/app/pid/current", "p/app/pid/previous"
    old, new = popen_sleeper(), popen_sleeper()
    try:
        async with anyio.create_task_group() as tg:
            drain._tg = tg
            await drain.started(KeyRange({}, 1))
            await drain.changed([WatchEvent(current, str(old.pid), 2, live=True)])
            await drain.changed([WatchEvent(previous, str(old.pid), 3, live=True)])
            assert drain.serving_previous == {old.pid}
            await drain.changed([WatchEvent(current, None, 4, live=True)])
            # A drain started now would have signalled by the time every task waits (no
            # template to wait for, no settle): none did.
            await anyio.wait_all_tasks_blocked()
            assert f"to pid={old.pid}" not in caplog.text
            assert f"pid/current deleted: pid={old.pid} kept pending" in caplog.text
            assert old.poll() is None
            await drain.changed([WatchEvent(current, str(new.pid), 5, live=True)])
            await await_until(lambda: holds(old.poll() is not None), message="the drain")
            tg.cancel_scope.cancel()
        assert old.returncode == -signal.SIGTERM
        assert new.poll() is None
    finally:
        for process in (old, new):
            process.kill()
            process.wait(timeout=5)


async def test_drain_pid_forgets_the_processes_it_saw_once_they_are_gone(tmp_path: Path) -> None:
    """A long run sees a new ``pid/current`` at every promotion and worker restart: those that
    are gone are forgotten (none can be drained), so ``seen`` holds only processes still running."""
    drain = drain_watch(tmp_path)
    current = "p/app/pid/current"
    await drain.started(KeyRange({}, 1))
    for revision in range(2, 6):
        process = popen_sleeper()
        try:
            await drain.changed([WatchEvent(current, str(process.pid), revision, live=True)])
            assert any(seen.pid == process.pid for seen in drain.seen)
        finally:
            process.kill()
            process.wait(timeout=5)  # reaped: its PID names nothing now
    assert len(drain.seen) == 1  # the last one, not forgotten until another is seen


async def test_drain_pid_says_a_process_it_saw_and_forgot_is_gone_not_never_seen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process seen as ``pid/current`` and forgotten once gone: ``pid/previous`` naming it
    said "never seen" (its PID free), or warned to stop by hand whatever reused its PID. Kept
    among the last processes gone, it is said to be gone already."""
    caplog.set_level(logging.INFO, logger="flipvisor.watch_drain")
    drain = drain_watch(tmp_path)
    current, previous = "p/app/pid/current", "p/app/pid/previous"
    await drain.started(KeyRange({}, 1))
    old, new = popen_sleeper(), popen_sleeper()
    try:
        await drain.changed([WatchEvent(current, str(old.pid), 2, live=True)])
        old.kill()
        old.wait(timeout=5)  # reaped: gone, its PID free
        await drain.changed([WatchEvent(current, str(new.pid), 3, live=True)])
        assert not any(seen.pid == old.pid for seen in drain.seen)  # forgotten
        await drain.changed([WatchEvent(previous, str(old.pid), 4, live=True)])
        assert f"pid={old.pid} is gone already" in caplog.text
        assert f"pid={old.pid} is not running (never seen" not in caplog.text
    finally:
        for process in (old, new):
            process.kill()
            process.wait(timeout=5)


def test_drain_pid_keeps_a_bounded_number_of_processes_gone(tmp_path: Path) -> None:
    drain = drain_watch(tmp_path)
    most = watch_drain.TOMBSTONES
    for pid in range(1, most + 11):
        drain._forget(Recorded(pid, started=1764490000.0))
    assert [process.pid for process in drain.gone] == list(range(11, most + 11))
