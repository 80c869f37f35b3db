"""The pure parts of a worker slot: backoff, placeholders, environment, budget, exit text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from flipvisor import restarts
from flipvisor.config import ProgramConfig
from flipvisor.config_fields import RESERVED_ENV
from flipvisor.restarts import BACKOFF_BASE, BACKOFF_CAP, RestartBudget, backoff_delay
from flipvisor.starttime import start_ticks_of
from flipvisor.worker import WorkerSpec, describe_exit, expand_placeholders, worker_env

SAMPLES = 200


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [0, -1])
def test_first_restart_is_immediate(failures: int) -> None:
    assert backoff_delay(failures) == 0.0


@pytest.mark.parametrize("failures", [1, 2, 3, 5, 7, 8, 20, 200])
def test_backoff_within_jitter_bounds(failures: int) -> None:
    nominal = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (failures - 1))
    delays = [backoff_delay(failures) for _ in range(SAMPLES)]
    assert all(nominal * 0.5 <= d <= nominal for d in delays), (nominal, min(delays), max(delays))
    # Jittered: workers crashing together must not restart in lockstep.
    assert len(set(delays)) > SAMPLES // 2


def test_backoff_grows_then_is_capped() -> None:
    upper = [max(backoff_delay(n) for _ in range(SAMPLES)) for n in range(1, 12)]
    # Each nominal delay doubles until the cap, so the largest samples must grow.
    assert upper[0] <= BACKOFF_BASE
    assert upper[3] > 2 * BACKOFF_BASE
    assert all(d <= BACKOFF_CAP for d in upper)
    assert upper[-1] > BACKOFF_CAP * 0.9, "the cap itself is reached"


def test_backoff_no_overflow_in_a_long_crash_loop() -> None:
    assert backoff_delay(10_000) <= BACKOFF_CAP


# -- placeholders ----------------------------------------------------------------------------


VALUES = {"port": 8123, "fd": 3, "generation": 7, "worker": 1}


def test_the_four_placeholders() -> None:
    argv = ["svc", "--port={port}", "--fd", "{fd}", "g{generation}-w{worker}", "{port}{port}"]
    assert expand_placeholders(argv, VALUES) == [
        "svc",
        "--port=8123",
        "--fd",
        "3",
        "g7-w1",
        "81238123",
    ]


@pytest.mark.parametrize(
    "arg",
    [
        "{other}",
        "{PORT}",
        "{ port }",
        "{}",
        "${HOME}",
        '{"json": {"a": 1}}',
        "{port",
        "port}",
        "{0}",
        "%(port)s",
    ],
)
def test_other_braces_untouched(arg: str) -> None:
    assert expand_placeholders([arg], VALUES) == [arg]


def test_input_not_modified() -> None:
    argv = ["{port}"]
    expand_placeholders(argv, VALUES)
    assert argv == ["{port}"]


# -- environment -----------------------------------------------------------------------------


def spec(env: dict[str, str] | None = None, notify: Path | None = None) -> WorkerSpec:
    return WorkerSpec(
        program="web",
        generation=3,
        config=ProgramConfig(command=["svc"], env=env or {}),
        port=41234,
        listen_fd=9,
        notify_socket=notify,
        state_dir=Path("/var/lib/flipvisor"),
    )


INHERITED = {
    "PATH": "/usr/bin:/bin",
    "KEEP": "inherited",
    "SHARED": "inherited",
    "LISTEN_FDS": "4",
    "LISTEN_PID": "1",
    "LISTEN_FDNAMES": "theirs",
    "NOTIFY_SOCKET": "/run/systemd/notify",
}


def test_socket_activation_variables() -> None:
    env = worker_env(spec(), 2, INHERITED)
    assert env["LISTEN_FDS"] == "1"
    assert env["LISTEN_FDNAMES"] == "web"
    assert env["PORT"] == "41234"
    assert env["FLIPVISOR_PROGRAM"] == "web"
    assert env["FLIPVISOR_GENERATION"] == "3"
    assert env["FLIPVISOR_WORKER"] == "2"
    assert env["FLIPVISOR_STATE_DIR"] == "/var/lib/flipvisor"
    # Whose it is: this supervisor's PID and start tick (what tells its processes from a
    # killed supervisor's: lineage.py).
    assert env["FLIPVISOR_SUPERVISOR"] == f"{os.getpid()}:{start_ticks_of(os.getpid())}"
    # Our own supervisor's socket activation must not reach the worker: the spawn shim sets
    # LISTEN_PID to the worker's PID, and NOTIFY_SOCKET is only ours when readiness says so.
    assert "LISTEN_PID" not in env
    assert "NOTIFY_SOCKET" not in env


def test_notify_socket_when_the_generation_has_one(tmp_path: Path) -> None:
    env = worker_env(spec(notify=tmp_path / "web-3.sock"), 0, INHERITED)
    assert env["NOTIFY_SOCKET"] == str(tmp_path / "web-3.sock")


def test_config_env_wins_over_inherited() -> None:
    env = worker_env(spec({"SHARED": "config", "NEW": "x"}), 0, INHERITED)
    assert env["SHARED"] == "config"
    assert env["NEW"] == "x"
    assert env["KEEP"] == "inherited"
    assert env["PATH"] == "/usr/bin:/bin"


def test_the_config_refuses_exactly_what_flipvisor_sets(tmp_path: Path) -> None:
    # config_fields.RESERVED_ENV must follow worker_env: every variable it sets, and LISTEN_PID
    # (set by the spawn shim, which alone knows the worker's PID).
    env = worker_env(spec(notify=tmp_path / "web-3.sock"), 0, base={})
    assert {*env, "LISTEN_PID"} == RESERVED_ENV


def test_socket_variables_cannot_come_from_config_env() -> None:
    # The config refuses them (a setting that would be ignored); see test_config.
    refused = r"env\.PORT\.\[key\]\n.*is set by flipvisor for every worker"
    with pytest.raises(ValidationError, match=refused):
        spec({"PORT": "80"})


def test_base_environment_not_modified() -> None:
    base = dict(INHERITED)
    worker_env(spec({"SHARED": "config"}), 0, base)
    assert base == INHERITED


# -- restart budget --------------------------------------------------------------------------


def test_budget_exhausted_within_the_window() -> None:
    budget = RestartBudget(3, window=60.0)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    budget.reset()
    assert budget.take()


def test_zero_budget_never_allows() -> None:
    assert not RestartBudget(0, window=60.0).take()


class FakeClock:
    """``time.monotonic`` for ``restarts.py`` alone, moved by the test: what a window does is
    then independent of how fast the machine schedules the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(restarts, "time", fake)
    return fake


def test_budget_window_slides(clock: FakeClock) -> None:
    """Restarts older than the window are forgotten one by one, not all at once."""
    budget = RestartBudget(2, window=10.0)
    assert budget.take()  # at 0
    clock.now += 5
    assert budget.take()  # at 5
    assert not budget.take()
    clock.now += 5  # 10: the first is exactly one window old, still inside
    assert not budget.take()
    clock.now += 0.01  # the first leaves the window: exactly one new restart fits
    assert budget.take()
    assert not budget.take()
    clock.now += 5  # past 15: the second leaves too
    assert budget.take()
    assert not budget.take()


def test_failed_take_does_not_spend(clock: FakeClock) -> None:
    budget = RestartBudget(1, window=10.0)
    assert budget.take()
    for _ in range(50):
        clock.now += 0.1
        assert not budget.take()  # refused attempts must not push the window further out
    clock.now += 5.01  # 10.01 after the one restart taken
    assert budget.take()


# -- exit descriptions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (None, "did not start"),
        (0, "exit status 0"),
        (3, "exit status 3"),
        (127, "exit status 127"),
        (-9, "killed by SIGKILL"),
        (-15, "killed by SIGTERM"),
        (-11, "killed by SIGSEGV"),
        (-200, "killed by signal 200"),
    ],
)
def test_describe_exit(returncode: int | None, text: str) -> None:
    assert describe_exit(returncode) == text
