"""QA pass 7 (an on-call operator's read of today's changes): findings as strict xfail tests.
Each fails today because of the defect its reason names, and passes once it is fixed. Real
processes, nginx and sockets; every wait has a deadline."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until


@pytest.mark.xfail(
    strict=True,
    reason="QA: `flip --timeout S` answers only after the discarded generation's whole "
    "drain.timeout when its worker ignores SIGTERM (over 20 s for --timeout 2)",
)
def test_flip_timeout_bounds_the_flip_when_the_new_generation_ignores_sigterm(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """The contract: `--timeout S` gives up and rolls back after S seconds, and bounds the
    whole flip. A release still starting (it never opens its gate here; in life: a migration,
    a JVM warming up) that does not act on SIGTERM yet is discarded; the flip waits for its
    whole `drain.timeout` (then SIGKILL) before answering, so a deploy job's `--timeout 2`
    returns after more than 20 s. The answer (rolled back, generation 1 serving) is known at
    the deadline; the drain could go on after it, as a promoted flip's `--timeout` answers
    early while the old generation drains."""
    drain = {"delay": 0.1, "timeout": 20}
    readiness = {"http": "/health", "timeout": 30, "interval": 0.1}
    first = {"command": svc_command("--version", "1"), "readiness": readiness, "drain": drain}
    flipvisor.start({"programs": {"web": first}})
    serving = flipvisor.wait_serving("web")
    never = tmp_path / "never-created"
    second = {
        **first,
        "command": svc_command("--version", "2", "--ignore-term", "--serve-after", str(never)),
    }
    flipvisor.write_config({"programs": {"web": second}})

    began = time.monotonic()
    result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=90)
    took = time.monotonic() - began

    assert result.returncode == 1, result.stdout + result.stderr
    assert "--timeout 2s; rolled back" in " ".join(result.stderr.split()), result.stderr
    after = flipvisor.serving("web")
    assert after is not None and after["pids"] == serving["pids"]
    assert took < 2 + 8, f"`flip --timeout 2` answered after {took:.1f}s"


@pytest.mark.xfail(
    strict=True,
    reason="QA: `check` passes metrics.listen `localhost:P` with a program on 127.0.0.1:P; "
    "`run` then makes the program fatal (in use by the supervisor itself)",
)
def test_check_refuses_a_fixed_port_that_metrics_listen_takes_by_name(
    flipvisor: Flipvisor,
) -> None:
    """`metrics.listen: localhost:9100` is accepted (it resolves to an address of this host),
    and the metrics endpoint binds 127.0.0.1:9100. A program on the same port at the default
    host 127.0.0.1 collides with it, but `check` compares addresses only when both are IPs
    (`config_consistency.addresses_overlap`: "a name: only the same name is known"), says ok,
    and `run` makes the program `fatal` with "in use by pid N", N the supervisor."""
    port = free_port()
    flipvisor.write_config(
        {
            "metrics": {"listen": f"localhost:{port}"},
            "programs": {"web": {"command": svc_command(), "socket": {"port": port}}},
        }
    )
    result = flipvisor.cli("check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "programs.web.socket.port" in result.stderr, result.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA: with its state_dir removed, clients advise `kill -HUP N`, but SIGHUP cannot "
    "listen again (the folder is not made again): the supervisor stays unreachable",
)
def test_sighup_as_advised_makes_a_supervisor_whose_state_dir_was_removed_reachable(
    flipvisor: Flipvisor,
) -> None:
    """A state_dir removed whole (`rm -rf` by an operator tidying up, a temp cleaner) takes the
    control socket with it. Every client then says the supervisor runs and that `kill -HUP N`
    makes it listen again; it does not: `ControlServer._listen_again` fails with ENOENT (logged
    as a warning) and keeps the old listener, whose file is gone. Nothing but a restart of the
    supervisor makes it reachable, while the advice says otherwise (the log folder, at least,
    is made again by itself)."""
    process = flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
    shutil.rmtree(flipvisor.state_dir)
    unreachable = flipvisor.cli("status")
    assert unreachable.returncode == 2, unreachable.stdout + unreachable.stderr
    advice = " ".join(unreachable.stderr.split())
    assert f"`kill -HUP {process.pid}` makes it listen there again" in advice, advice

    process.send_signal(signal.SIGHUP)  # as advised

    wait_until(
        lambda: flipvisor.cli("status").returncode == 0,
        timeout=15,
        message="the supervisor to answer after the SIGHUP its clients advised",
    )


@pytest.mark.xfail(
    strict=True,
    reason="QA: a key YAML reads as a date (`2024-01-01:`) is named datetime.date(...) at its "
    "parent's line, with the advice to quote that",
)
def test_a_date_key_is_named_as_written_at_its_own_line(flipvisor: Flipvisor) -> None:
    """The changelog: a key YAML reads as something other than text is named as the file writes
    it, at its own line, with the way out. A date is such a key too (YAML 1.1 timestamps):
    `check` says `programs.web.env."datetime.date(2024, 1, 1)": ... YAML reads
    datetime.date(2024, 1, 1) as no text; quote it: "datetime.date(2024, 1, 1)"`, at the line
    of `env:`; quoting that would set another variable than the one meant."""
    flipvisor.config_path.write_text(
        yaml.safe_dump({"state_dir": str(flipvisor.state_dir)})
        + "programs:\n"
        + "  web:\n"
        + '    command: ["true"]\n'
        + "    env:\n"
        + "      A: b\n"
        + "      2024-01-01: x\n"
    )
    result = flipvisor.cli("check")
    assert result.returncode == 2, result.stdout + result.stderr
    said = result.stderr
    assert "datetime" not in said, said
    assert 'quote it: "2024-01-01"' in said, said
    assert f"{flipvisor.config_path}:7: programs.web.env" in said, said
