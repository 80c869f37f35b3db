"""Every failed flip ends with what the operator can do next, chosen by what failed."""

from __future__ import annotations

import pytest

from flipvisor.errors import (
    BindError,
    ProbeFailed,
    ProxyError,
    ProxyFileError,
    RegistryConflict,
    RegistryError,
    SpawnError,
    flip_next_step,
)


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (ProxyError("nginx -t failed"), "fix the proxy template or its check/reload command"),
        # The template is not to blame for a dest that cannot be written.
        (ProxyFileError("a folder is there"), "fix programs.web.proxy.dest (or the folders"),
        # A lost compare: the registry was reached; another writer changed the keys.
        (RegistryConflict("key changed"), "find what else writes these keys (another supervisor"),
        (RegistryError("connection refused"), "make the registry reachable (registry.endpoints)"),
        # The local backend's file knows better than "reachable", which is about etcd.
        (RegistryError("bad JSON", "fix /s/registry.json by hand"), "fix /s/registry.json by hand"),
        (SpawnError("not found"), "fix programs.web.command or cwd in the config"),
        (
            BindError("127.0.0.1:8000 in use", in_use=True),
            "free the address or change programs.web.socket",
        ),
        # Nothing to free: an address of another host.
        (BindError("10.9.9.9 is not an address of this host"), "change programs.web.socket, then"),
        (ProbeFailed("GET /health: 503"), "`flipvisor logs web` shows its output"),
    ],
)
def test_a_failed_flip_names_the_next_step_for_what_failed(error: Exception, advice: str) -> None:
    step = flip_next_step(error, "web")
    assert step.startswith(advice)
    fixable_then_retry = not isinstance(error, ProbeFailed)
    assert step.endswith("then `flipvisor flip web`") == fixable_then_retry


def test_with_nothing_serving_the_one_next_step_is_start() -> None:
    """A failed first start leaves the program fatal, which `start` clears: not `flip`."""
    step = flip_next_step(BindError("127.0.0.1:8000 in use", in_use=True), "web", retry="start")
    assert step == "free the address or change programs.web.socket, then `flipvisor start web`"
