"""The validated value types the config models are built from, and the limits they enforce.

Commands (argv, or a string split like a shell would), environments, paths resolved against the
config file's folder, signals that stop a process, IP addresses and ``host:port`` endpoints,
durations in seconds, counts, program names, a proxy template's extra variables: each rejects what
it cannot mean with a sentence, which the loader (``config_file``) places at its line.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import signal
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from .locate import expand_home

PROGRAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A program names its files in state_dir (logs/<name>.log.<backup>, history/.<name>.json.tmp):
# with this, they fit the 255 bytes a file name holds.
MAX_PROGRAM_NAME = 200
NUL = "\0"  # in no argument, path or environment value that exec or a file system takes


def _split_command(value: Any) -> Any:
    """A command is argv: a list, or a string split like a shell would (never run by one)."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split command string: {exc}") from exc
    if not isinstance(value, list):
        raise ValueError("must be a list of strings (argv) or a string split like a shell would")
    return value


def null_is_empty(value: Any) -> Any:
    """A section left empty (``drain:`` with nothing under it is YAML null) means its defaults,
    as ``readiness:`` or ``proxy:`` left empty mean unset: not "must be a mapping"."""
    return {} if value is None else value


def null_is_no_entries(value: Any) -> Any:
    """A list left empty (``watch:`` with nothing under it) has no entries."""
    return [] if value is None else value


def _nonempty_command(value: list[str]) -> list[str]:
    if not value or not value[0]:
        raise ValueError("must name a program to run")
    for index, argument in enumerate(value):
        if NUL in argument:  # exec would fail at run time, naming no key
            raise ValueError(f"argument {index} holds a NUL character, which no program can get")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    if NUL in str(value):  # no file can be named so; os.stat would raise, not say so
        raise ValueError("a path cannot hold a NUL character")
    base = (info.context or {}).get("base_dir")
    value = expand_home(value)
    if base is not None and not value.is_absolute():
        return Path(base) / value
    return value


def _parse_signal(value: Any) -> Any:
    if isinstance(value, signal.Signals):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value)
        except ValueError as exc:
            raise ValueError(f"unknown signal number {value}") from exc
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return signal.Signals[name]
        except KeyError as exc:
            raise ValueError(f"unknown signal {value!r} (use a name like SIGTERM)") from exc
    raise ValueError("must be a signal name like SIGTERM")


# Signals that do not ask a process to stop: a drain (or a drain_pid) sending one would leave the
# workers holding their requests (frozen, or running on) until the SIGKILL at drain.timeout.
# SIGWINCH and SIGURG are not here although ignored by default: Apache stops gracefully on
# SIGWINCH, and a server may choose either.
NOT_A_STOP_SIGNAL = {
    signal.SIGSTOP: "freezes the process (it cannot be handled)",
    signal.SIGTSTP: "freezes the process unless it handles it (a terminal's Ctrl-Z)",
    signal.SIGTTIN: "freezes the process unless it handles it (a background read of a terminal)",
    signal.SIGTTOU: "freezes the process unless it handles it (a background write to a terminal)",
    signal.SIGCONT: "resumes a frozen process; a running one goes on as before",
    signal.SIGCHLD: "tells a process that a child of its changed state; ignored by default",
}


def _check_stops(value: signal.Signals) -> signal.Signals:
    why = NOT_A_STOP_SIGNAL.get(value)
    if why is not None:
        raise ValueError(
            f"{value.name} does not ask a process to stop: it {why}, so a drain would leave the "
            "processes holding their requests until the SIGKILL at the timeout; use SIGTERM, or "
            "the signal the server stops gracefully on (SIGQUIT for nginx, SIGWINCH for Apache)"
        )
    return value


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc
    if "%" in value:  # a scope id would be rendered into the proxy file verbatim
        raise ValueError(f"{value!r}: IPv6 scope ids are not supported")
    return value


def _check_endpoint(value: str) -> str:
    rest = value.removeprefix("http://").removeprefix("https://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{value!r} is not host:port")
    if not 0 < int(port) < 65536:
        # host:port all right; "not host:port" sent people looking at the wrong part
        raise ValueError(f"{value!r}: the port must be 1..65535 (an address to connect or scrape)")
    return value


# Set by flipvisor for every worker (the contract's environment): a program's `env` cannot
# override them, and a setting that would be ignored is refused instead.
RESERVED_ENV = frozenset(
    {
        "PORT",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
        "FLIPVISOR_PROGRAM",
        "FLIPVISOR_GENERATION",
        "FLIPVISOR_WORKER",
        "FLIPVISOR_STATE_DIR",
        "FLIPVISOR_SUPERVISOR",
    }
)


# Checked one variable at a time (a key's problem is placed at that key), so that `check` names
# every variable of an env that is wrong, not only the first.
def _check_env_name(key: str) -> str:
    if not key or "=" in key or "\0" in key:
        raise ValueError(f"{key!r} is not a variable name (not empty, no '=')")
    if key in RESERVED_ENV:
        raise ValueError("is set by flipvisor for every worker; remove it from env")
    return key


def _check_env_value(text: str) -> str:
    if NUL in text:
        raise ValueError("a value cannot hold a NUL character")
    return text


# What every proxy template gets from the flip (proxy_template.flip_context builds it): a `vars`
# entry of the same name would be overridden, so it is refused instead.
TEMPLATE_CONTEXT = frozenset({"program", "generation", "host", "port", "pids", "upstreams"})
# What a watch entry's template gets (watch_template.template_context builds it).
WATCH_TEMPLATE_CONTEXT = frozenset({"keys", "get"})


def _check_template_vars(value: dict[str, Any]) -> dict[str, Any]:
    for name in value:
        if name in TEMPLATE_CONTEXT:
            raise ValueError(
                f"{name} is set by flipvisor for the template (the promoted generation's); "
                "choose another name"
            )
    return value


def _key_prefix(value: str) -> str:
    """As the keys start: a trailing ``/`` dropped, a leading one kept (``/uswitch`` names
    ``/uswitch/web/port/current``, what a confd reading etcd with that prefix asks for; it was
    once dropped too, and nothing found the keys)."""
    if not value:
        raise ValueError("must not be empty")
    if value.rstrip("/") != value.rstrip("/").strip():
        # A quoting slip (" uswitch", "uswitch /"): the keys would go to " uswitch/web/...",
        # which no confd reading "uswitch" finds, and nothing would say why.
        raise ValueError(f"{value!r} has whitespace at its start or end; remove it")
    if any(not char.isprintable() for char in value):
        raise ValueError(
            f"{value!r} holds a character that does not print (a control character or an "
            "invisible space); a key prefix is one printable line"
        )
    prefix = value.rstrip("/")
    if not prefix:
        raise ValueError(
            f"{value!r} names no folder: give one for flipvisor's keys (such as uswitch or "
            "/uswitch); the keys are <prefix>/<program>/..."
        )
    return prefix


Command = Annotated[list[str], BeforeValidator(_split_command), AfterValidator(_nonempty_command)]
Env = Annotated[
    dict[
        Annotated[str, AfterValidator(_check_env_name)],
        Annotated[str, AfterValidator(_check_env_value)],
    ],
    BeforeValidator(null_is_empty),
]
RelPath = Annotated[Path, AfterValidator(_resolve_path)]
# A signal that stops a process (drain.signal, drain_pid.signal).
Signal = Annotated[signal.Signals, BeforeValidator(_parse_signal), AfterValidator(_check_stops)]
Host = Annotated[str, AfterValidator(_check_host)]
Endpoint = Annotated[str, AfterValidator(_check_endpoint)]
KeyPrefix = Annotated[str, AfterValidator(_key_prefix)]  # registry.prefix
# Extra template variables (the listen port, a server_name...), besides the flip's context.
TemplateVars = Annotated[
    dict[str, str | int | float | bool],
    BeforeValidator(null_is_empty),
    AfterValidator(_check_template_vars),
]

# The longest duration a timeout, delay, interval or window may name: more than any drain, probe
# or proxy reload needs, and `1.0e+300` (finite, so allowed before) is a typo, not a wish.
MAX_SECONDS = 24 * 3600.0
# rollback_window keeps a replaced generation warm for a rollback: over a weekend, say.
MAX_ROLLBACK_WINDOW = 7 * 24 * 3600.0


def _at_most(limit: float, words: str) -> AfterValidator:
    def check(value: float) -> float:
        if value > limit:
            raise ValueError(f"must be at most {limit:g} seconds ({words})")
        return value

    return AfterValidator(check)


# Strict: YAML's `true` must not silently become 1 (lax pydantic accepts bools as numbers).
# Finite: `.inf` (or `1.0e+400`) would make a drain, a probe or a stop wait forever.
Seconds = Annotated[
    float, Field(gt=0, strict=True, allow_inf_nan=False), _at_most(MAX_SECONDS, "one day")
]
SecondsOrZero = Annotated[
    float, Field(ge=0, strict=True, allow_inf_nan=False), _at_most(MAX_SECONDS, "one day")
]
KeepSeconds = Annotated[
    float,
    Field(ge=0, strict=True, allow_inf_nan=False),
    _at_most(MAX_ROLLBACK_WINDOW, "one week"),
]
Count = Annotated[int, Field(strict=True)]


def _check_program_name(value: str) -> str:
    if not PROGRAM_NAME_RE.fullmatch(value):
        raise ValueError(
            "a program name starts with a letter or digit and holds only letters, digits, "
            "'_', '.', '-'"
        )
    if len(value) > MAX_PROGRAM_NAME:
        raise ValueError(
            f"a program name is at most {MAX_PROGRAM_NAME} characters (it names the program's "
            f"log and history files), not {len(value)}"
        )
    return value


ProgramName = Annotated[str, AfterValidator(_check_program_name)]
