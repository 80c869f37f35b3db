"""The benchmarked HTTP service: tests/apps/svc.py, run in this process (same PID, same flags),
with Nagle's algorithm disabled on each accepted connection by the app itself, as gunicorn and
uvicorn do. Without it, svc.py's two writes per answer (headers, body) meet delayed ACKs on
nginx's keep-alive upstream connections and every answer waits ~40 ms, unless the supervisor
happens to set TCP_NODELAY on the listening socket (flipvisor does, Circus does not, supervisord
has no socket): the tools would then be compared on a socket option, not on deploys."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "apps"))
import svc

svc.Handler.disable_nagle_algorithm = True

if __name__ == "__main__":
    sys.exit(svc.main())
