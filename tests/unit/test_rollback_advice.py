"""A failed rollback's next step names what the history recorded, never the config file's keys:
editing the file does not change what the next rollback deploys."""

from __future__ import annotations

from pathlib import Path

import pytest

from flipvisor.config import ProgramConfig
from flipvisor.errors import (
    BindError,
    ProbeFailed,
    ProxyError,
    ProxyFileError,
    RegistryError,
    SpawnError,
)
from flipvisor.rollback_advice import rollback_next_step

HISTORY = Path("/s/history/web.json")
TARGET = ProgramConfig.model_validate(
    {
        "command": ["/srv/release-1/app.sh", "--port", "{port}"],
        "cwd": "/srv/release-1",
        "socket": {"port": 8000},
        "proxy": {"template": "/etc/web.conf.j2", "dest": "/etc/nginx/web.conf"},
    }
)
AGAIN = "then `flipvisor rollback web`"
INSTEAD = "`flipvisor flip web`"


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (
            SpawnError("no such file"),
            "restore the previous deploy's command `/srv/release-1/app.sh --port '{port}'` in "
            f"/srv/release-1, {AGAIN}",
        ),
        (
            BindError("in use", in_use=True),
            f"free 127.0.0.1:8000 (the previous deploy's socket), {AGAIN}",
        ),
        (BindError("not here"), "the previous deploy's socket 127.0.0.1:8000 cannot be bound here"),
        (ProxyFileError("a folder"), "make the previous deploy's proxy.dest /etc/nginx/web.conf"),
        (ProxyError("nginx -t failed"), f"fix the proxy template /etc/web.conf.j2, {AGAIN}"),
    ],
)
def test_a_failed_rollback_names_the_recorded_value_and_the_file_s_way(
    error: Exception, advice: str
) -> None:
    step = rollback_next_step(error, "web", TARGET, HISTORY)
    assert step.startswith(advice), step
    assert INSTEAD in step and str(HISTORY) in step, step
    assert "programs.web" not in step and "in the config" not in step, step


def test_the_registry_and_the_probe_are_not_the_deploy_s_to_restore() -> None:
    step = rollback_next_step(RegistryError("refused"), "web", TARGET, HISTORY)
    assert step == f"make the registry reachable (registry.endpoints), {AGAIN}"
    assert rollback_next_step(ProbeFailed("503"), "web", TARGET, HISTORY) == (
        "`flipvisor logs web` shows its output"
    )


def test_a_failed_proxy_step_names_the_recorded_check_and_reload_commands() -> None:
    """The history records the check and reload commands: they cannot be edited, so the advice
    names them (what must work), not "fix the previous deploy's check/reload command"."""
    proxy = {
        "template": "/etc/web.conf.j2",
        "dest": "/etc/nginx/web.conf",
        "check_cmd": ["nginx", "-t"],
        "reload_cmd": ["nginx", "-s", "reload"],
    }
    target = TARGET.model_copy(update={"proxy": TARGET.proxy.model_copy(update=proxy)})
    step = rollback_next_step(ProxyError("nginx -t failed"), "web", target, HISTORY)
    assert step.startswith(
        "fix the proxy template /etc/web.conf.j2 or make `nginx -t` (the previous deploy's check "
        "command) and `nginx -s reload` (the previous deploy's reload command) work, "
    ), step
    assert "check/reload" not in step and INSTEAD in step, step


def test_a_socket_that_cannot_be_bound_here_says_to_flip_without_a_dangling_or() -> None:
    step = rollback_next_step(BindError("not here"), "web", TARGET, HISTORY)
    assert step.startswith(
        "the previous deploy's socket 127.0.0.1:8000 cannot be bound here: deploy the config "
        "file's section instead with `flipvisor flip web`"
    ), step
    assert ": or " not in step, step
