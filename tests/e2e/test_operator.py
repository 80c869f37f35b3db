"""The operator's view of a running supervisor: the Prometheus endpoint, ``status`` details
(last exit, fatal reason, a flip in progress) and ``events`` (history and ``-f``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.flipvisor import TEMPLATE, Flipvisor, svc_command
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until


def web(version: str = "1", *flags: str) -> dict[str, Any]:
    return {
        "command": svc_command("--version", version, *flags),
        "readiness": {"http": "/health", "timeout": 10},
        "drain": {"delay": 0, "timeout": 5},
    }


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics`` as (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def crash_worker(flipvisor: Flipvisor, name: str) -> tuple[int, dict[str, Any]]:
    """SIGKILL the serving generation's worker; return its PID and the generation once replaced."""
    (old_pid,) = flipvisor.wait_serving(name)["pids"]
    psutil.Process(old_pid).kill()
    gen = flipvisor.wait_serving(name, where=lambda g: bool(g["pids"]) and g["pids"] != [old_pid])
    return old_pid, gen


def test_metrics_count_flips_failures_and_restarts(flipvisor: Flipvisor) -> None:
    port = free_port()
    flipvisor.start({"metrics": {"listen": f"127.0.0.1:{port}"}, "programs": {"web": web()}})
    flipvisor.wait_serving("web")

    def started() -> Samples | None:
        s = scrape(port)
        return s if sample(s, "flipvisor_flips_total", program="web") == 1 else None

    first = wait_until(started, message="the start-up flip to be counted")
    assert first is not None
    assert sample(first, "flipvisor_flip_failures_total", program="web") == 0
    assert sample(first, "flipvisor_restarts_total", program="web") == 0
    assert sample(first, "flipvisor_workers_up", program="web") == 1
    assert sample(first, "flipvisor_leftover_processes", program="web") == 0
    assert sample(first, "flipvisor_program_state", program="web", state="running") == 1
    assert sample(first, "flipvisor_program_state", program="web", state="fatal") == 0

    flipvisor.write_config(
        {"metrics": {"listen": f"127.0.0.1:{port}"}, "programs": {"web": web("2")}}
    )
    assert flipvisor.cli("flip", "web").returncode == 0
    flipvisor.write_config(
        {
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "programs": {"web": web("3", "--exit-at-start", "7")},
        }
    )
    failed = flipvisor.cli("flip", "web")
    assert failed.returncode == 1
    assert "exit status 7" in failed.stderr and "`flipvisor logs web`" in failed.stderr
    crash_worker(flipvisor, "web")

    def counted() -> Samples | None:
        s = scrape(port)
        done = (
            sample(s, "flipvisor_flips_total", program="web") == 3
            and sample(s, "flipvisor_restarts_total", program="web") == 1
        )
        return s if done else None

    samples = wait_until(counted, message="two flips, one failure and one restart counted")
    assert samples is not None
    assert sample(samples, "flipvisor_flip_failures_total", program="web") == 1
    durations = "flipvisor_flip_duration_seconds_count"
    assert sample(samples, durations, program="web", outcome="ok") == 2
    assert sample(samples, durations, program="web", outcome="failed") == 1
    assert sample(samples, "flipvisor_generation_serving", program="web") == 2
    assert sample(samples, "flipvisor_workers_up", program="web") == 1
    assert sample(samples, "flipvisor_flip_in_progress", program="web") == 0

    # Anything but GET /metrics gets a plain answer, never a hang.
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        exc.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"garbage\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.0 400")


def test_a_state_dir_that_cannot_be_created_stops_run_with_what_to_do(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    process = flipvisor.start(
        {"state_dir": str(a_file / "state"), "programs": {"web": web()}}, wait=False
    )
    assert process.wait(timeout=20) == 2, flipvisor.output()
    output = flipvisor.output()
    assert (
        f"state_dir: cannot create {a_file / 'state'}: {a_file} is a file, not a folder" in output
    )
    assert str(flipvisor.config_path) in output and "choose a writable folder" in output
    assert "Traceback" not in output


def test_metrics_port_in_use_stops_run_with_what_to_do(flipvisor: Flipvisor) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = flipvisor.start(
            {"metrics": {"listen": f"127.0.0.1:{port}"}, "programs": {"web": web()}}, wait=False
        )
        assert process.wait(timeout=20) == 2, flipvisor.output()
    output = flipvisor.output()
    assert (
        f"metrics.listen: cannot listen on 127.0.0.1:{port}: the port is in use; choose a free"
        in output
    )
    assert "Traceback" not in output


def test_status_shows_the_last_exit_after_a_crash(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    before = time.time()
    old_pid, _gen = crash_worker(flipvisor, "web")
    program = flipvisor.program("web")
    assert program["restarts"] == 1
    assert program["flip"] is None
    (gen,) = program["generations"]
    last = gen["last_exit"]
    assert last["reason"] == "killed by SIGKILL"
    assert last["pid"] == old_pid and last["worker"] == 0
    assert before - 1 <= last["time"] <= time.time() + 1
    table = flipvisor.cli("status")
    assert table.returncode == 0, table.stderr
    assert "killed by SIGKILL" in table.stdout


def test_events_show_a_flip_and_a_crash(flipvisor: Flipvisor) -> None:
    # A proxy step that reloads nothing (`true`), so the lifecycle has a reload in it.
    proxy: dict[str, Any] = {
        "template": str(TEMPLATE),
        "dest": str(flipvisor.dir / "web.conf"),
        "reload_cmd": ["true"],
    }
    flipvisor.start({"programs": {"web": {**web(), "proxy": proxy}}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": {**web("2"), "proxy": proxy}}})
    assert flipvisor.cli("flip", "web").returncode == 0
    old_pid, _gen = crash_worker(flipvisor, "web")

    def events() -> list[dict[str, Any]]:
        result = flipvisor.cli("events", "--json", "-n", "200")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def restarted() -> list[dict[str, Any]] | None:
        got = events()
        return got if any(e["kind"] == "restarting" for e in got) else None

    listed = wait_until(restarted, message="the restart to be listed")
    assert listed is not None
    kinds = [(e["kind"], e["generation"]) for e in listed]
    for expected in [("spawned", 2), ("ready", 2), ("proxy-reloaded", 2), ("promoted", 2)]:
        assert expected in kinds, kinds
    assert kinds.index(("proxy-reloaded", 2)) < kinds.index(("promoted", 2))
    assert kinds.index(("promoted", 2)) < kinds.index(("draining", 1))
    assert ("stopped", 1) in kinds
    finished = [e for e in listed if e["kind"] == "flip-finished"]
    assert [(e["fields"]["flip"], e["fields"]["ok"]) for e in finished] == [
        ("start", True),
        ("flip", True),
    ]
    exited = next(e for e in listed if e["kind"] == "exited" and e["fields"]["pid"] == old_pid)
    assert exited["message"] == "killed by SIGKILL" and exited["generation"] == 2
    # Oldest first: the crash comes after the flip's promotion.
    assert listed.index(exited) > kinds.index(("promoted", 2))

    unknown = flipvisor.cli("flip", "nope")
    assert unknown.returncode == 2
    assert "no program named 'nope'" in unknown.stderr and "flipvisor reload" in unknown.stderr

    text = flipvisor.cli("events", "web")
    assert text.returncode == 0, text.stderr
    assert "web g2 exited killed by SIGKILL" in text.stdout


def follow_events(flipvisor: Flipvisor) -> subprocess.Popen[bytes]:
    """Start program web, then `flipvisor events -f --json -n 1` following it."""
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    argv = ["events", "-f", "--json", "-n", "1", "-c", str(flipvisor.config_path)]
    return subprocess.Popen(
        [sys.executable, "-m", "flipvisor", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def test_events_follow_prints_new_events_live(flipvisor: Flipvisor) -> None:
    follower = follow_events(flipvisor)
    assert follower.stdout is not None
    os.set_blocking(follower.stdout.fileno(), False)
    received = b""

    def seen(kind: str, generation: int) -> bool:
        nonlocal received
        received += follower.stdout.read() or b""  # type: ignore[union-attr]
        return any(
            (event := json.loads(line))["kind"] == kind and event["generation"] == generation
            for line in received.splitlines()
        )

    try:
        # The newest past event arrives first, and the follower is subscribed by then.
        wait_until(lambda: seen("flip-finished", 1), timeout=10, message="the last past event")
        flipvisor.write_config({"programs": {"web": web("2")}})
        assert flipvisor.cli("flip", "web").returncode == 0
        wait_until(lambda: seen("promoted", 2), timeout=10, message="the live promoted event")
        assert follower.poll() is None  # still following
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        follower.stdout.close()
        assert follower.stderr is not None
        follower.stderr.close()


def test_events_follow_gets_every_event_of_a_big_stop(flipvisor: Flipvisor) -> None:
    """Stopping 400 workers emits their 400 ``exited`` events in a burst, faster than the
    follower sends them on: it gets every one, in order (it got 257 of 400, silently)."""
    workers = 400
    many = {"command": ["sleep", "600"], "numprocs": workers, "drain": {"delay": 0, "timeout": 10}}
    flipvisor.start({"programs": {"many": many}})
    flipvisor.wait_serving("many", timeout=60, where=lambda g: len(g["pids"]) == workers)
    argv = ["events", "-f", "--json", "-n", "1", "-c", str(flipvisor.config_path)]
    follower = subprocess.Popen(
        [sys.executable, "-m", "flipvisor", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert follower.stdout is not None
    os.set_blocking(follower.stdout.fileno(), False)
    received: list[dict[str, Any]] = []
    partial = b""

    def seen(kind: str) -> bool:
        nonlocal partial
        partial += follower.stdout.read() or b""  # type: ignore[union-attr]
        *lines, partial = partial.split(b"\n")
        received.extend(map(json.loads, lines))
        return any(e["kind"] == kind and e["program"] == "many" for e in received)

    try:
        # The newest past event arrives first, and the follower is subscribed by then.
        wait_until(lambda: seen("flip-finished"), timeout=10, message="the last past event")
        stop = flipvisor.cli("stop", "many")
        assert stop.returncode == 0, stop.stderr
        wait_until(lambda: seen("stopped"), timeout=30, message="the stop's last event")
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        follower.stdout.close()
        assert follower.stderr is not None
        follower.stderr.close()
    assert not [e for e in received if e["kind"] == "missed"]
    exited = [e for e in received if e["kind"] == "exited"]
    assert len(exited) == workers, f"{len(exited)} exited events of {workers}"
    assert [e["seq"] for e in received] == list(range(received[0]["seq"], received[-1]["seq"] + 1))


def test_a_refused_request_with_json_prints_one_error_document(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    for argv in (["status", "nope"], ["stop", "nope"], ["flip", "nope"], ["start", "nope"]):
        refused = flipvisor.cli(*argv, "--json")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        document = json.loads(refused.stdout)
        assert document == {"ok": False, "exit_code": 2, "error": document["error"]}
        assert "no program named 'nope'" in document["error"], argv
    flipvisor.config_path.write_text("programs: [\n")
    invalid = flipvisor.cli("reload", "--json")
    assert invalid.returncode == 2, invalid.stdout + invalid.stderr
    assert "not valid YAML" in json.loads(invalid.stdout)["error"]


def test_events_of_an_unknown_program_are_refused(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web(), "gone": web()}})
    flipvisor.wait_serving("gone")
    for argv in (["events", "nope"], ["events", "nope", "-f"]):
        refused = flipvisor.cli(*argv, timeout=10)  # -f used to wait forever, printing nothing
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "no program named 'nope'" in refused.stderr
    # A program removed by a reload keeps its history.
    flipvisor.write_config({"programs": {"web": web()}})
    assert flipvisor.cli("reload").returncode == 0
    removed = flipvisor.cli("events", "gone")
    assert removed.returncode == 0, removed.stderr
    assert "gone g1 promoted" in removed.stdout


def test_events_follow_ends_with_exit_0_when_the_supervisor_shuts_down(
    flipvisor: Flipvisor,
) -> None:
    follower = follow_events(flipvisor)
    try:
        assert follower.stdout is not None
        # Subscribed once the newest past event has arrived.
        assert json.loads(follower.stdout.readline())["kind"] == "flip-finished"
        assert flipvisor.cli("shutdown").returncode == 0
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 0, err  # it was 2: "the supervisor closed the connection"
    assert err == b""
    kinds = [(e["program"], e["kind"]) for e in map(json.loads, out.splitlines())]
    assert kinds[0] == ("(supervisor)", "shutting-down")
    assert ("web", "draining") in kinds and kinds[-1] == ("web", "stopped"), kinds
    assert flipvisor.process is not None and flipvisor.process.wait(timeout=30) == 0


def test_a_flip_cut_short_by_its_timeout_shows_the_new_generations_output(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    # Never ready, and says so at once: a shell starts in milliseconds even on a loaded machine,
    # where the Python service once had not printed its line within the flip's 4 s.
    never_ready = {
        **web("2"),
        "command": ["sh", "-c", "echo 'svc 2 serving on its socket'; exec sleep 600"],
        "readiness": {"http": "/health", "timeout": 60},
    }
    flipvisor.write_config({"programs": {"web": never_ready}})
    result = flipvisor.cli("flip", "web", "--timeout", "4", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert "--timeout 4" in report["error"]
    # What it said before it was discarded, as for any other rolled-back flip.
    assert any(line.startswith("svc 2 serving on") for line in report["output"]), report
    human = flipvisor.cli("flip", "web", "--timeout", "4")
    assert human.returncode == 1
    assert "last output of the new generation:" in human.stderr


def test_metrics_of_a_program_removed_by_a_reload_go_with_it(flipvisor: Flipvisor) -> None:
    port = free_port()
    metrics = {"listen": f"127.0.0.1:{port}"}
    # gone drains for as long as the test wants (it kills the worker): counted meanwhile.
    slow = {**web(), "drain": {"delay": 60, "timeout": 5}}
    flipvisor.start({"metrics": metrics, "programs": {"web": web(), "gone": slow}})
    (pid,) = flipvisor.wait_serving("gone")["pids"]
    durations = "flipvisor_flip_duration_seconds_count"
    wait_until(
        lambda: sample(scrape(port), durations, program="gone", outcome="ok") == 1,
        message="gone's start-up flip to be timed",
    )
    flipvisor.write_config({"metrics": metrics, "programs": {"web": web()}})
    assert flipvisor.cli("reload").returncode == 0
    assert flipvisor.program("gone")["removing"]
    assert sample(scrape(port), "flipvisor_processes", program="gone") == 1  # still draining
    psutil.Process(pid).kill()
    wait_until(
        lambda: not any(("program", "gone") in labels for _name, labels in scrape(port)),
        message="every series of gone to go",
    )
    # Back under the same name: its histogram starts again with its counters.
    flipvisor.write_config({"metrics": metrics, "programs": {"web": web(), "gone": web()}})
    assert flipvisor.cli("reload").returncode == 0

    def timed_again() -> Samples | None:
        samples = scrape(port)
        return samples if sample(samples, "flipvisor_flips_total", program="gone") == 1 else None

    samples = wait_until(timed_again, message="gone's new start-up flip to be counted")
    assert samples is not None
    assert sample(samples, durations, program="gone", outcome="ok") == 1
    assert sample(samples, durations, program="web", outcome="ok") == 1


def test_stop_shows_its_drain_while_it_waits(flipvisor: Flipvisor) -> None:
    """A long wait shows progress: `stop` prints the drain (what, for how long at most) when it
    begins, not only once it is over."""
    # The drain lasts until the test ends it (it kills the worker), however slow the machine.
    slow = {**web(), "drain": {"delay": 60, "timeout": 5}}
    flipvisor.start({"programs": {"web": slow}})
    pids = flipvisor.wait_serving("web")["pids"]
    stop = subprocess.Popen(
        [sys.executable, "-m", "flipvisor", "stop", "web", "-c", str(flipvisor.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert stop.stderr is not None and stop.stdout is not None
    try:
        os.set_blocking(stop.stderr.fileno(), False)
        shown = b""

        def drain_shown() -> bool:
            nonlocal shown
            shown += stop.stderr.read() or b""  # type: ignore[union-attr]
            return b"drain" in shown

        wait_until(drain_shown, timeout=15, message="the drain step")
        assert stop.poll() is None  # still draining (its delay)
        assert f"generation 1 (pid {pids[0]})".encode() in shown and b"up to 65s" in shown
    finally:
        for pid in pids:  # the drain's end: nothing of the generation runs any more
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        stop.kill()
        stop.wait()
        stop.stdout.close()
        stop.stderr.close()


def test_shutdown_shows_the_drains_and_returns_once_they_are_done(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": {**web(), "drain": {"delay": 1, "timeout": 5}}}})
    pids = flipvisor.wait_serving("web")["pids"]
    done = flipvisor.cli("shutdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "flipvisor: shutdown: done\n"
    assert "(supervisor) shutting-down" in done.stderr and "web stopped" in done.stderr
    assert not any(psutil.pid_exists(pid) for pid in pids)  # drained before it returned
    assert flipvisor.process is not None and flipvisor.process.wait(timeout=10) == 0


def test_shutdown_no_wait_only_asks(flipvisor: Flipvisor) -> None:
    # The drain lasts until the test ends it (it kills the worker): a client that waited for the
    # shutdown would outlive its own 30 s, however slow the machine.
    flipvisor.start({"programs": {"web": {**web(), "drain": {"delay": 60, "timeout": 5}}}})
    pids = flipvisor.wait_serving("web")["pids"]
    try:
        asked = flipvisor.cli("shutdown", "--no-wait", timeout=30)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout == "flipvisor: shutdown: asked\n"
        assert all(psutil.pid_exists(pid) for pid in pids)
    finally:
        for pid in pids:  # the drain's end: nothing of the generation runs any more
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    assert flipvisor.process is not None and flipvisor.process.wait(timeout=30) == 0


def test_ctrl_c_of_a_flip_says_the_flip_goes_on(flipvisor: Flipvisor) -> None:
    """Ctrl-C stops the client only; the supervisor carries the flip through. The operator is
    told so, and how to watch it, rather than left to believe the deploy was aborted; and is
    not sent to `stop` as an undo, which drains the serving generation too (it said that `stop`
    "rolls back a flip not yet promoted")."""
    web = {"command": svc_command("--ready-delay", "60"), "readiness": {"http": "/health"}}
    flipvisor.start({"programs": {"web": {**web, "command": svc_command()}}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": web}})
    flip = flipvisor.cli_started("flip", "web", "--timeout", "90")
    try:
        wait_until(
            lambda: flipvisor.program("web")["flip"] is not None, message="the flip to begin"
        )
        flip.send_signal(signal.SIGINT)
        _, err = flip.communicate(timeout=20)
    finally:
        flip.kill()
    # 130, as a shell reports a command that Ctrl-C ended (not a death by SIGINT, which CPython
    # gave it when the Ctrl-C came during a lazy import: tests/unit/test_cli_errors.py).
    assert flip.returncode == 130, err
    assert (
        "interrupted: only this client stopped; the flip of web goes on in the supervisor "
        "(Ctrl-C did not cancel it): `flipvisor status web` shows where it is, `flipvisor "
        "events -f web` follows it to its end; --timeout 90 still rolls it back if it is not "
        "promoted by then; no command cancels only the flip: `flipvisor stop web` stops the "
        "program, the generation that serves it included"
    ) in err, err
    assert "rolls back a flip" not in err, err
    assert "Traceback" not in err, err
    assert flipvisor.program("web")["flip"] is not None  # still probing generation 2


def test_output_to_a_closed_pipe_ends_quietly(flipvisor: Flipvisor) -> None:
    """`flipvisor status --json | head -1`: when the reader goes away, the command stops
    without a traceback (or a log file it "cannot read"), with SIGPIPE's exit status."""
    flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
    for args in (["status", "--json"], ["events"], ["logs", "web"]):
        reader, writer = os.pipe()
        os.close(reader)  # the reader is gone before the first write
        try:
            done = subprocess.run(
                [sys.executable, "-m", "flipvisor", *args, "-c", str(flipvisor.config_path)],
                stdout=writer,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            os.close(writer)
        assert done.returncode == 128 + signal.SIGPIPE, (args, done.stderr)
        assert done.stderr == "", (args, done.stderr)


def test_a_flip_or_reload_naming_another_file_than_the_supervisors_is_refused(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """The client finds the supervisor through its file's state_dir only: `flip web -c
    other.yaml` (same state_dir) would deploy what the supervisor's own file says. Refused,
    naming both; the supervisor's file through a symlink is the same file."""
    flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
    other = tmp_path / "other.yaml"
    other.write_text(flipvisor.config_path.read_text().replace("svc.py", "svc.py --version 9"))
    for args in (["flip", "web"], ["restart", "web"], ["reload"]):
        refused = subprocess.run(
            [sys.executable, "-m", "flipvisor", *args, "-c", str(other)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert (
            f"this supervisor reads {flipvisor.config_path.resolve()}, not {other.resolve()}"
            in refused.stderr
        ), refused.stderr
    assert flipvisor.serving("web")["generation"] == 1  # type: ignore[index]
    link = tmp_path / "link.yaml"
    link.symlink_to(flipvisor.config_path)
    flipped = subprocess.run(
        [sys.executable, "-m", "flipvisor", "flip", "web", "-c", str(link)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert flipped.returncode == 0, flipped.stderr + flipvisor.output()
    assert flipvisor.serving("web")["generation"] == 2  # type: ignore[index]


def test_stop_names_a_few_pids_of_a_big_generation(flipvisor: Flipvisor) -> None:
    """The drain line (shown as it starts and as it ends) lists the first PIDs and how many
    more: with numprocs 400 every PID made ~40 wrapped lines, twice."""
    flipvisor.start({"programs": {"web": {**web(), "numprocs": 8}}})
    pids = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == 8)["pids"]
    stopped = flipvisor.cli("stop", "web")
    assert stopped.returncode == 0, stopped.stderr
    shown = " ".join(stopped.stderr.split())  # as wrapped to the terminal's width
    assert f"generation 1 (pid {', '.join(map(str, pids[:5]))} +3 more)" in shown, shown
    assert str(pids[5]) not in shown, shown


def test_a_failed_flip_and_its_events_show_a_path_s_control_characters_as_escapes(
    flipvisor: Flipvisor,
) -> None:
    """A folder of the config named with an escape sequence and a newline (here ``proxy.dest``'s,
    a file where the folder should be): the flip's error and ``events`` name it with them
    shown as escapes, not sent to the terminal (it cleared the screen, and started a line of
    its own); ``events --json`` has it as written."""
    folder = "conf\x1b[2J\nflipvisor: ok"
    (flipvisor.dir / folder).write_text("a file, not a folder")
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    proxy = {"template": str(TEMPLATE), "dest": str(flipvisor.dir / folder / "web.conf")}
    flipvisor.write_config({"programs": {"web": {**web("2"), "proxy": proxy}}})

    flip = flipvisor.cli("flip", "web")

    assert flip.returncode == 1, flip.stdout + flip.stderr
    shown = "conf\\x1b[2J\\x0aflipvisor: ok/web.conf"
    # Escaped; in the error, whose lines are shown as lines, each after the first indented.
    assert "\x1b" not in flip.stderr, flip.stderr
    assert "conf\\x1b[2J\n  flipvisor: ok/web.conf: " in flip.stderr, flip.stderr
    assert not any(line.startswith("flipvisor: ok") for line in flip.stderr.splitlines())
    events = flipvisor.cli("events", "web")
    assert events.returncode == 0, events.stderr
    (failed,) = [line for line in events.stdout.splitlines() if " flip-failed " in line]
    assert shown in failed and "\x1b" not in events.stdout, events.stdout
    as_sent = flipvisor.cli("events", "web", "--json").stdout.splitlines()
    assert any(folder in json.loads(line)["message"] for line in as_sent), as_sent


def test_a_generation_a_failed_flip_throws_away_is_listed_as_draining(
    flipvisor: Flipvisor,
) -> None:
    """`flip --timeout 1` of a release whose health check fails and whose workers ignore
    SIGTERM: the flip rolls back (exit 1) and generation 2 stays listed, with its PIDs, until
    its SIGKILL at `drain.timeout`. It was listed as `starting` meanwhile, which reads as a
    deploy under way; it is `draining`, and it ends `failed` (QA pass 8)."""

    def web(*flags: str) -> dict[str, Any]:
        return {
            "command": svc_command(*flags),
            "readiness": {"http": "/health", "timeout": 10, "interval": 0.05},
            "drain": {"delay": 0.1, "timeout": 6},
        }

    flipvisor.start({"programs": {"web": web("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config(
        {"programs": {"web": web("--version", "2", "--health-fail", "--ignore-term")}}
    )
    result = flipvisor.cli("flip", "web", "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    generations = flipvisor.program("web")["generations"]
    discarded = [g for g in generations if g["generation"] == 2]
    assert discarded and discarded[0]["pids"], f"the discarded generation is listed: {generations}"
    assert discarded[0]["state"] == "draining", generations
    wait_until(
        lambda: all(g["generation"] != 2 for g in flipvisor.program("web")["generations"]),
        timeout=30,
        message="generation 2 ended at its drain.timeout's SIGKILL",
    )
    said = flipvisor.cli("events", "--json").stdout.splitlines()
    events = [json.loads(line) for line in said]
    kinds = [e["kind"] for e in events if e["program"] == "web" and e["generation"] == 2]
    assert kinds.index("draining") < kinds.index("failed"), kinds
    assert "stopped" not in kinds, kinds


def test_events_and_logs_with_a_line_count_past_64_bits_show_everything(
    flipvisor: Flipvisor,
) -> None:
    """QA 11: `flipvisor events -n 99999999999999999999999` (a script passing "everything" as a
    big number) died with an orjson traceback (exit 1: integers past 64 bits do not encode),
    while `logs -n` with the same number printed every line. Both now show everything."""
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    huge = "99999999999999999999999"
    events = flipvisor.cli("events", "-n", huge, "--json")
    assert "Traceback" not in events.stderr, events.stderr
    assert events.returncode == 0, events.stderr
    kinds = [json.loads(line)["kind"] for line in events.stdout.splitlines()]
    assert "spawned" in kinds and "serving" in kinds, kinds
    logs = flipvisor.cli("logs", "web", "-n", huge)
    assert logs.returncode == 0, logs.stderr
