"""The frozen pydantic models of the config file: its sections, their defaults, and the rules
within one section; whether two program sections deploy the same thing.

The value types they are built from are ``config_fields``; reading a file into them, with every
problem at its line, is ``config_file``; what is wrong across sections is ``config_consistency``.
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .config_fields import (
    Command,
    Count,
    Endpoint,
    Env,
    Host,
    KeepSeconds,
    KeyPrefix,
    ProgramName,
    RelPath,
    Seconds,
    SecondsOrZero,
    Signal,
    TemplateVars,
    null_is_empty,
    null_is_no_entries,
)
from .locate import DEFAULT_STATE_DIR, socket_path


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
        if self.http is not None and any(ord(c) < 32 or ord(c) == 127 for c in self.http):
            # No URL holds one: the probe's first request would fail (an internal error).
            raise ValueError("http: a URL path cannot hold a control character (NUL, tab, ...)")
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
    vars: TemplateVars = Field(default_factory=dict)


class ProgramConfig(_Model):
    """One supervised program: ``numprocs`` workers per generation sharing one socket."""

    command: Command
    numprocs: Annotated[Count, Field(ge=1, le=1024)] = 1
    cwd: RelPath | None = None
    env: Env = Field(default_factory=dict)
    autostart: bool = True
    socket: Annotated[SocketConfig, BeforeValidator(null_is_empty)] = SocketConfig()
    readiness: ReadinessConfig | None = None
    drain: Annotated[DrainConfig, BeforeValidator(null_is_empty)] = DrainConfig()
    restart: Annotated[RestartConfig, BeforeValidator(null_is_empty)] = RestartConfig()
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
    endpoints: list[Endpoint] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    prefix: KeyPrefix = "flipvisor"
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

    listen: Endpoint


class Config(_Model):
    """The whole config file."""

    state_dir: RelPath = DEFAULT_STATE_DIR
    registry: Annotated[RegistryConfig, BeforeValidator(null_is_empty)] = RegistryConfig()
    logs: Annotated[LogsConfig, BeforeValidator(null_is_empty)] = LogsConfig()
    metrics: MetricsConfig | None = None
    programs: Annotated[dict[ProgramName, ProgramConfig], BeforeValidator(null_is_empty)] = Field(
        default_factory=dict
    )
    watch: Annotated[list[WatchConfig], BeforeValidator(null_is_no_entries)] = Field(
        default_factory=list
    )

    @property
    def socket_path(self) -> Path:
        return socket_path(self.state_dir)


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
