"""A flip's proxy-undo record kept after its reload back failed (``"kept": "reload back failed"``),
with a real supervisor and nginx: the next flip of the program must not lose it, and the next
start reloads the proxy for it; a removal of the program that reloads leaves nothing of it
(``proxy_journal.py``, ``proxy_recovery.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.test_flip import answers, program, proxied, start_serving
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


def _unless(marker: Path, command: list[str]) -> list[str]:
    """``command``, failing (exit 1, not run) while ``marker`` exists."""
    return ["sh", "-c", f'test ! -e {marker} && exec "$0" "$@"', *command]


def test_a_later_flip_failing_before_its_reload_leaves_the_kept_reload_to_the_next_start(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """Generation 2's flip fails at its reload, and so does its reload back: its record is kept
    for the next start's reload. Generation 3's flip then fails at its check, before any reload:
    it wrote its own record over ``web.json`` and removed it as it was undone, so the next start
    did not know that nginx may still route to generation 2 (review)."""
    reload_fails, check_fails = tmp_path / "reload-fails", tmp_path / "check-fails"

    def web(version: str) -> dict[str, Any]:
        proxy = {
            "check_cmd": _unless(check_fails, nginx.check_cmd),
            "reload_cmd": _unless(reload_fails, nginx.reload_cmd),
        }
        return program(nginx, version, proxy=proxy)

    start_serving(flipvisor, nginx, web("1"))
    records = flipvisor.state_dir / "proxy-undo"
    reload_fails.touch()
    flipvisor.write_config({"programs": {"web": web("2")}})
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 1, flipped.stdout + flipped.stderr
    assert "the next start of the supervisor checks the proxy's config and reloads it" in (
        flipped.stdout + flipped.stderr
    )
    assert json.loads((records / "web.json").read_text())["kept"] == "reload back failed"

    check_fails.touch()
    flipvisor.write_config({"programs": {"web": web("3")}})
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 1, flipped.stdout + flipped.stderr

    [kept] = list(records.iterdir())
    record = json.loads(kept.read_text())
    assert (record["generation"], record["kept"]) == (2, "reload back failed"), kept
    assert flipvisor.stop() == 0
    reload_fails.unlink()
    check_fails.unlink()
    flipvisor.start()
    flipvisor.wait_serving("web")

    events = flipvisor.cli("events", "web").stdout
    assert "the reload back of web's rolled-back flip to generation 2" in events, events
    assert "checked and reloaded" in events, events
    assert list(records.iterdir()) == []
    wait_until(lambda: answers(nginx), message="nginx to proxy")
    assert proxied(nginx)["version"] == "3"


def test_a_removal_after_a_kept_record_leaves_nothing_for_the_next_start(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """Generation 2's flip fails at its reload and so does its reload back (its record kept),
    then web is removed from the config: its file removed, checked and the proxy reloaded. The
    removal set the kept record aside and never dropped it: the next start warned
    ``proxy-left`` (web.conf "is gone") though the removal had reloaded (review)."""
    reload_fails = tmp_path / "reload-fails"
    proxy = {"reload_cmd": _unless(reload_fails, nginx.reload_cmd)}
    start_serving(flipvisor, nginx, program(nginx, "1", proxy=proxy))
    records = flipvisor.state_dir / "proxy-undo"
    reload_fails.touch()
    flipvisor.write_config({"programs": {"web": program(nginx, "2", proxy=proxy)}})
    assert flipvisor.cli("flip", "web").returncode == 1
    assert json.loads((records / "web.json").read_text())["kept"] == "reload back failed"

    reload_fails.unlink()
    flipvisor.write_config({"programs": {}})
    reloaded = flipvisor.cli("reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    wait_until(lambda: not (nginx.conf_dir / "web.conf").exists(), message="web.conf removed")
    wait_until(lambda: "unrouted" in flipvisor.event_kinds(), message="web unrouted")
    assert list(records.iterdir()) == []
    assert flipvisor.stop() == 0
    api = program(nginx, "api")
    del api["proxy"]  # a program started after the start-up's recovery, to wait for
    flipvisor.start({"programs": {"api": api}})
    flipvisor.wait_serving("api")

    assert "proxy-left" not in flipvisor.event_kinds(), flipvisor.cli("events").stdout
    assert list(records.iterdir()) == []
