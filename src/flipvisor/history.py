"""What each program ran: the resolved configs of its serving and previous deploys, kept in
``<state_dir>/history/<program>.json`` so that ``rollback`` still knows the previous command, env
and cwd after the supervisor itself was restarted.

"Previous" is the last *different* config: a restart (a flip to the same config) or a supervisor
restart does not make the running config its own rollback target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from pydantic import ValidationError

from . import durable
from .config import ProgramConfig

log = logging.getLogger(__name__)


HISTORY_MODE = 0o600  # a config's env may hold secrets: private, as the state_dir is


@dataclass(frozen=True)
class Deploys:
    """The history at one moment (``History.snapshot``): put back by ``History.restore``."""

    current: ProgramConfig | None
    previous: ProgramConfig | None


class History:
    """The current and previous config of one program, persisted atomically and durably
    (``durable.write_atomic``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: ProgramConfig | None = None
        self.previous: ProgramConfig | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = orjson.loads(self.path.read_bytes())
            self.current = _config(data.get("current"))
            self.previous = _config(data.get("previous"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError, ValidationError) as exc:
            # A history written by another version, or damaged: rollback just has no target.
            log.warning("ignoring the deploy history in %s: %s", self.path, exc)
            self.current = self.previous = None

    def deployed(self, config: ProgramConfig) -> None:
        """Record that ``config`` now serves (blocking: the write is fsynced)."""
        if self._remember(config):
            self._save(self._document())

    async def record_deployed(self, config: ProgramConfig) -> None:
        """``deployed`` from the event loop (after a promotion): the memory is updated at once,
        the file written in a worker thread, as its fsync may take a while on a busy disk."""
        if self._remember(config):
            # Shielded: cancelled before the thread ran, the file would keep the config before
            # (the next run's rollback target wrong), while the memory says otherwise.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._save, self._document())

    def snapshot(self) -> Deploys:
        """The current and previous deploys now: a flip takes it before its promotion."""
        return Deploys(self.current, self.previous)

    async def restore(self, deploys: Deploys) -> None:
        """Put back what ``snapshot`` took (a flip routed back to what it replaced: the deploy
        it promoted is no rollback target, the one before is), durably, as ``record_deployed``."""
        if (self.current, self.previous) == (deploys.current, deploys.previous):
            return
        self.current, self.previous = deploys.current, deploys.previous
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._save, self._document())

    def _remember(self, config: ProgramConfig) -> bool:
        """Shift ``config`` in; whether that changed anything (a restart does not)."""
        if config == self.current:
            return False
        self.previous, self.current = self.current, config
        return True

    def _document(self) -> bytes:
        # orjson: the stdlib's indented encoding is pure Python, on the event loop per deploy.
        document: dict[str, Any] = {
            "current": self.current.model_dump(mode="json") if self.current else None,
            "previous": self.previous.model_dump(mode="json") if self.previous else None,
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2)

    def _save(self, data: bytes) -> None:
        try:
            try:
                durable.write_atomic(self.path, data, HISTORY_MODE)
            except FileNotFoundError:  # the first deploy, or the folder removed since
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                durable.write_atomic(self.path, data, HISTORY_MODE)
        except OSError as exc:
            # Losing the history costs only a rollback target; the deploy itself stands.
            log.warning("cannot record the deploy history in %s: %s", self.path, exc.strerror)


def _config(data: object) -> ProgramConfig | None:
    return None if data is None else ProgramConfig.model_validate(data)
