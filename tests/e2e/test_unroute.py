"""A program that stops having a proxy file (removed from the config, or flipped to a section
without ``proxy:``) is taken out of nginx before it drains, unless nginx's config still needs
the file: then the file is put back."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.load import Load
from tests.e2e.test_flip import answers, busy, program, proxied
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx, port_answers
from tests.waiting import wait_until


def needing_the_file(nginx: Nginx, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a check that fails without the program's file, as nginx -t would if a
    server block elsewhere used the upstream the file defines."""
    dest = config["proxy"]["dest"]
    check = " ".join(nginx.check_cmd)
    config["proxy"]["check_cmd"] = ["sh", "-c", f"test -f {dest} && {check}"]
    return config


def start_web(flipvisor: Flipvisor, nginx: Nginx, config: dict[str, Any]) -> dict[str, Any]:
    flipvisor.start({"programs": {"web": config}})
    gen = flipvisor.wait_serving("web")
    wait_until(lambda: answers(nginx), message="nginx to proxy to web")
    return gen


def wait_gone(pids: list[int]) -> None:
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), message=f"{pids} to exit")


def only(flipvisor: Flipvisor, name: str) -> None:
    """Wait until ``name`` is the only program listed: a removed one is, until its drain ends
    (its workers gone, the removal is forgotten a moment later)."""
    wait_until(
        lambda: [p["name"] for p in flipvisor.status()["programs"]] == [name],
        message=f"{name} to be the only program",
    )


def web_conf(nginx: Nginx) -> Path:
    return nginx.conf_dir / "web.conf"


def test_a_program_removed_by_a_reload_leaves_nginx_before_it_drains(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    gen = start_web(flipvisor, nginx, program(nginx, "1"))
    flipvisor.write_config({"programs": {}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert not web_conf(nginx).exists()
    # Nor do the registry keys name it by then (a confd would still route to it).
    keys = flipvisor.registry()
    assert "flipvisor/web/port/current" not in keys and "flipvisor/web/pid/current" not in keys
    assert keys["flipvisor/web/pid/previous"] == ",".join(map(str, gen["pids"]))
    wait_until(lambda: not port_answers(nginx.listen), message="nginx to drop web's server")
    wait_gone(gen["pids"])
    kinds = flipvisor.event_kinds()
    assert kinds.index("unrouted") < kinds.index("draining")


def test_a_removed_program_s_file_that_nginx_still_needs_is_put_back(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    gen = start_web(flipvisor, nginx, needing_the_file(nginx, program(nginx, "1")))
    content = web_conf(nginx).read_bytes()
    flipvisor.write_config({"programs": {}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    wait_gone(gen["pids"])  # removed all the same
    assert web_conf(nginx).read_bytes() == content
    assert "remove what refers to" in flipvisor.output()
    assert "unrouted" not in flipvisor.event_kinds()


def test_a_flip_to_a_section_without_proxy_removes_the_file_before_the_old_drains(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    first = start_web(flipvisor, nginx, program(nginx, "1"))
    plain = {"command": svc_command("--version", "2"), "readiness": {"http": "/health"}}
    flipvisor.write_config({"programs": {"web": plain}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert not web_conf(nginx).exists()
    wait_until(lambda: not port_answers(nginx.listen), message="nginx to drop web's server")
    wait_gone(first["pids"])
    second = flipvisor.serving("web")
    assert second is not None and second["generation"] == 2


def test_a_flip_without_proxy_whose_check_needs_the_file_rolls_back(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    first = start_web(flipvisor, nginx, needing_the_file(nginx, program(nginx, "1")))
    content = web_conf(nginx).read_bytes()
    plain = {"command": svc_command("--version", "2"), "readiness": {"http": "/health"}}
    flipvisor.write_config({"programs": {"web": plain}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "put it back" in result.stdout + result.stderr
    assert web_conf(nginx).read_bytes() == content
    assert proxied(nginx)["version"] == "1"
    serving = flipvisor.serving("web")
    assert serving is not None
    assert (serving["generation"], serving["pids"]) == (1, first["pids"])


def test_a_removed_program_whose_proxy_reload_fails_says_what_is_left_to_do(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The file is gone by then: the operator is told to reload the proxy, not to delete it, by
    a `not-unrouted` warning event naming the command (a non-zero exit, not a timeout: review,
    that path's event was untested), and the program is not reported as unrouted."""
    broken = flipvisor.dir / "reload-broken"
    config = program(nginx, "1")
    reload = " ".join(nginx.reload_cmd)
    script = f"test ! -e {broken} && {reload}"
    config["proxy"]["reload_cmd"] = ["sh", "-c", script]
    gen = start_web(flipvisor, nginx, config)
    broken.touch()
    flipvisor.write_config({"programs": {}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    wait_gone(gen["pids"])
    assert not web_conf(nginx).exists()
    output = flipvisor.output()
    assert "removed, but the proxy reload failed" in output, output
    assert "remove what refers to" not in output
    kinds = flipvisor.event_kinds()
    assert "unrouted" not in kinds and "not-unrouted" in kinds, kinds
    events = flipvisor.cli("events", "web").stdout
    assert "not-unrouted" in events and "the proxy reload failed" in events, events
    assert f"run `sh -c '{script}'`" in events, events


@pytest.mark.parametrize("applied", [False, True], ids=["hangs-before", "hangs-after"])
def test_a_removed_program_whose_proxy_reload_times_out_is_unrouted_only_if_nginx_applied_it(
    flipvisor: Flipvisor, nginx: Nginx, applied: bool
) -> None:
    """The reload command times out (QA 10): that was taken as success (`unrouted`, INFO) and the
    program drained while nginx may never have reloaded (502s). As for a flip, a timed-out
    reload counts only once nginx shows that it applied it (a new worker, by its pidfile):
    otherwise a `not-unrouted` warning names the command to run, and there is no `unrouted`."""
    hang = flipvisor.dir / "reload-hangs"
    config = program(nginx, "1")
    reload = " ".join(nginx.reload_cmd)
    hangs = f"if [ -e {hang} ]; then exec sleep 30; fi"
    script = f"{reload}; {hangs}" if applied else f"{hangs}; exec {reload}"
    config["proxy"] |= {"reload_cmd": ["sh", "-c", script], "timeout": 2}
    gen = start_web(flipvisor, nginx, config)
    hang.touch()
    flipvisor.write_config({"programs": {}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    wait_gone(gen["pids"])
    assert not web_conf(nginx).exists()
    kinds = flipvisor.event_kinds()
    if applied:
        assert "unrouted" in kinds and "not-unrouted" not in kinds, kinds
        assert not port_answers(nginx.listen), "nginx still routes to the removed program"
        return
    assert "unrouted" not in kinds, kinds
    events = flipvisor.cli("events", "web").stdout
    assert "not-unrouted" in events and "timed out, and is not known to have happened" in events
    assert f"run `sh -c '{script}'`" in events, events


def test_a_program_renamed_by_a_reload_hands_its_proxy_file_over_with_no_failed_request(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """Removed and added in one reload with the same ``proxy.dest``: the added program starts
    first and its promotion rewrites the file; only then does the removed one drain, without
    taking the file out of nginx (which would leave the address with nothing behind it)."""
    gen = start_web(flipvisor, nginx, program(nginx, "1"))
    with Load(nginx.url("/"), clients=2) as load:
        flipvisor.write_config({"programs": {"site": program(nginx, "2")}})
        result = flipvisor.cli("reload", "--json")
        outcome = load.stop()
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert outcome.failed == 0, outcome.errors[:5]
    assert proxied(nginx)["version"] == "2"
    wait_gone(gen["pids"])
    assert web_conf(nginx).exists()
    assert "unrouted" not in flipvisor.event_kinds()
    assert flipvisor.wait_serving("site")["generation"] == 1


def test_a_renamed_program_whose_start_fails_leaves_the_removed_one_serving(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The new name's start fails: the program the reload removed goes on serving (the old is
    never lost to a broken new one) until a reload whose new program starts, or one that no
    longer hands the file over."""
    gen = start_web(flipvisor, nginx, program(nginx, "1"))
    broken = program(nginx, "2", "--health-fail", readiness={"timeout": 1})
    flipvisor.write_config({"programs": {"site": broken}})
    result = flipvisor.cli("reload", "--json")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    kept = json.loads(result.stdout)["kept"]
    assert list(kept) == ["web"] and "site" in kept["web"], kept
    assert proxied(nginx)["version"] == "1"
    assert flipvisor.serving("web") is not None and all(map(psutil.pid_exists, gen["pids"]))
    shown = flipvisor.cli("status").stdout
    assert "web: removed from the config" in shown, shown
    flipvisor.write_config({"programs": {"site": program(nginx, "3")}})
    again = flipvisor.cli("reload", "--json")
    assert again.returncode == 0, again.stderr + flipvisor.output()
    assert proxied(nginx)["version"] == "3"
    wait_gone(gen["pids"])
    only(flipvisor, "site")


def test_a_removed_program_kept_serving_goes_once_its_successor_is_flipped_in(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    gen = start_web(flipvisor, nginx, program(nginx, "1"))
    broken = program(nginx, "2", "--health-fail", readiness={"timeout": 1})
    flipvisor.write_config({"programs": {"site": broken}})
    reloaded = flipvisor.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr + flipvisor.output()
    assert "web: removed from the config, but serving on" in reloaded.stderr
    assert "kept-serving" in flipvisor.event_kinds()
    flipvisor.write_config({"programs": {"site": program(nginx, "3")}})
    flipped = flipvisor.cli("flip", "site")
    assert flipped.returncode == 0, flipped.stderr + flipvisor.output()
    assert proxied(nginx)["version"] == "3"
    wait_gone(gen["pids"])
    only(flipvisor, "site")
    assert web_conf(nginx).exists()


def test_a_removed_program_whose_file_was_deleted_by_hand_still_leaves_nginx(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """nginx keeps what it loaded until it reloads: a file gone from the disk may still route."""
    gen = start_web(flipvisor, nginx, program(nginx, "1"))
    web_conf(nginx).unlink()
    flipvisor.write_config({"programs": {}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    wait_until(lambda: not port_answers(nginx.listen), message="nginx to drop web's server")
    wait_gone(gen["pids"])


def test_a_kept_program_added_back_to_the_config_is_no_longer_reported_as_removed(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_web(flipvisor, nginx, program(nginx, "1"))
    broken = program(nginx, "2", "--health-fail", readiness={"timeout": 1})
    flipvisor.write_config({"programs": {"site": broken}})
    assert flipvisor.cli("reload").returncode == 0
    assert flipvisor.program("web")["kept_after_removal"] is not None
    flipvisor.write_config({"programs": {"web": program(nginx, "1")}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert flipvisor.program("web")["kept_after_removal"] is None
    assert proxied(nginx)["version"] == "1"
    only(flipvisor, "web")


def test_a_program_renamed_back_while_its_old_name_drains_takes_the_file_over_again(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """web renamed site, then site renamed web while the removed web still drains: the new web
    waits for that drain, starts, and takes the file over from site, which drains in turn."""
    stubborn = program(nginx, "1", "--ignore-term")
    # Its drain ends when this test kills it, not at a timeout a loaded machine may pass first.
    stubborn["drain"] = {"delay": 0, "timeout": 120}
    first = start_web(flipvisor, nginx, stubborn)
    flipvisor.write_config({"programs": {"site": program(nginx, "2")}})
    assert flipvisor.cli("reload").returncode == 0, flipvisor.output()
    assert proxied(nginx)["version"] == "2"
    site = flipvisor.wait_serving("site")
    flipvisor.write_config({"programs": {"web": program(nginx, "3")}})

    back = flipvisor.cli_started("reload", "--json")
    try:
        waiting = "web is added back while its removal still drains it"
        wait_until(lambda: waiting in flipvisor.output(), message="the reload to wait")
        assert back.poll() is None, "the reload should wait for the drain"
        assert all(psutil.pid_exists(pid) for pid in first["pids"]), flipvisor.output()
        for pid in first["pids"]:  # the drain's end
            psutil.Process(pid).kill()
        out, err = back.communicate(timeout=60)
    finally:
        back.kill()

    assert back.returncode == 0, out + err + flipvisor.output()
    assert json.loads(out)["kept"] == {}, out
    assert waiting in err, err
    assert flipvisor.wait_serving("web")["generation"] == 1
    assert proxied(nginx)["version"] == "3"
    wait_gone(first["pids"] + site["pids"])
    assert web_conf(nginx).exists()
    only(flipvisor, "web")


def test_a_kept_program_goes_once_its_successor_serves_after_a_flip_cut_short_by_timeout(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """`flip site --timeout 4` answers once site is promoted, while nginx's old worker still
    holds a slow request to web (the kept program): web goes once site serves, after that
    worker is gone, not never (it was checked when the flip answered, before site served)."""
    # --timeout 4 leaves the promotion time on a loaded machine (2 s did not, once), and the
    # request outlasts it, however slow the machine: web answers only once the test opens its
    # gate (a 9.5 s --slow-ms could end first). The gate opens well within the 30 s nginx gives
    # its old workers (worker_shutdown_timeout, tests/fixtures/nginx.py) from the flip's reload.
    held = tmp_path / "answer"
    slow = program(nginx, "1", "--answer-after", str(held), "--notify")
    slow["readiness"] = {"notify": True, "timeout": 10}
    flipvisor.start({"programs": {"web": slow}})  # every answer is held: none awaited here
    gen = flipvisor.wait_serving("web")
    answered: list[str] = []

    def slow_request() -> None:
        with urllib.request.urlopen(nginx.url("/"), timeout=30) as answer:
            answered.append(json.loads(answer.read())["version"])

    request = threading.Thread(target=slow_request, daemon=True)
    request.start()
    try:
        wait_until(lambda: busy(gen["pids"][0]), message="a request in web")
        broken = program(nginx, "2", "--health-fail", readiness={"timeout": 1})
        flipvisor.write_config({"programs": {"site": broken}})
        assert list(json.loads(flipvisor.cli("reload", "--json").stdout)["kept"]) == ["web"]
        flipvisor.write_config({"programs": {"site": program(nginx, "3")}})

        flipped = flipvisor.cli("flip", "site", "--timeout", "4", "--json")

        assert flipped.returncode == 0, flipped.stdout + flipped.stderr + flipvisor.output()
        assert json.loads(flipped.stdout)["warning"], flipped.stdout  # answered before it served
        assert flipvisor.serving("web") is not None  # kept until site serves
    finally:
        held.touch()  # the request ends, and nginx's old worker with it
    request.join(timeout=30)
    assert answered == ["1"]
    wait_gone(gen["pids"])
    only(flipvisor, "site")
