"""The human status table: a row per generation; notes for flips in progress and fatal programs."""

from __future__ import annotations

import time

import pytest

from flipvisor.display import COMMAND_WIDTH, FlipProgress, keeper_line, print_status, status_rows

NOW = 1_800_000_000.0


def _program(name: str, state: str = "running", **extra: object) -> dict[str, object]:
    program: dict[str, object] = {
        "name": name,
        "state": state,
        "restarts": 0,
        "fatal_reason": None,
        "flip": None,
        "generations": [
            {
                "generation": 2,
                "state": "serving",
                "port": 41000,
                "pids": [11, 12],
                "uptime": 75.0,
                "restarts": 1,
                "last_exit": {
                    "worker": 0,
                    "pid": 10,
                    "reason": "killed by SIGKILL",
                    "time": NOW - 12,
                },
                "command": "python3 app.py --port '{port}'",
                "fingerprint": "3f2a9c1b7d4e",
                "warm_until": None,
            },
        ],
    }
    program.update(extra)
    return program


def test_rows_show_generation_ports_pids_uptime_and_last_exit() -> None:
    rows, notes = status_rows({"programs": [_program("web")]}, NOW)
    assert rows == [
        [
            "web",
            "running",
            "2",
            "serving",
            "3f2a9c1b7d4e",
            "41000",
            "11,12",
            "1m15s",
            "1",
            "w0 killed by SIGKILL, 12s ago",
            "python3 app.py --port '{port}'",
        ]
    ]
    assert notes == []


def test_program_columns_only_on_its_first_generation_row() -> None:
    program = _program("web")
    warm = {
        "generation": 1,
        "state": "ready",
        "port": 40000,
        "pids": [9],
        "uptime": 3700.0,
        "restarts": 0,
        "last_exit": None,
    }
    program["generations"] = [*program["generations"], warm]  # type: ignore[misc]
    rows, _ = status_rows({"programs": [program]}, NOW)
    assert rows[1][:2] == ["", ""] and rows[1][2:4] == ["1", "ready"] and rows[1][7] == "1h01m"


def test_notes_say_what_a_flip_is_doing_and_what_to_do_about_fatal() -> None:
    flipping = _program(
        "web", flip={"kind": "flip", "generation": 3, "step": "probe", "elapsed": 2.14}
    )
    fatal = _program(
        "api",
        state="fatal",
        generations=[],
        fatal_reason="worker 0 of generation 1 exit status 3; more than 5 restarts",
    )
    rows, notes = status_rows({"programs": [flipping, fatal]}, NOW)
    assert rows[1] == ["api", "fatal", "-", "-", "-", "-", "-", "-", "0", "", ""]
    assert notes == [
        "web: flip to generation 3 in progress: probe (2.1s)",
        "api: fatal: worker 0 of generation 1 exit status 3; more than 5 restarts; "
        "`flipvisor logs api` shows its output; `flipvisor start api` tries again",
    ]


def test_a_fatal_reason_that_names_start_is_its_only_next_step() -> None:
    reason = "generation 1 of api failed: in use; free it, then `flipvisor start api`"
    fatal = _program("api", state="fatal", generations=[], fatal_reason=reason)
    _, notes = status_rows({"programs": [fatal]}, NOW)
    assert notes == [f"api: fatal: {reason}"]


def test_printed_table_is_aligned_and_uncoloured_when_piped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_status({"programs": [_program("web"), _program("a-much-longer-name")]})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "PROGRAM",
        "STATE",
        "GEN",
        "GEN",
        "STATE",
        "CONFIG",
        "PORT",
        "PIDS",
        "UPTIME",
        "RESTARTS",
        "LAST",
        "EXIT",
        "COMMAND",
    ]
    assert "\x1b[" not in "".join(lines)
    assert lines[1].index("running") == lines[2].index("running") == lines[0].index("STATE")


def test_a_flip_reported_as_json_never_loads_rich() -> None:
    """``flip --json`` runs in scripts and deploy pipelines: importing rich would add ~25 ms of CPU
    to every deploy, competing with the traffic it is meant not to disturb."""
    from tests.reaping import run_script

    loaded = run_script(
        "import json, sys\n"
        "from flipvisor.display import FlipProgress\n"
        "progress = FlipProgress(enabled=False)\n"
        "with progress:\n"
        "    progress.update({'step': 'probe', 'status': 'ok', 'detail': '', 'duration': 0.1})\n"
        "print(json.dumps('rich' in sys.modules))\n"
    )
    assert loaded is False


def test_without_a_terminal_a_step_is_printed_when_it_starts_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A CI log or a pipe has no spinner: a 30 s probe must not be 30 s of silence.
    progress = FlipProgress(enabled=True)
    with progress:
        progress.update(
            {"step": "probe", "status": "running", "detail": "GET /health", "duration": None}
        )
        assert "probe" in capsys.readouterr().err  # before the step finished
        progress.update({"step": "probe", "status": "ok", "detail": "GET /health", "duration": 2})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ probe") and "2.000s" in lines[0]


def test_a_flip_that_succeeded_with_a_warning_says_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = {"program": "web", "generation": 2, "ok": True, "duration": 2.0, "output": []}
    progress = FlipProgress(enabled=True)
    with progress:
        progress.summary({**report, "warning": "generation 1 is still draining"})
    err = capsys.readouterr().err
    assert "web: generation 2 serving" in err and "generation 1 is still draining" in err
    with progress:
        progress.summary({**report, "warning": None})
    assert "draining" not in capsys.readouterr().err


@pytest.mark.parametrize(("abandoned", "says"), [(True, "called off"), (False, "failed")])
def test_a_flip_a_stop_called_off_is_not_said_to_have_failed(
    capsys: pytest.CaptureFixture[str], abandoned: bool, says: str
) -> None:
    """A flip rolled back because it was stopped is an abandoned flip, not a failed one (QA
    11): its summary and the step the stop cut short say so."""
    report = {"program": "web", "kind": "flip", "generation": 2, "ok": False, "output": []}
    progress = FlipProgress(enabled=True)
    with progress:
        status = "cancelled" if abandoned else "failed"
        progress.update({"step": "probe", "status": status, "detail": "", "duration": 1.0})
        progress.summary({**report, "abandoned": abandoned})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("⊘ probe" if abandoned else "✗ probe"), lines
    assert lines[1] == f"web: flip {says}", lines


def test_a_removed_program_still_draining_says_so() -> None:
    draining = _program("old", state="stopped", removing=True)
    draining["generations"][0]["state"] = "draining"  # type: ignore[index]
    rows, notes = status_rows({"programs": [_program("web"), draining]}, NOW)
    assert rows[1][:4] == ["old", "stopped", "2", "draining"]
    assert notes == ["old: removed from the config; listed until its workers are gone"]


@pytest.mark.parametrize(
    ("step", "says"),
    [
        ("probe", "drained once the registry names a generation of this supervisor"),
        ("drain", "being drained"),
    ],
)
def test_a_killed_supervisors_workers_are_said_to_drain_when_they_do(step: str, says: str) -> None:
    flip = {"kind": "start", "generation": 1, "step": step, "elapsed": 1.0}
    left = {"generation": 3, "port": 40000, "pids": [7]}
    _, notes = status_rows({"programs": [_program("web", flip=flip, leftovers=left)]}, NOW)
    (note,) = [note for note in notes if "killed supervisor" in note]
    assert note.startswith("web: workers a killed supervisor left (pid 7, port 40000): "), note
    assert says in note and ("registry" in note) == (step != "drain"), note


def _generations(*gens: dict[str, object]) -> dict[str, object]:
    base = _program("web")["generations"][0]  # type: ignore[index]
    return _program("web", generations=[{**base, **gen} for gen in gens])


def test_a_warm_generation_says_how_long_it_is_kept_and_the_serving_one_its_config() -> None:
    """After a rollback: generation 1 serves the old command again, generation 2 is warm."""
    program = _generations(
        {
            "generation": 1,
            "command": "app --version 1",
            "fingerprint": "aaaaaaaaaaaa",
        },
        {
            "generation": 2,
            "state": "ready",
            "command": "app --version 2",
            "fingerprint": "bbbbbbbbbbbb",
            "warm_until": NOW + 252.4,
        },
    )
    rows, notes = status_rows({"programs": [program]}, NOW)
    assert [(r[2], r[3], r[4], r[10]) for r in rows] == [
        ("1", "serving", "aaaaaaaaaaaa", "app --version 1"),
        ("2", "ready (warm 4m12s)", "bbbbbbbbbbbb", "app --version 2"),
    ]
    assert notes == []  # the table of every program: the cell says it
    _, notes = status_rows({"programs": [program]}, NOW, one_program=True)
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW + 252.4))
    assert notes == [f"web: generation 2 is kept warm for a rollback until {until}, then drained"]


def test_a_warm_generation_past_its_time_is_shown_at_zero_not_negative() -> None:
    program = _generations({"state": "ready", "warm_until": NOW - 0.5})
    rows, _ = status_rows({"programs": [program]}, NOW)
    assert rows[0][3] == "ready (warm 0s)"


LONG = "/opt/python/3.11/bin/python3 /srv/releases/2026-12-01-a1b2c3/app.py --workers 4"


def test_a_long_command_is_cut_to_its_name_and_the_end_of_its_arguments() -> None:
    rows, _ = status_rows({"programs": [_generations({"command": LONG})]}, NOW)
    assert rows[0][10] == "python3 …12-01-a1b2c3/app.py --workers 4"
    assert len(rows[0][10]) == COMMAND_WIDTH


def test_status_of_one_program_shows_its_command_whole(capsys: pytest.CaptureFixture[str]) -> None:
    print_status({"programs": [_generations({"command": LONG})]}, one_program=True)
    assert LONG in capsys.readouterr().out
    print_status({"programs": [_generations({"command": LONG})]})
    assert LONG not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("sleep infinity", "sleep infinity"),  # short: as is
        ("app 'a b'", "app 'a b'"),
        ("/usr/local/bin/gunicorn app:wsgi -b fd://3", "gunicorn app:wsgi -b fd://3"),
        ("/opt/bin/server --port 8000", "/opt/bin/server --port 8000"),  # fits whole
        (
            "/opt/bin/" + "x" * 30 + " --port 8000",  # a long name: its start, the end
            "/opt/bin/xxxx…xxxxxxxxxxxxxx --port 8000",
        ),
        (
            "'/opt/my app/bin/server' --port 8000 --workers 4 --log-level info",  # quoted
            "'/opt/my app/…workers 4 --log-level info",
        ),
    ],
)
def test_commands_in_the_table(command: str, shown: str) -> None:
    rows, _ = status_rows({"programs": [_generations({"command": command})]}, NOW)
    assert rows[0][10] == shown and len(shown) <= COMMAND_WIDTH


def test_a_multi_line_command_and_a_worker_s_words_keep_to_their_row(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A YAML block command (``sh -c "echo starting\\nexec sleep 300"``) split its row, its
    second line at column 0 under PROGRAM, like another program (QA finding). Control
    characters in what a worker said (a fatal reason quoting its output) are escaped too."""
    command = "sh -c 'echo starting\nexec sleep 300\n'"
    program = _generations({"command": command})
    program["fatal_reason"] = "worker 0 said \x1b[2J\tgoodbye\r\n"
    for one_program in (False, True):
        print_status({"programs": [program]}, one_program=one_program)
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\r" not in out and "\t" not in out
        rows = [line for line in out.splitlines() if line.startswith("web ")]
        assert len(rows) == 1 and "echo starting\\x0aexec sleep 300\\x0a'" in rows[0]
        assert "worker 0 said \\x1b[2J\\x09goodbye\\x0d\\x0a" in out
        assert not any(line.startswith("exec sleep") for line in out.splitlines())


def test_a_status_from_an_older_supervisor_without_the_new_fields_is_shown() -> None:
    program = _program("web")
    for field in ("command", "fingerprint", "warm_until"):
        del program["generations"][0][field]  # type: ignore[index]
    rows, _ = status_rows({"programs": [program]}, NOW)
    assert (rows[0][3], rows[0][4], rows[0][10]) == ("serving", "-", "-")


def _keeper(pid: int | None = 4321, pipes: int = 5, restarts: int = 0) -> dict[str, object]:
    return {"pid": pid, "pipes": pipes, "restarts": restarts, "disabled": None}


def test_the_output_keeper_is_a_line_below_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    print_status({"programs": [_program("web")], "keeper": _keeper(restarts=2)})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "output keeper: pid 4321, holding 5 pipes, 2 restarts"
    assert len(lines) == 3  # the heading, web's row, the keeper


@pytest.mark.parametrize(
    ("keeper", "line", "colour"),
    [
        (_keeper(pipes=1, restarts=1), "output keeper: pid 4321, holding 1 pipe, 1 restart", None),
        (_keeper(pipes=0), "output keeper: pid 4321, holding 0 pipes, 0 restarts", None),
        (
            _keeper(pid=None, pipes=0, restarts=3),
            "output keeper: not running, starting another (3 restarts): until it runs, a killed "
            "supervisor's workers would die at their next write",
            "yellow",
        ),
        (
            _keeper(pid=None, pipes=0) | {"disabled": "the supervisor is PID 1"},
            "output keeper: none (the supervisor is PID 1)",
            None,
        ),
    ],
)
def test_what_the_keeper_line_says(
    keeper: dict[str, object], line: str, colour: str | None
) -> None:
    assert keeper_line(keeper) == (line, colour)


def test_a_status_from_a_supervisor_that_does_not_say_has_no_keeper_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert keeper_line(None) is None
    print_status({"programs": [_program("web")]})
    assert "output keeper" not in capsys.readouterr().out


def test_keys_given_up_on_after_conflicts_are_a_line_below_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A write given up on after conflicts in a row with another writer (etcd) is not pending
    any more, but the keys are still not right: said until a write of them lands."""
    registry = {"backend": "etcd", "where": "127.0.0.1:2379", "connected": True, "pending": []}
    print_status({"programs": [_program("web")], "registry": registry | {"conflicting": ["web"]}})
    said = " ".join(capsys.readouterr().out.split())
    assert "registry: keys of web not rewritten: another writer kept changing them" in said
    print_status({"programs": [_program("web")], "registry": registry})  # an older supervisor's
    assert "registry" not in capsys.readouterr().out


def test_a_registry_that_answered_with_a_problem_is_not_called_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """etcd that wants credentials (or an endpoint that is no etcd) answered: status says what
    it said and what to do, not "unreachable" nor "written once it answers" (QA 15)."""
    problem = "etcd at h:2379 requires a user and password; set registry.user and ..."
    registry = {"backend": "etcd", "where": "h:2379", "connected": True, "problem": problem}
    print_status({"programs": [_program("web")], "registry": registry | {"pending": []}})
    said = " ".join(capsys.readouterr().out.split())
    assert f"registry: etcd h:2379 connected: {problem}" in said
    print_status(
        {
            "programs": [_program("web")],
            "registry": registry | {"connected": False, "pending": ["web"]},
        }
    )
    said = " ".join(capsys.readouterr().out.split())
    assert f"not connected: {problem}; keys of web are written once that is fixed" in said
    assert "unreachable" not in said and "once it answers" not in said
