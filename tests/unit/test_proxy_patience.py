"""The reason a first start's proxy attempt failed, compared without what differs every time."""

from __future__ import annotations

from flipvisor.proxy_patience import same_reason

HEAD = "proxy reload failed: `nginx -s reload` exited with status 1: "


def attempt(at: str, pid: int, line: str) -> str:
    return (
        f"{HEAD}{at} [notice] {pid}#{pid}: signal process started\n{at} [error] {pid}#{pid}: {line}"
    )


def test_the_same_failure_by_another_nginx_process_later_is_the_same_reason() -> None:
    missing = 'open() "/run/nginx.pid" failed (2: No such file or directory)'
    first = attempt("2026/12/02 06:57:36", 24800, missing)
    later = attempt("2026/12/02 07:57:36", 31002, missing)
    assert first != later and same_reason(first) == same_reason(later)
    assert same_reason(first).endswith(f"[error] {missing}")


def test_another_failure_or_level_is_another_reason() -> None:
    at = "2026/12/02 06:57:36"
    missing = attempt(at, 1, 'open() "/run/nginx.pid" failed (2: No such file or directory)')
    empty = attempt(at, 1, 'invalid PID number "" in "/run/nginx.pid"')
    stale = attempt(at, 1, "kill(99999, 1) failed (3: No such process)")
    assert len({same_reason(missing), same_reason(empty), same_reason(stale)}) == 3
    error = f"{HEAD}{at} [error] 7#7: kill(99999, 1) failed (3: No such process)"
    alert = f"{HEAD}{at} [alert] 7#7: kill(99999, 1) failed (3: No such process)"
    assert same_reason(error) != same_reason(alert)
