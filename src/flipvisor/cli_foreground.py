"""The commands that run in the foreground until they are stopped: ``run`` (the supervisor) and
``watch`` (the confd side alone). Each holds its signals back until it handles them, and logs
to stderr (journald, a terminal).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EXIT_OK, ConfigError


def _log_to_stderr() -> None:
    """Log lines of the long-running commands, for journald or a terminal."""
    import logging

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe attempt is noise


def run_supervisor(args: argparse.Namespace, path: Path) -> int:
    """``run``: the supervisor of the config file, until it is shut down."""
    from . import signals

    signals.hold()  # until the supervisor handles them (signals.py says why)
    import anyio

    from .config_file import load_config
    from .supervisor import Supervisor

    config = load_config(path)
    _log_to_stderr()
    anyio.run(Supervisor(path, config).run, backend="asyncio")
    return EXIT_OK


def run_watch(args: argparse.Namespace, path: Path) -> int:
    """``watch``: the config's ``watch:`` entries alone, until SIGTERM, SIGINT or SIGQUIT."""
    from . import signals

    signals.hold()  # until watch_main receives them (signals.py says why)
    import anyio

    from .config_file import load_config
    from .watch import watch_main

    config = load_config(path)
    _log_to_stderr()
    if not config.watch:
        raise ConfigError(f"{path}: no `watch:` entries")
    anyio.run(watch_main, config, backend="asyncio")
    return EXIT_OK
