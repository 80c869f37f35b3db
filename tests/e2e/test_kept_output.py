"""A killed supervisor's workers write on: its output keeper holds their pipes and logs what they
write, and the next ``flipvisor run`` takes the pipes over. The worker here is a shell loop, which
(like a Go binary) dies of SIGPIPE when a write finds nobody reading."""

from __future__ import annotations

import array
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import psutil

from tests.e2e.test_leftovers import restart_supervisor, survivors, wait_gone
from tests.e2e.test_supervisor import held_open
from tests.fixtures.flipvisor import Flipvisor
from tests.integration.test_output_keeper import pipes_held_by
from tests.waiting import wait_until

__all__ = ["survivors"]  # the fixture, used by name

# Says "ready" once, then "said <pid>" each time the file $0 appears (and removes it), and
# "stopping <pid>" at SIGTERM.
SAYER = (
    'trap \'echo "stopping $$"; exit 0\' TERM; echo "ready $$"; '
    'while :; do if [ -e "$0" ]; then echo "said $$"; rm -f "$0"; fi; sleep 0.05; done'
)


def sayer(say: Path, **overrides: Any) -> dict[str, Any]:
    return {"command": ["/bin/sh", "-c", SAYER, str(say)], **overrides}


def start_sayer(
    flipvisor: Flipvisor, say: Path, survivors: list[psutil.Process]
) -> tuple[int, Path]:
    """Run program "say" (``sayer(say)``) until its worker said it is ready; its PID (one the
    test expects to outlive a killed supervisor) and its log."""
    flipvisor.start({"programs": {"say": sayer(say)}})
    pid: int = flipvisor.wait_serving("say")["pids"][0]
    log = flipvisor.state_dir / "logs" / "say.log"
    wait_until(lambda: log.exists() and f"ready {pid}" in log.read_text())
    survivors.append(psutil.Process(pid))
    return pid, log


def keepers(state_dir: Path) -> list[psutil.Process]:
    """The output keepers of ``state_dir``'s supervisors, running now."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if (
            "flipvisor.output_keeper" in cmdline
            and str(state_dir) in cmdline
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


def stdout_pipe(pid: int) -> int:
    """The inode of the pipe process ``pid`` writes its stdout into."""
    target = os.readlink(f"/proc/{pid}/fd/1")
    assert target.startswith("pipe:["), target
    return int(target[len("pipe:[") : -1])


def kill_run(flipvisor: Flipvisor) -> None:
    assert flipvisor.process is not None
    flipvisor.process.send_signal(signal.SIGKILL)
    flipvisor.process.wait(timeout=10)


def say_and_wait(flipvisor: Flipvisor, say: Path, pid: int, count: int) -> None:
    """Have the worker write a line, and wait until the log holds ``count`` of its lines."""
    log = flipvisor.state_dir / "logs" / "say.log"
    say.touch()
    try:
        wait_until(lambda: log.read_text().count(f"| said {pid}\n") == count, timeout=15)
    except AssertionError:
        # The log as it is now, not as it was when the wait began.
        raise AssertionError(
            f"no line {count} of worker {pid} in the log:\n{log.read_text()}"
        ) from None
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_a_killed_supervisor_s_worker_writes_on_and_the_next_run_reads_it(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    say, promote = tmp_path / "say", tmp_path / "promote"
    pid, log = start_sayer(flipvisor, say, survivors)
    [first_keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    assert first_keeper.ppid() == flipvisor.process.pid  # type: ignore[union-attr]
    kill_run(flipvisor)

    # Without a keeper this write would kill the worker (SIGPIPE), and nothing would log it.
    say_and_wait(flipvisor, say, pid, 1)
    assert "output keeper" in log.read_text()

    # The next run's generation is ready only once `promote` exists: until then the worker is
    # a leftover still serving, and its output is the new supervisor's to read. Its own worker
    # watches another file: one file for both, and either could say the line.
    ready_once_promoted = {"exec": ["test", "-e", str(promote)], "timeout": 60}
    gated = sayer(tmp_path / "say-new", readiness=ready_once_promoted)
    restart_supervisor(flipvisor, {"programs": {"say": gated}})
    wait_until(lambda: not first_keeper.is_running(), message="the old keeper to hand over")
    say_and_wait(flipvisor, say, pid, 2)  # read by the new supervisor: its keeper only holds
    [second_keeper] = keepers(flipvisor.state_dir)
    assert second_keeper.ppid() == flipvisor.process.pid  # type: ignore[union-attr]

    promote.touch()
    wait_gone([pid])  # drained once the new generation is promoted
    assert flipvisor.stop() == 0, flipvisor.output()
    wait_until(lambda: not keepers(flipvisor.state_dir), message="no keeper after a shutdown")


def test_a_log_file_removed_while_the_keeper_writes_it_is_written_again(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    say = tmp_path / "say"
    pid, log = start_sayer(flipvisor, say, survivors)
    [keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    kill_run(flipvisor)
    say_and_wait(flipvisor, say, pid, 1)  # the keeper writes the log now

    log.unlink()

    # The keeper looks once a second at most: a line said sooner may go with the removed file.
    def said_again() -> bool:
        say.touch()
        return log.exists() and f"| said {pid}\n" in log.read_text()

    wait_until(said_again, timeout=15, message="a line of the worker in the log written again")
    assert "[flipvisor] the log file was removed, not by flipvisor" in log.read_text()
    assert f"{log} (deleted)" not in held_open(keeper.pid)  # its space freed


def test_a_keeper_killed_with_its_supervisor_leaves_a_socket_the_next_run_replaces(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    config = {"programs": {"say": sayer(tmp_path / "say")}}
    flipvisor.start(config)
    pid = flipvisor.wait_serving("say")["pids"][0]
    survivors.append(psutil.Process(pid))
    [keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    # Running is not listening yet: the keeper binds its socket after it starts (under load, a
    # while after the program serves).
    socket_file = flipvisor.state_dir / "keeper.sock"
    wait_until(socket_file.exists, timeout=15, message="the keeper to listen on keeper.sock")
    kill_run(flipvisor)
    keeper.kill()
    keeper.wait(timeout=10)
    assert socket_file.exists()
    restart_supervisor(flipvisor, config)
    flipvisor.wait_serving("say", where=lambda gen: gen["pids"] != [pid])
    wait_gone([pid])
    [new_keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    assert new_keeper.pid != keeper.pid
    assert flipvisor.stop() == 0, flipvisor.output()


def test_the_kept_output_of_a_program_no_longer_in_the_config_is_logged_until_it_stops(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    """The next run stops what the killed one left of a program it no longer has; what that
    worker writes meanwhile (its last words at SIGTERM here) still reaches the program's log."""
    pid, log = start_sayer(flipvisor, tmp_path / "say", survivors)
    kill_run(flipvisor)
    restart_supervisor(flipvisor, {"programs": {"other": sayer(tmp_path / "other")}})
    wait_gone([pid])
    wait_until(
        lambda: f"| stopping {pid}\n" in log.read_text(),
        message=f"the stopped worker's last line in say.log:\n{log.read_text()}",
    )
    assert flipvisor.stop() == 0, flipvisor.output()


def test_the_pipes_taken_over_are_read_and_held_while_the_next_run_starts(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    """The next run takes the pipes over first thing, but adds its programs only once it has
    read the registry for leftovers: up to its request timeout when etcd does not answer. Until
    then too, what the worker writes is logged (a chatty one would block on its full pipe), and
    the new run's keeper holds the pipes: a run killed meanwhile (OOM-killed again) leaves them
    to its keeper, and the worker writes on."""
    say = tmp_path / "say"
    pid, log = start_sayer(flipvisor, say, survivors)
    [first_keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    kill_run(flipvisor)

    new = sayer(tmp_path / "say-new")
    with socket.socket() as silent:  # an etcd that accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        etcd = {"backend": "etcd", "endpoints": [f"127.0.0.1:{silent.getsockname()[1]}"]}
        restart_supervisor(
            flipvisor, {"registry": etcd | {"timeout": 60}, "programs": {"say": new}}
        )
        wait_until(lambda: not first_keeper.is_running(), message="the old keeper to hand over")
        say_and_wait(flipvisor, say, pid, 1)
        assert flipvisor.status()["starting"], "the start-up ended too soon to matter"
        [second_keeper] = keepers(flipvisor.state_dir)
        wait_until(
            lambda: stdout_pipe(pid) in pipes_held_by(second_keeper.pid),
            message="the new run's keeper to hold the pipe it took over",
        )
        kill_run(flipvisor)

    say_and_wait(flipvisor, say, pid, 2)  # logged by the second keeper: the worker lives
    restart_supervisor(flipvisor, {"programs": {"say": new}})
    wait_until(lambda: not second_keeper.is_running(), message="the second keeper to hand over")
    flipvisor.wait_serving("say", where=lambda gen: gen["pids"] != [pid])
    wait_gone([pid])
    assert f"| stopping {pid}\n" in log.read_text()
    assert flipvisor.stop() == 0, flipvisor.output()


# Says "ready" once, then "said <pid>" at each SIGUSR1, "stopping <pid>" at SIGTERM; idle
# meanwhile (no polling loop: there are many of it), in a sleep it ends before the next.
SIGNALLED_SAYER = (
    "trap 'echo \"said $$\"' USR1; trap 'echo \"stopping $$\"; kill $p; exit 0' TERM; "
    'echo "ready $$"; while :; do sleep 1000 & p=$!; wait $p; kill $p 2>/dev/null; done'
)
MANY = 100


def say_all(pids: list[int], log: Path, count: int) -> None:
    """SIGUSR1 each worker, and wait until the log holds ``count`` lines of each."""
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)

    def missing() -> list[int]:
        text = log.read_text()
        return [pid for pid in pids if text.count(f"| said {pid}\n") < count]

    wait_until(lambda: not missing(), timeout=20, message="every worker's line")
    assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_the_pipes_of_many_workers_are_all_held_restarted_kept_and_handed_over(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    """Every one of many workers' pipes: held by the keeper, told again to a keeper started
    after the first one died, read by it once the supervisor is killed, and all handed over."""
    many = {"command": ["/bin/sh", "-c", SIGNALLED_SAYER], "numprocs": MANY}
    config = {"programs": {"many": many}}
    flipvisor.start(config)
    pids: list[int] = flipvisor.wait_serving("many", timeout=60)["pids"]
    assert len(pids) == MANY
    survivors.extend(psutil.Process(pid) for pid in pids)
    log = flipvisor.state_dir / "logs" / "many.log"
    wait_until(lambda: log.read_text().count("| ready ") == MANY, message="every worker ready")
    pipes = {stdout_pipe(pid) for pid in pids}
    assert len(pipes) == MANY

    def keeper_holding_all(not_pid: int | None = None) -> psutil.Process | None:
        for keeper in keepers(flipvisor.state_dir):
            if keeper.pid != not_pid and pipes <= pipes_held_by(keeper.pid):
                return keeper
        return None

    first = wait_until(keeper_holding_all, message="the keeper to hold every pipe")
    first.kill()
    second = wait_until(
        lambda: keeper_holding_all(not_pid=first.pid),
        timeout=15,
        message="a second keeper, told every pipe",
    )
    kill_run(flipvisor)
    say_all(pids, log, 1)  # read by the orphaned keeper

    # Its generation is ready only once `promote` exists: until then, the leftovers serve on.
    promote = tmp_path / "promote"
    gated = many | {"readiness": {"exec": ["test", "-e", str(promote)], "timeout": 60}}
    restart_supervisor(flipvisor, {"programs": {"many": gated}})
    wait_until(lambda: not second.is_running(), message="the keeper to hand every pipe over")
    say_all(pids, log, 2)  # read by the new supervisor
    promote.touch()
    flipvisor.wait_serving("many", timeout=60, where=lambda gen: not set(gen["pids"]) & set(pids))
    wait_gone(pids)
    assert flipvisor.stop() == 0, flipvisor.output()


# A master that runs a pool child in its process group, as gunicorn does; both hold the output.
# The child says "said" at SIGUSR1 and, at SIGTERM, its last words once its master is gone.
POOL_CHILD = """\
trap 'echo "child said $$"' USR1
trap 'while kill -0 $PPID 2>/dev/null; do sleep 0.05; done; echo "child stopping $$"; exit 0' TERM
echo "child ready $$"
while :; do sleep 0.05; done
"""
POOL_MASTER = """\
trap 'echo "master stopping $$"; exit 0' TERM
/bin/sh "$0.child" &
echo "master ready $$"
while :; do sleep 0.05; done
"""


def test_a_leftover_master_s_pool_child_is_read_until_it_is_gone_then_let_go(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    """The pipe a killed supervisor's worker shares with its pool child is read, once taken
    over, for as long as either holds it: the child's last words, after the master's, reach the
    log; then the new run closes the pipe and its keeper lets it go."""
    master = tmp_path / "master.sh"
    master.write_text(POOL_MASTER)
    master.with_name("master.sh.child").write_text(POOL_CHILD)
    flipvisor.start({"programs": {"pool": {"command": ["/bin/sh", str(master)]}}})
    [pid] = flipvisor.wait_serving("pool")["pids"]
    log = flipvisor.state_dir / "logs" / "pool.log"
    found = wait_until(
        lambda: log.exists() and re.search(r"\| child ready (\d+)\n", log.read_text()),
        message="the pool child to start",
    )
    child = int(found.group(1))
    survivors.extend([psutil.Process(pid), psutil.Process(child)])
    pipe = stdout_pipe(child)
    assert stdout_pipe(pid) == pipe
    [first_keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    kill_run(flipvisor)

    promote = tmp_path / "promote"
    ready_once_promoted = {"exec": ["test", "-e", str(promote)], "timeout": 60}
    pool = {"command": ["/bin/sh", str(master)], "readiness": ready_once_promoted}
    restart_supervisor(flipvisor, {"programs": {"pool": pool}})
    os.kill(child, signal.SIGUSR1)
    wait_until(lambda: f"| child said {child}\n" in log.read_text(), message="the child's line")
    # Until the killed run's keeper has handed over, both keepers run.
    wait_until(lambda: not first_keeper.is_running(), message="the old keeper to hand over")
    [keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    wait_until(lambda: pipe in pipes_held_by(keeper.pid), message="the new keeper to hold it")

    promote.touch()  # the leftovers drain: the master stops, then its child
    wait_gone([pid, child])
    text = log.read_text()
    assert text.index(f"| master stopping {pid}\n") < text.index(f"| child stopping {child}\n")
    wait_until(lambda: pipe not in pipes_held_by(keeper.pid), message="the keeper to let go")
    assert flipvisor.stop() == 0, flipvisor.output()


def test_the_keeper_lets_go_of_the_pipes_of_a_program_stopped_or_removed_by_a_reload(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A stopped program's workers, and a removed one's, are gone: their pipes are closed, and
    the keeper (the same one) does not keep a copy of them."""
    programs = {name: sayer(tmp_path / name) for name in ("kept", "stopped", "removed")}
    flipvisor.start({"programs": programs})
    pipes = {name: stdout_pipe(flipvisor.wait_serving(name)["pids"][0]) for name in programs}
    [keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    wait_until(lambda: set(pipes.values()) <= pipes_held_by(keeper.pid), message="every pipe")

    assert flipvisor.cli("stop", "stopped").returncode == 0, flipvisor.output()
    wait_until(lambda: pipes["stopped"] not in pipes_held_by(keeper.pid), message="let go")
    del programs["removed"]
    flipvisor.write_config({"programs": programs})
    reloaded = flipvisor.cli("reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    wait_until(lambda: pipes["removed"] not in pipes_held_by(keeper.pid), message="let go")
    assert pipes_held_by(keeper.pid) == {pipes["kept"]}
    assert keepers(flipvisor.state_dir) == [keeper]
    assert flipvisor.stop() == 0, flipvisor.output()


def test_a_handover_the_next_run_cannot_read_is_a_warning_and_the_run_starts(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """What the socket of a killed supervisor's keeper sends is not a handover (garbage here,
    with a pipe): `run` ended with a traceback. It warns, naming the socket, starts its
    programs, and logs what the pipe's writer writes as unnamed (closing it would end that
    writer at its next write)."""
    flipvisor.state_dir.mkdir(mode=0o700)
    handover = flipvisor.state_dir / "keeper.sock"
    read_fd, write_fd = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(handover))
        listener.listen()

        def hand_over_garbage() -> None:
            connection, _address = listener.accept()
            with connection:
                rights = array.array("i", [read_fd])
                connection.sendmsg(
                    [b"\x00garbage"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                )
                connection.sendmsg([b'{"op": "end"}'])

        playing = threading.Thread(target=hand_over_garbage)
        playing.start()
        try:
            flipvisor.start({"programs": {"say": sayer(tmp_path / "say")}})
            flipvisor.wait_serving("say")
        finally:
            playing.join(timeout=15)
    os.close(read_fd)
    try:
        os.write(write_fd, b"a leftover's line\n")
        unnamed = flipvisor.state_dir / "logs" / "output-keeper.unnamed.log"
        wait_until(
            lambda: unnamed.exists() and "unnamed 1 | a leftover's line\n" in unnamed.read_text(),
            message="the pipe's line in the unnamed log",
        )
    finally:
        os.close(write_fd)
    output = flipvisor.output()
    assert f"the output keeper at {handover} sent a message this run cannot use" in output
    assert "Traceback" not in output
    assert flipvisor.stop() == 0, flipvisor.output()


# Says "ready" once; when the file "$0.half" appears, a line and the start of another (in one
# write), and when "$0.rest" appears, the rest of that line.
HALF_SAYER = (
    'echo "ready $$"; while :; do '
    'if [ -e "$0.half" ]; then rm -f "$0.half"; printf "a line $$\\nhalf of "; fi; '
    'if [ -e "$0.rest" ]; then rm -f "$0.rest"; echo "the line $$"; fi; '
    "sleep 0.05; done"
)


def test_a_line_a_worker_is_in_the_middle_of_at_the_handover_is_logged_whole(
    flipvisor: Flipvisor, survivors: list[psutil.Process], tmp_path: Path
) -> None:
    """The worker writes the start of a line while the keeper logs for a killed supervisor, and
    the rest once the next run has the pipe: one log line. The keeper logged the start as a line
    of its own at the handover, and the next run the rest as another."""
    say = tmp_path / "say"
    flipvisor.start({"programs": {"say": {"command": ["/bin/sh", "-c", HALF_SAYER, str(say)]}}})
    pid = flipvisor.wait_serving("say")["pids"][0]
    survivors.append(psutil.Process(pid))
    log = flipvisor.state_dir / "logs" / "say.log"
    wait_until(lambda: log.exists() and f"| ready {pid}\n" in log.read_text())
    [first_keeper] = wait_until(lambda: keepers(flipvisor.state_dir))
    kill_run(flipvisor)

    say.with_name("say.half").touch()
    # Logged by the keeper: it read the start of the next line with it, in the same write.
    wait_until(lambda: f"| a line {pid}\n" in log.read_text(), message="the keeper's line")
    promote = tmp_path / "promote"
    ready_once_promoted = {"exec": ["test", "-e", str(promote)], "timeout": 60}
    gated = {
        "command": ["/bin/sh", "-c", HALF_SAYER, str(tmp_path / "say-new")],
        "readiness": ready_once_promoted,
    }
    restart_supervisor(flipvisor, {"programs": {"say": gated}})
    wait_until(lambda: not first_keeper.is_running(), message="the old keeper to hand over")

    say.with_name("say.rest").touch()
    wait_until(lambda: f"the line {pid}\n" in log.read_text(), message="the rest of the line")
    assert f"| half of the line {pid}\n" in log.read_text(), log.read_text()
    promote.touch()
    wait_gone([pid])
    assert flipvisor.stop() == 0, flipvisor.output()
