"""A recorded process (``starttime.Recorded``: a PID with its start tick and boot id, or an
older record's start time) reached through a pidfd only while its PID still names it: signalled,
or waited for, never once the PID was reused.
"""

from __future__ import annotations

import logging
import os
import signal

from .starttime import Recorded, pid_still_names, recorded_now

log = logging.getLogger(__name__)


def pidfd_if_still(process: Recorded) -> int | None:
    """A pidfd for ``process.pid`` if it still names the recorded process (by its start tick and
    boot id, or for an older record its start time: ``starttime.pid_still_names``); the caller
    closes it. None if it is gone, or the PID now names another process.

    The pidfd is opened *before* the identity is compared, so the check and whatever is done
    with the pidfd concern the same process even if the PID is recycled in between.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (OSError, OverflowError):  # gone already, or no PID at all (from a garbage record)
        return None
    if not pid_still_names(process):
        now = recorded_now(process.pid)
        if now is not None and process.identity is not None and now.identity == process.identity:
            # The same process, exited: a zombie its parent has not reaped yet.
            log.info("pid=%d has exited (%s), not reaped yet", process.pid, process.describe())
        elif now is not None:
            log.info(
                "pid=%d is another process now (%s, not %s): the PID was reused",
                process.pid,
                now.describe() if process.identity is not None else f"started {now.started:.2f}",
                process.describe(),
            )
        os.close(pidfd)
        return None
    return pidfd


def signal_verified(process: Recorded, sig: int) -> bool:
    """Signal ``process.pid`` only if it still names the recorded process; False when it does
    not (or it is gone)."""
    pidfd = pidfd_if_still(process)
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True
