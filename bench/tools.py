"""The three supervisors behind one small interface: write a config for the same programs,
start the daemon, and ask its own control interface (Python API, in process) what runs.

flipvisor: its control-socket client; supervisord: XML-RPC over its unix socket (what
supervisorctl uses); Circus: its zmq ``CircusClient`` (what circusctl uses).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, TEMPLATE, free_port, launch, stop_tree, tool_bin, wait_until
from bench.nginx import Nginx

SLEEP = ["sleep", "infinity"]


@dataclass(frozen=True)
class Program:
    """``sleep`` (a real binary doing nothing) or ``svc`` (tests/apps/svc.py, HTTP)."""

    name: str
    kind: str = "sleep"
    ready_delay: float = 0.0


def svc_argv(program: Program, *flags: str) -> list[str]:
    """bench/app.py (svc.py with TCP_NODELAY) run as a script, as each tool's worker."""
    delay = ["--ready-delay", str(program.ready_delay)] if program.ready_delay else []
    return [sys.executable, str(ROOT / "bench" / "app.py"), *flags, *delay]


class Tool(ABC):
    name: str
    # The workloads this tool takes part in (None: all of them).
    workloads: frozenset[str] | None = None

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.programs: list[Program] = []
        self.argv: list[str] = []
        self.log = directory / "daemon.log"

    # -- life cycle ---------------------------------------------------------------------
    def start(self, programs: list[Program], nginx: Nginx | None = None) -> float:
        """Write the config and launch the daemon; returns the monotonic launch time."""
        self.programs = programs
        self.argv = self.configure(programs, nginx)
        started = time.monotonic()
        self.process = launch(self.argv, self.log, cwd=self.dir)
        return started

    def relaunch(self) -> float:
        """Launch the daemon again with the config ``start`` wrote (after it was killed): what
        an init system's restart does. Returns the monotonic launch time."""
        self.disconnect()
        started = time.monotonic()
        self.process = launch(self.argv, self.log, cwd=self.dir)
        return started

    def wait_running(self, timeout: float = 60) -> None:
        names = [p.name for p in self.programs]
        try:
            wait_until(lambda: self.all_running(names), timeout, f"{self.name} to run programs")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.tail()}") from None

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_tree(self.process, grace=15)

    def disconnect(self) -> None:  # noqa: B027 - optional: most tools keep no connection
        """Forget a control connection to a daemon that is gone (none by default)."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    # -- per tool -----------------------------------------------------------------------
    @abstractmethod
    def configure(self, programs: list[Program], nginx: Nginx | None) -> list[str]:
        """Write the config file(s); return the daemon's argv."""

    @abstractmethod
    def all_running(self, names: list[str]) -> bool:
        """One control round trip: does every program in ``names`` have a live process?"""

    @abstractmethod
    def pids(self, name: str) -> list[int]:
        """PIDs of ``name``'s processes as the tool reports them (one round trip)."""

    @abstractmethod
    def status_call(self) -> Any:
        """One in-process ``status`` round trip."""

    @abstractmethod
    def status_argv(self) -> list[str]:
        """The shell command an operator types for status."""

    @abstractmethod
    def port(self, name: str) -> int:
        """Where ``name`` (an svc program) serves."""

    @abstractmethod
    def deploy(self, name: str) -> dict[str, Any]:
        """Deploy ``name`` again the tool's recommended way; returns a report (may be empty)."""


class Flipvisor(Tool):
    name = "flipvisor"

    def configure(self, programs: list[Program], nginx: Nginx | None) -> list[str]:
        self.config_path = self.dir / "flipvisor.yaml"
        self.socket = self.dir / "state" / "flipvisor.sock"
        entries = {p.name: {"command": SLEEP} if p.kind == "sleep" else self.service(p, nginx)
                   for p in programs}
        config = {"state_dir": str(self.dir / "state"), "programs": entries}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [tool_bin("flipvisor"), "-c", str(self.config_path), "run"]

    def service(self, p: Program, nginx: Nginx | None) -> dict[str, Any]:
        """The config section of an HTTP service: port 0, http probe, the proxy step."""
        entry: dict[str, Any] = {
            "command": svc_argv(p),
            "readiness": {"http": "/health", "timeout": 30},
        }
        if nginx is not None:
            entry["proxy"] = {
                "template": str(TEMPLATE), "dest": str(nginx.snippet),
                "check_cmd": nginx.check_cmd, "reload_cmd": nginx.reload_cmd,
                "pidfile": str(nginx.pidfile), "vars": {"listen": nginx.listen},
            }
        return entry

    def _status(self) -> dict[str, Any]:
        from flipvisor.client import call
        from flipvisor.protocol import Request

        answer = call(self.socket, Request("status"), timeout=10)
        result: dict[str, Any] = answer["result"]
        return result

    def _serving_pids(self, program: dict[str, Any]) -> list[int]:
        return [pid for g in program["generations"] if g["state"] == "serving"
                for pid in g["pids"]]

    def all_running(self, names: list[str]) -> bool:
        programs = {p["name"]: p for p in self._status()["programs"]}
        return all(n in programs and programs[n]["state"] == "running"
                   and self._serving_pids(programs[n]) for n in names)

    def pids(self, name: str) -> list[int]:
        programs = {p["name"]: p for p in self._status()["programs"]}
        return self._serving_pids(programs[name]) if name in programs else []

    def status_call(self) -> Any:
        return self._status()

    def status_argv(self) -> list[str]:
        return [tool_bin("flipvisor"), "-c", str(self.config_path), "status"]

    def port(self, name: str) -> int:
        programs = {p["name"]: p for p in self._status()["programs"]}
        return int(next(g["port"] for g in programs[name]["generations"]
                        if g["state"] == "serving"))

    def deploy(self, name: str) -> dict[str, Any]:
        result = subprocess.run(
            [tool_bin("flipvisor"), "-c", str(self.config_path), "flip", name, "--json"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
        )
        try:
            report: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            report = {"ok": False, "error": result.stderr[-500:]}
        report["exit_code"] = result.returncode
        return report


class FlipvisorFixedPort(Flipvisor):
    """flipvisor in its other deployment mode, for (e) only: the program keeps one fixed port
    (one socket across its generations), nginx points at it once and is never reloaded, and
    readiness is sd_notify (the only probe a shared port allows). Like Circus, nothing tells
    nginx's keep-alive clients to go away during a deploy."""

    name = "flipvisor-fixed"
    workloads = frozenset({"e"})

    def service(self, p: Program, nginx: Nginx | None) -> dict[str, Any]:
        port = free_port()
        if nginx is not None:
            nginx.route_to(port)
        return {
            "command": svc_argv(p, "--notify"),
            "socket": {"port": port},
            "readiness": {"notify": True, "timeout": 30},
        }


class Supervisord(Tool):
    name = "supervisord"

    def configure(self, programs: list[Program], nginx: Nginx | None) -> list[str]:
        self.conf = self.dir / "supervisord.conf"
        self.socket = self.dir / "supervisor.sock"
        (self.dir / "logs").mkdir(exist_ok=True)
        self.ports: dict[str, int] = {}
        lines = [
            "[unix_http_server]", f"file={self.socket}", "",
            "[supervisord]", f"logfile={self.dir / 'supervisord.log'}",
            f"pidfile={self.dir / 'supervisord.pid'}", f"childlogdir={self.dir / 'logs'}",
            "nodaemon=true", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{self.socket}", "",
        ]
        for p in programs:
            if p.kind == "sleep":
                command = shlex.join(SLEEP)
            else:
                self.ports[p.name] = free_port()
                command = shlex.join(svc_argv(p, "--port", str(self.ports[p.name])))
            # startsecs=0: RUNNING as soon as the process exists (the default 1 s would be
            # measured as start-up time otherwise).
            lines += [f"[program:{p.name}]", f"command={command}", "autorestart=true",
                      "startsecs=0", "stopwaitsecs=10", ""]
        self.conf.write_text("\n".join(lines))
        self._rpc: Any = None
        if nginx is not None:
            for port in self.ports.values():
                nginx.route_to(port)
        return [tool_bin("supervisord"), "-c", str(self.conf), "-n"]

    @property
    def rpc(self) -> Any:
        if self._rpc is None:
            from supervisor.xmlrpc import SupervisorTransport

            transport = SupervisorTransport(None, None, f"unix://{self.socket}")
            self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self._rpc

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.rpc.supervisor, method)(*args)
        except (OSError, xmlrpc.client.ProtocolError):
            self._rpc = None  # reconnect next time (the socket was not there yet)
            raise

    def disconnect(self) -> None:
        self._rpc = None

    def all_running(self, names: list[str]) -> bool:
        infos = {i["name"]: i for i in self._call("getAllProcessInfo")}
        return all(n in infos and infos[n]["statename"] == "RUNNING" for n in names)

    def pids(self, name: str) -> list[int]:
        info = self._call("getProcessInfo", name)
        return [info["pid"]] if info["pid"] and info["statename"] in ("STARTING", "RUNNING") else []

    def status_call(self) -> Any:
        return self._call("getAllProcessInfo")

    def status_argv(self) -> list[str]:
        return [tool_bin("supervisorctl"), "-c", str(self.conf), "status"]

    def port(self, name: str) -> int:
        return self.ports[name]

    def deploy(self, name: str) -> dict[str, Any]:
        # What `supervisorctl restart NAME` does.
        self._call("stopProcess", name)
        self._call("startProcess", name)
        return {"ok": True}


class Circus(Tool):
    name = "circus"

    def configure(self, programs: list[Program], nginx: Nginx | None) -> list[str]:
        self.conf = self.dir / "circus.ini"
        self.endpoint = f"ipc://{self.dir / 'endpoint.sock'}"
        self.ports = {}
        lines = ["[circus]", f"endpoint = {self.endpoint}",
                 f"pubsub_endpoint = ipc://{self.dir / 'pubsub.sock'}", "statsd = False",
                 # The ini default is 5 s; 1 s (the Arbiter's own default) respawns sooner.
                 "check_delay = 1", ""]
        for p in programs:
            if p.kind == "sleep":
                lines += [f"[watcher:{p.name}]", f"cmd = {shlex.join(SLEEP)}",
                          "numprocesses = 1", ""]
                continue
            self.ports[p.name] = free_port()
            # Circus hands the shared socket's fd number in the command; svc.py takes its
            # socket systemd-style on fd 3, so a shell moves it there and execs (same PID).
            inner = (f"exec 3<&$(circus.sockets.{p.name}); export LISTEN_FDS=1 LISTEN_PID=$$; "
                     f"exec {shlex.join(svc_argv(p))}")
            lines += [f"[socket:{p.name}]", "host = 127.0.0.1", f"port = {self.ports[p.name]}",
                      "", f"[watcher:{p.name}]", f"cmd = sh -c {shlex.quote(inner)}",
                      "use_sockets = True", "numprocesses = 1", ""]
        self.conf.write_text("\n".join(lines))
        self._client: Any = None
        if nginx is not None:
            for port in self.ports.values():
                nginx.route_to(port)
        return [tool_bin("circusd"), str(self.conf)]

    def _call(self, command: str, **properties: Any) -> dict[str, Any]:
        if self._client is None:
            from circus.client import CircusClient

            self._client = CircusClient(endpoint=self.endpoint, timeout=10)
        answer: dict[str, Any] = self._client.call(
            {"command": command, "properties": properties})
        if answer.get("status") != "ok":
            raise RuntimeError(f"circus {command}: {answer}")
        return answer

    def all_running(self, names: list[str]) -> bool:
        # "active" is set once the watcher's processes are spawned (watcher._start).
        statuses = self._call("status")["statuses"]
        return all(statuses.get(n) == "active" for n in names)

    def pids(self, name: str) -> list[int]:
        return list(self._call("list", name=name)["pids"])

    def status_call(self) -> Any:
        return self._call("status")

    def status_argv(self) -> list[str]:
        return [tool_bin("circusctl"), "--endpoint", self.endpoint, "status"]

    def port(self, name: str) -> int:
        return self.ports[name]

    def deploy(self, name: str) -> dict[str, Any]:
        # `circusctl reload NAME --waiting`: graceful, new processes first, then the old stop.
        self._call("reload", name=name, graceful=True, sequential=False, waiting=True)
        return {"ok": True}

    def disconnect(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    def stop(self) -> None:
        self.disconnect()
        super().stop()


TOOLS: dict[str, type[Tool]] = {"flipvisor": Flipvisor, "supervisord": Supervisord,
                                "circus": Circus, "flipvisor-fixed": FlipvisorFixedPort}

