"""The module layering (style guide section 2), checked by parsing every module of src/flipvisor.

Each module may import only the flipvisor modules on its row below: leaves first, so a low module
can never reach up into the supervisor. Every import counts, including lazy ones inside functions
and ``TYPE_CHECKING`` blocks. Process creation is confined to spawn.py: nothing else imports
``subprocess`` or calls the other ways of starting a process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "flipvisor"

# Components: a top-level module of the package, or "registry" for anything in registry/.
ERRORS = {"errors"}
LEAVES = ERRORS | {
    "states",
    "lazy_event",
    "signals",
    "usable",
    "starttime",
    "printable",
    "fatal_advice",
    "durable",
    "current_record",
    "file_identity",
    "proxy_lock",
    "accepting",
    "lasting",
    "json_text",
}
# The config file (models, their value types, reading, checks across sections) is one layer.
CONFIG = {"config", "config_fields", "config_file", "config_consistency"}
# A program's log: the rotating writer, a worker's capture into it, and the CLI's readers.
LOGS = {"logs", "logs_capture", "log_lines", "logs_tail", "logs_follow"}
# Processes: the only creator (spawn), whether a command can start (command_lookup), a child's
# output pipe, a short command run to completion, a recorded process signalled only while its PID
# names it, our stray children, which supervisor started a process (its environment).
SPAWN = {
    "exec_format",
    "spawn",
    "command_lookup",
    "output_pipe",
    "run_command",
    "verified_signal",
    "strays",
    "socket_holders",
    "lineage",
}
# The output keeper process (stdlib and the log writer only: it must stay small) and the
# supervisor's side of it, which every worker tells about its pipe.
KEEPER = {"output_keeper", "kept_outputs", "keeper_handover"}
BASE = LEAVES | CONFIG | LOGS | SPAWN | KEEPER | {"reaper", "sockets", "events", "progress"}
# A failed rollback's advice: what the history recorded (a config), by what failed (an error).
BASE |= {"rollback_advice"}
CHECKS = BASE | {
    "notify_socket",
    "probe",
    "proxy",
    "proxy_file",
    "proxy_journal",
    "proxy_change",
    "proxy_record",
    "proxy_reload",
    "proxy_template",
    "proxy_workers",
    "registry",
}
# A generation, and its parts: the drain of its processes, its probe, what status shows of it.
WORKERS = CHECKS | {
    "worker",
    "generation",
    "generation_drain",
    "generation_probe",
    "generation_status",
}
CORE = WORKERS | {
    "leftovers",
    "published_keys",
    "promotion",
    "promotion_steps",
    "promotion_undo",
    "proxy_patience",
    "proxy_lock_wait",
    "unroute",
    "registration",
    "program",
    "program_stop",
    "crash_policy",
    "flip",
    "flip_steps",
    "flip_outcome",
    "discard",
    "retirement",
    "route_back",
    "takeover",
    "protocol",
    "control",
    "metrics",
}

ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    # A timed-out proxy reload carries the workers read before it (a type-only import).
    "errors": {"starttime"},
    "states": set(),
    "lazy_event": set(),
    "signals": set(),
    "usable": set(),
    "starttime": set(),
    "fatal_advice": set(),
    # Durable atomic writes (temporary file, fsync, rename, fsync of the folder).
    "durable": set(),
    # Serving a listener with a back-off on accepts that fail for lack of fds (control, metrics).
    "accepting": set(),
    # The services that last as long as the supervisor, started again after an end (flipvisor's
    # own errors, FlipvisorError, said in one line).
    "lasting": {"errors"},
    # A generation/current record parsed: leftovers and the proxy-undo journal read it alike.
    "current_record": {"starttime", "json_text"},
    # JSON from outside the process decoded with every failure a ValueError (stdlib only).
    "json_text": set(),
    "file_identity": set(),
    "config_fields": {"locate"},
    "config": {"config_fields", "locate"},
    # config_file only for its type (ConfigFile), which it runs on.
    "config_consistency": {"config_file", "problems", "usable"},  # usable: metrics.listen read
    "config_file": {"config", "config_consistency", "errors", "locate", "problems"},
    "rollback_advice": {"config", "errors"},
    "reaper": {"errors"},
    "spawn": {
        "errors",
        "config",
        "reaper",
        "signals",
        "starttime",
        "output_pipe",
        "usable",
        "command_lookup",
    },
    # Whether the kernel execs a file's format (its first bytes): the lookup refuses what it won't.
    "exec_format": set(),
    "command_lookup": {"errors", "exec_format", "usable"},
    "output_pipe": set(),
    "run_command": {"reaper", "spawn", "output_pipe", "strays"},
    "verified_signal": {"starttime"},
    "strays": set(),
    "socket_holders": {"strays"},
    "lineage": {"starttime", "verified_signal"},
    # Not config: the output keeper writes logs without loading the config's models.
    "logs": {"logs_follow"},  # logs_follow: the numbering its files get
    "log_lines": set(),
    "logs_capture": {"logs", "output_pipe", "log_lines"},
    "output_keeper": {"logs", "log_lines", "file_identity"},
    "kept_outputs": {"errors", "logs", "output_keeper", "reaper", "spawn"},
    # config_fields: a program name handed over is checked as the config checks one.
    "keeper_handover": {"config_fields", "locate", "output_keeper"},
    "logs_tail": set(),
    "logs_follow": {"logs_tail"},
    "sockets": {"config", "errors", "usable"},
    "notify_socket": {"config_consistency", "errors"},
    "probe": {"config", "errors", "notify_socket", "run_command", "reaper"},
    # The template's text (context, render, parse), and the file's installing, checking, reloading.
    "proxy_template": {"config_fields", "errors"},
    "proxy_file": {"errors", "durable"},
    # What a proxy step replaces, on disk until it stands or is undone (a killed supervisor's).
    # The records' format and reading them back; the journal that writes them.
    "proxy_change": {"errors", "proxy_file"},
    "proxy_record": {
        "errors",
        "proxy_file",
        "proxy_change",
        "durable",
        "current_record",
        "json_text",
        "starttime",
    },
    "proxy_journal": {"errors", "proxy_file", "proxy_change", "proxy_record", "durable"},
    # The proxy's workers: its master's children, awaited through pidfds.
    "proxy_workers": {"starttime", "verified_signal"},
    # A reload, confirmed by the master's new worker.
    "proxy_reload": {"errors", "proxy_workers", "run_command", "reaper", "starttime"},
    "proxy": {
        "config",
        "errors",
        "proxy_file",
        "proxy_reload",
        "run_command",
        "verified_signal",
        "reaper",
        "usable",
        "starttime",
    },
    # The generation record's parser and process identities: whose promotion the keys hold
    # (registry/keys_owner.py), never a process signalled.
    "registry": {
        "config",
        "errors",
        "registry",
        "durable",
        "current_record",
        "json_text",
        "starttime",
        "file_identity",  # what is at the local file's path, said
    },
    # The confd side: the runner (watch), following keys, a template entry, a drain_pid entry.
    "watch": {"registry", "reaper", "config", "signals", "watch_template", "watch_drain"},
    "watch_follow": {"registry", "errors"},
    "watch_template": {
        "registry",
        "proxy",
        "proxy_reload",
        "proxy_workers",
        "proxy_template",
        "reaper",
        "config",
        "errors",
        "starttime",  # for its type: the proxy's workers a reload replaced
        "watch_follow",
    },
    "watch_drain": {
        "registry",
        "proxy",
        "proxy_workers",
        "config",
        "starttime",
        "verified_signal",
        "watch_drain_hold",
        "watch_drain_keys",
        "watch_follow",
        "watch_template",
    },
    # When a drain may go ahead: the template entries caught up, the proxy settled.
    "watch_drain_hold": {"starttime", "watch_template"},
    # What a drain_pid entry's keys say: parsing only.
    "watch_drain_keys": {"registry", "starttime", "json_text"},
    "protocol": {"errors"},
    "events": LEAVES,
    "progress": LEAVES | {"events"},
    "metrics": LEAVES | {"config", "events"},
    # The upper layers: generous, everything below them.
    "worker": BASE,
    "generation": BASE
    | {
        "notify_socket",
        "probe",
        "worker",
        "generation_drain",
        "generation_probe",
        "generation_status",
    },
    "generation_drain": BASE | {"worker"},
    # Parts of a Generation that take it (for its type only): generation's layer, itself included.
    "generation_probe": BASE | {"probe", "worker", "generation"},
    "generation_status": {"config", "generation"},
    "leftovers": WORKERS,
    "leftover_records": WORKERS | {"leftovers"},
    "published_keys": WORKERS,
    "proxy_patience": WORKERS,
    "promotion": WORKERS
    | {"proxy_patience", "promotion_steps", "promotion_undo", "proxy_lock_wait"},
    # A flip's hold on the proxy lock, and its wait for it.
    "proxy_lock_wait": WORKERS,
    # A promotion's steps with their undos, and the undo run after a failure.
    "promotion_steps": WORKERS | {"published_keys"},
    "promotion_undo": WORKERS | {"promotion_steps"},
    "unroute": CHECKS,  # proxy (and config, errors, reaper) only
    "registration": WORKERS | {"promotion", "published_keys", "registry"},
    "restarts": {"config"},
    "history": {"config", "durable"},
    "preflight": {
        "config",
        "config_fields",
        "errors",
        "proxy_template",
        "command_lookup",
        "usable",
        "sockets",
        "runrecord",
        "locate",
        "problems",
        "state_files",
    },
    "program": WORKERS
    | {
        "leftovers",
        "promotion",
        "unroute",
        "registration",
        "restarts",
        "history",
        "locate",
        "flip",
        "retirement",
        "takeover",
        "program_stop",
        "crash_policy",
    },
    # Parts of a Program that take it (for its type only): program's layer, program included.
    "program_stop": WORKERS | {"unroute", "program"},
    "crash_policy": WORKERS | {"restarts", "program"},
    "flip": WORKERS
    | {
        "promotion",
        "proxy_patience",
        "program",
        "flip_steps",
        "flip_outcome",
        "discard",
        "route_back",
        "history",  # what a flip routed back puts back (its snapshot of the deploy history)
    },
    # A flip's drain of what it replaced, routed back to if what it promoted gives up.
    "route_back": WORKERS | {"promotion", "program", "flip", "flip_steps", "retirement"},
    "flip_steps": WORKERS
    | {"promotion", "proxy_patience", "program", "flip", "flip_outcome", "discard"},
    "flip_outcome": WORKERS | {"program"},
    # How a generation that never served is stopped and dropped from its program.
    "discard": WORKERS | {"program"},
    "retirement": WORKERS | {"promotion", "program", "discard"},
    "takeover": WORKERS | {"program"},
    # runrecord: the refusal names the config file of the supervisor already listening.
    "control": LEAVES | {"protocol", "config", "runrecord", "state_files"},
    # What is at the state_dir's control socket path and local registry file: run refuses
    # what it cannot use, check reports it.
    "state_files": {"config", "errors", "file_identity", "registry"},
    "client": LEAVES | {"protocol", "config", "locate", "runrecord"},
    "display": LEAVES | {"protocol", "events", "progress"},
    "supervisor": CORE
    | {
        "watch",  # runs the watches too
        "runrecord",
        "orphans",
        "reload",
        "commands",
        "locate",
        "run_start",
        "predecessor",
        "sockets_left",
    },
    # Parts of the supervisor's start-up: what it sees to first (another supervisor of the file,
    # the state_dir, the run record), and what it takes over from a killed one.
    "run_start": {
        "config",
        "control",
        "errors",
        "reaper",
        "runrecord",
        "spawn",
        "state_files",
        "usable",
    },
    "predecessor": CORE | {"leftover_records", "stray_programs", "handover", "proxy_recovery"},
    # The proxy steps a killed supervisor left unfinished, kept or undone as its keys say.
    # (With the configured proxy sections: the proxy a killed flip may have reloaded.)
    "proxy_recovery": {
        "config",
        "errors",
        "events",
        "proxy",
        "proxy_file",
        "proxy_lock",
        "proxy_record",
        "reaper",
    },
    # A removed program's deploy history (its proxy section), and what a program's stop does
    # (unroute, the registry, a Runtime).
    "stray_programs": CORE | {"history", "leftover_records"},
    # Parts of the supervisor that take it (for its type only): its layer, supervisor included.
    "reload": CORE | {"supervisor", "reload_changes", "handover"},
    # Which socket on a fixed address something of ours that leaves it leaves to its successor.
    "sockets_left": {"config", "program", "supervisor"},
    # What a reload makes of a changed section: the program's, decided on its Program.
    "reload_changes": {"config", "errors", "program"},
    # What a removed program hands over to its successor: read off both Programs (and whether
    # their fixed addresses overlap, as the config tells).
    "handover": {
        "config",
        "config_consistency",
        "program",
        "events",
        "progress",
        "proxy_file",
        "usable",
    },
    "commands": CORE | {"supervisor", "reload"},
    "orphans": WORKERS,
    "locate": {"errors"},
    "runrecord": {"starttime", "durable", "json_text"},
    "problems": {"locate"},
    "placeholders": {"config_file", "problems"},
    # The arguments: nothing heavy, every command parses with it first.
    "cli_parser": {"locate", "protocol"},
    # The entry point: parses, runs a handler of the cli_* modules, maps errors to exit codes.
    "cli": LEAVES
    | {
        "cli_parser",
        "cli_output",
        "cli_check",
        "cli_foreground",
        "cli_logs",
        "cli_requests",
        "locate",
    },
    # How the CLI prints (stderr, JSON): every command module's, so nothing of flipvisor but
    # the leaf that shows control characters as escapes.
    "cli_output": {"printable"},
    "cli_check": LEAVES
    | {
        "cli_output",
        "config",
        "config_file",
        "config_consistency",
        "placeholders",
        "preflight",
        "problems",
    },
    "cli_foreground": LEAVES | {"signals", "config_file", "supervisor", "watch"},
    # Reads log files: neither the config's models nor the supervisor's modules.
    "cli_logs": LEAVES | {"cli_output", "client", "locate", "logs_follow", "logs_tail"},
    "cli_requests": LEAVES | {"cli_output", "client", "display", "protocol"},
    "__main__": {"cli"},
}
# A module without a row (new since this table was written) may import everything but the
# entry points; the lower rows above still keep it from being imported by a leaf.
NEW_MODULE = CORE - {"metrics"}

SPAWN_ONLY_MODULES = {"subprocess", "asyncio.subprocess", "multiprocessing", "pty"}
SPAWN_ONLY_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("os", "fork"),
    ("os", "forkpty"),
    ("os", "posix_spawn"),
    ("os", "posix_spawnp"),
    ("asyncio", "create_subprocess_exec"),
    ("asyncio", "create_subprocess_shell"),
    ("anyio", "open_process"),
    ("anyio", "run_process"),
}


def component(module: str) -> str:
    """``flipvisor.registry.etcd`` → ``registry``; ``flipvisor.spawn`` → ``spawn``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def flipvisor_imports(path: Path) -> list[tuple[int, str]]:
    """Every flipvisor module ``path`` imports, absolute or relative, with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "flipvisor":
                # "from flipvisor import spawn" / "from . import spawn" name the modules themselves.
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "flipvisor"]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_its_layer(path: Path) -> None:
    own = component(module_name(path))
    allowed = ALLOWED.get(own, NEW_MODULE) | {own}
    bad = [
        f"{path.relative_to(SRC)}:{line}: imports {name}"
        for line, name in flipvisor_imports(path)
        if name != "flipvisor" and component(name) not in allowed
    ]
    assert not bad, f"{own} may import only {sorted(allowed - {own})}:\n" + "\n".join(bad)


def test_every_listed_module_exists_or_is_planned() -> None:
    # Keep the table honest: a typo in a row's name would silently exempt a module.
    present = {component(module_name(p)) for p in sources()} | {"__main__", "__init__"}
    planned = {"metrics"}
    assert set(ALLOWED) - present - planned == set()


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_only_spawn_creates_processes(path: Path) -> None:
    if path == SRC / "spawn.py":
        return
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in SPAWN_ONLY_CALLS or (
                node.value.id == "os" and node.attr.startswith(("exec", "spawn"))
            ):
                bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
            continue
        else:
            continue
        for name in names:
            if name in SPAWN_ONLY_MODULES or any(
                name == f"{mod}.{attr}" for mod, attr in SPAWN_ONLY_CALLS
            ):
                bad.append(f"line {node.lineno}: imports {name}")
    assert not bad, f"{path.relative_to(SRC)} starts processes outside spawn.py: {bad}"


def test_the_checker_sees_relative_and_lazy_imports() -> None:
    # The checker itself, on a module shaped like registry/__init__.py.
    path = SRC / "registry" / "__init__.py"
    names = {name for _, name in flipvisor_imports(path)}
    assert "flipvisor.registry.base" in names
    assert "flipvisor.registry.local" in names  # imported lazily inside a function
    names = {name for _, name in flipvisor_imports(SRC / "cli_foreground.py")}
    assert {"flipvisor.config_file", "flipvisor.supervisor"} <= names  # both lazily
