"""Two programs behind one nginx (each its own snippet and listen port) flipping at the same time:
both flips succeed, and neither program fails a request under load while the other reloads nginx.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from typing import Any

from tests.e2e.load import Load
from tests.e2e.test_flip import program
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx, free_port
from tests.waiting import wait_until

NAMES = ("alpha", "beta")
FLIP_TIMEOUT = 60.0
# Long enough for one status call to see both flips in their probe, even on a slow machine.
READY_DELAY = 1.0


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        loaded: dict[str, Any] = json.loads(answer.read())
        return loaded


def answers(url: str) -> bool:
    try:
        get(url)
        return True
    except OSError:
        return False


def programs(nginx: Nginx, ports: dict[str, int], version: str) -> dict[str, Any]:
    """Both programs at ``version`` (told apart by their name in the version they answer).

    ``--ready-delay`` keeps each new generation in its probe long enough for the flips to overlap.
    """
    return {
        name: program(
            nginx, f"{name}-{version}", "--ready-delay", str(READY_DELAY),
            proxy={"dest": str(nginx.conf_dir / f"{name}.conf"), "vars": {"listen": port}},
        )
        for name, port in ports.items()
    }


def test_two_programs_flip_at_once_under_load(flipvisor: Flipvisor, nginx: Nginx) -> None:
    ports = {name: free_port() for name in NAMES}
    urls = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
    flipvisor.start({"programs": programs(nginx, ports, "1")})
    for name in NAMES:
        flipvisor.wait_serving(name)
    wait_until(lambda: all(answers(url) for url in urls.values()),
               message="nginx to proxy both programs")

    with Load(urls["alpha"], clients=2) as alpha_load, Load(urls["beta"], clients=2) as beta_load:
        flipvisor.write_config({"programs": programs(nginx, ports, "2")})
        flips = {
            name: subprocess.Popen(
                [sys.executable, "-m", "flipvisor", "flip", name, "--json",
                 "-c", str(flipvisor.config_path)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                stdin=subprocess.DEVNULL,
            )
            for name in NAMES
        }
        try:
            # Both flips in progress at one moment: they really ran concurrently.
            wait_until(lambda: all(p["flipping"] for p in flipvisor.status()["programs"]),
                       message="both flips to be in progress at once")
            outputs = {name: flip.communicate(timeout=FLIP_TIMEOUT) for name, flip in flips.items()}
        finally:
            for flip in flips.values():
                if flip.poll() is None:
                    flip.kill()
                    flip.communicate()
        for name in NAMES:
            assert get(urls[name])["version"] == f"{name}-2"
        outcomes = {"alpha": alpha_load.stop(), "beta": beta_load.stop()}

    for name, flip in flips.items():
        out, err = outputs[name]
        assert flip.returncode == 0, f"{name}: {out}{err}{flipvisor.output()}"
        report = json.loads(out)
        assert report["ok"] and report["generation"] == 2, report
    for name, outcome in outcomes.items():
        assert outcome.failed == 0, (name, outcome.errors[:5])
        assert outcome.ok > 10, name
        # Each listen port only ever reached its own program.
        assert {json.loads(body)["version"] for body in outcome.bodies} <= {
            f"{name}-1", f"{name}-2"}

    keys = flipvisor.registry()
    for name in NAMES:
        gen = flipvisor.serving(name)
        assert gen is not None and gen["generation"] == 2
        assert keys[f"flipvisor/{name}/port/current"] == str(gen["port"])
        assert [g["generation"] for g in flipvisor.program(name)["generations"]] == [2]
        assert f"listen {ports[name]};" in (nginx.conf_dir / f"{name}.conf").read_text()
