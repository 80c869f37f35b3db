"""The proxy step against a real nginx: atomic install, check, restore, reload, old workers."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import psutil
import pytest

from flipvisor import proxy_reload
from flipvisor import proxy_workers as workers_module
from flipvisor.errors import ProxyError, ProxyFileError, ProxyReloadNotTaken
from flipvisor.proxy import install
from flipvisor.proxy_file import Installed
from flipvisor.proxy_reload import reload
from flipvisor.proxy_template import flip_context, render_template
from flipvisor.proxy_workers import proxy_workers, wait_workers_gone
from flipvisor.reaper import Reaper
from flipvisor.spawn import Child, spawn_process
from flipvisor.starttime import Recorded, identity_of, recorded_now
from tests.clock import step_clock
from tests.fixtures.nginx import Nginx
from tests.reaping import running_reaper
from tests.stand_in_master import stand_in_master
from tests.waiting import await_until

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "nginx.conf.j2"
TIMEOUT = 10.0

# A stdlib HTTP/1.1 server on the inherited listening socket (fd 3) that answers $BODY.
UPSTREAM_APP = r"""
import http.server, os, socket
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = os.environ["BODY"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
server.serve_forever()
"""


@dataclass
class Upstream:
    port: int
    child: Child


@asynccontextmanager
async def upstream(reaper: Reaper, body: str) -> AsyncIterator[Upstream]:
    """A generation-like upstream: a socket we bind, served by a spawned child on fd 3."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        child = spawn_process(
            [sys.executable, "-c", UPSTREAM_APP],
            reaper=reaper,
            env={**os.environ, "BODY": body},
            listen_fd=sock.fileno(),
        )
        try:
            yield Upstream(sock.getsockname()[1], child)
        finally:
            await child.stop(timeout=5.0)
            child.close()


async def get(url: str) -> str:
    # A fresh client (and connection) per request: a pooled connection would pin an old worker.
    # Plain http: verify=False spares each client loading the CA bundle (17 ms of CPU, much more
    # on a loaded machine), which would leave fewer requests to run while nginx reloads.
    async with httpx.AsyncClient(timeout=5.0, verify=False, trust_env=False) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.text


def snippet(nginx: Nginx, port: int, generation: int = 1) -> str:
    values = flip_context(
        program="app", generation=generation, host="127.0.0.1", port=port, pids=[os.getpid()]
    )
    return render_template(TEMPLATE, {**values, "listen": f"127.0.0.1:{nginx.listen}"})


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- install and check -----------------------------------------------------------------------


async def test_install_checks_the_rendered_file_with_nginx(nginx: Nginx) -> None:
    dest = nginx.conf_dir / "app.conf"
    content = snippet(nginx, port=41234)
    async with running_reaper() as reaper:
        installed = await install(
            dest, content, check_cmd=nginx.check_cmd, reaper=reaper, timeout=TIMEOUT
        )
    assert installed.dest == dest
    assert installed.previous is None
    assert dest.read_text() == content
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644  # nginx workers may run as another user
    assert leftovers(nginx.conf_dir) == []


async def test_failed_check_restores_previous_file_byte_for_byte(nginx: Nginx) -> None:
    dest = nginx.conf_dir / "app.conf"
    previous = b"# hand-written \xc3\xa9  \r\n# no trailing newline"
    dest.write_bytes(previous)
    dest.chmod(0o640)
    async with running_reaper() as reaper:
        with pytest.raises(ProxyError) as caught:
            await install(
                dest,
                "this_is_not_a_directive on;\n",
                check_cmd=nginx.check_cmd,
                reaper=reaper,
                timeout=TIMEOUT,
            )
    assert "unknown directive" in str(caught.value)
    assert "kept the previous file" in str(caught.value)
    assert dest.read_bytes() == previous
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert leftovers(nginx.conf_dir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
@pytest.mark.parametrize("check", [["true"], ["false"]], ids=["installed", "restored"])
async def test_the_file_keeps_its_owner_and_group(tmp_path: Path, check: list[str]) -> None:
    """A file restricted to its reader (``chown nobody:daemon; chmod 640``: a proxy or a
    file_sd reader that is not root) kept its mode, but became root's, uid and gid, at the first
    render: its reader got EACCES at its next reload (QA finding). Put back after a failed
    check, it is its owner's again too."""
    dest = tmp_path / "app.conf"
    dest.write_text("# the reader's\n")
    owner = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("daemon").gr_gid)
    os.chown(dest, *owner)
    dest.chmod(0o640)
    async with running_reaper() as reaper:
        with contextlib.suppress(ProxyError):
            await install(dest, "upstream 8000;\n", check_cmd=check, reaper=reaper, timeout=TIMEOUT)
    found = dest.stat()
    assert (found.st_uid, found.st_gid) == owner
    assert stat.S_IMODE(found.st_mode) == 0o640
    expected = "upstream 8000;\n" if check == ["true"] else "# the reader's\n"
    assert dest.read_text() == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the write as another user (nobody)")
def test_a_user_that_may_not_give_the_file_away_still_keeps_its_group() -> None:
    """A supervisor that is not root cannot give the new file to the old one's owner, but may
    give it a group of its own: the group (what a 0640 reader reads through) was lost along
    with the owner, as one fchown does both or neither (review)."""
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory() as where:  # pytest's own folders are root's alone
        _write_as_nobody_into(Path(where), nobody)


def _write_as_nobody_into(folder: Path, nobody: pwd.struct_passwd) -> None:
    os.chmod(folder, 0o755)
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)  # nobody may replace files in it
    dest = folder / "app.conf"
    dest.write_text("# root's, readable by nobody's group\n")
    os.chown(dest, 0, nobody.pw_gid)
    dest.chmod(0o640)
    script = (
        "import os, sys; from pathlib import Path; from flipvisor.proxy_file import write_atomic; "
        f"os.setgid({nobody.pw_gid}); os.setgroups([]); os.setuid({nobody.pw_uid}); "
        f"write_atomic(Path(sys.argv[1]), b'upstream 8000;\\n', 0o640, (0, {nobody.pw_gid}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(dest)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "keeps its group but not its owner" in done.stderr, done.stderr
    found = dest.stat()
    assert (found.st_uid, found.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert dest.read_text() == "upstream 8000;\n"


async def test_failed_check_removes_file_that_did_not_exist(nginx: Nginx) -> None:
    dest = nginx.conf_dir / "app.conf"
    async with running_reaper() as reaper:
        with pytest.raises(ProxyError, match="unknown directive") as caught:
            await install(
                dest, "bogus;\n", check_cmd=nginx.check_cmd, reaper=reaper, timeout=TIMEOUT
            )
    assert "removed the new file" in str(caught.value)
    assert not dest.exists()
    assert leftovers(nginx.conf_dir) == []


async def test_path_placeholder_names_the_new_file(tmp_path: Path) -> None:
    dest = tmp_path / "new" / "dir" / "app.conf"  # created when missing
    check = ["sh", "-c", 'grep -q "^upstream" "$1"', "check", "{path}"]
    async with running_reaper() as reaper:
        await install(dest, "upstream x {}\n", check_cmd=check, reaper=reaper, timeout=TIMEOUT)
        assert dest.read_text() == "upstream x {}\n"
        with pytest.raises(ProxyError, match="exited with status 1"):
            await install(dest, "server {}\n", check_cmd=check, reaper=reaper, timeout=TIMEOUT)
    assert dest.read_text() == "upstream x {}\n"


async def test_check_that_cannot_start_restores(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    dest.write_bytes(b"old")
    async with running_reaper() as reaper:
        with pytest.raises(ProxyError, match="could not run"):
            await install(
                dest,
                "new",
                check_cmd=[str(tmp_path / "no-such-checker")],
                reaper=reaper,
                timeout=TIMEOUT,
            )
    assert dest.read_bytes() == b"old"


async def test_check_timeout_restores(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    dest.write_bytes(b"old")
    async with running_reaper() as reaper:
        with pytest.raises(ProxyError, match="timed out"):
            await install(dest, "new", check_cmd=["sleep", "30"], reaper=reaper, timeout=0.3)
    assert dest.read_bytes() == b"old"


async def test_cancelled_check_restores(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    async with running_reaper() as reaper:
        with anyio.move_on_after(0.3) as scope:
            await install(dest, "new", check_cmd=["sleep", "30"], reaper=reaper, timeout=30)
    assert scope.cancelled_caught
    assert not dest.exists()
    assert leftovers(tmp_path) == []


async def test_restore_puts_back_what_a_checked_install_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    dest.write_bytes(b"generation 1\n")
    async with running_reaper() as reaper:
        installed = await install(
            dest, "generation 2\n", check_cmd=["true"], reaper=reaper, timeout=TIMEOUT
        )
    assert dest.read_bytes() == b"generation 2\n"
    installed.restore()  # a later step of the flip failed
    assert dest.read_bytes() == b"generation 1\n"
    assert leftovers(tmp_path) == []


async def test_readers_never_see_a_half_written_file(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    contents = ["a" * 4_000_000, "b" * 3_000_000]
    dest.write_text(contents[1])
    seen: set[int] = set()

    async def read_all_the_time() -> None:
        while True:
            text = dest.read_text()
            assert text in contents, f"torn read: {len(text)} bytes"
            seen.add(len(text))
            await anyio.lowlevel.checkpoint()

    async with running_reaper() as reaper, anyio.create_task_group() as tg:
        tg.start_soon(read_all_the_time)
        for round_ in range(10):
            await install(
                dest, contents[round_ % 2], check_cmd=None, reaper=reaper, timeout=TIMEOUT
            )
        tg.cancel_scope.cancel()
    assert dest.read_text() == contents[1]
    assert seen == {len(text) for text in contents}  # the reader read across the installs
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("dest", "why"),
    [
        ("app.conf", "{tmp}/app.conf is a folder; name a file"),
        # mkdir said only "File exists", and the flip's advice blamed the template
        (
            "a-file/sites/app.conf",
            "cannot create {tmp}/a-file/sites: {tmp}/a-file is a file, not a folder",
        ),
    ],
    ids=["a-folder-there", "a-file-on-the-way"],
)
async def test_unwritable_destination_names_what_is_wrong_with_the_path(
    tmp_path: Path, dest: str, why: str
) -> None:
    (tmp_path / "app.conf").mkdir()  # a directory where the file should go
    (tmp_path / "a-file").write_text("")
    async with running_reaper() as reaper:
        with pytest.raises(ProxyFileError) as caught:
            await install(tmp_path / dest, "x", check_cmd=None, reaper=reaper, timeout=TIMEOUT)
    assert str(caught.value) == (
        f"cannot write the proxy file {tmp_path / dest}: {why.format(tmp=tmp_path)}"
    )
    assert leftovers(tmp_path) == []


# -- reload ----------------------------------------------------------------------------------


async def test_reload_success_and_failure(nginx: Nginx) -> None:
    async with running_reaper() as reaper:
        await reload(nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT)
        await reload(None, reaper=reaper, timeout=TIMEOUT)  # nothing to reload
        bad = [
            nginx.binary,
            "-s",
            "reload",
            "-c",
            str(nginx.prefix / "missing.conf"),
            "-p",
            str(nginx.prefix),
            "-e",
            str(nginx.error_log),
        ]
        with pytest.raises(ProxyError, match=r"proxy reload failed: .*missing\.conf"):
            await reload(bad, reaper=reaper, timeout=TIMEOUT)
        with pytest.raises(ProxyError, match="could not run"):
            await reload(["/nonexistent/nginx", "-s", "reload"], reaper=reaper, timeout=TIMEOUT)


# -- the proxy's old workers -----------------------------------------------------------------


async def test_old_workers_exit_after_reload(nginx: Nginx) -> None:
    old = await proxy_workers(nginx.pidfile)
    assert len(old) == 1
    ((worker_pid, identity, _),) = old
    assert identity is not None and identity == identity_of(worker_pid)
    assert psutil.Process(worker_pid).ppid() == nginx.process.pid
    async with running_reaper() as reaper:
        await reload(nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT)
    assert await wait_workers_gone(old, timeout=TIMEOUT)
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE  # not reaped yet

    async def new_workers() -> frozenset[Recorded]:
        # Only the new generation of nginx workers, once the exited one is no longer listed.
        current = await proxy_workers(nginx.pidfile)
        return current if current and current.isdisjoint(old) else frozenset()

    new = await await_until(new_workers, message="nginx's new workers, without the old one")
    assert new.isdisjoint(old)


async def test_proxy_workers_are_read_from_the_masters_children_list_not_a_scan(
    nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload's confirmation reads the master's workers every 10-200 ms for up to
    proxy.timeout: psutil's children() scanned all of /proc on the event loop for each (30 ms
    with 1,600 processes). The master's /proc children list costs the same however many
    processes run; the scan is only a fallback, in a worker thread."""

    def no_scan(master: int) -> list[int]:
        raise AssertionError("scanned every process for the master's children")

    monkeypatch.setattr(workers_module, "_children_by_psutil", no_scan)
    workers = await proxy_workers(nginx.pidfile)
    expected = {child.pid for child in psutil.Process(nginx.process.pid).children()}
    assert {worker.pid for worker in workers} == expected and expected


async def test_proxy_workers_fall_back_to_a_scan_off_the_event_loop(
    nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN): psutil's
    scan, in a worker thread, not on the event loop."""
    scanned_in: list[int] = []
    scan = workers_module._children_by_psutil

    def recorded_scan(master: int) -> list[int]:
        scanned_in.append(threading.get_ident())
        return scan(master)

    monkeypatch.setattr(workers_module, "_listed_children", lambda master: None)
    monkeypatch.setattr(workers_module, "_children_by_psutil", recorded_scan)
    workers = await proxy_workers(nginx.pidfile)
    expected = {child.pid for child in psutil.Process(nginx.process.pid).children()}
    assert {worker.pid for worker in workers} == expected and expected
    assert scanned_in and threading.get_ident() not in scanned_in


async def test_a_reload_with_the_pidfile_returns_once_a_new_worker_started(nginx: Nginx) -> None:
    old = await proxy_workers(nginx.pidfile)
    assert old
    async with running_reaper() as reaper:
        returned = await reload(
            nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT, pidfile=nginx.pidfile
        )
    assert returned == old  # the workers to wait for
    # Confirmed: the master has a worker that was not there before the reload.
    assert {w.pid for w in await proxy_workers(nginx.pidfile)} - {w.pid for w in old}
    assert await wait_workers_gone(old, timeout=TIMEOUT)


async def test_a_reload_nginx_does_not_apply_fails_and_its_old_workers_serve_on(
    nginx: Nginx,
) -> None:
    """A `listen` on a port something else holds passes `nginx -t` (it binds nothing), and
    `nginx -s reload` succeeds (it only signals the master); the master logs that it could not
    bind and keeps its old workers and config. Only the pidfile shows it: no new worker."""
    dest = nginx.conf_dir / "app.conf"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        held = f"127.0.0.1:{busy.getsockname()[1]}"
        async with running_reaper() as reaper:
            await install(
                dest,
                f"server {{ listen {held}; return 204; }}\n",
                check_cmd=nginx.check_cmd,
                reaper=reaper,
                timeout=TIMEOUT,
            )
            old = await proxy_workers(nginx.pidfile)
            assert old
            with anyio.fail_after(TIMEOUT), pytest.raises(ProxyReloadNotTaken) as caught:
                await reload(nginx.reload_cmd, reaper=reaper, timeout=1, pidfile=nginx.pidfile)
            # Without the pidfile nothing can tell: the command's success is all there is.
            assert await reload(nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT) == frozenset()
            # The old workers serve on. Asked while the port is still held: nginx may handle
            # the second reload's SIGHUP only now, and once the port is free it would apply it.
            assert await proxy_workers(nginx.pidfile) == old
    message = str(caught.value)
    assert "nginx has not applied the reload (or is still loading it)" in message
    assert f"no new worker of the master (pidfile {nginx.pidfile}) started within 1s" in message
    assert "see nginx's error log" in message
    assert "Address already in use" in nginx.log_tail()


async def test_a_refused_reload_is_given_up_on_after_the_proxy_timeout(nginx: Nginx) -> None:
    """A reload nginx does not apply (a `listen` on a port something else holds) fails once
    ``timeout`` (the proxy's) passed without a new worker, and says after how long."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        held = f"127.0.0.1:{busy.getsockname()[1]}"
        async with running_reaper() as reaper:
            await install(
                nginx.conf_dir / "app.conf",
                f"server {{ listen {held}; return 204; }}\n",
                check_cmd=nginx.check_cmd,
                reaper=reaper,
                timeout=TIMEOUT,
            )
            with anyio.fail_after(10), pytest.raises(ProxyReloadNotTaken, match=r"within 0\.5s"):
                await reload(nginx.reload_cmd, reaper=reaper, timeout=0.5, pidfile=nginx.pidfile)


async def test_a_reload_slower_than_any_fixed_cap_is_waited_for_within_the_proxy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confirmation waited at most ``RELOAD_CONFIRM_MAX`` (10 s), whatever the proxy's
    timeout: an nginx that takes longer to load a large config had every reload taken for one it
    did not apply, and every flip rolled back. It waits the proxy's timeout, the operator's knob.
    Such a cap is set here (shorter than the master's 1 s, for a quick test): it is not obeyed."""
    monkeypatch.setattr(proxy_reload, "RELOAD_CONFIRM_MAX", 0.2, raising=False)
    with stand_in_master(tmp_path, delay=1.0) as pidfile:
        before = await proxy_workers(pidfile)
        assert len(before) == 1
        master = pidfile.read_text().strip()
        async with running_reaper() as reaper:
            with anyio.fail_after(10):
                old = await reload(
                    ["kill", "-HUP", master], reaper=reaper, timeout=5, pidfile=pidfile
                )
        assert old == before  # confirmed by the new worker, the old one to be waited for


async def test_a_reload_without_workers_to_replace_is_not_waited_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pidfile that names no running master (or one without workers) gives nothing to
    confirm the reload by: the command's success is taken, and there is nothing to wait for.
    That was silent: a warning says it now, once per program (each reload would repeat it)."""
    missing = tmp_path / "missing.pid"
    async with running_reaper() as reaper:
        with anyio.fail_after(TIMEOUT):
            for owner in ("program=web", "program=web", "program=api"):
                workers = await reload(
                    ["true"], reaper=reaper, timeout=60, pidfile=missing, owner=owner
                )
                assert workers == frozenset()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"program=web: the proxy's pidfile {missing} names no running")
    assert "its reloads are not confirmed" in warnings[0]
    assert warnings[1].startswith("program=api: ")


async def test_old_workers_are_waited_for_across_a_clock_step(
    nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a wall-clock step every start time in seconds reads as another
    (``tests/clock.py``): the old workers are still told apart by their start ticks, not taken
    for gone (a drain that would then not wait for them fails the requests they still route)."""
    old = await proxy_workers(nginx.pidfile)
    assert old
    step_clock(monkeypatch, 3600.0)
    with anyio.fail_after(5):
        assert await wait_workers_gone(old, timeout=0.3) is False
    async with running_reaper() as reaper:
        await reload(nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT)
    assert await wait_workers_gone(old, timeout=TIMEOUT)


async def test_wait_workers_gone_times_out_on_a_live_process() -> None:
    me = recorded_now(os.getpid())
    assert me is not None
    with anyio.fail_after(5):
        assert await wait_workers_gone([me], timeout=0.2) is False
        assert await wait_workers_gone([me._replace(identity=None)], timeout=0.2) is False


async def test_wait_workers_gone_skips_gone_and_reused_pids(tmp_path: Path) -> None:
    me = recorded_now(os.getpid())
    assert me is not None and me.identity is not None and me.started is not None
    recycled = [  # same PID, other process: by start time, by start tick, by boot
        Recorded(me.pid, None, me.started - 1000),
        me._replace(identity=me.identity._replace(ticks=me.identity.ticks + 1)),
        me._replace(identity=me.identity._replace(boot_id="another boot")),
    ]
    gone = Recorded(2**22 + 12345, None, 0.0)  # beyond pid_max's default
    with anyio.fail_after(1):
        assert await wait_workers_gone([*recycled, gone], timeout=5) is True
        assert await wait_workers_gone([], timeout=5) is True
    assert await proxy_workers(tmp_path / "missing.pid") == frozenset()
    (tmp_path / "garbage.pid").write_text("not a pid\n")
    assert await proxy_workers(tmp_path / "garbage.pid") == frozenset()


# -- end to end ------------------------------------------------------------------------------


async def test_flip_through_nginx_drops_no_request(nginx: Nginx) -> None:
    """render → install+check → reload → old workers gone → stop generation 1, under load."""
    dest = nginx.conf_dir / "app.conf"
    bodies: list[str] = []
    failures: list[str] = []

    async def answered(count: int) -> bool:
        return len(bodies) >= count

    async def client() -> None:
        while True:
            try:
                bodies.append(await get(nginx.url("/")))
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    async with running_reaper() as reaper, upstream(reaper, "generation 1") as gen1:
        await install(
            dest,
            snippet(nginx, gen1.port),
            check_cmd=nginx.check_cmd,
            reaper=reaper,
            timeout=TIMEOUT,
        )
        await reload(nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT)

        async def serves_generation_1() -> bool:
            try:
                return await get(nginx.url("/")) == "generation 1"
            except httpx.HTTPError:
                return False

        await await_until(serves_generation_1, message="nginx to proxy to generation 1")

        async with upstream(reaper, "generation 2") as gen2, anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(client)
            await await_until(lambda: answered(5), message="requests through generation 1")
            installed = await install(
                dest,
                snippet(nginx, gen2.port, generation=2),
                check_cmd=nginx.check_cmd,
                reaper=reaper,
                timeout=TIMEOUT,
            )
            assert installed.previous == snippet(nginx, gen1.port).encode()
            old = await proxy_workers(nginx.pidfile)  # before the reload
            before_reload = len(bodies)
            await reload(nginx.reload_cmd, reaper=reaper, timeout=TIMEOUT)
            assert await wait_workers_gone(old, timeout=TIMEOUT)
            # Requests were running while nginx switched (the reload command alone takes longer).
            assert len(bodies) > before_reload
            # Only new workers are left, so generation 1 may go: the drain of a flip.
            await gen1.child.stop(timeout=5.0)
            served = len(bodies)
            await await_until(lambda: answered(served + 5), message="requests after the drain")
            tg.cancel_scope.cancel()
    assert failures == []
    assert bodies[0] == "generation 1"
    assert set(bodies[served:]) == {"generation 2"}


async def test_a_check_that_fails_and_a_restore_that_fails_are_both_named(
    tmp_path: Path,
) -> None:
    """The check turns the file into a directory: the previous file cannot be renamed back."""
    dest = tmp_path / "app.conf"
    dest.write_bytes(b"old")
    check = ["sh", "-c", f"rm {dest} && mkdir {dest} && touch {dest}/x && echo bad && exit 1"]
    async with running_reaper() as reaper:
        with pytest.raises(ProxyError) as caught:
            await install(dest, "new", check_cmd=check, reaper=reaper, timeout=TIMEOUT)
    message = str(caught.value)
    assert message.startswith(f"proxy check of {dest} failed: "), message
    assert "bad" in message and f"then cannot restore the previous {dest}" in message, message


async def test_a_failed_or_cancelled_check_puts_the_file_back_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore (a write and two fsyncs) runs in a worker thread, as the install does: on
    the event loop, a busy disk held every program's supervision meanwhile (review). A
    cancelled check still restores (the thread is shielded)."""
    restored_in: list[int] = []
    restore = Installed.restore

    def recorded_restore(self: Installed, *, quiet: bool = False) -> None:
        restored_in.append(threading.get_ident())
        restore(self, quiet=quiet)

    monkeypatch.setattr(Installed, "restore", recorded_restore)
    dest = tmp_path / "app.conf"
    dest.write_bytes(b"old")
    async with running_reaper() as reaper:
        with pytest.raises(ProxyError, match="failed"):
            await install(dest, "new", check_cmd=["false"], reaper=reaper, timeout=TIMEOUT)
        with anyio.move_on_after(0.3) as scope:
            await install(dest, "new", check_cmd=["sleep", "30"], reaper=reaper, timeout=30)
    assert scope.cancelled_caught
    assert dest.read_bytes() == b"old"
    assert len(restored_in) == 2 and threading.get_ident() not in restored_in, restored_in
