"""Two programs behind one nginx (each its own snippet and listen port) flipping at the same time:
both flips succeed, and neither program fails a request under load while the other reloads nginx.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.load import Load
from tests.e2e.test_flip import gated as gated_command
from tests.e2e.test_flip import program
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx, free_port
from tests.waiting import wait_until

NAMES = ("alpha", "beta")
FLIP_TIMEOUT = 60.0
# A generation gated by the test (svc --serve-after) waits for it this long at most.
GATED_READINESS = {"timeout": 60}


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


def version_or_error(url: str) -> str:
    """The version ``url`` answers, or why it did not answer."""
    try:
        return str(get(url)["version"])
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def programs(nginx: Nginx, ports: dict[str, int], version: str) -> dict[str, Any]:
    """Both programs at ``version`` (told apart by their name in the version they answer)."""
    return {
        name: program(
            nginx,
            f"{name}-{version}",
            proxy={"dest": str(nginx.conf_dir / f"{name}.conf"), "vars": {"listen": port}},
        )
        for name, port in ports.items()
    }


def gated(config: dict[str, Any], gate: Path) -> dict[str, Any]:
    """``config``, whose generation serves (and so gets ready) only once ``gate`` exists: the
    test creates it when the flips overlap as it needs, however slow the machine."""
    return {
        **config,
        "command": [*config["command"], "--serve-after", str(gate)],
        "readiness": {**config["readiness"], **GATED_READINESS},
    }


def generation_state(flipvisor: Flipvisor, name: str, generation: int) -> str | None:
    return next(
        (
            g["state"]
            for g in flipvisor.program(name)["generations"]
            if g["generation"] == generation
        ),
        None,
    )


def flip_step(flipvisor: Flipvisor, name: str) -> str | None:
    flip = flipvisor.program(name)["flip"]
    return None if flip is None else str(flip["step"])


def test_two_programs_flip_at_once_under_load(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in NAMES}
    urls = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
    flipvisor.start({"programs": programs(nginx, ports, "1")})
    for name in NAMES:
        flipvisor.wait_serving(name)
    wait_until(
        lambda: all(answers(url) for url in urls.values()), message="nginx to proxy both programs"
    )

    # Both new generations stay in their probe until a status call has seen both flips.
    gate = tmp_path / "serve"
    new = {name: gated(config, gate) for name, config in programs(nginx, ports, "2").items()}
    with Load(urls["alpha"], clients=2) as alpha_load, Load(urls["beta"], clients=2) as beta_load:
        flipvisor.write_config({"programs": new})
        flips = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flipvisor",
                    "flip",
                    name,
                    "--json",
                    "-c",
                    str(flipvisor.config_path),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            for name in NAMES
        }
        try:
            # Both flips in progress at one moment: they really ran concurrently.
            try:
                wait_until(
                    lambda: all(p["flip"] for p in flipvisor.status()["programs"]),
                    message="both flips to be in progress at once",
                )
            finally:
                gate.touch()
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
            f"{name}-1",
            f"{name}-2",
        }

    keys = flipvisor.registry()
    for name in NAMES:
        gen = flipvisor.serving(name)
        assert gen is not None and gen["generation"] == 2
        assert keys[f"flipvisor/{name}/port/current"] == str(gen["port"])
        assert [g["generation"] for g in flipvisor.program(name)["generations"]] == [2]
        assert f"listen {ports[name]};" in (nginx.conf_dir / f"{name}.conf").read_text()


def _flip(flipvisor: Flipvisor, name: str) -> subprocess.Popen[str]:
    return flipvisor.cli_started("flip", name)


def _both_serving(flipvisor: Flipvisor, nginx: Nginx) -> tuple[dict[str, int], dict[str, str]]:
    """Start both programs at version 1; their listen ports and URLs once nginx proxies both."""
    ports = {name: free_port() for name in NAMES}
    urls = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
    flipvisor.start({"programs": programs(nginx, ports, "1")})
    for name in NAMES:
        flipvisor.wait_serving(name)
    wait_until(
        lambda: all(answers(url) for url in urls.values()), message="nginx to proxy both programs"
    )
    return ports, urls


def _start_both(flipvisor: Flipvisor) -> dict[str, subprocess.Popen[str]]:
    """Start a flip of each program; ``_results`` waits for them."""
    return {name: _flip(flipvisor, name) for name in NAMES}


def _results(flips: dict[str, subprocess.Popen[str]]) -> dict[str, tuple[int, str]]:
    """Each flip's exit code and stderr, once it is done."""
    try:
        errors = {name: flip.communicate(timeout=FLIP_TIMEOUT)[1] for name, flip in flips.items()}
        return {name: (flip.returncode, errors[name]) for name, flip in flips.items()}
    finally:
        for flip in flips.values():
            if flip.poll() is None:
                flip.kill()
                flip.communicate()


# Regression tests: promotions of programs that share a proxy are serialized (the proxy lock of
# promotion.promote), so one program's reload or check never sees another program's file between
# that program's install and its own check, reload or undo.


def test_failed_flip_is_not_activated_by_another_programs_reload(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    ports, urls = _both_serving(flipvisor, nginx)
    before_file = (nginx.conf_dir / "alpha.conf").read_bytes()
    # alpha's reload holds until beta wants to promote (it waits for the proxy lock alpha
    # holds; without the lock it would reload nginx with alpha's new file in place), then
    # fails, so alpha's flip rolls back. Each step waits for the one before, not for a delay a
    # loaded machine may outrun: beta's generation serves only once alpha's reload began.
    beta_serves, alpha_fails = tmp_path / "beta-serves", tmp_path / "alpha-fails"
    new = programs(nginx, ports, "2")
    new["alpha"]["proxy"]["reload_cmd"] = [
        "sh",
        "-c",
        f'touch "{beta_serves}"; while [ ! -e "{alpha_fails}" ]; do sleep 0.05; done; exit 1',
    ]
    new["beta"] = gated(new["beta"], beta_serves)
    with Load(urls["alpha"], clients=2) as alpha_load:
        flipvisor.write_config({"programs": new})
        flips = _start_both(flipvisor)
        try:
            wait_until(
                lambda: (
                    flip_step(flipvisor, "alpha") == "reload"
                    and generation_state(flipvisor, "beta", 2) in ("promoting", "serving")
                ),
                message="beta to promote while alpha reloads",
            )
        finally:
            alpha_fails.touch()
            results = _results(flips)
        alpha_version = version_or_error(urls["alpha"])
        outcome = alpha_load.stop()
    assert results["beta"][0] == 0, results["beta"][1]
    assert results["alpha"][0] == 1, results["alpha"][1]
    # alpha's old generation serves, its file is back, and nginx must still route alpha to it.
    assert (nginx.conf_dir / "alpha.conf").read_bytes() == before_file
    assert alpha_version == "alpha-1"
    assert outcome.failed == 0, outcome.errors[:5]


def test_neighbours_unchecked_file_does_not_break_a_flip(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    ports, urls = _both_serving(flipvisor, nginx)
    # alpha deploys a broken file (nginx rejects its listen) and checks it slowly; beta checked
    # its own file, and its reload holds until alpha wants to promote (it waits for the proxy
    # lock beta holds; without the lock its broken file would be in place when beta reloads).
    # Each step waits for the one before, not for a delay a loaded machine may outrun: alpha's
    # generation serves only once beta's reload began.
    alpha_serves, beta_reloads = tmp_path / "alpha-serves", tmp_path / "beta-reloads"
    new = programs(nginx, ports, "2")
    new["alpha"] = gated(new["alpha"], alpha_serves)
    new["alpha"]["proxy"]["vars"] = {"listen": "127.0.0.1:notaport"}
    new["alpha"]["proxy"]["check_cmd"] = ["sh", "-c", 'sleep 2; exec "$0" "$@"', *nginx.check_cmd]
    new["beta"]["proxy"]["reload_cmd"] = [
        "sh",
        "-c",
        f'touch "{alpha_serves}"; while [ ! -e "{beta_reloads}" ]; do sleep 0.05; done; '
        'exec "$0" "$@"',
        *nginx.reload_cmd,
    ]
    with Load(urls["alpha"], clients=2) as alpha_load, Load(urls["beta"], clients=2) as beta_load:
        flipvisor.write_config({"programs": new})
        flips = _start_both(flipvisor)
        try:
            wait_until(
                lambda: (
                    flip_step(flipvisor, "beta") == "reload"
                    and generation_state(flipvisor, "alpha", 2) == "promoting"
                ),
                message="alpha to promote while beta reloads",
            )
        finally:
            beta_reloads.touch()
            results = _results(flips)
        versions = {name: version_or_error(url) for name, url in urls.items()}
        outcomes = {"alpha": alpha_load.stop(), "beta": beta_load.stop()}
    assert results["alpha"][0] == 1 and "notaport" in results["alpha"][1]
    assert results["beta"][0] == 0, results["beta"][1]
    assert versions == {"alpha": "alpha-1", "beta": "beta-2"}
    for name, outcome in outcomes.items():
        assert outcome.failed == 0, (name, outcome.failed, outcome.errors[:3])


def _error_line_of(stderr: str) -> str:
    """The client's error (from its `flipvisor:` line on), without the progress lines."""
    return " ".join(stderr.partition("flipvisor: ")[2].split())


def test_a_flip_waiting_for_the_proxy_held_by_another_program_s_reload_back_says_so(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """web's `flip --timeout 2` is answered while its reload back (a hung reload_cmd) goes on,
    holding the proxy (README: other programs' proxy steps wait). api's `flip --timeout 3`,
    started then, passes its probe and waits for the proxy until its timeout: it is rolled
    back. It said only "the flip took longer than --timeout 3s; rolled back" (QA 10), with no
    step shown after the probe: now its `proxy-wait` step and its answer name web's rollback,
    and say to flip api again once web's `rollback-finished` event came."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gate.touch()
    api_listen = free_port()

    def config(version: str) -> dict[str, Any]:
        web_reload = gated_command(nginx.reload_cmd, gate, entered)
        return {
            "programs": {
                "web": program(nginx, version, proxy={"reload_cmd": web_reload, "timeout": 8}),
                "api": program(
                    nginx,
                    version,
                    proxy={
                        "dest": str(nginx.conf_dir / "api.conf"),
                        "vars": {"listen": api_listen},
                    },
                ),
            }
        }

    flipvisor.start(config("1"))
    flipvisor.wait_serving("web")
    flipvisor.wait_serving("api")
    gate.unlink()  # web's reload command hangs from now on
    flipvisor.write_config(config("2"))
    try:
        web = flipvisor.cli("flip", "web", "--timeout", "2", timeout=30)
        assert web.returncode == 1, web.stderr
        assert "it is being rolled back" in web.stderr, web.stderr
        api = flipvisor.cli("flip", "api", "--timeout", "3", timeout=30)
        assert api.returncode == 1, api.stderr
        said = _error_line_of(api.stderr)
        assert "took longer than --timeout 3s" in said, said
        # What held it up: the proxy, held by web's rollback (its reload back); what to do.
        held = "the proxy was held by web's flip to generation 2, being rolled back"
        assert held in said, said
        assert "(its reload of the proxy back)" in said, said
        assert "flip api` again once web's `rollback-finished` event came" in said, said
        assert "proxy-wait" in api.stderr, api.stderr
    finally:
        gate.touch()
