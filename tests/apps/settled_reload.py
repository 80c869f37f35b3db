#!/usr/bin/env python3
"""A proxy reload that is over when it returns: ``settled_reload.py PIDFILE CMD...`` runs CMD
(``nginx -s reload``), then waits until every worker the master (its PID in PIDFILE) had before
it has exited, so none of them routes to the old upstream any more.

``nginx -s reload`` returns once it has signalled the master, which reconfigures on its own time:
a test that needs the reload done before what comes after it (a drain) uses this as its
``reload_cmd`` instead of betting on how fast a loaded machine reconfigures nginx. Exits with
CMD's status if it failed, 1 if the old workers outlive ``DEADLINE``, else 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

DEADLINE = 25.0  # under the watcher's reload timeout (30 s): a hang fails here, and says so


def main(argv: list[str]) -> int:
    pidfile, command = Path(argv[0]), argv[1:]
    # psutil.Process checks a PID's start time, so a worker whose PID is reused is not waited for.
    before = psutil.Process(int(pidfile.read_text().strip())).children()
    status = subprocess.run(command, check=False, stdin=subprocess.DEVNULL).returncode
    if status != 0:
        return status
    _, alive = psutil.wait_procs(before, timeout=DEADLINE)
    if alive:
        print(f"settled_reload: old workers still running: {alive}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
