"""A program removed from the config while no supervisor ran, whose workers died with the killed
supervisor (or since): nothing of it runs, but its proxy file still routes nginx to the dead port
and its registry keys still name the dead workers. The next ``flipvisor run`` finds it by its
deploy history and its ``generation/current`` record (a dead supervisor's), and takes it out of
nginx and the registry; a file that another program of the config writes now is left to it, and
a program a previous run removed itself (its keys withdrawn then) is not touched again."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from tests.e2e.test_flip import answers, program, proxied
from tests.e2e.test_leftovers import kill_supervisor, restart_supervisor, survivors, wait_gone
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx, port_answers
from tests.waiting import wait_until

__all__ = ["survivors"]  # the fixture, used by name

KEPT = {"command": svc_command("--version", "1"), "drain": {"delay": 0, "timeout": 5}}


@dataclass(frozen=True)
class Backend:
    """A registry for the supervisor's config (``registry:``) and how the test reads a program's
    keys from it, by suffix (``pid/current``)."""

    config: dict[str, Any]
    keys: Callable[[str], dict[str, str]]


@pytest.fixture(params=["local", "etcd"])
def backend(
    request: pytest.FixtureRequest, flipvisor: Flipvisor, etcd_server: EtcdServer, etcd_prefix: str
) -> Backend:
    """The local registry, or etcd (the session's, asked for either way: started after the
    check that a test leaves no process behind took its note, it would count as one)."""
    if request.param == "local":

        def local_keys(name: str) -> dict[str, str]:
            start = f"flipvisor/{name}/"
            keys = flipvisor.registry().items()
            return {key[len(start) :]: value for key, value in keys if key.startswith(start)}

        return Backend({}, local_keys)

    def etcd_keys(name: str) -> dict[str, str]:
        start = f"{etcd_prefix}/{name}/"
        found = json.loads(etcd_server.etcdctl("get", "--prefix", start, "-w", "json"))
        decoded = {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in found.get("kvs", [])
        }
        return {key[len(start) :]: value for key, value in decoded.items()}

    etcd = {"backend": "etcd", "endpoints": [etcd_server.endpoint], "timeout": 2}
    return Backend({"registry": {**etcd, "prefix": etcd_prefix}}, etcd_keys)


def serve_then_die(
    flipvisor: Flipvisor, nginx: Nginx, backend: Backend, survivors: list[psutil.Process]
) -> tuple[list[int], list[int]]:
    """Serve ``kept`` and ``gone`` (behind nginx), then SIGKILL the supervisor and ``gone``'s
    workers with it; ``kept``'s workers and ``gone``'s (dead) PIDs."""
    config = {**backend.config, "programs": {"kept": KEPT, "gone": program(nginx, "g")}}
    flipvisor.start(config)
    flipvisor.wait_serving("kept")
    gone_pids: list[int] = flipvisor.wait_serving("gone")["pids"]
    wait_until(lambda: answers(nginx), message="nginx to proxy to gone")
    kept_pids = kill_supervisor(flipvisor, "kept", survivors)
    for pid in gone_pids:
        psutil.Process(pid).kill()
    wait_gone(gone_pids)
    assert backend.keys("gone")["pid/current"] == ",".join(map(str, gone_pids))
    return kept_pids, gone_pids


def withdrawn(keys: dict[str, str], pids: list[int]) -> bool:
    """Whether ``keys`` name nothing current any more, and ``pids`` as replaced."""
    current = {"port/current", "pid/current", "generation/current"} & keys.keys()
    return not current and keys.get("pid/previous") == ",".join(map(str, pids))


def events_of(flipvisor: Flipvisor, name: str) -> list[dict[str, Any]]:
    """``name``'s events (``events PROGRAM`` refuses a program neither configured nor with any
    event)."""
    result = flipvisor.cli("events", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return [event for event in events if event["program"] == name]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["kind"] for event in events]


def test_a_removed_program_whose_workers_died_too_is_unrouted_and_its_keys_withdrawn(
    flipvisor: Flipvisor, nginx: Nginx, backend: Backend, survivors: list[psutil.Process]
) -> None:
    kept_pids, gone_pids = serve_then_die(flipvisor, nginx, backend, survivors)

    restart_supervisor(flipvisor, {**backend.config, "programs": {"kept": KEPT}})

    wait_until(
        lambda: withdrawn(backend.keys("gone"), gone_pids),
        message="gone's keys to be withdrawn",
    )
    events = events_of(flipvisor, "gone")
    assert kinds(events) == ["leftovers", "unrouted"], events
    assert "none of its workers running: not in the config" in events[0]["message"], events
    assert not (nginx.conf_dir / "web.conf").exists()
    assert not port_answers(nginx.listen)  # reloaded without it, its old workers awaited
    flipvisor.wait_serving("kept", where=lambda g: g["pids"] != kept_pids)
    wait_gone(kept_pids)


def test_a_removed_program_s_proxy_file_that_another_program_writes_now_is_left_to_it(
    flipvisor: Flipvisor, nginx: Nginx, backend: Backend, survivors: list[psutil.Process]
) -> None:
    """Renamed while no supervisor ran (`gone` is `renamed` now, with the same `proxy.dest`):
    `renamed`'s promotion rewrites the file, which is not taken out of nginx for `gone`; `gone`'s
    keys are withdrawn all the same."""
    kept_pids, gone_pids = serve_then_die(flipvisor, nginx, backend, survivors)
    renamed = program(nginx, "r")

    restart_supervisor(
        flipvisor, {**backend.config, "programs": {"kept": KEPT, "renamed": renamed}}
    )

    wait_until(
        lambda: withdrawn(backend.keys("gone"), gone_pids),
        message="gone's keys to be withdrawn",
    )
    flipvisor.wait_serving("renamed")
    wait_until(lambda: answers(nginx) and proxied(nginx)["version"] == "r", message="renamed")
    assert kinds(events_of(flipvisor, "gone")) == ["leftovers"], flipvisor.output()
    assert "program renamed" in (nginx.conf_dir / "web.conf").read_text()
    flipvisor.wait_serving("kept", where=lambda g: g["pids"] != kept_pids)
    wait_gone(kept_pids)


@pytest.mark.parametrize("ended", ["shutdown", "killed"])
def test_a_program_a_previous_run_removed_itself_is_not_unrouted_again(
    flipvisor: Flipvisor, nginx: Nginx, survivors: list[psutil.Process], ended: str
) -> None:
    """A reload removed `gone` (its file taken out, its keys withdrawn); the file is someone
    else's since (here: a static site the operator put there). Whether that run then shut down
    or was killed, the next one finds `gone` in the deploy history but no record of a dead
    supervisor in the registry: it leaves the file, nginx and the keys alone."""
    flipvisor.start({"programs": {"kept": KEPT, "gone": program(nginx, "g")}})
    flipvisor.wait_serving("kept")
    flipvisor.wait_serving("gone")
    flipvisor.write_config({"programs": {"kept": KEPT}})
    reload = flipvisor.cli("reload")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    wait_until(lambda: not (nginx.conf_dir / "web.conf").exists(), message="gone's removal")
    static = f"server {{ listen {nginx.listen}; location / {{ return 200 'static'; }} }}\n"
    (nginx.conf_dir / "web.conf").write_text(static)
    subprocess.run(nginx.reload_cmd, check=True, timeout=30)
    wait_until(lambda: _static_answers(nginx), message="nginx to serve the static site")
    keys_after_removal = flipvisor.registry()
    if ended == "shutdown":
        assert flipvisor.stop() == 0, flipvisor.output()
        kept_pids: list[int] = []
        flipvisor.start()
    else:
        kept_pids = kill_supervisor(flipvisor, "kept", survivors)
        restart_supervisor(flipvisor)

    # The start-up names what it stops before it adds the configured programs.
    flipvisor.wait_serving("kept", where=lambda g: g["pids"] != kept_pids)
    assert events_of(flipvisor, "gone") == []
    assert (nginx.conf_dir / "web.conf").read_text() == static
    assert _static_answers(nginx)
    gone_keys = {k: v for k, v in flipvisor.registry().items() if k.startswith("flipvisor/gone/")}
    assert gone_keys == {
        k: v for k, v in keys_after_removal.items() if k.startswith("flipvisor/gone/")
    }
    assert "flipvisor/gone/pid/current" not in gone_keys
    wait_gone(kept_pids)


def _static_answers(nginx: Nginx) -> bool:
    try:
        with urllib.request.urlopen(nginx.url("/"), timeout=5) as answer:
            return bool(answer.read() == b"static")
    except OSError:
        return False
