"""QA pass 10: findings in today's changes (the answer of `flip --timeout` while a hung reload
back goes on, the draining state of a discarded generation), each an xfail(strict) test that
fails because of the defect and passes once it is fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_flip import gated, program
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx, free_port


def _error_line(stderr: str) -> str:
    """The client's error (from its `flipvisor:` line on), without the progress lines."""
    return " ".join(stderr.partition("flipvisor: ")[2].split())


@pytest.mark.xfail(
    strict=True,
    reason="QA 10: a flip of another program cut short by --timeout while web's reload back "
    "holds the proxy says only 'took longer than --timeout; rolled back': not what it waited for",
)
def test_a_flip_waiting_for_the_proxy_held_by_another_program_s_reload_back_says_so(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """web's `flip --timeout 2` is answered while its reload back (a hung reload_cmd) goes on,
    holding the proxy (README: other programs' proxy steps wait). api's `flip --timeout 3`,
    started then, passes its probe and waits for the proxy until its timeout: it is rolled
    back, and its answer says only "the flip took longer than --timeout 3s; rolled back",
    with no step shown after the probe. The operator of api cannot tell that web's rollback
    held it up (nor that flipping api again once web's `reloaded-back` event came would pass)."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gate.touch()
    api_listen = free_port()

    def config(version: str) -> dict[str, Any]:
        web_reload = gated(nginx.reload_cmd, gate, entered)
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
        said = _error_line(api.stderr)
        assert "took longer than --timeout 3s" in said, said
        # What held it up: the proxy, held by web's rollback (its reload back).
        assert "web" in said, f"api's flip does not say what it waited for: {said}"
    finally:
        gate.touch()
