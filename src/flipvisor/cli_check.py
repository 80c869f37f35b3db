"""``flipvisor check``: the config file validated, then checked on this host, every problem at
its line in the file's order, as text or as one JSON document (exit 2 for any error)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_output import print_error, print_json
from .errors import EXIT_OK, EXIT_USAGE, ConfigError
from .printable import count, one_line

if TYPE_CHECKING:
    from .config import Config
    from .config_file import ConfigFile
    from .problems import Problem


def check(args: argparse.Namespace, path: Path) -> int:
    """Validate the file at ``path``, then check it on this host; exit 2 for any error."""
    from .config_file import load_config_file
    from .problems import in_file_order

    as_json = getattr(args, "json", False)
    try:
        parsed = load_config_file(path)
    except ConfigError as exc:  # a key is invalid: nothing to check on this host
        return _check_failed(args, exc, [])
    errors, warnings = _errors_and_warnings(parsed, path)
    if errors:
        header = (
            f"invalid config file {path}:"
            if parsed.problems
            else f"{path} is valid, but would not work on this host:"
        )
        # In text, one list in the file's order, the warnings marked; --json keeps them apart.
        listed = errors if as_json else in_file_order([*errors, *warnings])
        return _check_failed(args, ConfigError(header, [str(p) for p in listed]), warnings)
    return _check_passed(args, path, parsed.config, warnings)


def _errors_and_warnings(parsed: ConfigFile, path: Path) -> tuple[list[Problem], list[Problem]]:
    """Every error and every warning of a file whose keys are valid, each list in the file's
    order: the file's own, those of this host, and the warnings of placeholders, watches and a
    drain by SIGKILL."""
    from .config_consistency import sigkill_warnings, watch_warnings
    from .placeholders import placeholder_warnings
    from .preflight import host_problems
    from .problems import in_file_order

    # Host checks need valid keys only: a file with two programs on one fixed port is checked on
    # this host too, and every problem is listed at its line, from the top of the file down.
    on_host = [
        parsed.problem(found.loc, found.message, warning=found.warning)
        for found in host_problems(parsed.config, path)
    ]
    errors = in_file_order([*parsed.problems, *(p for p in on_host if not p.warning)])
    warnings = in_file_order(
        [
            *placeholder_warnings(parsed),
            *watch_warnings(parsed),
            *sigkill_warnings(parsed),
            *(p for p in on_host if p.warning),
        ]
    )
    return errors, warnings


def _check_passed(
    args: argparse.Namespace, path: Path, config: Config, warnings: list[Problem]
) -> int:
    """``check``'s success: what the file holds, and its warnings (on stderr, or in the JSON
    document)."""
    if getattr(args, "json", False):
        print_json(
            {
                "ok": True,
                "exit_code": EXIT_OK,
                "programs": sorted(config.programs),
                "warnings": [str(warning) for warning in warnings],
            }
        )
        return EXIT_OK
    for warning in warnings:
        print_error(str(warning))
    counts = [count(len(config.programs), "program"), count(len(config.watch), "watch")]
    if warnings:
        counts.append(count(len(warnings), "warning"))
    print(f"{one_line(str(path))}: ok ({', '.join(counts)})")
    return EXIT_OK


def _check_failed(args: argparse.Namespace, exc: ConfigError, warnings: list[Problem]) -> int:
    """``check``'s refusal: on stderr, or as its JSON document (``warnings`` apart from the
    ``problems``, which alone make the exit code 2)."""
    if getattr(args, "json", False):
        print_json(
            {
                "ok": False,
                "exit_code": EXIT_USAGE,
                "error": str(exc).splitlines()[0],
                "problems": exc.problems,
                "warnings": [str(warning) for warning in warnings],
            }
        )
    else:
        print_error(str(exc))
    return EXIT_USAGE
