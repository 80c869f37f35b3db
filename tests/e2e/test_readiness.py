"""Flips whose readiness is proved by sd_notify or by an exec probe, through nginx under load:
zero failed requests, promotion only after the workers said (or the probe showed) they are
ready; a notify program whose workers never send READY=1 rolls back after the timeout; a
serving notify program's later messages (STATUS=, a restarted worker's READY=1) never block it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.load import Load
from tests.e2e.test_flip import BeforeFlip, program, proxied, start_serving
from tests.fixtures.dgram_queue import unix_dgram_capacity
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until

READY_DELAY = 0.5
# svc workers sharing a socket can hang in a blocking accept() on SIGTERM (tests/apps/svc.py
# leaves the inherited socket blocking); bound what that costs a drain, as it does not matter here.
DRAIN = {"timeout": 2}
# The exec probe: GET /health on the port given as {port}, which must also be $PORT.
EXEC_PROBE = [
    sys.executable,
    "-c",
    "import os, sys, urllib.request; assert sys.argv[1] == os.environ['PORT'], 'PORT'; "
    "urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/health', timeout=0.2).read()",
    "{port}",
]
READINESS: dict[str, dict[str, Any]] = {
    "notify": {"notify": True, "timeout": 10},
    "exec": {"exec": EXEC_PROBE, "timeout": 10, "interval": 0.05},
}


def with_readiness(config: dict[str, Any], readiness: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its readiness replaced (``program`` would merge it into the http one)."""
    return {**config, "readiness": readiness}


@pytest.mark.parametrize("kind", sorted(READINESS))
def test_flip_with_readiness_under_load(flipvisor: Flipvisor, nginx: Nginx, kind: str) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    # Workers that take READY_DELAY to serve (and only then notify): promotion must wait.
    flags = ("--ready-delay", str(READY_DELAY), "--notify")
    new = with_readiness(program(nginx, "2", *flags, numprocs=2, drain=DRAIN), READINESS[kind])
    with Load(nginx.url("/"), clients=3) as load:
        flipvisor.write_config({"programs": {"web": new}})
        result = flipvisor.cli("flip", "web", "--json")
        assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
        assert proxied(nginx)["version"] == "2"
        outcome = load.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 10
    report = json.loads(result.stdout)
    probe = next(step for step in report["steps"] if step["step"] == "probe")
    assert probe["status"] == "ok"
    assert probe["duration"] >= READY_DELAY * 0.9, report["steps"]
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 2 and len(gen["pids"]) == 2
    keys = flipvisor.registry()
    assert keys["flipvisor/web/port/current"] == str(gen["port"])


def test_notify_program_that_never_sends_ready_rolls_back(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    # Serves fine, but never says so: without READY=1 the generation is never ready.
    silent = with_readiness(
        program(nginx, "2", numprocs=2, drain=DRAIN), {"notify": True, "timeout": 1}
    )
    with Load(nginx.url("/"), clients=2) as load:
        flipvisor.write_config({"programs": {"web": silent}})
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not ready after 1s" in result.stderr
    assert "0 of 2 workers sent READY=1" in result.stderr
    assert outcome.failed == 0, outcome.errors[:5]
    before.assert_untouched(flipvisor, nginx)

    # The same program that does send READY=1 deploys with the next flip.
    fixed = with_readiness(
        program(nginx, "3", "--notify", numprocs=2, drain=DRAIN), {"notify": True, "timeout": 10}
    )
    flipvisor.write_config({"programs": {"web": fixed}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert proxied(nginx)["version"] == "3"


def test_a_notify_probe_does_not_count_a_dead_worker_s_ready(flipvisor: Flipvisor) -> None:
    """``numprocs: 2``, ``readiness: {notify: true}``. Worker 0 sends READY=1 and then crashes
    (once); as the program's first generation, it is restarted, and its replacement sends
    READY=1 too. Worker 1 never sends READY=1 (it hangs in its start-up). The probe counts two
    READY=1 (the dead worker's and its replacement's) for two workers and promotes the
    generation, while worker 1 shares the socket and takes connections it is not ready for.
    Contract: with ``notify: true`` "every worker sends READY=1"; README: "the READY=1 its
    workers sent counts while they run". The probe must time out instead."""
    crashed_once = flipvisor.dir / "crashed-once"
    sender = (
        "import os, socket, time; "
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', "
        "os.environ['NOTIFY_SOCKET']); time.sleep(0.3); raise SystemExit(1)"
    )
    script = flipvisor.dir / "worker.sh"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$FLIPVISOR_WORKER" = 0 ]; then\n'
        f"  if [ ! -e {crashed_once} ]; then touch {crashed_once}; "
        f'exec {svc_command()[0]} -c "{sender}"; fi\n'
        f"  exec {' '.join(svc_command('--notify'))}\n"
        "fi\n"
        f"exec {' '.join(svc_command())}\n"  # worker 1: never sends READY=1
    )
    script.chmod(0o755)
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": [str(script)],
                    "numprocs": 2,
                    "readiness": {"notify": True, "timeout": 3},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    settled = wait_until(
        lambda: (p := flipvisor.program("web"))["state"] in ("running", "fatal") and p,
        timeout=20,
        message="generation 1 to be promoted or to fail",
    )
    assert crashed_once.exists()
    assert "promoted" not in flipvisor.event_kinds(), flipvisor.cli("events", "web").stdout
    assert settled["state"] == "fatal"
    assert "READY=1" in (settled["fatal_reason"] or ""), settled["fatal_reason"]


# A systemd-aware service: READY=1, then a STATUS= line now and then (php-fpm sends one every
# 10 s), through a blocking datagram socket, as libsystemd's sd_notify does. It counts what it
# sent into a file.
NOTIFYING_SERVICE = """\
import os, socket, sys, time
count_file, messages = sys.argv[1], int(sys.argv[2])
address = os.environ["NOTIFY_SOCKET"]
sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sender.sendto(b"READY=1", address)
for sent in range(1, messages + 1):
    sender.sendto(f"STATUS=handled {sent} requests".encode(), address)
    with open(count_file + ".tmp", "w") as f:
        f.write(str(sent))
    os.replace(count_file + ".tmp", count_file)
time.sleep(3600)
"""


def test_a_serving_notify_worker_is_not_blocked_by_its_later_status_messages(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A worker that keeps sending STATUS= once it serves (as php-fpm does) is never stopped
    in sendto(): the generation reads its notify socket for its whole life, not only until the
    probe passed, so the queue never fills."""
    service = tmp_path / "notifying.py"
    service.write_text(NOTIFYING_SERVICE)
    count_file = tmp_path / "sent"
    messages = unix_dgram_capacity() + 20  # more than the queue holds, whatever the host's sysctl
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": [sys.executable, str(service), str(count_file), str(messages)],
                    "readiness": {"notify": True, "timeout": 10},
                    "drain": {"delay": 0, "timeout": 2},
                }
            }
        }
    )
    flipvisor.wait_serving("web")

    def sent() -> int:
        try:
            return int(count_file.read_text())
        except (OSError, ValueError):
            return 0

    try:
        wait_until(lambda: sent() == messages, timeout=10, message=f"{messages} messages sent")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: the worker is stuck in sendto() after {sent()} STATUS messages "
            "(nobody reads the notify socket once the generation serves)"
        ) from None


# A systemd-aware worker that crashes CRASHES times once its generation serves (the test says
# when, by creating GO): each start sends READY=1 and EXTRA STATUS= lines, with a blocking
# datagram send as sd_notify does, and only then counts itself as started in COUNT.<worker>.
CRASHING_NOTIFY_SERVICE = """\
import os, socket, sys, time
count_file, go, crashes, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
count_file += "." + os.environ["FLIPVISOR_WORKER"]
address = os.environ["NOTIFY_SOCKET"]
sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sender.sendto(b"READY=1", address)
for line in range(extra):
    sender.sendto(f"STATUS=warming up {line}".encode(), address)
try:
    with open(count_file) as f:
        started = int(f.read()) + 1
except FileNotFoundError:
    started = 1
with open(count_file + ".tmp", "w") as f:
    f.write(str(started))
os.replace(count_file + ".tmp", count_file)
if started <= crashes:
    while not os.path.exists(go):
        time.sleep(0.02)
    sys.exit(1)
time.sleep(3600)
"""


def test_a_notify_worker_restarted_again_and_again_still_comes_up(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """Each crash of a serving notify generation's worker restarts it, and the restarted worker
    says READY=1 again (and some STATUS=): more datagrams, over the crashes, than the socket's
    queue holds. Every restart must still get past its sd_notify and come up."""
    service = tmp_path / "crashing.py"
    service.write_text(CRASHING_NOTIFY_SERVICE)
    count_file, go = tmp_path / "started", tmp_path / "go"
    queue, numprocs, crashes = unix_dgram_capacity(), 2, 3
    # Enough that the restarts' datagrams alone are more than the queue holds.
    extra = queue // (numprocs * crashes) + 1
    command = [sys.executable, str(service), str(count_file), str(go), str(crashes), str(extra)]
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": command,
                    "numprocs": numprocs,
                    "readiness": {"notify": True, "timeout": 10},
                    "restart": {"max_restarts": 100, "window": 60},
                    "drain": {"delay": 0, "timeout": 2},
                }
            }
        }
    )
    flipvisor.wait_serving("web")
    go.touch()  # the crashes begin once the generation serves: each restart is a serving one's

    def starts() -> list[int]:
        counts = []
        for worker in range(numprocs):
            try:
                counts.append(int(Path(f"{count_file}.{worker}").read_text()))
            except (OSError, ValueError):
                counts.append(0)
        return counts

    try:
        wait_until(
            lambda: starts() == [crashes + 1] * numprocs,
            timeout=30,
            message=f"each of {numprocs} workers to come up after {crashes} crashes",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: starts per worker {starts()} (a restarted worker stuck in sendto(): "
            "nobody reads the notify socket once the generation serves)\n" + flipvisor.output()
        ) from None
    gen = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == numprocs)
    assert gen["generation"] == 1 and gen["restarts"] == numprocs * crashes, gen
