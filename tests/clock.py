"""A simulated wall-clock step, for the tests of what must survive one; and a simulated stretch
of the event loop's clock, for the tests of what counts time served (``step_loop_clock``).

The machine's clock is shared, so a test cannot step it (settimeofday, NTP's or chrony's
makestep). What a step does to the process start times flipvisor reads is simple, though: the
kernel derives the boot time in ``/proc/stat`` from the wall clock, so every start time in
seconds (boot time plus start tick) moves with it, and start ticks do not. ``step_clock`` shifts
``starttime``'s boot-time read the same way, in this process only: the code under test runs
in-process (a killed supervisor's record and workers are real, the next run's checks are
called directly).
"""

from __future__ import annotations

import pytest

from flipvisor import lasting, starttime


def step_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """From now on (until the test ends), every start time in seconds this process reads is
    ``seconds`` off, as after the wall clock was stepped by ``seconds``."""
    before = starttime._boot_time  # a step already simulated adds up
    monkeypatch.setattr(starttime, "_boot_time", lambda: before() + seconds)


def step_loop_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """From now on (until the test ends), the event-loop clock the restart pauses read
    (``lasting.RestartPause``: whether what ended served long enough to start afresh) is
    ``seconds`` ahead, as after serving ``seconds`` more without waiting them."""
    before = lasting._now  # a step already simulated adds up
    monkeypatch.setattr(lasting, "_now", lambda: before() + seconds)
