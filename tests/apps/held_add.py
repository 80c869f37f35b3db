"""``held_add.py PROGRAM GATE HELD ARGS...``: ``flipvisor ARGS`` whose reloads add ``PROGRAM``
only once the file ``GATE`` exists, having created ``HELD`` when they reach it.

A reload checks for a shutdown once, then adds the programs the file gained one after another,
each taking a few turns of the event loop: a shutdown that begins meanwhile lists the programs
before the last ones are added. Those turns are too few for a test to aim a signal at; this hold
widens them for as long as the test needs. Nothing else of the supervisor is changed (the start-up
adds the configured programs unheld).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio

from flipvisor import cli
from flipvisor.program import Program
from flipvisor.supervisor import Supervisor

GATE_POLL = 0.02
# Longer than any test waits with the gate closed; the shutdown's end cancels the hold anyway.
HOLD_LIMIT = 120.0

held_program, gate, held = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
add_program = Supervisor._add_program


async def _add_program_held(self: Supervisor, name: str, program_config: Any) -> Program:
    if name == held_program and self._programs_added.is_set():
        await anyio.Path(held).touch()
        with anyio.move_on_after(HOLD_LIMIT):
            # Another process opens the gate: nothing in this one to wait on but the file.
            while not await anyio.Path(gate).exists():  # noqa: ASYNC110
                await anyio.sleep(GATE_POLL)
    return await add_program(self, name, program_config)


Supervisor._add_program = _add_program_held  # type: ignore[method-assign]
cli.main(sys.argv[4:])
