"""One proxy file a proxy-undo record (``proxy_record.py``) says a step changed: what it held,
the digest of what the step wrote, its format in the record, and putting it back (blocking)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ProxyError
from .proxy_file import DEFAULT_FILE_MODE, Installed, same_file


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Change:
    """One proxy file a step changed: what it held (``kept``) and the digest of what the step
    wrote there (None: it removed the file)."""

    kept: Installed
    written: str | None

    def to_json(self) -> dict[str, Any]:
        kept = self.kept
        previous = kept.previous
        return {
            "dest": str(kept.dest),
            "previous": None if previous is None else base64.b64encode(previous).decode(),
            "mode": kept.previous_mode,
            "owner": None if kept.previous_owner is None else list(kept.previous_owner),
            "written_sha256": self.written,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Change:
        previous, owner = data["previous"], data["owner"]
        kept = Installed(
            dest=Path(data["dest"]),
            previous=None if previous is None else base64.b64decode(previous, validate=True),
            previous_mode=int(data.get("mode", DEFAULT_FILE_MODE)),
            previous_owner=None if owner is None else (int(owner[0]), int(owner[1])),
        )
        written = data["written_sha256"]
        return cls(kept, None if written is None else str(written))

    def holds(self, now: bytes | None) -> bool:
        """Whether ``now`` (a file's bytes, None: no file) is either state of this change: what
        the file held before it, or what it wrote."""
        if now == self.kept.previous:
            return True
        return self.written is None if now is None else digest(now) == self.written

    def put_back(self, earlier: Sequence[Change] = ()) -> tuple[str, bool]:
        """Put the previous file back if ``dest`` still holds what the step wrote; what was
        done, for a message, and whether the file was left alone (a hand edit since). A file
        that holds a state of ``earlier`` (changes before this one in the record's chain) was
        put back further already, by a start killed before it could drop the record: ours,
        not a hand edit, and left as it is.

        Raises:
            ProxyError: it could not be put back.
        """
        dest = self.kept.dest
        try:
            now: bytes | None = dest.read_bytes()
        except FileNotFoundError:
            now = None
        except OSError as exc:
            raise ProxyError(f"cannot read {dest}: {exc.strerror or exc}") from exc
        if now == self.kept.previous:
            return f"{dest} is the previous file already", False
        if not self.holds(now):
            if any(same_file(c.kept.dest, dest) and c.holds(now) for c in earlier):
                return f"{dest} is an earlier step's file already (put back before)", False
            what = "is gone" if now is None else "holds something other than what that step wrote"
            return (
                f"{dest} left as it is: it {what} (changed by a later step, or by hand, "
                "since?); see that it is what the proxy should load"
            ), True
        self.kept.restore()
        if self.kept.previous is None:
            return f"{dest} removed (there was none before)", False
        return f"{dest}: the previous file put back", False
