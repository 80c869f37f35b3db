"""``flipvisor run`` on a real etcd: the seed's keys, and an etcd outage in the middle of a run."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from flipvisor.starttime import identity_of
from tests.e2e.load import Load
from tests.e2e.test_flip import WARM, answers, program, proxied
from tests.e2e.test_lifecycle import stop_start_shutdown_run, withdrawn
from tests.fixtures.etcd import FOREIGN_KEYS, FOREIGN_VALUE_BYTES, EtcdServer, put_large
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


def registry(etcd: EtcdServer, prefix: str) -> dict[str, Any]:
    return {"backend": "etcd", "endpoints": [etcd.endpoint], "prefix": prefix, "timeout": 2}


def keys(etcd: EtcdServer, prefix: str) -> dict[str, str | None]:
    """Program web's keys, read at one revision with one etcdctl: a poll of them stays quick on
    a loaded machine, where five etcdctl start-ups ate into the contract's 5 s."""
    names = ("port/current", "port/previous", "pid/current", "pid/previous", "generation/current")
    found = json.loads(etcd.etcdctl("get", "--prefix", f"{prefix}/web/", "-w", "json"))
    values = {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
        for kv in found.get("kvs", [])
    }
    return {name: values.get(f"{prefix}/web/{name}") for name in names}


def changed_within(predicate: Callable[[], bool], *, seconds: float) -> bool:
    """Whether ``predicate`` became true within ``seconds`` (a bounded look for a change that
    must not happen: False once the deadline passed without it)."""
    try:
        wait_until(predicate, timeout=seconds, message="a change")
    except AssertionError:
        return False
    return True


def test_flips_write_the_seeds_keys_in_etcd(
    flipvisor: Flipvisor, nginx: Nginx, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    flipvisor.start(
        {
            "registry": registry(etcd_server, etcd_prefix),
            "programs": {"web": program(nginx, "1", numprocs=2)},
        }
    )
    first = flipvisor.wait_serving("web")
    wait_until(
        lambda: keys(etcd_server, etcd_prefix)["port/current"] == str(first["port"]),
        message="generation 1 in etcd",
    )
    assert flipvisor.cli("flip", "web").returncode == 0
    second = flipvisor.serving("web")
    assert second is not None
    got = keys(etcd_server, etcd_prefix)
    assert got["port/current"] == str(second["port"])
    assert got["port/previous"] == str(first["port"])
    assert sorted(map(int, got["pid/current"].split(","))) == sorted(second["pids"])  # type: ignore[union-attr]
    assert sorted(map(int, got["pid/previous"].split(","))) == sorted(first["pids"])  # type: ignore[union-attr]
    record = json.loads(got["generation/current"] or "{}")
    assert record["generation"] == 2 and record["port"] == second["port"]
    assert {p["pid"] for p in record["pids"]} == set(second["pids"])
    assert all(isinstance(p["started"], float) for p in record["pids"])
    # Added to the contract's fields: what a clock step does not move (see starttime.py).
    assert all((p["ticks"], p["boot_id"]) == identity_of(p["pid"]) for p in record["pids"])
    supervisor = record["supervisor"]
    assert flipvisor.process is not None and supervisor["pid"] == flipvisor.process.pid
    assert (supervisor["ticks"], supervisor["boot_id"]) == identity_of(supervisor["pid"])
    assert record["command"][-1] == "1" and isinstance(record["promoted_at"], float)


def test_etcd_outage_keeps_serving_fails_flips_and_heals_the_keys(
    flipvisor: Flipvisor, nginx: Nginx, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    config = program(nginx, "1")
    flipvisor.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": config}})
    gen = flipvisor.wait_serving("web")
    wait_until(lambda: answers(nginx), message="nginx to proxy")
    etcd.stop()
    with Load(nginx.url("/"), clients=2) as load:
        flipvisor.write_config(
            {"registry": registry(etcd, etcd_prefix), "programs": {"web": program(nginx, "2")}}
        )
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    # A crash during the outage is handled as always. (Outside the load: a request in flight
    # on a SIGKILLed worker is lost whatever supervises it.)
    psutil.Process(gen["pids"][0]).kill()
    replaced = flipvisor.wait_serving(
        "web", where=lambda g: bool(g["pids"]) and g["pids"] != gen["pids"]
    )
    assert result.returncode == 1, result.stderr
    assert "etcd" in result.stderr
    assert outcome.failed == 0, outcome.errors[:5]
    # status says so, and which program's keys wait for etcd (the replacement's PID)
    wait_until(
        lambda: (
            (h := flipvisor.status()["registry"])["connected"] is False and "web" in h["pending"]
        ),
        message="status to show etcd unreachable with web pending",
    )
    assert "unreachable" in flipvisor.cli("status").stdout
    assert proxied(nginx)["version"] == "1"
    etcd.start()
    # The keys are made to match what is serving (the replacement's PID) within 5 seconds.
    wait_until(
        lambda: (
            (got := keys(etcd, etcd_prefix))["pid/current"] == str(replaced["pids"][0])
            and got["port/current"] == str(gen["port"])
        ),
        timeout=5,
        message="etcd's keys to be reconciled",
    )
    wait_until(
        lambda: (
            flipvisor.status()["registry"]
            == {
                "backend": "etcd",
                "where": etcd.endpoint,
                "connected": True,
                "pending": [],
                "problem": None,
                "conflicting": [],
            }
        ),
        message="status to show etcd back",
    )
    assert flipvisor.cli("flip", "web").returncode == 0  # and flips work again


def test_a_flip_while_etcd_hangs_is_rolled_back_and_the_old_generation_serves_on(
    flipvisor: Flipvisor, nginx: Nginx, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """etcd stops answering on an open connection (SIGSTOP): the promotion's transaction times
    out, the flip is rolled back, and generation 1 serves on. (It was drained instead: gRPC's
    cancellation at the request deadline went through the flip and ended the program's task.)"""
    etcd = restartable_etcd
    flipvisor.start(
        {"registry": registry(etcd, etcd_prefix), "programs": {"web": program(nginx, "1")}}
    )
    gen = flipvisor.wait_serving("web")
    wait_until(lambda: keys(etcd, etcd_prefix)["port/current"] == str(gen["port"]), message="keys")
    wait_until(lambda: answers(nginx), message="nginx to proxy")
    etcd.pause()
    with Load(nginx.url("/"), clients=2) as load:
        flipvisor.write_config(
            {"registry": registry(etcd, etcd_prefix), "programs": {"web": program(nginx, "2")}}
        )
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    assert result.returncode == 1, result.stdout + result.stderr + flipvisor.output()
    assert f"etcd at {etcd.endpoint} did not answer within 2 s" in result.stderr, result.stderr
    assert outcome.failed == 0, outcome.errors[:5]
    serving = flipvisor.serving("web")
    assert serving is not None, flipvisor.output()
    assert (serving["generation"], serving["pids"]) == (1, gen["pids"])
    assert proxied(nginx)["version"] == "1"
    etcd.resume()
    assert keys(etcd, etcd_prefix)["port/current"] == str(gen["port"])
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stderr + flipvisor.output()
    assert proxied(nginx)["version"] == "2"


def test_supervisor_starts_while_etcd_is_down_and_registers_when_it_returns(
    flipvisor: Flipvisor, nginx: Nginx, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    etcd.put(f"{etcd_prefix}/web/port/current", "1234")  # what an earlier run left
    etcd.stop()
    flipvisor.start(
        {"registry": registry(etcd, etcd_prefix), "programs": {"web": program(nginx, "1")}}
    )
    gen = flipvisor.wait_serving("web")
    wait_until(lambda: answers(nginx), message="nginx to proxy while etcd is down")
    assert proxied(nginx)["version"] == "1"
    # `status` names whose keys wait for etcd: web's registration (QA 13: `pending` was empty,
    # the deferred registration not among the registry's own pending writes).
    wait_until(
        lambda: "registering later" in flipvisor.output(),
        timeout=20,
        message="the supervisor to defer web's registration",
    )
    health = flipvisor.status()["registry"]
    assert (health["connected"], health["pending"]) == (False, ["web"]), health
    table = flipvisor.cli("status").stdout
    assert "keys of web are written once it answers" in table, table
    etcd.start()
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] == str(gen["port"]),
        timeout=5,
        message="generation 1 to be registered once etcd is back",
    )
    got = keys(etcd, etcd_prefix)
    assert got["port/previous"] == "1234"  # promoted like a flip, even late
    assert got["pid/current"] == ",".join(map(str, gen["pids"]))
    wait_until(
        lambda: flipvisor.status()["registry"]["pending"] == [],
        timeout=5,
        message="web no longer pending once registered",
    )


def test_a_warm_rollback_that_fails_keeps_the_warm_generation(
    flipvisor: Flipvisor, nginx: Nginx, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    where = registry(etcd, etcd_prefix)
    flipvisor.start({"registry": where, "programs": {"web": program(nginx, "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config(
        {"registry": where, "programs": {"web": program(nginx, "2", rollback_window=WARM)}}
    )
    assert flipvisor.cli("flip", "web").returncode == 0
    warm = next(g for g in flipvisor.program("web")["generations"] if g["generation"] == 1)
    serving = flipvisor.serving("web")
    etcd.stop()
    # The promotion of the warm generation cannot write the keys: the rollback fails, and the
    # warm generation stays warm, with the same workers, for a rollback once etcd is back.
    failed = flipvisor.cli("rollback", "web")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "etcd" in failed.stderr
    states = {g["generation"]: g["state"] for g in flipvisor.program("web")["generations"]}
    assert states == {1: "ready", 2: "serving"}
    after = flipvisor.serving("web")
    assert after is not None and serving is not None
    assert (after["generation"], after["pids"]) == (serving["generation"], serving["pids"])
    assert proxied(nginx)["version"] == "2"
    etcd.start()
    # Once the supervisor is connected again (`status` says so; the contract gives it 5 s): a
    # rollback at once may still meet its connection in gRPC's reconnect backoff.
    wait_until(lambda: flipvisor.status()["registry"]["connected"], message="etcd reached again")
    result = flipvisor.cli("rollback", "web", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["generation"] == 1
    back = flipvisor.serving("web")
    assert back is not None and back["pids"] == warm["pids"]
    assert proxied(nginx)["version"] == "1"


def test_a_warm_generation_whose_window_ran_out_during_a_failed_rollback_is_drained(
    flipvisor: Flipvisor, nginx: Nginx, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """The rollback begins while generation 1 is warm; its promotion waits on a hung etcd past
    the end of the window, then fails: generation 1 is drained then (its window's own task,
    which ran meanwhile, found it being promoted and left it)."""
    etcd = restartable_etcd
    # The promotion waits on a paused etcd until the test kills it, once the window is over;
    # the request timeout is longer than that. The window is long enough for the rollback's
    # client to start on a loaded machine (a stopped etcd, refusing at once, failed a rollback
    # begun within a 1 s window before that window ended, and one begun after was cold).
    where = {**registry(etcd, etcd_prefix), "timeout": 60}
    window = 4
    flipvisor.start({"registry": where, "programs": {"web": program(nginx, "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config(
        {"registry": where, "programs": {"web": program(nginx, "2", rollback_window=window)}}
    )
    assert flipvisor.cli("flip", "web").returncode == 0
    over = time.time() + window  # the window began before the flip answered
    etcd.pause()
    rollback = flipvisor.cli_started("rollback", "web", "--json")
    try:
        wait_until(lambda: time.time() > over, message="the window to be over")
        assert etcd.process is not None
        etcd.process.kill()  # the connection closes: the promotion's request fails at once
        out, err = rollback.communicate(timeout=60)
    finally:
        rollback.kill()
        rollback.communicate()
        etcd.stop()
    assert rollback.returncode == 1, out + err
    report = json.loads(out)
    assert report["generation"] == 1, report  # begun while warm: no new generation
    # Probed again (not started anew), on its own port.
    assert report["steps"][0]["detail"].startswith("warm generation: GET http://"), report
    assert "etcd" in report["error"], report
    # Tried again by a rollback: a flip would deploy the file's section, not the previous one.
    assert report["error"].endswith("then `flipvisor rollback web`"), report
    wait_until(
        lambda: [g["generation"] for g in flipvisor.program("web")["generations"]] == [2],
        message="the warm generation to be drained once its window is over",
    )
    assert proxied(nginx)["version"] == "2"


def test_stop_and_shutdown_withdraw_the_etcd_keys_and_start_and_run_write_them_again(
    flipvisor: Flipvisor, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    stop_start_shutdown_run(
        flipvisor, registry(etcd_server, etcd_prefix), lambda: keys(etcd_server, etcd_prefix)
    )


def test_a_stop_while_etcd_hangs_drains_at_its_timeout_and_etcd_catches_up(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """etcd stops answering (SIGSTOP): withdrawing the keys gives up at registry.timeout, the
    workers drain all the same, and the keys are withdrawn once etcd answers again."""
    etcd = restartable_etcd
    web = {"command": svc_command(), "drain": {"delay": 0, "timeout": 5}}
    flipvisor.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": web}})
    gen = flipvisor.wait_serving("web")
    wait_until(lambda: keys(etcd, etcd_prefix)["port/current"] == str(gen["port"]), message="keys")
    etcd.pause()
    stopped = flipvisor.cli("stop", "web")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
    # The withdrawal's step, as the supervisor timed it (the client's own start-up, which a
    # loaded machine stretches, is not in it): it gave up at registry.timeout, no sooner.
    withdrawal = re.search(
        r"registry +(\d+\.\d+)s +pending: the registry does not answer", stopped.stderr
    )
    assert withdrawal is not None, stopped.stderr
    assert 2 - 0.1 <= float(withdrawal[1]) < 2 + 1, stopped.stderr
    assert not any(psutil.pid_exists(pid) for pid in gen["pids"])
    etcd.resume()
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] is None,
        timeout=5,
        message="the keys to be withdrawn once etcd answers",
    )
    assert keys(etcd, etcd_prefix) == withdrawn(gen)


def test_a_registry_prefix_with_a_leading_slash_is_kept_in_the_keys(
    flipvisor: Flipvisor, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """A confd reading etcd keys with a leading slash (the seed's ``/uswitch/experiment/...``)
    needs ``registry.prefix: /uswitch`` written as given. The slash was dropped: ``check`` said ok,
    the keys went to ``uswitch/...``, and a ``watch:`` entry (or confd) on the contract's
    ``<prefix>/<program>/port/current`` never rendered (QA finding)."""
    prefix = f"/{etcd_prefix}"
    port_key = f"{prefix}/web/port/current"
    template = flipvisor.dir / "port.j2"
    template.write_text(f'port={{{{ get("{port_key}") }}}}\n')
    dest = flipvisor.dir / "port.conf"
    flipvisor.write_config(
        {
            "registry": {
                "backend": "etcd",
                "endpoints": [etcd_server.endpoint],
                "prefix": prefix,
                "timeout": 2,
            },
            "programs": {"web": {"command": svc_command("--version", "1"), "drain": {"delay": 0}}},
            "watch": [
                {
                    "keys": [port_key],
                    "template": str(template),
                    "dest": str(dest),
                    "reload_cmd": ["true"],
                }
            ],
        }
    )
    assert flipvisor.cli("check").returncode == 0
    flipvisor.start()
    port = flipvisor.wait_serving("web")["port"]
    wait_until(
        lambda: dest.exists() and dest.read_text() == f"port={port}\n",
        timeout=10,
        message=f"the watch to render {port_key} (keys: "
        f"{etcd_server.etcdctl('get', '--prefix', etcd_prefix, '--keys-only').split()})",
    )
    assert etcd_server.etcdctl("get", port_key, "--print-value-only").strip() == str(port)
    assert not etcd_server.etcdctl("get", "--prefix", etcd_prefix, "--keys-only").strip()


def test_a_restarted_worker_does_not_overwrite_keys_another_supervisor_promoted(
    flipvisor: Flipvisor, nginx: Nginx, etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    etcd = etcd_server
    config = program(nginx, "1")
    config.pop("proxy")  # two hosts, one nginx file each: not what this is about
    flipvisor.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": config}})
    first = flipvisor.wait_serving("web")
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] == str(first["port"]),
        message="supervisor A's generation 1 in etcd",
    )
    (tmp_path / "b").mkdir()
    other = Flipvisor(tmp_path / "b")  # "another host": its own state_dir, same prefix
    try:
        other.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": config}})
        second = other.wait_serving("web")
        wait_until(
            lambda: keys(etcd, etcd_prefix)["port/current"] == str(second["port"]),
            message="supervisor B's promotion in etcd",
        )
        promoted_by_b = keys(etcd, etcd_prefix)
        assert promoted_by_b["port/previous"] == str(first["port"])
        psutil.Process(first["pids"][0]).kill()  # a worker of A crashes; A restarts it
        flipvisor.wait_serving(
            "web", where=lambda g: bool(g["pids"]) and g["pids"] != first["pids"]
        )
        # The republication runs at once after the restart: give it 3 s to touch B's keys.
        changed_within(lambda: keys(etcd, etcd_prefix) != promoted_by_b, seconds=3)
        got = keys(etcd, etcd_prefix)
        assert got["port/current"] == str(second["port"]), got
        assert got["port/previous"] == str(first["port"]), got
        assert got["pid/current"] == promoted_by_b["pid/current"], got
        left = "etcd keys not rewritten: they name"
        assert flipvisor.output().count(left) == 1, flipvisor.output()[-3000:]
    finally:
        other.stop()


def quick_web() -> dict[str, Any]:
    return {
        "command": svc_command("--version", "1"),
        "readiness": {"http": "/health", "timeout": 10, "interval": 0.05},
        "drain": {"delay": 0.1, "timeout": 5},
    }


def start_registered(flipvisor: Flipvisor, etcd: EtcdServer, prefix: str) -> dict[str, Any]:
    """Start ``flipvisor`` with program web (``quick_web``) on ``etcd``; web's serving generation
    once it is serving and its port is in etcd."""
    flipvisor.start({"registry": registry(etcd, prefix), "programs": {"web": quick_web()}})
    first = flipvisor.wait_serving("web")
    wait_until(
        lambda: keys(etcd, prefix)["port/current"] == str(first["port"]),
        message="generation 1 in etcd",
    )
    return first


def serving_with_foreign_keys(flipvisor: Flipvisor, etcd: EtcdServer, prefix: str) -> None:
    """web serving generation 1, registered, and another tool's keys under web's folder, more
    than a gRPC reply takes (QA 15: a read of the whole folder failed with RESOURCE_EXHAUSTED)."""
    start_registered(flipvisor, etcd, prefix)
    for n in range(FOREIGN_KEYS):
        put_large(etcd, f"{prefix}/web/extra/{n}", FOREIGN_VALUE_BYTES)


def test_foreign_keys_under_the_program_folder_do_not_break_flips(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    serving_with_foreign_keys(flipvisor, etcd, etcd_prefix)
    first = flipvisor.serving("web")
    assert first is not None
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr
    second = flipvisor.serving("web")
    assert second is not None and second["generation"] == 2
    got = keys(etcd, etcd_prefix)
    assert got["port/current"] == str(second["port"])
    assert got["port/previous"] == str(first["port"])
    # The healing after an outage reads the same keys: it rewrites a hand-edited one.
    etcd.put(f"{etcd_prefix}/web/port/current", "1")
    etcd.stop()
    etcd.start()
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] == str(second["port"]),
        timeout=10,
        message=f"the keys healed after the outage (output:\n{flipvisor.output()})",
    )
    # The other tool's keys are its own: untouched.
    listed = etcd.etcdctl("get", "--prefix", "--keys-only", f"{etcd_prefix}/web/extra/")
    assert sorted(listed.split()) == [f"{etcd_prefix}/web/extra/{n}" for n in range(FOREIGN_KEYS)]


def test_foreign_keys_under_the_program_folder_do_not_keep_a_stop_from_withdrawing(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    serving_with_foreign_keys(flipvisor, etcd, etcd_prefix)
    stopped = flipvisor.cli("stop", "web")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_until(
        lambda: keys(etcd, etcd_prefix)["pid/current"] is None,
        timeout=10,
        message=f"pid/current withdrawn (supervisor output:\n{flipvisor.output()})",
    )


HUNG_TIMEOUT = 10.0  # registry.timeout: a wait of it stands out from a promotion's own time


def test_run_with_a_hung_etcd_serves_within_one_registry_timeout(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """etcd hung at start-up (SIGSTOP: a member that does not answer, packets dropped): the
    search for leftovers waits one registry.timeout for it; generation 1's promotion then
    defers its registration at once, as when etcd is down (QA 15: it waited another whole
    timeout, nothing serving meanwhile), and the keys are written once etcd answers."""
    etcd = restartable_etcd
    etcd.pause()
    config = {**registry(etcd, etcd_prefix), "timeout": HUNG_TIMEOUT}
    flipvisor.start({"registry": config, "programs": {"web": quick_web()}})
    gen = flipvisor.wait_serving("web", timeout=4 * HUNG_TIMEOUT)
    # The start-up's read did wait for etcd (so etcd was known not to answer)...
    assert "cannot read the registry to find workers" in flipvisor.output(), flipvisor.output()
    assert "registering later" in flipvisor.output(), flipvisor.output()
    # ...and the promotion did not, as the supervisor timed it (the wait was a whole timeout).
    result = flipvisor.cli("events", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    at = {e["kind"]: e["time"] for e in events if e["program"] == "web" and e["generation"] == 1}
    assert at["serving"] - at["promoting"] < HUNG_TIMEOUT / 2, events
    etcd.resume()
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] == str(gen["port"]),
        timeout=3 * HUNG_TIMEOUT,
        message=f"generation 1 registered once etcd answers (output:\n{flipvisor.output()})",
    )
