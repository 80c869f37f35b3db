"""Whether a folder, a file or a listen address can be used here, said so the operator knows
what to fix (shared by `check` and by `run`'s errors). Real files, folders and sockets."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from flipvisor.usable import (
    file_problem,
    folder_problem,
    in_use,
    listen_error,
    listen_problem,
    port_holders,
)

# A folder nobody may create anything in, root included (procfs refuses it): the same on every
# Linux test host, whoever runs the tests.
READ_ONLY = Path("/proc/sys/kernel")


def test_a_folder_that_exists_or_can_be_created_is_fine(tmp_path: Path) -> None:
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert file_problem(tmp_path / "new" / "app.conf") is None
    (tmp_path / "app.conf").write_text("old")
    assert file_problem(tmp_path / "app.conf") is None  # replaced atomically


def test_a_file_where_a_folder_should_be(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert folder_problem(a_file) == f"{a_file} is a file, not a folder"
    assert folder_problem(a_file / "x" / "y") == (
        f"cannot create {a_file / 'x' / 'y'}: {a_file} is a file, not a folder"
    )
    assert file_problem(a_file / "app.conf") == f"{a_file} is a file, not a folder"


def test_a_folder_where_a_file_should_be(tmp_path: Path) -> None:
    assert file_problem(tmp_path) == f"{tmp_path} is a folder; name a file"


def test_a_folder_that_cannot_be_written() -> None:
    uid = os.geteuid()
    assert folder_problem(READ_ONLY) == f"{READ_ONLY} is not writable by this user (uid {uid})"
    assert folder_problem(READ_ONLY / "fv" / "state") == (
        f"cannot create {READ_ONLY / 'fv' / 'state'}: {READ_ONLY} is not writable by this user "
        f"(uid {uid})"
    )
    assert file_problem(READ_ONLY / "app.conf") == (
        f"{READ_ONLY} is not writable by this user (uid {uid})"
    )


def test_an_address_of_this_host_is_fine_even_while_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The running supervisor holds its own metrics port: `check` must not call it busy.
        assert listen_problem("127.0.0.1", port) is None
    assert listen_problem("0.0.0.0", 9100) is None


def test_an_address_that_does_not_resolve() -> None:
    problem = listen_problem("999.1.1.1", 9000)
    assert problem is not None
    assert problem.startswith("cannot listen on 999.1.1.1:9000: '999.1.1.1' is not an address (")
    assert problem.endswith("use an IP address of this host, such as 127.0.0.1")


def test_an_address_of_another_host() -> None:
    # TEST-NET-3 (RFC 5737): never assigned to a host's interface.
    assert listen_problem("203.0.113.7", 9000) == (
        "cannot listen on 203.0.113.7:9000: 203.0.113.7 is not an address of this host; use one "
        "of its own, or 0.0.0.0"
    )


def test_a_port_in_use_says_choose_a_free_port() -> None:
    with socket.socket() as taken, socket.socket() as second:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as caught:
            second.bind(("127.0.0.1", port))
    assert caught.value.errno == errno.EADDRINUSE
    assert listen_error("127.0.0.1", port, caught.value) == (
        f"cannot listen on 127.0.0.1:{port}: the port is in use; choose a free port, or stop "
        "what holds this one"
    )


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")
def test_an_ipv6_port_in_use_is_written_bracketed() -> None:
    # `:::8080` could be read as the address `::` and port 8080, or `::8080` and no port.
    with socket.socket(socket.AF_INET6) as taken, socket.socket(socket.AF_INET6) as second:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as caught:
            second.bind(("::1", port))
        holders = port_holders(port)
    assert listen_error("::1", port, caught.value).startswith(f"cannot listen on [::1]:{port}: ")
    assert in_use("::1", port, holders).startswith(f"cannot listen on [::1]:{port}: the port is ")
    assert listen_error("127.0.0.1", port, caught.value).startswith(f"on 127.0.0.1:{port}: ", 14)


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ("999.1.1.1:9000", "'999.1.1.1' is not an address ("),
        ("203.0.113.7:9000", "203.0.113.7 is not an address of this host"),
    ],
    ids=["not-an-address", "another-hosts"],
)
async def test_run_says_why_metrics_cannot_listen(listen: str, why: str) -> None:
    """`run` said "choose a free port" for an address that does not exist."""
    from flipvisor.errors import ConfigError
    from flipvisor.events import EventLog
    from flipvisor.metrics import Metrics

    with pytest.raises(ConfigError) as caught:
        await Metrics(listen, EventLog(), list).run()
    assert str(caught.value).startswith(f"metrics.listen: cannot listen on {listen}: {why}")
    assert "free port" not in str(caught.value)
