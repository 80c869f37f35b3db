"""A stand-in for nginx's master, for the proxy's reload confirmation: its PID in a pidfile
written after it started (as nginx writes its own), one worker child. SIGHUP applies a "reload"
after ``delay`` seconds (a large config's parse) by starting a new worker, and stops the old one
unless ``keep_old`` (old workers finishing their requests); with ``applies_while``, only while
that file exists: otherwise it rejects the reload (as nginx does a ``listen`` it cannot bind)
and serves on with its old worker. SIGTERM stops it and its workers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

MASTER = r"""
import os, signal, subprocess, sys, time

delay, keep_old, applies_while = float(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
workers = [subprocess.Popen(["sleep", "600"])]
def stop(*_):
    for worker in workers:
        worker.kill()
        worker.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
# SIGHUP stays pending until taken here: one sent while a reload is applied is not lost.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
print("ready", flush=True)
while True:
    # Not sigwait: glibc's retries past SIGTERM, whose handler would then never run.
    if signal.sigtimedwait({signal.SIGHUP}, 0.1) is None:
        continue
    if applies_while and not os.path.exists(applies_while):
        continue  # rejected: no new worker, the old one serves on
    time.sleep(delay)
    workers.append(subprocess.Popen(["sleep", "600"]))
    if not keep_old:
        old = workers.pop(0)
        old.kill()
        old.wait()
"""


@contextlib.contextmanager
def stand_in_master(
    tmp_path: Path,
    *,
    delay: float = 0.0,
    keep_old: bool = False,
    applies_while: Path | None = None,
) -> Iterator[Path]:
    """The stand-in master running; yields its pidfile."""
    applies = str(applies_while) if applies_while is not None else ""
    argv = [sys.executable, "-c", MASTER, str(delay), "1" if keep_old else "0", applies]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as master:
        try:
            assert master.stdout is not None and master.stdout.readline() == "ready\n"
            pidfile = tmp_path / "master.pid"
            pidfile.write_text(f"{master.pid}\n")
            yield pidfile
        finally:
            master.terminate()
            master.wait(timeout=10)
