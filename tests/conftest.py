"""Shared test set-up: the asyncio backend, fixture plugins, and the no-leftover-children check."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flipvisor.runrecord import RUNTIME_ENV
from tests.event_loop import GrpcTolerantEventLoop
from tests.waiting import wait_until

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.nginx",
    "tests.fixtures.flipvisor",
    "tests.fixtures.not_etcd",
]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """asyncio, on a loop that drops gRPC's completions of an earlier test (tests/event_loop.py)."""
    return "asyncio", {"loop_factory": GrpcTolerantEventLoop}


@pytest.fixture(autouse=True, scope="session")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the supervisors the tests start record where they listen (runrecord.py): a folder
    of this session's, not /run/flipvisor, which the records of SIGKILLed supervisors would
    litter. Records are named by their config file's path, each test's own: no two collide."""
    folder = tmp_path_factory.mktemp("runtime")
    before = os.environ.get(RUNTIME_ENV)
    os.environ[RUNTIME_ENV] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop(RUNTIME_ENV, None)
        else:
            os.environ[RUNTIME_ENV] = before


def require_binary(name: str) -> str:
    """The path of ``name``; skips locally when it is missing, fails under CI."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (apt-get install it in .ci/run)")
        pytest.skip(f"{name} is not installed")
    return path


def _own_children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def no_leftover_children(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test must leave no process of its own behind (session fixtures' are allowed)."""
    before = _own_children()
    yield
    wait_until(
        lambda: not (_own_children() - before),
        timeout=15,
        message="the test's child processes to exit",
    )
