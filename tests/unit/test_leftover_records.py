"""Which ``generation/current`` records start-up reads as a killed supervisor's of this host
(``leftover_records.py``): a record is judged only if this host wrote it."""

from __future__ import annotations

import json
import logging

import pytest

from flipvisor.leftover_records import dead_supervisors_record


def test_another_host_s_record_with_a_supervisor_entry_this_version_cannot_read_is_not_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another host (another flipvisor version, say) shares the prefix: its record is not this
    # host's to judge, and a warning at every start would send the operator looking for damage.
    record = json.dumps({"generation": 3, "port": 1, "host": "web-2", "supervisor": {"pid": "x"}})
    with caplog.at_level(logging.WARNING):
        assert dead_supervisors_record("web", record, "web-1") is None
    assert caplog.records == []


def test_this_host_s_record_flipvisor_did_not_write_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = json.dumps({"generation": 3, "port": 1, "host": "web-1", "supervisor": {"pid": "x"}})
    with caplog.at_level(logging.WARNING):
        assert dead_supervisors_record("web", record, "web-1") is None
    assert "not a record flipvisor wrote" in caplog.text
