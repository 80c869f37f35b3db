"""The whole ``status --json`` document of a realistic supervisor, field by field: every key of
every level, and each value checked against what is true outside the supervisor (its processes,
the registry file, the config). It pins what scripts read, so that work on how the status is
built (it is on the hot path of the control round trip) cannot change what it says."""

from __future__ import annotations

import re
import shlex
import sys
import time
from typing import Any

import psutil

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.integration.test_output_keeper import pipes_held_by
from tests.waiting import wait_until

DOCUMENT_KEYS = {"programs", "registry", "starting", "keeper"}  # "keeper": added later
KEEPER_KEYS = {"pid", "pipes", "restarts", "disabled"}
REGISTRY_KEYS = {"backend", "where", "connected", "pending", "problem", "conflicting"}
PROGRAM_KEYS = {
    "name",
    "state",
    "restarts",
    "flips",
    "flip_failures",
    "fatal_reason",
    "leftovers",
    "kept_after_removal",
    "removing",
    "flip",
    "generations",
}
GENERATION_KEYS = {
    "generation",
    "state",
    "port",
    "pids",
    "uptime",
    "restarts",
    "last_exit",
    # Added with the config's fingerprint; the keys above are the same as before.
    "command",
    "fingerprint",
    "warm_until",
}
LAST_EXIT_KEYS = {"worker", "pid", "reason", "time"}
FINGERPRINT = re.compile("[0-9a-f]{12}")


def web(version: str) -> dict[str, Any]:
    return {
        "command": svc_command("--version", version),
        "numprocs": 2,
        "readiness": {"http": "/health", "timeout": 10, "interval": 0.05},
        "drain": {"delay": 0, "timeout": 5},
        "rollback_window": 300,
    }


def config(version: str) -> dict[str, Any]:
    return {
        "programs": {
            "web": web(version),
            "worker": {"command": svc_command("--version", "1"), "drain": {"timeout": 5}},
            "idle": {"command": svc_command(), "autostart": False},
            "broken": {
                "command": [sys.executable, "-c", "import sys; sys.exit(3)"],
                "restart": {"max_restarts": 0},
            },
        }
    }


def assert_uptime(gen: dict[str, Any], at_most: float) -> None:
    uptime = gen["uptime"]
    assert isinstance(uptime, float) and 0 <= uptime <= at_most, gen
    assert round(uptime, 3) == uptime, "to the millisecond"


def test_status_json_document_of_a_realistic_supervisor(flipvisor: Flipvisor) -> None:
    began = time.time()
    flipvisor.start(config("1"))
    flipvisor.wait_serving("web")
    flipvisor.wait_serving("worker")
    wait_until(lambda: flipvisor.program("broken")["state"] == "fatal", message="broken fatal")
    crashed = flipvisor.wait_serving("worker")["pids"]
    psutil.Process(crashed[0]).kill()
    flipvisor.wait_serving("worker", where=lambda g: bool(g["pids"]) and g["pids"] != crashed)
    flipvisor.write_config(config("2"))
    flip_began = time.time()
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stderr
    flip_ended = time.time()

    document = flipvisor.status()
    elapsed = time.time() - began

    assert set(document) == DOCUMENT_KEYS
    assert document["starting"] is False
    assert document["registry"] == {
        "backend": "local",
        "where": str(flipvisor.state_dir / "registry.json"),
        "connected": True,
        "pending": [],
        "problem": None,
        "conflicting": [],
    }
    assert set(document["registry"]) == REGISTRY_KEYS
    programs = document["programs"]
    assert [p["name"] for p in programs] == ["web", "worker", "idle", "broken"]  # config order
    for program in programs:
        assert set(program) == PROGRAM_KEYS, program
        for gen in program["generations"]:
            assert set(gen) == GENERATION_KEYS, gen
        assert program["leftovers"] is None
        assert program["kept_after_removal"] is None
        assert program["removing"] is False
        assert program["flip"] is None
    web_status, worker, idle, broken = programs
    keys = flipvisor.registry()

    # web: generation 2 serves, generation 1 is kept warm (ready, unrouted) for a rollback.
    assert (web_status["state"], web_status["restarts"], web_status["fatal_reason"]) == (
        "running",
        0,
        None,
    )
    assert (web_status["flips"], web_status["flip_failures"]) == (2, 0)
    warm, serving = web_status["generations"]
    assert (warm["generation"], warm["state"]) == (1, "ready")
    assert (serving["generation"], serving["state"]) == (2, "serving")
    assert serving["port"] == int(keys["flipvisor/web/port/current"])
    assert warm["port"] == int(keys["flipvisor/web/port/previous"])
    assert sorted(serving["pids"]) == sorted(
        int(pid) for pid in keys["flipvisor/web/pid/current"].split(",")
    )
    for gen in (warm, serving):
        assert len(gen["pids"]) == 2 and all(psutil.pid_exists(pid) for pid in gen["pids"])
        assert (gen["restarts"], gen["last_exit"]) == (0, None)
        assert_uptime(gen, elapsed)
    assert serving["uptime"] <= warm["uptime"]
    # The command as one string, as a shell would take it: shlex.split gives the list back.
    assert (warm["command"], serving["command"]) == (
        shlex.join(svc_command("--version", "1")),
        shlex.join(web("2")["command"]),
    )
    assert shlex.split(serving["command"]) == web("2")["command"]
    assert FINGERPRINT.fullmatch(warm["fingerprint"]) and FINGERPRINT.fullmatch(
        serving["fingerprint"]
    )
    assert warm["fingerprint"] != serving["fingerprint"]
    assert serving["warm_until"] is None
    assert flip_began + 300 <= warm["warm_until"] <= flip_ended + 300

    # worker: one crash, replaced in the same generation; its last exit is recorded.
    assert (worker["state"], worker["restarts"], worker["flips"]) == ("running", 1, 1)
    (gen,) = worker["generations"]
    assert (gen["generation"], gen["state"], gen["restarts"]) == (1, "serving", 1)
    assert gen["port"] == int(keys["flipvisor/worker/port/current"])
    assert len(gen["pids"]) == 1 and gen["pids"] != crashed
    assert (gen["command"], gen["warm_until"]) == (shlex.join(svc_command("--version", "1")), None)
    # The same command as web's generation 1, in another section: another fingerprint.
    assert FINGERPRINT.fullmatch(gen["fingerprint"]) and gen["fingerprint"] != warm["fingerprint"]
    assert_uptime(gen, elapsed)
    last = gen["last_exit"]
    assert set(last) == LAST_EXIT_KEYS
    assert (last["worker"], last["pid"], last["reason"]) == (0, crashed[0], "killed by SIGKILL")
    assert isinstance(last["time"], float) and began <= last["time"] <= time.time()

    # idle: autostart false: stopped, nothing ever ran.
    assert idle == {
        "name": "idle",
        "state": "stopped",
        "restarts": 0,
        "flips": 0,
        "flip_failures": 0,
        "fatal_reason": None,
        "leftovers": None,
        "kept_after_removal": None,
        "removing": False,
        "flip": None,
        "generations": [],
    }

    # broken: fatal at once (max_restarts 0), its generation given up and gone.
    assert broken["state"] == "fatal"
    # Why, then what to do (README): with or without a generation kept warm for a rollback.
    assert "exit status 3" in broken["fatal_reason"]
    assert broken["fatal_reason"].endswith(
        "; `flipvisor logs broken` shows its output; `flipvisor start broken` tries again"
    ), broken["fatal_reason"]
    assert broken["generations"] == []

    # The output keeper: this supervisor's child, holding every worker's pipe (web's two
    # generations of 2, worker's 1); none was started again.
    keeper = document["keeper"]
    assert set(keeper) == KEEPER_KEYS
    assert (keeper["restarts"], keeper["disabled"]) == (0, None)
    keeper_process = psutil.Process(keeper["pid"])
    assert "flipvisor.output_keeper" in keeper_process.cmdline()
    assert keeper_process.ppid() == flipvisor.process.pid  # type: ignore[union-attr]
    assert keeper["pipes"] == 5  # told: what it holds once it has read the messages
    wait_until(lambda: len(pipes_held_by(keeper["pid"])) == 5, message="the keeper's 5 pipes")
    table = flipvisor.cli("status")
    assert table.returncode == 0, table.stderr
    assert (
        table.stdout.splitlines()[-1]
        == f"output keeper: pid {keeper['pid']}, holding 5 pipes, 0 restarts"
    )

    # `status PROGRAM` is the same program, alone.
    alone = flipvisor.status("worker")
    assert set(alone) == DOCUMENT_KEYS
    (only,) = alone["programs"]
    assert {k: v for k, v in only.items() if k != "generations"} == {
        k: v for k, v in worker.items() if k != "generations"
    }
    (again,) = only["generations"]
    assert {k: v for k, v in again.items() if k != "uptime"} == {
        k: v for k, v in gen.items() if k != "uptime"
    }


def generations(flipvisor: Flipvisor) -> dict[int, dict[str, Any]]:
    return {g["generation"]: g for g in flipvisor.program("web")["generations"]}


def test_after_a_warm_rollback_status_shows_the_old_release_serving_and_the_new_one_warm(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": web("1")}})
    flipvisor.wait_serving("web")
    v1 = generations(flipvisor)[1]
    flipvisor.write_config({"programs": {"web": web("2")}})
    assert flipvisor.cli("flip", "web").returncode == 0
    v2 = generations(flipvisor)[2]
    assert v2["command"] == shlex.join(web("2")["command"])
    assert v2["fingerprint"] != v1["fingerprint"]

    began = time.time()
    rolled = flipvisor.cli("rollback", "web")
    assert rolled.returncode == 0, rolled.stderr
    ended = time.time()

    serving, warm = generations(flipvisor)[1], generations(flipvisor)[2]
    assert serving["state"] == "serving" and warm["state"] == "ready"
    # What serves is v1 again, by its command and its config's fingerprint.
    assert (serving["command"], serving["fingerprint"]) == (v1["command"], v1["fingerprint"])
    assert serving["warm_until"] is None
    # v2 is kept warm for the rollback_window of v1's section, which deploys now.
    assert (warm["command"], warm["fingerprint"]) == (v2["command"], v2["fingerprint"])
    assert began + 300 <= warm["warm_until"] <= ended + 300

    table = flipvisor.cli("status", "web")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    (row_1,) = [line for line in lines if v1["fingerprint"] in line]
    (row_2,) = [line for line in lines if v2["fingerprint"] in line]
    assert " serving " in row_1 and row_1.endswith(v1["command"])  # whole
    assert " ready (warm 4m" in row_2 and row_2.endswith(v2["command"])
    assert any("generation 2 is kept warm for a rollback until " in line for line in lines)


def test_a_cold_rollback_and_a_restart_show_the_fingerprint_of_the_same_config(
    flipvisor: Flipvisor,
) -> None:
    """The fingerprint is the config's, not the generation's: a restart (the same section
    again) and a cold rollback (from the deploy history's copy of the section) show the one the
    section had."""
    cold = {**web("1"), "rollback_window": 0}
    flipvisor.start({"programs": {"web": cold}})
    flipvisor.wait_serving("web")
    v1 = generations(flipvisor)[1]
    assert flipvisor.cli("restart", "web").returncode == 0
    assert generations(flipvisor)[2]["fingerprint"] == v1["fingerprint"]
    flipvisor.write_config({"programs": {"web": {**cold, "command": web("2")["command"]}}})
    assert flipvisor.cli("flip", "web").returncode == 0
    assert generations(flipvisor)[3]["fingerprint"] != v1["fingerprint"]
    assert flipvisor.cli("rollback", "web").returncode == 0
    gen = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 4)
    assert (gen["command"], gen["fingerprint"]) == (v1["command"], v1["fingerprint"])
