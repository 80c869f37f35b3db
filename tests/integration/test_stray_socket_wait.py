"""A start on a fixed port that a stray (a killed supervisor's program the config no longer has)
may hold, its socket not handed over, waits for that stray's stop only
(``Predecessor.stray_socket``): not for a stray kept for another program, which serves on until
that program serves (for ever, if its start failed)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from flipvisor.config import SocketConfig
from flipvisor.config_file import parse_config
from flipvisor.leftovers import Leftovers
from flipvisor.predecessor import Predecessor

pytestmark = pytest.mark.anyio


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("recorded", [True, False])
async def test_a_start_waits_for_the_stray_on_its_port_not_for_one_kept_for_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    """``old`` listens on ``other``'s port (its recorded one, or none recorded: found by its
    processes' environment, it may), and its socket is not handed over: ``other``'s start waits
    until ``old`` is stopped, and no longer, though ``web`` serves on for ``api``."""
    kept_socket = listening()  # the stray `web`'s, handed over to `api`
    api_port = kept_socket.getsockname()[1]
    other_port = 1 + api_port if api_port < 65535 else api_port - 1
    text = (
        f"state_dir: {tmp_path}\nprograms:\n"
        f"  api:\n    command: x\n    socket: {{port: {api_port}}}\n"
        f"  other:\n    command: x\n    socket: {{port: {other_port}}}\n"
    )
    config = parse_config(text, tmp_path / "flipvisor.yaml")

    def take_socket(self: Leftovers, wanted: SocketConfig) -> socket.socket | None:
        # `web` holds api's port and hands it over; `old` (no recorded port) hands nothing over.
        return kept_socket.dup() if self.program == "web" and wanted.port == api_port else None

    monkeypatch.setattr(Leftovers, "take_socket", take_socket)
    predecessor = Predecessor(config, cast(Any, None), cast(Any, None), cast(Any, None), {})
    strays = [
        Leftovers("web", 1, api_port, ()),
        Leftovers("old", None, other_port if recorded else None, ()),
    ]
    predecessor._take_stray_sockets(strays)
    # As ``find_leftovers`` sets them up before the strays' stops begin.
    predecessor._stray_gone = {stray.program: anyio.Event() for stray in strays}
    predecessor._strays_gone = anyio.Event()

    taken = await predecessor.stray_socket(SocketConfig(port=api_port))
    assert taken is not None
    taken[0].close()

    async with anyio.create_task_group() as tg:
        bound = anyio.Event()

        async def start_other() -> None:
            assert await predecessor.stray_socket(SocketConfig(port=other_port)) is None
            bound.set()

        tg.start_soon(start_other)
        await anyio.wait_all_tasks_blocked()
        assert not bound.is_set()  # `old` may hold other's port: waited for
        predecessor._stray_gone["old"].set()  # `old` stopped; `web` is kept serving for `api`
        with anyio.fail_after(5):
            await bound.wait()
    kept_socket.close()
    for sock, _ in predecessor._stray_sockets.values():
        sock.close()
