"""``flipvisor watch`` as a real process: the seed's self-registering service flipped through a
real nginx by the confd alone with zero failed requests, a flip that converges by itself once a
broken nginx config is fixed, ``drain_pid`` refusing a PID it never saw, the ``watch:`` section
under ``flipvisor run``, and the watcher's own lifecycle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from flipvisor.registry.local_file import write_registry_file
from flipvisor.watch_drain_hold import RELOAD_SETTLE
from tests.e2e.load import Load
from tests.e2e.test_lifecycle import held_back
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.flipvisor import ROOT, Flipvisor, svc_command
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until

SELFREGISTER = ROOT / "tests" / "apps" / "selfregister.py"
SETTLED_RELOAD = ROOT / "tests" / "apps" / "settled_reload.py"
# The log's times are to the millisecond, and "rendered and reloaded" is written a moment after
# the reload's time that the grace counts from.
LOG_CLOCK = 0.05
STOP_TIMEOUT = 15.0

NGINX_TEMPLATE = """upstream selfregistered {
    server 127.0.0.1:{{ get("PFX/svc/port/current") }};
}
server {
    listen 127.0.0.1:LISTEN;
    location / {
        proxy_pass http://selfregistered;
    }
}
"""


class Watcher:
    """``flipvisor watch -c CONFIG`` as a subprocess, its output in a file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config_path = directory / "watch.yaml"
        self.output_path = directory / "watch.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, config: dict[str, Any]) -> subprocess.Popen[bytes]:
        config = {"state_dir": str(self.dir / "state"), **config}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        with open(self.output_path, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flipvisor", "watch", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return self.process

    def output(self) -> str:
        try:
            return self.output_path.read_text()
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, then wait; SIGKILL (and fail) past the deadline."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("flipvisor watch outlived SIGTERM:\n" + self.output()[-4000:])


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[Watcher]:
    w = Watcher(tmp_path)
    try:
        yield w
    finally:
        w.stop()


class Service:
    """One self-registering service version, started by the test (nobody supervises it)."""

    def __init__(self, directory: Path, etcd: EtcdServer, prefix: str, version: str) -> None:
        self.version = version
        self.output_path = directory / f"selfregister-{version}.log"
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(SELFREGISTER),
                    *("--version", version, "--prefix", prefix, "--program", "svc"),
                    *("--etcd", etcd.url),
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.output_path.read_text()

    def close(self) -> None:
        """Stop it if it still runs (the test's own cleanup, not a drain under test)."""
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=STOP_TIMEOUT)


def etcd_registry(etcd: EtcdServer, prefix: str) -> dict[str, Any]:
    return {"backend": "etcd", "endpoints": [etcd.endpoint], "prefix": prefix, "timeout": 2}


def drain_previous_svc(etcd: EtcdServer, prefix: str) -> dict[str, Any]:
    """A ``flipvisor watch`` config on ``etcd``: one watch that drains (SIGTERM, 5 s) the PID
    written to program svc's ``pid/previous``."""
    return {
        "registry": etcd_registry(etcd, prefix),
        "watch": [
            {
                "keys": [f"{prefix}/svc/pid/previous"],
                "drain_pid": {"signal": "SIGTERM", "timeout": 5},
            }
        ],
    }


def answer(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            loaded: dict[str, Any] = json.loads(response.read())
            return loaded
    except (OSError, ValueError):
        return None


def serves_version(url: str, version: str) -> bool:
    got = answer(url)
    return got is not None and got.get("version") == version


def file_holds(path: Path, text: str) -> bool:
    try:
        return text in path.read_text()
    except OSError:
        return False


@pytest.mark.etcd
@pytest.mark.nginx
@pytest.mark.parametrize("evidence", [False, True], ids=["grace", "pidfile"])
def test_self_registering_service_flipped_by_watch_alone_under_load(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    nginx: Nginx,
    watcher: Watcher,
    tmp_path: Path,
    evidence: bool,
) -> None:
    # Without a pidfile the drain waits a fixed grace (RELOAD_SETTLE) after the reload; with
    # one, until nginx's pre-reload workers are gone. How long nginx takes to retire them is the
    # machine's, not the test's: without a pidfile, the test's own reload command returns only
    # once they are gone (the gate), and the test reads the grace from the watcher's log.
    template = tmp_path / "selfregistered.conf.j2"
    template.write_text(
        NGINX_TEMPLATE.replace("PFX", etcd_prefix).replace("LISTEN", str(nginx.listen))
    )
    reload_cmd = (
        nginx.reload_cmd
        if evidence
        else [sys.executable, str(SETTLED_RELOAD), str(nginx.pidfile), *nginx.reload_cmd]
    )
    process = watcher.start(
        {
            "registry": etcd_registry(etcd_server, etcd_prefix),
            "watch": [
                {
                    "keys": [f"{etcd_prefix}/svc/port/current"],
                    "template": str(template),
                    "dest": str(nginx.conf_dir / "selfregistered.conf"),
                    "check_cmd": nginx.check_cmd,
                    "reload_cmd": reload_cmd,
                    **({"pidfile": str(nginx.pidfile)} if evidence else {}),
                },
                {
                    "keys": [f"{etcd_prefix}/svc/pid/previous"],
                    "drain_pid": {"signal": "SIGTERM", "timeout": 10},
                },
            ],
        }
    )
    url = nginx.url("/")
    services = [Service(tmp_path, etcd_server, etcd_prefix, "1")]
    try:
        wait_until(lambda: serves_version(url, "1"), timeout=15, message="nginx to proxy to v1")
        with Load(url, clients=3) as load:
            for version in ("2", "3"):
                old = services[-1]
                services.append(Service(tmp_path, etcd_server, etcd_prefix, version))
                wait_until(
                    lambda v=version: serves_version(url, v),  # type: ignore[misc]
                    timeout=15,
                    message=f"nginx to proxy to v{version}",
                )
                # The watcher (not the test, not the new version) drains the old one.
                try:
                    old.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"v{old.version} was never drained:\n{watcher.output()[-3000:]}")
                assert old.process.returncode == 0, old.output()
                assert f"SIGTERM from pid {process.pid}" in old.output()
            outcome = load.stop()
        assert outcome.failed == 0, (outcome.failed, outcome.errors[:5], watcher.output()[-3000:])
        assert outcome.ok > 50
        assert services[-1].process.poll() is None  # the newest one is left alone
        assert {json.loads(body)["version"] for body in outcome.bodies} == {"1", "2", "3"}
    finally:
        for service in services:
            service.close()
    assert watcher.stop() == 0, watcher.output()[-3000:]
    if not evidence:
        settled = drains_after_reloads(watcher.output())
        assert len(settled) == 2, watcher.output()[-3000:]
        assert min(settled) >= RELOAD_SETTLE - LOG_CLOCK, (settled, watcher.output()[-3000:])


def drains_after_reloads(output: str) -> list[float]:
    """For each SIGTERM a drain_pid sent, the seconds since the last reload before it, by the
    watcher's log times."""
    settled, reloaded = [], None
    for line in output.splitlines():
        if "rendered and reloaded" in line:
            reloaded = log_time(line)
        elif "sent SIGTERM to pid=" in line and reloaded is not None:
            settled.append(log_time(line) - reloaded)
    return settled


def log_time(line: str) -> float:
    """The time a watcher's log line was written (``2026-01-31 12:00:00,123 INFO ...``)."""
    stamp = datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


@pytest.mark.etcd
@pytest.mark.nginx
def test_watch_converges_by_itself_once_a_broken_nginx_config_is_fixed(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    nginx: Nginx,
    watcher: Watcher,
    tmp_path: Path,
) -> None:
    # Another file of nginx's config is broken when v2 registers: `nginx -t` fails, nginx keeps
    # routing to v1, and v1 must not be drained. The operator fixes the file; with no key
    # changing, a retry applies v2 and the held drain of v1 goes ahead.
    template = tmp_path / "selfregistered.conf.j2"
    template.write_text(
        NGINX_TEMPLATE.replace("PFX", etcd_prefix).replace("LISTEN", str(nginx.listen))
    )
    process = watcher.start(
        {
            "registry": etcd_registry(etcd_server, etcd_prefix),
            "watch": [
                {
                    "keys": [f"{etcd_prefix}/svc/port/current"],
                    "template": str(template),
                    "dest": str(nginx.conf_dir / "selfregistered.conf"),
                    "check_cmd": nginx.check_cmd,
                    "reload_cmd": nginx.reload_cmd,
                },
                {
                    "keys": [f"{etcd_prefix}/svc/pid/previous"],
                    "drain_pid": {"signal": "SIGTERM", "timeout": 10},
                },
            ],
        }
    )
    url = nginx.url("/")
    broken = nginx.conf_dir / "zz-broken.conf"
    v1 = Service(tmp_path, etcd_server, etcd_prefix, "1")
    v2: Service | None = None
    try:
        wait_until(lambda: serves_version(url, "1"), timeout=15, message="nginx to proxy to v1")
        broken.write_text("this_is_not_a_directive;\n")
        v2 = Service(tmp_path, etcd_server, etcd_prefix, "2")
        wait_until(
            lambda: "zz-broken.conf" in watcher.output(),
            timeout=15,
            message="the check of v2's render to fail",
        )
        assert serves_version(url, "1")
        assert v1.process.poll() is None, watcher.output()[-3000:]

        broken.unlink()  # the operator's fix
        wait_until(lambda: serves_version(url, "2"), timeout=15, message="a retry to apply v2")
        try:
            v1.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"v1 was never drained:\n{watcher.output()[-3000:]}")
        assert f"SIGTERM from pid {process.pid}" in v1.output()
        assert "applied on retry" in watcher.output()
        assert v2.process.poll() is None
    finally:
        for service in (v1, v2):
            if service is not None:
                service.close()
    assert watcher.stop() == 0, watcher.output()[-3000:]


def test_watch_stops_at_once_during_a_retry_backoff(watcher: Watcher, tmp_path: Path) -> None:
    # The check never passes: the first failure is retried after 1 s, then 2 s, then 4 s, ...
    template = tmp_path / "port.txt.j2"
    template.write_text('port={{ get("flipvisor/svc/port/current") }}\n')
    checks = tmp_path / "checks.log"
    write_registry_file(tmp_path / "state" / "registry.json", {"flipvisor/svc/port/current": "1"})
    process = watcher.start(
        {
            "registry": {"backend": "local"},
            "watch": [
                {
                    "keys": ["flipvisor/svc/port/current"],
                    "template": str(template),
                    "dest": str(tmp_path / "out" / "port.txt"),
                    "check_cmd": ["sh", "-c", f'echo run >> "{checks}"; echo broken; exit 1'],
                }
            ],
        }
    )

    def checks_run() -> int:
        try:
            return len(checks.read_text().splitlines())
        except OSError:
            return 0

    # Three checks: the first attempt and two retries; the next one is 4 s away.
    wait_until(lambda: checks_run() >= 3, timeout=15, message="two retries")
    third = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=10) == 0, watcher.output()[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail("flipvisor watch waited for more than its backoff after SIGTERM")
    # Had it waited for its backoff, it would have exited 4 s after the third check at the
    # earliest (the margin is for a loaded machine's slow exit), most likely after a fourth.
    assert time.monotonic() - third < 3.5, "flipvisor watch waited for its backoff after SIGTERM"
    assert checks_run() == 3
    # The retries failed the same way as the first attempt: logged once, not each time.
    output = watcher.output()
    assert output.count("ERROR flipvisor.watch") == 1, output
    assert output.count("WARNING flipvisor.proxy") == 1, output


@pytest.mark.etcd
def test_drain_pid_refuses_a_pid_it_never_saw(
    etcd_server: EtcdServer, etcd_prefix: str, watcher: Watcher
) -> None:
    watcher.start(drain_previous_svc(etcd_server, etcd_prefix))
    bystander = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        # Never anybody's pid/current: a bare PID, as the seed's `kill -9` script would take it.
        etcd_server.put(f"{etcd_prefix}/svc/pid/previous", str(bystander.pid))
        wait_until(
            lambda: f"refusing to signal pid={bystander.pid}" in watcher.output(),
            timeout=10,
            message="the watcher to log its refusal",
        )
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=STOP_TIMEOUT)
    assert watcher.stop() == 0


@pytest.mark.etcd
def test_drain_pid_drains_once_pid_current_moves_on_after_pid_previous_was_written(
    watcher: Watcher, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    folder = f"{etcd_prefix}/svc"
    watcher.start(
        {
            "registry": etcd_registry(etcd_server, etcd_prefix),
            "watch": [{"keys": [f"{folder}/pid/previous"], "drain_pid": {"timeout": 5}}],
        }
    )
    old = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    new = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:

        def seen_as_current() -> bool:
            # Written again until the watcher, once connected, receives it as a live change
            # (what it finds at its first read it does not trust, rightly).
            etcd_server.etcdctl("del", f"{folder}/pid/current")
            etcd_server.put(f"{folder}/pid/current", str(old.pid))
            return f"pid={old.pid} is pid/current" in watcher.output()

        wait_until(
            seen_as_current,
            interval=0.2,
            message="the watcher to see the old process as pid/current (a live change)",
        )
        # The swap in two writes: previous <- old current, then current <- the new process.
        etcd_server.put(f"{folder}/pid/previous", str(old.pid))
        etcd_server.put(f"{folder}/pid/current", str(new.pid))
        wait_until(
            lambda: old.poll() is not None,
            timeout=8,
            message=f"pid/previous's process {old.pid}, seen as pid/current, to be drained:\n"
            + watcher.output()[-1500:],
        )
        assert new.poll() is None
    finally:
        for process in (old, new):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def test_watch_section_under_run_follows_the_programs_own_keys(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    template = tmp_path / "port.txt.j2"
    template.write_text('port={{ get("flipvisor/web/port/current") }}\n')
    dest = tmp_path / "out" / "port.txt"
    reloads = tmp_path / "reloads.log"

    def config(version: str) -> dict[str, Any]:
        return {
            "registry": {"backend": "local"},
            "programs": {
                "web": {
                    "command": svc_command("--version", version),
                    "readiness": {"http": "/health", "timeout": 10, "interval": 0.05},
                    "drain": {"delay": 0.1, "timeout": 5},
                }
            },
            "watch": [
                {
                    "keys": ["flipvisor/web/port/current"],
                    "template": str(template),
                    "dest": str(dest),
                    "check_cmd": ["grep", "-q", "^port=[0-9]", "{path}"],
                    "reload_cmd": ["sh", "-c", f'cat "{dest}" >> "{reloads}"'],
                }
            ],
        }

    flipvisor.start(config("1"))
    first = flipvisor.wait_serving("web")
    wait_until(lambda: file_holds(dest, f"port={first['port']}\n"), message="the first render")
    flipvisor.write_config(config("2"))
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    second = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 2)
    assert second["port"] != first["port"]
    wait_until(
        lambda: file_holds(dest, f"port={second['port']}\n"), message="the render after the flip"
    )
    wait_until(lambda: file_holds(reloads, f"port={second['port']}"), message="the reload")
    assert flipvisor.stop() == 0


def test_drain_pid_acts_on_a_stop_and_does_not_fight_the_supervisor_s_drain(
    flipvisor: Flipvisor,
) -> None:
    """A stop withdraws the keys as a flip would replace them: `pid/previous` names the stopped
    workers, so a `drain_pid` watcher drains them (verified by start time) too. A worker it
    stops first is not restarted, nor killed by our drain."""
    web = {"command": svc_command(), "drain": {"delay": 1, "timeout": 5}}
    entry = {"keys": ["flipvisor/web/pid/previous"], "drain_pid": {"timeout": 5}}
    flipvisor.start({"programs": {"web": web}, "watch": [entry]})
    pid = flipvisor.wait_serving("web")["pids"][0]
    wait_until(lambda: f"pid={pid} is pid/current" in flipvisor.output(), message="the watcher")

    stopped = flipvisor.cli("stop", "web")

    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
    assert not psutil.pid_exists(pid)
    acted = (f"sent SIGTERM to pid={pid}", f"pid={pid} is gone already")
    wait_until(
        lambda: any(line in flipvisor.output() for line in acted),
        message="the watcher to drain the stopped worker",
    )
    kinds = flipvisor.event_kinds()
    assert "killed" not in kinds and "restarting" not in kinds, kinds
    assert flipvisor.program("web")["generations"] == []


@pytest.mark.etcd
def test_watch_waits_for_etcd_then_renders_and_exits_0_on_sigterm(
    restartable_etcd: EtcdServer, etcd_prefix: str, watcher: Watcher, tmp_path: Path
) -> None:
    template = tmp_path / "port.txt.j2"
    template.write_text(f'port={{{{ get("{etcd_prefix}/svc/port/current") }}}}\n')
    dest = tmp_path / "out" / "port.txt"
    started = tmp_path / "reload-started"
    restartable_etcd.stop()
    process = watcher.start(
        {
            "registry": etcd_registry(restartable_etcd, etcd_prefix),
            "watch": [
                {
                    "keys": [f"{etcd_prefix}/svc/port/current"],
                    "template": str(template),
                    "dest": str(dest),
                    # The second reload hangs, so SIGTERM finds a command running.
                    "reload_cmd": [
                        "sh",
                        "-c",
                        f'if [ -e "{started}" ]; then exec sleep 60; fi; touch "{started}"',
                    ],
                }
            ],
        }
    )
    wait_until(
        lambda: "retrying" in watcher.output() or process.poll() is not None,
        timeout=15,
        message="the watcher to report etcd unreachable",
    )
    assert process.poll() is None, watcher.output()
    restartable_etcd.start()
    restartable_etcd.put(f"{etcd_prefix}/svc/port/current", "41000")
    wait_until(lambda: file_holds(dest, "port=41000"), timeout=15, message="the render")
    wait_until(started.exists, message="the first reload")

    restartable_etcd.put(f"{etcd_prefix}/svc/port/current", "42000")

    def hanging_reload() -> list[psutil.Process]:
        return [
            p for p in psutil.Process(process.pid).children(recursive=True) if "sleep" in p.name()
        ]

    children = wait_until(hanging_reload, message="the second reload to run")
    assert watcher.stop() == 0, watcher.output()[-3000:]
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive
    # The reload never finished, so the file nginx would run is the one it had.
    assert file_holds(dest, "port=41000")


def test_run_exits_on_sigterm_while_a_watch_reload_runs(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    template = tmp_path / "port.txt.j2"
    template.write_text('port={{ get("flipvisor/web/port/current") }}\n')
    started = tmp_path / "reload-started"
    process = flipvisor.start(
        {
            "registry": {"backend": "local"},
            "programs": {"web": {"command": svc_command("--version", "1")}},
            "watch": [
                {
                    "keys": ["flipvisor/web/port/current"],
                    "template": str(template),
                    "dest": str(tmp_path / "out" / "port.txt"),
                    "reload_cmd": ["sh", "-c", f'touch "{started}"; exec sleep 60'],
                }
            ],
        }
    )
    wait_until(started.exists, message="the reload to run")
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=6)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        process.wait()
        pytest.fail("flipvisor run outlived SIGTERM while a watch's reload ran")
    assert code == 0, flipvisor.output()


def test_watch_keeps_running_after_sighup_and_sigusr1(watcher: Watcher, tmp_path: Path) -> None:
    # SIGHUP's default action would end the watcher (mid-reload, even), and operators send it
    # out of habit: it is logged as not re-reading the config, SIGUSR1/SIGUSR2 as ignored.
    template = tmp_path / "port.txt.j2"
    template.write_text('port={{ get("flipvisor/svc/port/current") }}\n')
    dest = tmp_path / "out" / "port.txt"
    registry_file = tmp_path / "state" / "registry.json"
    write_registry_file(registry_file, {"flipvisor/svc/port/current": "41000"})
    process = watcher.start(
        {
            "registry": {"backend": "local"},
            "watch": [
                {
                    "keys": ["flipvisor/svc/port/current"],
                    "template": str(template),
                    "dest": str(dest),
                }
            ],
        }
    )
    wait_until(lambda: file_holds(dest, "port=41000"), timeout=15, message="the first render")
    process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "does not re-read its config" in watcher.output() or process.poll() is not None,
        message="the watcher to log the SIGHUP",
    )
    process.send_signal(signal.SIGUSR1)
    wait_until(
        lambda: "received SIGUSR1: ignored" in watcher.output() or process.poll() is not None,
        message="the watcher to log the SIGUSR1",
    )
    assert process.poll() is None, watcher.output()
    write_registry_file(registry_file, {"flipvisor/svc/port/current": "42000"})
    wait_until(lambda: file_holds(dest, "port=42000"), timeout=15, message="a later render")
    assert watcher.stop() == 0, watcher.output()[-3000:]


def test_sighup_while_watch_starts_up_is_held_until_it_is_handled(
    watcher: Watcher, tmp_path: Path
) -> None:
    template = tmp_path / "port.txt.j2"
    template.write_text('port={{ get("flipvisor/svc/port/current") }}\n')
    process = watcher.start(
        {
            "registry": {"backend": "local"},
            "watch": [
                {
                    "keys": ["flipvisor/svc/port/current"],
                    "template": str(template),
                    "dest": str(tmp_path / "out" / "port.txt"),
                }
            ],
        }
    )
    # Sent while `watch` starts up (imports, config) and has no handler yet.
    wait_until(
        lambda: process.poll() is not None or held_back(process.pid, signal.SIGHUP),
        timeout=15,
        message="watch to hold SIGHUP back while it starts",
    )
    process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "does not re-read its config" in watcher.output() or process.poll() is not None,
        message="the watcher to log the SIGHUP",
    )
    assert process.poll() is None, watcher.output()
    assert watcher.stop() == 0, watcher.output()[-3000:]
