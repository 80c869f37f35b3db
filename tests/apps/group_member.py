"""An app that a wrapper script runs without exec, so it shares the worker's process group.

``group_member.py MARKERS SHUTDOWN``: writes ``START <pid>`` to MARKERS, waits for SIGTERM (at
most a minute, then exits 1: a test that failed must not leave it running for long), writes
``TERM <pid>``, takes SHUTDOWN seconds to shut down, writes ``STOP <pid>`` and exits 0.
"""

import os
import signal
import sys
import time

markers, shutdown = sys.argv[1], float(sys.argv[2])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
with open(markers, "a") as f:
    f.write(f"START {os.getpid()}\n")
if signal.sigtimedwait({signal.SIGTERM}, 60) is None:
    sys.exit(1)
with open(markers, "a") as f:
    f.write(f"TERM {os.getpid()}\n")
time.sleep(shutdown)
with open(markers, "a") as f:
    f.write(f"STOP {os.getpid()}\n")
