"""A proxy that is not up when a program first starts (nginx started after flipvisor at boot):
the start keeps its ready generation and retries the reload until the proxy takes it, with no
command, instead of going fatal; `status` and `events` show the wait, and `start`, `stop` and
the shutdown still work while it lasts. A failed check is no outage: it rolls the start back,
as the contract says of any flip."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import psutil

from tests.e2e.test_flip import program
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import LateNginx, Nginx, NginxSetup, free_port
from tests.waiting import wait_until


def web(nginx: NginxSetup) -> dict[str, Any]:
    return program(nginx, "1")


def version_served(nginx: Nginx) -> str | None:
    """The version nginx serves now; None while it answers with an error (or not at all)."""
    try:
        with urllib.request.urlopen(nginx.url("/"), timeout=5) as answer:
            version: str = json.loads(answer.read())["version"]
            return version
    except OSError:
        return None


def events(flipvisor: Flipvisor) -> list[dict[str, Any]]:
    result = flipvisor.cli("events", "--json", "-n", "1000")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def first_proxy_attempt_failed(flipvisor: Flipvisor) -> bool:
    """The gate: the first start's proxy step failed once (it waits for the proxy now, or, as
    before the proxy step was retried, the start failed)."""
    kinds = {event["kind"] for event in events(flipvisor)}
    return bool(kinds & {"proxy-waiting", "flip-failed"})


def proxy_attempts_failed(flipvisor: Flipvisor) -> int:
    """How many of the first start's proxy attempts failed, from `status`'s wait line."""
    waiting = (flipvisor.program("web")["flip"] or {}).get("waiting") or ""
    marker = "waiting for the proxy: attempt "
    if not waiting.startswith(marker):
        return 0
    return int(waiting[len(marker) :].split(" ", 1)[0])


def generation_1(flipvisor: Flipvisor) -> dict[str, Any]:
    (gen,) = flipvisor.program("web")["generations"]
    assert gen["generation"] == 1, gen
    return gen


def test_a_program_started_before_nginx_is_served_once_nginx_starts(
    flipvisor: Flipvisor, late_nginx: LateNginx
) -> None:
    """nginx is down at `run`, and the proxy file holds an earlier run's port: generation 1
    waits for nginx (not fatal), its checked file in place meanwhile, and nginx started later
    serves it; the start then finishes by itself."""
    dest = late_nginx.conf_dir / "web.conf"
    stale_port = free_port()  # an earlier run's generation, long drained: nobody listens
    dest.write_text(
        f"upstream flipvisor_web {{ server 127.0.0.1:{stale_port}; }}\n"
        f"server {{ listen {late_nginx.listen}; "
        "location / { proxy_pass http://flipvisor_web; } }\n"
    )
    flipvisor.start({"programs": {"web": web(late_nginx)}})
    wait_until(
        lambda: first_proxy_attempt_failed(flipvisor),
        timeout=20,
        message="the first proxy reload to fail (nginx is down)",
    )

    status = flipvisor.program("web")
    assert status["state"] == "starting", status
    assert "waiting for the proxy" in (status["flip"] or {}).get("waiting", ""), status
    port = generation_1(flipvisor)["port"]
    # The file nginx loads when it starts names the ready generation, not the stale port.
    assert f"127.0.0.1:{port};" in dest.read_text(), dest.read_text()
    waiting = [event for event in events(flipvisor) if event["kind"] == "proxy-waiting"]
    assert len(waiting) == 1 and "proxy reload failed" in waiting[0]["message"], waiting
    table = flipvisor.cli("status")
    assert "waiting for the proxy" in table.stdout, table.stdout

    nginx = late_nginx.start()

    wait_until(lambda: version_served(nginx) == "1", timeout=20, message="nginx to serve web")
    served = flipvisor.wait_serving("web", timeout=30)
    assert served["generation"] == 1 and served["port"] == port, served
    status = flipvisor.program("web")
    assert (status["state"], status["fatal_reason"], status["flip"]) == ("running", None, None)
    kinds = [event["kind"] for event in events(flipvisor)]
    assert "fatal" not in kinds and "flip-failed" not in kinds, kinds
    assert flipvisor.registry()  # registered as a flip would have
    assert str(port) in flipvisor.registry().values()


def test_start_stop_and_the_shutdown_work_while_a_first_start_waits_for_the_proxy(
    flipvisor: Flipvisor, late_nginx: LateNginx
) -> None:
    """`start` tries the proxy again at once and answers with the status (not "busy"); `stop`
    ends the wait (stopped, not fatal, its worker gone); a program started again waits again,
    and the shutdown ends that wait promptly, exit 0."""
    process = flipvisor.start({"programs": {"web": web(late_nginx)}})
    wait_until(
        lambda: first_proxy_attempt_failed(flipvisor),
        timeout=20,
        message="the first proxy reload to fail (nginx is down)",
    )

    started = flipvisor.cli("start", "web", "--json", timeout=30)
    assert started.returncode == 0, started.stdout + started.stderr + flipvisor.output()
    assert json.loads(started.stdout)["state"] == "starting", started.stdout
    pids = generation_1(flipvisor)["pids"]

    stopped = flipvisor.cli("stop", "web", timeout=40)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
    status = flipvisor.program("web")
    assert (status["state"], status["fatal_reason"]) == ("stopped", None), status
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), message="its worker gone")

    again = flipvisor.cli_started("start", "web")
    try:
        wait_until(
            lambda: sum(event["kind"] == "proxy-waiting" for event in events(flipvisor)) == 2,
            timeout=20,
            message="the second start to wait for the proxy too",
        )
        process.terminate()
        assert process.wait(timeout=40) == 0, flipvisor.output()
    finally:
        again.kill()
        again.communicate()  # and close its pipes
    assert "Traceback" not in flipvisor.output(), flipvisor.output()


def test_a_first_start_whose_proxy_check_fails_is_rolled_back_not_retried(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """A broken file elsewhere in nginx's config fails `nginx -t` at `run`: that is a broken
    config to fix, not a proxy to wait for. The contract's "a failed check restores the
    previous file and rolls the flip back" holds for a first start too: nothing waits, no file
    of ours stays, and `flipvisor start` once the config is fixed serves the program."""
    broken = nginx.conf_dir / "broken.conf"
    broken.write_text("this_is_no_directive;\n")
    flipvisor.start({"programs": {"web": web(nginx)}})
    wait_until(
        lambda: first_proxy_attempt_failed(flipvisor),
        timeout=20,
        message="the first proxy check to fail",
    )
    kinds = {event["kind"] for event in events(flipvisor)}
    assert "flip-failed" in kinds and "proxy-waiting" not in kinds, flipvisor.output()
    assert flipvisor.program("web")["state"] in ("fatal", "stopped"), flipvisor.program("web")
    assert not (nginx.conf_dir / "web.conf").exists()  # a file that fails the check never stays

    broken.unlink()
    started = flipvisor.cli("start", "web", timeout=60)

    assert started.returncode == 0, started.stdout + started.stderr + flipvisor.output()
    wait_until(lambda: version_served(nginx) == "1", timeout=30, message="nginx to serve web")


def test_a_worker_that_exits_while_the_start_waits_for_the_proxy_is_restarted(
    flipvisor: Flipvisor, late_nginx: LateNginx
) -> None:
    """The wait may last as long as nginx is down, with the checked file and the keys naming
    the generation in place: a worker of it that exits meanwhile is restarted on the same
    socket as a serving generation's is (the restart policy, not the start, decides), and the
    generation is served, with its new PID published, once nginx starts."""
    flipvisor.start({"programs": {"web": web(late_nginx)}})
    wait_until(
        lambda: first_proxy_attempt_failed(flipvisor),
        timeout=20,
        message="the first proxy reload to fail (nginx is down)",
    )
    (killed,) = generation_1(flipvisor)["pids"]
    psutil.Process(killed).kill()

    def replaced() -> int | None:
        pids = generation_1(flipvisor)["pids"]
        return pids[0] if pids and pids[0] != killed else None

    pid = wait_until(replaced, timeout=20, message="the worker to be restarted")
    assert flipvisor.program("web")["state"] == "starting"

    nginx = late_nginx.start()

    wait_until(lambda: version_served(nginx) == "1", timeout=20, message="nginx to serve web")
    served = flipvisor.wait_serving("web", timeout=30)
    assert served["generation"] == 1 and served["pids"] == [pid], served
    wait_until(
        lambda: flipvisor.registry().get("flipvisor/web/pid/current") == str(pid),
        timeout=20,
        message="the restarted worker's PID to be published",
    )
    kinds = [event["kind"] for event in events(flipvisor)]
    assert "flip-failed" not in kinds and "fatal" not in kinds, kinds


def test_a_long_wait_for_a_stopped_nginx_is_one_proxy_waiting_event(
    flipvisor: Flipvisor, late_nginx: LateNginx
) -> None:
    """README: a first start waiting for the proxy has "a `proxy-waiting` event at the first
    failure and whenever the reason changes", so a long outage does not push every other event
    out of the bounded history. `nginx -s reload` says why it failed after its timestamp and its
    own PID (`2026/12/02 06:57:36 [error] 24800#24800: open() ".../nginx.pid" failed`), which
    made every attempt a new reason: 360 events an hour of nginx down (QA 13). The same failure
    is one event."""
    config = web(late_nginx)
    # The quick start's command (`nginx -s reload`, no -e): Debian's nginx is built with
    # --error-log-path=stderr, so it says what failed on stderr, after its timestamp and PID.
    config["proxy"]["reload_cmd"] = [
        late_nginx.binary,
        "-c",
        str(late_nginx.conf),
        "-p",
        str(late_nginx.prefix),
        "-s",
        "reload",
    ]
    flipvisor.start({"programs": {"web": config}})
    wait_until(
        lambda: first_proxy_attempt_failed(flipvisor),
        timeout=20,
        message="the first proxy reload to fail (nginx is down)",
    )
    # Attempts at 0, 1 and 3 s, each by an `nginx -s reload` of its own: the same outage.
    wait_until(
        lambda: proxy_attempts_failed(flipvisor) >= 3,
        timeout=30,
        message="three proxy attempts to fail",
    )
    waiting = [event for event in events(flipvisor) if event["kind"] == "proxy-waiting"]
    assert len(waiting) == 1, [event["message"] for event in waiting]
