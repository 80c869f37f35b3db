"""Typed, frozen config models and the YAML loader that reports every problem with its location.

Loading is pure: no logging, no exits. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .errors import ConfigError
from .locate import (
    DEFAULT_STATE_DIR,
    describe_yaml_error,
    expand_home,
    read_config_text,
    socket_path,
)
from .problems import LineIndex, Problem, in_file_order, load_yaml, locate_problem, nearest_line

PROGRAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A program names its files in state_dir (logs/<name>.log.<backup>, history/.<name>.json.tmp):
# with this, they fit the 255 bytes a file name holds.
MAX_PROGRAM_NAME = 200
# The bytes of a unix socket's path (sun_path without its NUL): the control and notify sockets.
MAX_SOCKET_PATH = 107
# Digits of a generation number (restarting at 1 with the supervisor) allowed for in a notify
# socket's name (``<program>-<N>.sock``).
GENERATION_DIGITS = 4


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


def _null_is_empty(value: Any) -> Any:
    """A section left empty (``drain:`` with nothing under it is YAML null) means its defaults,
    as ``readiness:`` or ``proxy:`` left empty mean unset: not "must be a mapping"."""
    return {} if value is None else value


def _null_is_no_entries(value: Any) -> Any:
    return [] if value is None else value


def _nonempty_command(value: list[str]) -> list[str]:
    if not value or not value[0]:
        raise ValueError("must name a program to run")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
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
    }
)


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for key, text in value.items():
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"{key!r} is not a variable name (not empty, no '=')")
        if "\0" in text:
            raise ValueError(f"{key}: a value cannot hold a NUL character")
        if key in RESERVED_ENV:
            raise ValueError(f"{key} is set by flipvisor for every worker; remove it from env")
    return value


# What every proxy template gets from the flip (proxy.flip_context builds it): a `vars` entry
# of the same name would be overridden, so it is refused instead.
TEMPLATE_CONTEXT = frozenset({"program", "generation", "host", "port", "pids", "upstreams"})


def _check_template_vars(value: dict[str, Any]) -> dict[str, Any]:
    for name in value:
        if name in TEMPLATE_CONTEXT:
            raise ValueError(
                f"{name} is set by flipvisor for the template (the promoted generation's); "
                "choose another name"
            )
    return value


Command = Annotated[list[str], BeforeValidator(_split_command), AfterValidator(_nonempty_command)]
Env = Annotated[dict[str, str], BeforeValidator(_null_is_empty), AfterValidator(_check_env)]
RelPath = Annotated[Path, AfterValidator(_resolve_path)]
Signal = Annotated[signal.Signals, BeforeValidator(_parse_signal)]
Host = Annotated[str, AfterValidator(_check_host)]
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class SocketConfig(_Model):
    """The generation's listening socket; port 0 gives each generation a fresh port."""

    host: Host = "127.0.0.1"
    port: Annotated[Count, Field(ge=0, le=65535)] = 0
    backlog: Annotated[Count, Field(gt=0)] = 1024


class ReadinessConfig(_Model):
    """How a new generation proves it is ready: exactly one of ``http``, ``exec``, ``notify``."""

    http: str | None = None
    exec: Command | None = None
    notify: bool | None = None
    timeout: Seconds = 30.0
    interval: Seconds = 0.1

    @model_validator(mode="after")
    def _exactly_one(self) -> ReadinessConfig:
        chosen = [name for name in ("http", "exec", "notify") if getattr(self, name)]
        if len(chosen) != 1:
            raise ValueError("needs exactly one of http, exec, notify: true")
        if self.http is not None and not self.http.startswith("/"):
            raise ValueError("http: must be a path starting with '/'")
        return self


class DrainConfig(_Model):
    """How an old generation stops: wait ``delay``, send ``signal``, SIGKILL after ``timeout``."""

    delay: SecondsOrZero = 0.5
    signal: Signal = signal.SIGTERM
    timeout: Seconds = 10.0


class RestartConfig(_Model):
    """When a crashed worker is restarted, and when the program is declared fatal."""

    policy: Literal["always", "on-failure", "never"] = "always"
    max_restarts: Annotated[Count, Field(ge=0)] = 5
    window: Seconds = 60.0


class ProxyConfig(_Model):
    """The built-in confd step of a flip: render, check, reload, wait for the old proxy workers."""

    template: RelPath
    dest: RelPath
    check_cmd: Command | None = None
    reload_cmd: Command | None = None
    pidfile: RelPath | None = None
    timeout: Seconds = 30.0
    # Extra template variables (the listen port, a server_name...), besides the flip's context.
    vars: Annotated[
        dict[str, str | int | float | bool],
        BeforeValidator(_null_is_empty),
        AfterValidator(_check_template_vars),
    ] = Field(default_factory=dict)


class ProgramConfig(_Model):
    """One supervised program: ``numprocs`` workers per generation sharing one socket."""

    command: Command
    numprocs: Annotated[Count, Field(ge=1, le=1024)] = 1
    cwd: RelPath | None = None
    env: Env = Field(default_factory=dict)
    autostart: bool = True
    socket: Annotated[SocketConfig, BeforeValidator(_null_is_empty)] = SocketConfig()
    readiness: ReadinessConfig | None = None
    drain: Annotated[DrainConfig, BeforeValidator(_null_is_empty)] = DrainConfig()
    restart: Annotated[RestartConfig, BeforeValidator(_null_is_empty)] = RestartConfig()
    proxy: ProxyConfig | None = None
    rollback_window: KeepSeconds = 0.0

    @model_validator(mode="after")
    def _what_a_fixed_port_allows(self) -> ProgramConfig:
        # A fixed port is one socket that both generations accept from during a flip: a probe
        # over TCP could be answered by the old one and promote a broken generation (sd_notify
        # comes from the new workers themselves), and a replaced generation kept for a rollback
        # would go on serving.
        readiness = self.readiness
        if self.socket.port != 0 and readiness is not None and not readiness.notify:
            raise ValueError(
                "socket: a fixed port is shared by the old and the new generation during a flip, "
                "so an http or exec probe could be answered by the old one; use port 0 (the proxy "
                "follows each generation's port) or readiness: {notify: true}"
            )
        if self.socket.port != 0 and self.rollback_window > 0:
            raise ValueError(
                "socket: a generation on a fixed port cannot be taken out of traffic, so the one "
                "that rollback_window keeps would go on serving; use port 0 with rollback_window"
            )
        return self


class RegistryConfig(_Model):
    """Where promotions are recorded: ``local`` (a file in state_dir) or ``etcd``."""

    backend: Literal["local", "etcd"] = "local"
    endpoints: list[Annotated[str, AfterValidator(_check_endpoint)]] = Field(
        default_factory=lambda: ["127.0.0.1:2379"], min_length=1
    )
    prefix: str = "flipvisor"
    timeout: Seconds = 5.0
    ca: RelPath | None = None
    cert: RelPath | None = None
    key: RelPath | None = None
    user: str | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _pairs(self) -> RegistryConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        if not self.prefix.strip("/"):
            raise ValueError("prefix: must not be empty")
        return self


class DrainPidConfig(_Model):
    """``drain_pid`` of a watch: stop the process a key names, if the watcher saw it serving."""

    signal: Signal = signal.SIGTERM
    timeout: Seconds = 10.0


class WatchConfig(_Model):
    """One entry of the top-level ``watch:`` list (the built-in confd)."""

    keys: Annotated[list[str], Field(min_length=1)]
    template: RelPath | None = None
    dest: RelPath | None = None
    check_cmd: Command | None = None
    reload_cmd: Command | None = None
    # As proxy.pidfile: after a reload, wait until the proxy's old workers are gone, so a
    # drain_pid waits on evidence rather than a fixed grace.
    pidfile: RelPath | None = None
    drain_pid: DrainPidConfig | None = None

    @model_validator(mode="after")
    def _one_action(self) -> WatchConfig:
        renders = self.template is not None or self.dest is not None
        if renders and (self.template is None or self.dest is None):
            raise ValueError("template and dest go together")
        if renders == (self.drain_pid is not None):
            raise ValueError("needs either template + dest, or drain_pid")
        if self.pidfile is not None and not renders:
            raise ValueError("pidfile: goes with a template entry (it waits for its reloads)")
        if self.drain_pid is not None and (
            len(self.keys) != 1 or not self.keys[0].endswith("/pid/previous")
        ):
            raise ValueError("drain_pid: watches exactly one key <prefix>/<program>/pid/previous")
        return self


class LogsConfig(_Model):
    """Captured worker output: one file per program, rotated by size."""

    max_bytes: Annotated[Count, Field(ge=1024)] = 10 * 1024 * 1024
    backups: Annotated[Count, Field(ge=0, le=100)] = 5


class MetricsConfig(_Model):
    """An optional Prometheus endpoint."""

    listen: Annotated[str, AfterValidator(_check_endpoint)]


class Config(_Model):
    """The whole config file."""

    state_dir: RelPath = DEFAULT_STATE_DIR
    registry: Annotated[RegistryConfig, BeforeValidator(_null_is_empty)] = RegistryConfig()
    logs: Annotated[LogsConfig, BeforeValidator(_null_is_empty)] = LogsConfig()
    metrics: MetricsConfig | None = None
    programs: Annotated[dict[ProgramName, ProgramConfig], BeforeValidator(_null_is_empty)] = Field(
        default_factory=dict
    )
    watch: Annotated[list[WatchConfig], BeforeValidator(_null_is_no_entries)] = Field(
        default_factory=list
    )

    @property
    def socket_path(self) -> Path:
        return socket_path(self.state_dir)


@dataclass(frozen=True)
class ConfigFile:
    """A config file whose keys are all valid, with what is wrong across them (two programs on
    one fixed port...: ``problems``, in the file's order) and its line index, to name the line
    of a problem found later (``flipvisor check``'s host checks)."""

    path: Path
    config: Config
    lines: LineIndex
    problems: list[Problem]

    def problem(self, loc: Sequence[str], message: str, *, warning: bool = False) -> Problem:
        """``message`` about ``loc``, at its line in this file."""
        return locate_problem(self.path, self.lines, loc, message, warning=warning)


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at ``path``.

    Raises:
        ConfigError: the file is unreadable, not UTF-8, not YAML, or invalid; ``problems``
            lists every problem as ``file:line: dotted.location: what is wrong``, in the file's
            order.
    """
    return parse_config(read_config_text(path), path)


def parse_config(text: str, path: Path) -> Config:
    """Validate YAML ``text`` as the config file at ``path`` (used for relative paths and messages).

    Raises:
        ConfigError: not YAML, or invalid.
    """
    parsed = parse_config_file(text, path)
    if parsed.problems:
        raise ConfigError(f"invalid config file {path}:", [str(p) for p in parsed.problems])
    return parsed.config


def load_config_file(path: Path) -> ConfigFile:
    """Read and parse the config file at ``path``, keeping what is wrong across its keys.

    Raises:
        ConfigError: the file is unreadable, not UTF-8, not YAML, or a key is invalid.
    """
    return parse_config_file(read_config_text(path), path)


def parse_config_file(text: str, path: Path) -> ConfigFile:
    """Validate YAML ``text`` as the config file at ``path``, keeping what is wrong across its
    keys in ``problems``.

    Raises:
        ConfigError: not YAML, or a key is invalid (``problems`` in the file's order).
    """
    try:
        data, lines, duplicates = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(describe_yaml_error(exc, path)) from exc
    if duplicates:
        raise ConfigError(
            f"invalid config file {path}:",
            [str(Problem(path, line, loc, "duplicate key")) for line, loc in duplicates],
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    base_dir = path.resolve().parent
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        found = in_file_order(_describe(error, path, lines) for error in exc.errors())
        raise ConfigError(f"invalid config file {path}:", [str(p) for p in found]) from None
    parsed = ConfigFile(path, config, lines, [])
    across = [
        *_shared_fixed_ports(parsed),
        *_shared_proxy_files(parsed),
        *_long_socket_paths(parsed),
        *_watched_programs(parsed, warnings=False),
    ]
    return replace(parsed, problems=in_file_order(across))


def watch_warnings(parsed: ConfigFile) -> list[Problem]:
    """``check``'s warnings about ``watch:`` entries that act on a program of ``programs:``."""
    return _watched_programs(parsed, warnings=True)


def _watched_programs(parsed: ConfigFile, *, warnings: bool) -> list[Problem]:
    """``watch:`` entries on the keys of a program the same config runs (``warnings``: those
    that are warnings, else the errors).

    A ``drain_pid`` on its ``pid/previous`` is an error with ``rollback_window``: the replaced
    generation is kept running on purpose, and the watcher would kill it (the program then
    goes fatal, and the rollback has nothing to go back to). Without one it is a warning: the
    supervisor drains the replaced generation itself, after its proxy's reload, while the
    watcher's drain waits only for the watch's own templates. A template entry rendering the
    program's keys when the program has no ``proxy:`` is a warning: a flip waits for its
    ``proxy:`` (check, reload, the proxy's old workers gone) before it drains, but not for a
    watch entry's render, check and reload, so a slow check routes to a drained generation.
    """
    config, problems = parsed.config, []
    prefix = config.registry.prefix.strip("/")
    for index, entry in enumerate(config.watch):
        for name, program in config.programs.items():
            folder = f"{prefix}/{name}/"
            if entry.drain_pid is not None and entry.keys[0] == folder + "pid/previous":
                window = program.rollback_window > 0
                if window == warnings:
                    continue
                said = (
                    f"drains programs.{name}'s replaced generations, which the supervisor "
                    "drains itself"
                )
                if window:
                    said += (
                        ": with its rollback_window the generation kept warm for a rollback "
                        "would be killed (and the program go fatal)"
                    )
                else:
                    said += " (after its proxy's reload; this entry waits only for the watch's)"
                problems.append(
                    parsed.problem(
                        ("watch", str(index), "drain_pid"),
                        f"{said}; remove this entry (drain_pid is for services flipvisor does "
                        "not run)",
                        warning=warnings,
                    )
                )
            elif (
                warnings
                and entry.template is not None
                and program.proxy is None
                and any(pattern.startswith(folder) for pattern in entry.keys)
            ):
                problems.append(
                    parsed.problem(
                        ("watch", str(index), "template"),
                        f"renders programs.{name}'s keys, but a flip of {name} does not wait "
                        "for this entry's render, check and reload before it drains the old "
                        f"generation (after drain.delay): give programs.{name} a proxy: "
                        "section instead, which a flip waits for",
                        warning=True,
                    )
                )
    return problems


def _long_socket_paths(parsed: ConfigFile) -> list[Problem]:
    """Unix sockets the supervisor would create in state_dir whose path is too long to bind: the
    control socket (``run`` could not start), a program's notify socket (its flips would fail)."""
    config, problems = parsed.config, []
    control = config.socket_path
    if len(os.fsencode(control)) > MAX_SOCKET_PATH:
        problems.append(
            parsed.problem(
                ("state_dir",),
                f"{config.state_dir} is too long: the control socket {control} would be "
                f"{len(os.fsencode(control))} bytes, and a unix socket's path holds "
                f"{MAX_SOCKET_PATH}; choose a shorter state_dir",
            )
        )
    for name, program in config.programs.items():
        if program.readiness is None or not program.readiness.notify:
            continue
        notify = config.state_dir / "notify" / f"{name}-{'9' * GENERATION_DIGITS}.sock"
        if len(os.fsencode(notify)) > MAX_SOCKET_PATH:
            problems.append(
                parsed.problem(
                    ("programs", name, "readiness", "notify"),
                    f"the notify socket {notify.parent}/{name}-<generation>.sock would be longer "
                    f"than the {MAX_SOCKET_PATH} bytes a unix socket's path holds; choose a "
                    "shorter state_dir or program name",
                )
            )
    return problems


def _shared_fixed_ports(parsed: ConfigFile) -> list[Problem]:
    """Programs given the same fixed port (the same host, or either on a wildcard address).
    Only one could bind it, so the other would fail at every start: said here, for ``check``."""
    problems = []
    taken: dict[int, list[tuple[str, str]]] = {}
    for name, program in parsed.config.programs.items():
        host, port = program.socket.host, program.socket.port
        if port == 0:
            continue
        owner = next(
            (other for other, other_host in taken.get(port, []) if _overlap(host, other_host)), None
        )
        if owner is not None:
            problems.append(
                parsed.problem(
                    ("programs", name, "socket", "port"),
                    f"{host}:{port} is programs.{owner}'s already (each fixed port belongs to one "
                    "program)",
                )
            )
        taken.setdefault(port, []).append((name, host))
    return problems


def _shared_proxy_files(parsed: ConfigFile) -> list[Problem]:
    """Files written by two writers: programs' ``proxy.dest`` and watch entries' ``dest``, however
    spelled (``a/../a/x.conf``, a symlinked folder). Each writer rewrites the whole file for
    itself (a program at every flip, a watch entry at every change of its keys), so the other's
    routing would be lost, and removing a program would leave the file naming a drained port.
    The writer further down the file is the one reported.

    This compares the programs of one file; a reload that removes one program and adds another
    with the same dest (a rename) is a handover between two files, and allowed."""
    config, lines = parsed.config, parsed.lines
    writers: list[tuple[tuple[str, ...], Path]] = [
        (("programs", name, "proxy", "dest"), program.proxy.dest)
        for name, program in config.programs.items()
        if program.proxy is not None
    ]
    writers += [
        (("watch", str(index), "dest"), entry.dest)
        for index, entry in enumerate(config.watch)
        if entry.dest is not None
    ]
    writers.sort(key=lambda writer: nearest_line(writer[0], lines) or 0)
    problems = []
    owners: dict[str, tuple[str, ...]] = {}
    for loc, dest in writers:
        # realpath, not Path.resolve: it never raises (a symlink loop stays as spelled).
        real = os.path.realpath(dest)
        owner = owners.setdefault(real, loc)
        if owner == loc:
            continue
        spelled = str(dest) if str(dest) == real else f"{dest} (that is {real})"
        if owner[0] == loc[0] == "programs":
            why = "each proxy file belongs to one program, which rewrites all of it at every flip"
            fix = "give each program its own dest"
        else:
            why = (
                "a file has one writer: a program rewrites all of it at every flip, a watch entry "
                "at every change of its keys"
            )
            fix = "give each its own dest"
        problems.append(
            parsed.problem(loc, f"{spelled} is {'.'.join(owner)} already ({why}); {fix}")
        )
    return problems


def _overlap(host: str, other: str) -> bool:
    """Whether listening on both addresses (on one port) would collide."""
    wildcard = (
        ipaddress.ip_address(host).is_unspecified or ipaddress.ip_address(other).is_unspecified
    )
    return host == other or wildcard


_FRIENDLY: dict[str, str] = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "path_type": "must be a path",
}


def _describe(error: Any, path: Path, lines: LineIndex) -> Problem:
    loc = tuple(str(part) for part in error["loc"] if not _is_union_tag(part) and part != "[key]")
    kind = error["type"]
    if kind in _FRIENDLY:
        message = _FRIENDLY[kind]
    elif kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(error["ctx"].values()))
        message = f"must be {op} {bound:g}" if isinstance(bound, float) else f"must be {op} {bound}"
    elif kind == "literal_error":
        message = f"must be one of {error['ctx']['expected']}"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "value_error":
        message = str(error["ctx"]["error"])
    else:
        message = error["msg"]
    if kind == "value_error" and re.match(r"^[a-z_]+: ", message):
        # A validator of a whole section names the field it is about.
        field, message = message.split(": ", 1)
        loc = (*loc, field)
    return locate_problem(path, lines, loc, message)


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the member type's name ("list[str]", "function-after[...]") to union locations
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def same_deploy(a: ProgramConfig, b: ProgramConfig | None) -> bool:
    """Whether two sections deploy the same thing (``autostart`` only matters at start)."""
    return b is not None and a == b.model_copy(update={"autostart": a.autostart})


# Hex digits of a fingerprint: 48 bits, plenty to tell one program's deploys apart.
FINGERPRINT_LENGTH = 12


def fingerprint(program: ProgramConfig) -> str:
    """A short hash of the section as deployed (resolved: the command split, paths absolute,
    defaults filled in), for ``status``: the same for any two sections ``same_deploy`` calls the
    same (``autostart`` left out, mappings in any key order), in any supervisor, before and after
    the deploy history's round trip; different for a different command, env, cwd or setting."""
    document = program.model_dump(mode="json", exclude={"autostart"})
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:FINGERPRINT_LENGTH]
