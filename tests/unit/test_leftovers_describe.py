"""How leftovers are named in events, `status` and the drain's log lines."""

from __future__ import annotations

from flipvisor.leftovers import Leftovers
from flipvisor.starttime import Recorded


def process(pid: int) -> Recorded:
    return Recorded(pid, started=1.0)


def test_what_the_record_names_is_told_apart_from_what_was_found_by_environment() -> None:
    """The workers a record names serve its generation's port; those found by their environment
    (a flip's generation not yet promoted, what the workers started) may be of any generation:
    they were described as if they all served on the record's port."""
    recorded = Leftovers("web", 3, 43819, (process(479),), record="{}")
    assert recorded.describe() == "generation 3 of a previous supervisor (pid 479) on port 43819"
    both = recorded.with_workers([process(485), process(479)])
    assert both.describe() == (
        "generation 3 of a previous supervisor (pid 479) on port 43819, and pid 485 it left"
    )
    assert [w.pid for w in both.workers] == [479, 485]
    # Found by their environment alone: no generation, no port claimed for them.
    found = Leftovers("web", None, None, ()).with_workers([process(485), process(486)])
    assert found.describe() == "what a previous supervisor left (pid 485, 486)"
