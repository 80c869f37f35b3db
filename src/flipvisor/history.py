"""What each program ran: the resolved configs of its serving and previous deploys, kept in
``<state_dir>/history/<program>.json`` so that ``rollback`` still knows the previous command, env
and cwd after the supervisor itself was restarted.

"Previous" is the last *different* config: a restart (a flip to the same config) or a supervisor
restart does not make the running config its own rollback target.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson
from pydantic import ValidationError

from .config import ProgramConfig

log = logging.getLogger(__name__)


class History:
    """The current and previous config of one program, persisted atomically."""

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
        """Record that ``config`` now serves (after a promotion)."""
        if config == self.current:
            return
        self.previous, self.current = self.current, config
        self._save()

    def _save(self) -> None:
        document = {
            "current": self.current.model_dump(mode="json") if self.current else None,
            "previous": self.previous.model_dump(mode="json") if self.previous else None,
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # orjson: the stdlib's indented encoding is pure Python, on the event loop per deploy.
            tmp.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.path)
        except OSError as exc:
            # Losing the history costs only a rollback target; the deploy itself stands.
            log.warning("cannot record the deploy history in %s: %s", self.path, exc.strerror)


def _config(data: object) -> ProgramConfig | None:
    return None if data is None else ProgramConfig.model_validate(data)
