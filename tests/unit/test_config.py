"""The config loader: every bad input names its file, YAML line, dotted location and what is wrong;
good input gets its defaults, argv splitting, resolved paths and signals."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from textwrap import dedent
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from flipvisor.config import Config
from flipvisor.config_consistency import sigkill_warnings, watch_warnings
from flipvisor.config_file import (
    ConfigFile,
    load_config,
    load_config_file,
    parse_config,
    parse_config_file,
)
from flipvisor.errors import EXIT_USAGE, ConfigError

PATH = Path("/etc/flipvisor/flipvisor.yaml")
EXAMPLE = Path(__file__).resolve().parents[2] / "flipvisor.yaml.example"

# A minimal program, so each case below shows only the key it breaks.
PROG = "programs:\n  experiment:\n    command: x\n"
NAME_RULE = (
    "a program name starts with a letter or digit and holds only letters, digits, '_', '.', '-'"
)


def load_config_file_text(text: str) -> ConfigFile:
    return parse_config_file(text, PATH)


def problems_of(text: str, path: Path = PATH) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    assert caught.value.exit_code == EXIT_USAGE
    return caught.value.problems


# (id, YAML text, line, dotted location, message): the problem must read exactly
# "<file>:<line>: <dotted location>: <message>".
BAD: list[tuple[str, str, int, str, str]] = [
    # unknown keys, at every level
    ("unknown-top", "bogus: 1\n", 1, "bogus", "unknown key"),
    (
        "unknown-registry",
        "registry:\n  backend: etcd\n  colour: red\n",
        3,
        "registry.colour",
        "unknown key",
    ),
    ("unknown-logs", "logs:\n  max_byte: 2048\n", 2, "logs.max_byte", "unknown key"),
    (
        "unknown-metrics",
        "metrics:\n  listen: 127.0.0.1:9100\n  path: /m\n",
        3,
        "metrics.path",
        "unknown key",
    ),
    (
        "unknown-program",
        PROG + "    nummprocs: 2\n",
        4,
        "programs.experiment.nummprocs",
        "unknown key",
    ),
    (
        "unknown-socket",
        PROG + "    socket: {hots: 127.0.0.1}\n",
        4,
        "programs.experiment.socket.hots",
        "unknown key",
    ),
    (
        "unknown-readiness",
        PROG + "    readiness: {http: /health, tiemout: 3}\n",
        4,
        "programs.experiment.readiness.tiemout",
        "unknown key",
    ),
    (
        "unknown-drain",
        PROG + "    drain:\n      timeout: 3\n      sig: TERM\n",
        6,
        "programs.experiment.drain.sig",
        "unknown key",
    ),
    (
        "unknown-restart",
        PROG + "    restart: {max: 3}\n",
        4,
        "programs.experiment.restart.max",
        "unknown key",
    ),
    (
        "unknown-proxy",
        PROG + "    proxy: {template: t, dest: d, reload: x}\n",
        4,
        "programs.experiment.proxy.reload",
        "unknown key",
    ),
    (
        "unknown-watch",
        "watch:\n  - keys: [a/b/pid/previous]\n    drain_pid: {}\n    extra: 1\n",
        4,
        "watch.0.extra",
        "unknown key",
    ),
    (
        "unknown-drain-pid",
        "watch:\n  - keys: [a/b/pid/previous]\n    drain_pid: {sig: 1}\n",
        3,
        "watch.0.drain_pid.sig",
        "unknown key",
    ),
    # wrong types
    (
        "timeout-abc",
        PROG + "    drain:\n      timeout: abc\n",
        5,
        "programs.experiment.drain.timeout",
        "must be a number",
    ),
    (
        "numprocs-word",
        PROG + "    numprocs: two\n",
        4,
        "programs.experiment.numprocs",
        "must be an integer",
    ),
    (
        "numprocs-fraction",
        PROG + "    numprocs: 1.5\n",
        4,
        "programs.experiment.numprocs",
        "must be an integer",
    ),
    (
        "autostart-maybe",
        PROG + "    autostart: maybe\n",
        4,
        "programs.experiment.autostart",
        "must be true or false",
    ),
    ("env-list", PROG + "    env: [A]\n", 4, "programs.experiment.env", "must be a mapping"),
    (
        "env-value-null",
        PROG + "    env: {A: null}\n",
        4,
        "programs.experiment.env.A",
        "must be a string",
    ),
    ("programs-list", "programs: [a]\n", 1, "programs", "must be a mapping"),
    (
        "program-scalar",
        "programs:\n  experiment: hello\n",
        2,
        "programs.experiment",
        "must be a mapping",
    ),
    (
        "command-number",
        "programs:\n  experiment:\n    command: 5\n",
        3,
        "programs.experiment.command",
        "must be a list of strings (argv) or a string split like a shell would",
    ),
    (
        "command-item-number",
        "programs:\n  experiment:\n    command: [python, 3]\n",
        3,
        "programs.experiment.command.1",
        "must be a string",
    ),
    (
        "metrics-listen-number",
        "metrics:\n  listen: 9100\n",
        2,
        "metrics.listen",
        "must be a string",
    ),
    (
        "backend-unknown",
        "registry:\n  backend: consul\n",
        2,
        "registry.backend",
        "must be one of 'local' or 'etcd'",
    ),
    (
        "restart-policy",
        PROG + "    restart: {policy: sometimes}\n",
        4,
        "programs.experiment.restart.policy",
        "must be one of 'always', 'on-failure' or 'never'",
    ),
    (
        "command-missing",
        "programs:\n  experiment:\n    numprocs: 1\n",
        2,
        "programs.experiment.command",
        "required key is missing",
    ),
    (
        "proxy-dest-missing",
        PROG + "    proxy: {template: t}\n",
        4,
        "programs.experiment.proxy.dest",
        "required key is missing",
    ),
    # impossible numbers
    (
        "numprocs-zero",
        PROG + "    numprocs: 0\n",
        4,
        "programs.experiment.numprocs",
        "must be >= 1",
    ),
    (
        "port-too-big",
        PROG + "    socket: {port: 70000}\n",
        4,
        "programs.experiment.socket.port",
        "must be <= 65535",
    ),
    (
        "backlog-zero",
        PROG + "    socket: {backlog: 0}\n",
        4,
        "programs.experiment.socket.backlog",
        "must be > 0",
    ),
    ("logs-max-bytes", "logs: {max_bytes: 10}\n", 1, "logs.max_bytes", "must be >= 1024"),
    ("logs-backups", "logs:\n  backups: -1\n", 2, "logs.backups", "must be >= 0"),
    (
        "timeout-nan",
        PROG + "    drain:\n      timeout: .nan\n",
        5,
        "programs.experiment.drain.timeout",
        "must be a finite number",
    ),
    # readiness
    (
        "readiness-no-probe",
        PROG + "    readiness: {timeout: 3}\n",
        4,
        "programs.experiment.readiness",
        "needs exactly one of http, exec, notify: true",
    ),
    (
        "readiness-two-probes",
        PROG + "    readiness: {http: /h, notify: true}\n",
        4,
        "programs.experiment.readiness",
        "needs exactly one of http, exec, notify: true",
    ),
    (
        "readiness-notify-false",
        PROG + "    readiness: {notify: false}\n",
        4,
        "programs.experiment.readiness",
        "needs exactly one of http, exec, notify: true",
    ),
    (
        "fixed-port-http-probe",
        PROG + "    socket: {port: 8080}\n    readiness: {http: /health}\n",
        4,
        "programs.experiment.socket",
        "a fixed port is shared by the old and the new generation during a flip, so an http or "
        "exec probe could be answered by the old one; use port 0 (the proxy follows each "
        "generation's port) or readiness: {notify: true}",
    ),
    (
        "fixed-port-exec-probe",
        PROG + "    socket:\n      port: 8080\n    readiness: {exec: [check, '{port}']}\n",
        4,
        "programs.experiment.socket",
        "a fixed port is shared by the old and the new generation during a flip, so an http or "
        "exec probe could be answered by the old one; use port 0 (the proxy follows each "
        "generation's port) or readiness: {notify: true}",
    ),
    (
        "fixed-port-rollback-window",
        PROG + "    socket: {port: 8080}\n    rollback_window: 30\n",
        4,
        "programs.experiment.socket",
        "a generation on a fixed port cannot be taken out of traffic, so the one that "
        "rollback_window keeps would go on serving; use port 0 with rollback_window",
    ),
    (
        "readiness-http-path",
        PROG + "    readiness: {http: health}\n",
        4,
        "programs.experiment.readiness.http",
        "must be a path starting with '/'",
    ),
    (
        "readiness-exec-empty",
        PROG + "    readiness: {exec: ''}\n",
        4,
        "programs.experiment.readiness.exec",
        "must name a program to run",
    ),
    # signals
    (
        "signal-name",
        PROG + "    drain: {signal: SIGFOO}\n",
        4,
        "programs.experiment.drain.signal",
        "unknown signal 'SIGFOO' (use a name like SIGTERM)",
    ),
    (
        "signal-number",
        PROG + "    drain: {signal: 999}\n",
        4,
        "programs.experiment.drain.signal",
        "unknown signal number 999",
    ),
    (
        "signal-list",
        PROG + "    drain: {signal: [1]}\n",
        4,
        "programs.experiment.drain.signal",
        "must be a signal name like SIGTERM",
    ),
    (
        "signal-bool",
        PROG + "    drain: {signal: true}\n",
        4,
        "programs.experiment.drain.signal",
        "must be a signal name like SIGTERM",
    ),
    (
        "drain-pid-signal",
        "watch:\n  - keys: [a/b/pid/previous]\n    drain_pid: {signal: KILLME}\n",
        3,
        "watch.0.drain_pid.signal",
        "unknown signal 'KILLME' (use a name like SIGTERM)",
    ),
    # hosts and endpoints
    (
        "host-name",
        PROG + "    socket: {host: localhost}\n",
        4,
        "programs.experiment.socket.host",
        "'localhost' is not an IP address",
    ),
    (
        "host-scope-id",
        PROG + "    socket: {host: 'fe80::1%eth0'}\n",
        4,
        "programs.experiment.socket.host",
        "'fe80::1%eth0': IPv6 scope ids are not supported",
    ),
    (
        "endpoint-no-port",
        "registry:\n  endpoints: [localhost]\n",
        2,
        "registry.endpoints.0",
        "'localhost' is not host:port",
    ),
    (
        "endpoint-bad-port",
        "registry:\n  endpoints: ['127.0.0.1:2379', 'h:99999']\n",
        2,
        "registry.endpoints.1",
        "'h:99999': the port must be 1..65535 (an address to connect or scrape)",
    ),
    (
        "metrics-listen-port-zero",  # it said "is not host:port"
        "metrics:\n  listen: 127.0.0.1:0\n",
        2,
        "metrics.listen",
        "'127.0.0.1:0': the port must be 1..65535 (an address to connect or scrape)",
    ),
    (
        "endpoints-empty",
        "registry:\n  endpoints: []\n",
        2,
        "registry.endpoints",
        "must not be empty",
    ),
    (
        "metrics-listen",
        "metrics:\n  listen: ':9100'\n",
        2,
        "metrics.listen",
        "':9100' is not host:port",
    ),
    # registry pairs
    ("cert-without-key", "registry:\n  cert: c.pem\n", 1, "registry", "cert and key go together"),
    ("key-without-cert", "registry:\n  key: k.pem\n", 1, "registry", "cert and key go together"),
    (
        "user-without-password",
        "registry:\n  user: u\n",
        1,
        "registry",
        "user and password go together",
    ),
    ("prefix-empty", "registry:\n  prefix: ''\n", 2, "registry.prefix", "must not be empty"),
    (
        "prefix-slash",
        "registry:\n  prefix: /\n",
        2,
        "registry.prefix",
        "'/' names no folder: give one for flipvisor's keys (such as uswitch or /uswitch); "
        "the keys are <prefix>/<program>/...",
    ),
    (
        "prefix-lead-space",
        "registry:\n  prefix: ' us'\n",
        2,
        "registry.prefix",
        "' us' has whitespace at its start or end; remove it",
    ),
    (
        "prefix-tail-space",
        "registry:\n  prefix: 'us '\n",
        2,
        "registry.prefix",
        "'us ' has whitespace at its start or end; remove it",
    ),
    (
        "prefix-space-before-slash",
        "registry:\n  prefix: 'us /'\n",
        2,
        "registry.prefix",
        "'us /' has whitespace at its start or end; remove it",
    ),
    (
        "prefix-newline",
        'registry:\n  prefix: "u\\ns"\n',
        2,
        "registry.prefix",
        "'u\\ns' holds a character that does not print (a control character or an invisible "
        "space); a key prefix is one printable line",
    ),
    (
        "prefix-nul",
        'registry:\n  prefix: "u\\0s"\n',
        2,
        "registry.prefix",
        "'u\\x00s' holds a character that does not print (a control character or an invisible "
        "space); a key prefix is one printable line",
    ),
    ("registry-timeout", "registry:\n  timeout: 0\n", 2, "registry.timeout", "must be > 0"),
    # commands
    (
        "command-empty-string",
        "programs:\n  experiment:\n    command: ''\n",
        3,
        "programs.experiment.command",
        "must name a program to run",
    ),
    (
        "command-empty-list",
        "programs:\n  experiment:\n    command: []\n",
        3,
        "programs.experiment.command",
        "must name a program to run",
    ),
    (
        "command-unclosed-quote",
        'programs:\n  experiment:\n    command: "a \'b"\n',
        3,
        "programs.experiment.command",
        "cannot split command string: No closing quotation",
    ),
    (
        "check-cmd-empty",
        PROG + "    proxy: {template: t, dest: d, check_cmd: []}\n",
        4,
        "programs.experiment.proxy.check_cmd",
        "must name a program to run",
    ),
    # program names
    (
        "name-space",
        "programs:\n  'my prog':\n    command: x\n",
        2,
        'programs."my prog"',
        NAME_RULE,
    ),
    (
        "name-dash-first",
        "programs:\n  -x:\n    command: x\n",
        2,
        "programs.-x",
        NAME_RULE,
    ),
    (
        "name-slash",
        "programs:\n  a/b:\n    command: x\n",
        2,
        "programs.a/b",
        NAME_RULE,
    ),
    (
        "name-dots",
        "programs:\n  '..':\n    command: x\n",
        2,
        'programs.".."',
        NAME_RULE,
    ),
    (
        "name-number",
        "programs:\n  5:\n    command: x\n",
        2,
        "programs.5",
        'this key must be a string: YAML reads 5 as a number; quote it: "5"',
    ),
    # YAML 1.1 reads these keys as booleans: named as written, at their own line (found by QA)
    (
        "name-boolean",
        "programs:\n  web:\n    command: x\n  off:\n    command: y\n",
        4,
        "programs.off",
        'this key must be a string: YAML reads off as false; quote it: "off"',
    ),
    (
        "env-name-boolean",
        "programs:\n  off:\n    command: y\n    env:\n      'A': '1'\n      on: '1'\n",
        6,
        "programs.off.env.on",
        'this key must be a string: YAML reads on as true; quote it: "on"',
    ),
    (
        "env-name-date",
        "programs:\n  web:\n    command: y\n    env:\n      2024-01-01: x\n",
        5,
        "programs.web.env.2024-01-01",
        'this key must be a string: YAML reads 2024-01-01 as a date; quote it: "2024-01-01"',
    ),
    (
        "section-key-boolean",  # a section of fixed keys: pydantic's "Keys should be strings"
        "programs:\n  web:\n    command: y\n    socket: {off: 1}\n",
        4,
        "programs.web.socket.off",
        'this key must be a string: YAML reads off as false; quote it: "off"',
    ),
    (
        "env-name-null",
        "programs:\n  web:\n    command: y\n    env: {~: '1'}\n",
        4,
        "programs.web.env.~",
        'this key must be a string: YAML reads ~ as null; quote it: "~"',
    ),
    # watch entries
    (
        "watch-neither",
        "watch:\n  - keys: [a/b/port/current]\n",
        2,
        "watch.0",
        "needs either template + dest, or drain_pid",
    ),
    (
        "watch-both",
        "watch:\n  - keys: [a/b/pid/previous]\n    template: t\n    dest: d\n    drain_pid: {}\n",
        2,
        "watch.0",
        "needs either template + dest, or drain_pid",
    ),
    (
        "watch-template-only",
        "watch:\n  - keys: [a]\n    template: t\n",
        2,
        "watch.0",
        "template and dest go together",
    ),
    (
        "watch-drain-wrong-key",
        "watch:\n  - keys: [a/b/port/current]\n    drain_pid: {}\n",
        3,
        "watch.0.drain_pid",
        "watches exactly one key <prefix>/<program>/pid/previous",
    ),
    (
        "watch-no-keys",
        "watch:\n  - keys: []\n    template: t\n    dest: d\n",
        2,
        "watch.0.keys",
        "must not be empty",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "where", "message"), [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_bad_config_names_location_and_problem(
    text: str, line: int, where: str, message: str
) -> None:
    problems = problems_of(text)
    assert f"{PATH}:{line}: {where}: {message}" in problems, problems


# Bugs found in config.py, fixed: each with what it must say.
KNOWN_BUGS = [
    pytest.param(
        PROG + "    readiness: {http: /h, timeout: 0}\n",
        4,
        "programs.experiment.readiness.timeout",
        "must be > 0",
        id="contract-bound-format",
    ),
    pytest.param(
        "registry:\n  endpoints: ['example.com: 2379']\n",
        2,
        "registry.endpoints.0",
        "'example.com: 2379' is not host:port",
        id="message-with-colon-and-dot",
    ),
    pytest.param(
        PROG + "    numprocs: true\n",
        4,
        "programs.experiment.numprocs",
        "must be an integer",
        id="bool-as-number",
    ),
    pytest.param(
        "programs:\n  experiment:\n    command: a\n  experiment:\n    command: b\n",
        4,
        "programs.experiment",
        "duplicate key",
        id="duplicate-key",
    ),
    pytest.param(
        "state_dir: [1]\n",
        1,
        "state_dir",
        "must be a path",
        id="path-type-message",
    ),
]


@pytest.mark.parametrize(("text", "line", "where", "message"), KNOWN_BUGS)
def test_known_config_bugs(text: str, line: int, where: str, message: str) -> None:
    problems = problems_of(text)
    assert f"{PATH}:{line}: {where}: {message}" in problems, problems


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ("{PORT: '80'}", "PORT: is set by flipvisor for every worker; remove it from env"),
        ("{LISTEN_FDS: '2'}", "LISTEN_FDS: is set by flipvisor for every worker"),
        ("{FLIPVISOR_WORKER: '0'}", "FLIPVISOR_WORKER: is set by flipvisor for every worker"),
        ("{'A=B': x}", "A=B: 'A=B' is not a variable name (not empty, no '=')"),
        # Quoted, or the location would read "env.:".
        ("{'': x}", "\"\": '' is not a variable name"),
        ('{A: "x\\0y"}', "A: a value cannot hold a NUL character"),
    ],
)
def test_env_that_would_be_ignored_or_broken_is_refused(env: str, message: str) -> None:
    problems = problems_of(PROG + f"    env: {env}\n")
    assert any(p.startswith(f"{PATH}:4: programs.experiment.env.{message}") for p in problems), (
        problems
    )


def test_every_variable_of_an_env_that_is_refused_is_named_at_its_line() -> None:
    """Not only the first: the operator would fix one, and the next `check` name the next."""
    text = PROG + (
        "    env:\n"
        "      LISTEN_FDS: '2'\n"
        "      APP_ENV: production\n"
        "      NOTIFY_SOCKET: x\n"
        "      'A=B': y\n"
        "      FLIPVISOR_STATE_DIR: z\n"
    )
    reserved = "is set by flipvisor for every worker; remove it from env"
    assert problems_of(text) == [
        f"{PATH}:5: programs.experiment.env.LISTEN_FDS: {reserved}",
        f"{PATH}:7: programs.experiment.env.NOTIFY_SOCKET: {reserved}",
        f"{PATH}:8: programs.experiment.env.A=B: 'A=B' is not a variable name (not empty, no '=')",
        f"{PATH}:9: programs.experiment.env.FLIPVISOR_STATE_DIR: {reserved}",
    ]


def test_proxy_vars_named_like_the_flip_context_are_refused() -> None:
    text = PROG + "    proxy: {template: t.j2, dest: d.conf, vars: {port: 80, listen: 8080}}\n"
    assert problems_of(text) == [
        f"{PATH}:4: programs.experiment.proxy.vars: port is set by flipvisor for the template "
        "(the promoted generation's); choose another name"
    ]


def test_env_may_name_the_config_for_a_worker_that_runs_flipvisor() -> None:
    config = parse_config(PROG + "    env: {FLIPVISOR_CONFIG: /etc/f.yaml, APP_ENV: prod}\n", PATH)
    assert config.programs["experiment"].env == {
        "FLIPVISOR_CONFIG": "/etc/f.yaml",
        "APP_ENV": "prod",
    }


def test_a_yaml_merge_may_override_a_merged_key_but_a_key_written_twice_is_refused() -> None:
    """``<<: *web`` then ``command:``: the usual YAML idiom, whose explicit key wins. It was
    refused as ``duplicate key``: the merged keys are put into the mapping as it is read
    (QA finding). A key written twice in the mapping itself still is one."""
    merged = dedent(
        """\
        programs:
          web: &web
            command: ["sleep", "1"]
            drain: {delay: 0.1, timeout: 3}
          api:
            <<: *web
            command: ["sleep", "2"]
        """
    )
    config = load_config_file_text(merged).config
    assert config.programs["api"].command == ["sleep", "2"]
    assert config.programs["api"].drain.delay == 0.1
    assert problems_of(merged + '    command: ["sleep", "3"]\n') == [
        f"{PATH}:8: programs.api.command: duplicate key"
    ]


def test_a_key_s_control_characters_are_escaped_in_its_location() -> None:
    """An ESC in an unknown key, a NUL in an env name: the location sent them raw to the
    terminal (QA finding)."""
    problems = problems_of(PROG + '    env: {"A\\0B": x}\n"a\\eb": 1\n')
    assert problems == [
        f"{PATH}:4: programs.experiment.env.\"A\\u0000B\": 'A\\x00B' is not a variable name "
        "(not empty, no '=')",
        f'{PATH}:5: "a\\u001bb": unknown key',
    ]


@pytest.mark.parametrize("character", ["\\0", "\\t", "\\x7f"])
def test_a_control_character_in_the_http_probe_s_path_is_refused(character: str) -> None:
    """The probe's first request failed with httpx's InvalidURL, an internal error that made the
    program fatal; `check` said ok (QA finding)."""
    problems = problems_of(PROG + f'    readiness: {{http: "/he{character}alth"}}\n')
    assert problems == [
        f"{PATH}:4: programs.experiment.readiness.http: a URL path cannot hold a control "
        "character (NUL, tab, ...)"
    ]


def test_several_problems_are_reported_at_once() -> None:
    text = dedent("""\
        state_dir: /x
        bogus: 1
        programs:
          experiment:
            command: x
            numprocs: 0
            drain:
              timeout: abc
        """)
    # In the file's order (they came in the models': the unknown key last).
    assert problems_of(text) == [
        f"{PATH}:2: bogus: unknown key",
        f"{PATH}:6: programs.experiment.numprocs: must be >= 1",
        f"{PATH}:8: programs.experiment.drain.timeout: must be a number",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    # The message an operator sees lists every problem, one a line.
    assert str(caught.value).splitlines()[1:] == [f"  {p}" for p in caught.value.problems]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        pytest.param(
            "programs:\n  experiment:\n    command: [x\n",
            r":4:1: not valid YAML: .* \(while parsing a flow sequence at line 3, column 14\)$",
            id="unclosed-flow",
        ),
        pytest.param("programs:\n\texperiment: 1\n", r":2:1: not valid YAML", id="tab"),
        pytest.param("- a\n- b\n", r": the top level must be a mapping of keys", id="list"),
        pytest.param("hello\n", r": the top level must be a mapping of keys", id="scalar"),
    ],
)
def test_not_a_config_document(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    assert re.search(re.escape(str(PATH)) + pattern, str(caught.value)), str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE


def test_defaults() -> None:
    config = parse_config(PROG, PATH)
    assert config.state_dir == Path("/var/lib/flipvisor")
    assert config.socket_path == Path("/var/lib/flipvisor/flipvisor.sock")
    assert config.registry.backend == "local"
    assert config.registry.endpoints == ["127.0.0.1:2379"]
    assert config.registry.prefix == "flipvisor"
    assert config.registry.timeout == 5.0
    assert config.logs.max_bytes == 10 * 1024 * 1024
    assert config.logs.backups == 5
    assert config.metrics is None
    assert config.watch == []
    program = config.programs["experiment"]
    assert program.command == ["x"]
    assert program.numprocs == 1
    assert program.cwd is None
    assert program.env == {}
    assert program.autostart is True
    assert (program.socket.host, program.socket.port, program.socket.backlog) == (
        "127.0.0.1",
        0,
        1024,
    )
    assert program.readiness is None
    assert (program.drain.delay, program.drain.signal, program.drain.timeout) == (
        0.5,
        signal.SIGTERM,
        10.0,
    )
    assert (program.restart.policy, program.restart.max_restarts, program.restart.window) == (
        "always",
        5,
        60.0,
    )
    assert program.proxy is None
    assert program.rollback_window == 0.0


@pytest.mark.parametrize(
    ("text", "what"),
    [
        pytest.param("", "the file is empty (no YAML document)", id="0-bytes"),
        pytest.param("\n  \n", "the file is empty (no YAML document)", id="blank"),
        pytest.param("# all of it\n# commented out\n", "the file is empty", id="comments"),
        pytest.param("---\n", "its document is empty", id="bare-document"),
        pytest.param("null\n", "its document is empty", id="null"),
    ],
)
def test_an_empty_file_is_refused_not_read_as_a_config_without_programs(
    text: str, what: str
) -> None:
    """A file a config tool truncated before a reload would otherwise stop every program."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    assert str(caught.value).startswith(f"{PATH}: {what}"), str(caught.value)
    assert "`programs: {}` for none" in str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("text", ["programs:\n", "programs: {}\n", "state_dir: /x\n"])
def test_a_file_that_says_it_has_no_programs_is_valid(text: str) -> None:
    assert parse_config(text, PATH).programs == {}


def test_a_config_of_defaults_only_is_the_default_config() -> None:
    assert parse_config("programs:\n", PATH) == Config()


def test_string_command_is_split_like_a_shell_but_never_run_by_one() -> None:
    text = "programs:\n  experiment:\n    command: \"python3 app.py --name 'a b' ; rm -rf $HOME\"\n"
    command = parse_config(text, PATH).programs["experiment"].command
    # ';' and '$HOME' stay literal arguments: no shell ever sees them.
    assert command == ["python3", "app.py", "--name", "a b", ";", "rm", "-rf", "$HOME"]


def test_list_command_is_kept_verbatim() -> None:
    text = "programs:\n  experiment:\n    command: [sh, -c, 'echo {port}; exit 1']\n"
    assert parse_config(text, PATH).programs["experiment"].command == [
        "sh",
        "-c",
        "echo {port}; exit 1",
    ]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config_file = tmp_path / "conf" / "flipvisor.yaml"
    config_file.parent.mkdir()
    config_file.write_text(
        dedent("""\
        state_dir: state
        registry: {ca: tls/ca.pem, cert: tls/c.pem, key: /abs/k.pem}
        programs:
          experiment:
            command: x
            cwd: app
            proxy:
              {template: templates/nginx.conf.j2, dest: ../out/exp.conf, pidfile: run/nginx.pid}
        watch:
          - keys: [p/experiment/port/current]
            template: t.j2
            dest: /etc/out.conf
        """)
    )
    base = config_file.parent.resolve()
    config = load_config(config_file)
    assert config.state_dir == base / "state"
    assert config.registry.ca == base / "tls/ca.pem"
    assert config.registry.cert == base / "tls/c.pem"
    assert config.registry.key == Path("/abs/k.pem")
    program = config.programs["experiment"]
    assert program.cwd == base / "app"
    assert program.proxy is not None
    assert program.proxy.template == base / "templates/nginx.conf.j2"
    assert program.proxy.dest == base / "../out/exp.conf"
    assert program.proxy.pidfile == base / "run/nginx.pid"
    assert config.watch[0].template == base / "t.j2"
    assert config.watch[0].dest == Path("/etc/out.conf")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("TERM", signal.SIGTERM),
        ("sigquit", signal.SIGQUIT),
        ("INT", signal.SIGINT),
        (15, signal.SIGTERM),
        (int(signal.SIGUSR1), signal.SIGUSR1),
    ],
)
def test_signal_by_name_or_number(value: str | int, expected: signal.Signals) -> None:
    config = parse_config(PROG + f"    drain: {{signal: {value}}}\n", PATH)
    assert config.programs["experiment"].drain.signal is expected


@pytest.mark.parametrize("name", ["SIGSTOP", "TSTP", "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGCHLD"])
def test_a_drain_signal_that_does_not_ask_a_process_to_stop_is_refused(name: str) -> None:
    """A drain by SIGSTOP would freeze the workers mid-request until the SIGKILL at the timeout."""
    signame = name if name.startswith("SIG") else "SIG" + name
    (message,) = problems_of(PROG + f"    drain: {{signal: {name}}}\n")
    assert message.startswith(
        f"{PATH}:4: programs.experiment.drain.signal: {signame} does not ask a process to stop: "
    ), message
    assert message.endswith(
        "so a drain would leave the processes holding their requests until the SIGKILL at the "
        "timeout; use SIGTERM, or the signal the server stops gracefully on (SIGQUIT for nginx, "
        "SIGWINCH for Apache)"
    ), message
    watch = f"watch:\n  - keys: [a/b/pid/previous]\n    drain_pid: {{signal: {name}}}\n"
    assert problems_of(watch)[0].startswith(
        f"{PATH}:3: watch.0.drain_pid.signal: {signame} does not ask a process to stop"
    )


@pytest.mark.parametrize("name", ["SIGKILL", "SIGWINCH", "SIGQUIT", "SIGHUP", "SIGUSR2"])
def test_signals_that_a_server_may_stop_on_are_accepted(name: str) -> None:
    config = parse_config(PROG + f"    drain: {{signal: {name}}}\n", PATH)
    assert config.programs["experiment"].drain.signal.name == name


def test_a_drain_by_sigkill_is_warned_of() -> None:
    text = PROG + (
        "    drain: {signal: KILL}\n"
        "watch:\n  - keys: [a/b/pid/previous]\n    drain_pid: {signal: 9}\n"
    )
    assert [str(p) for p in sigkill_warnings(load_config_file_text(text))] == [
        f"{PATH}:4: warning: programs.experiment.drain.signal: SIGKILL cannot be handled: the "
        "workers are, after drain.delay, killed at once, with the requests each still holds; "
        "SIGTERM lets each finish them, and SIGKILL follows at the timeout",
        f"{PATH}:7: warning: watch.0.drain_pid.signal: SIGKILL cannot be handled: the process is "
        "killed at once, with the requests it still holds; SIGTERM lets it finish them, and "
        "SIGKILL follows at the timeout",
    ]
    assert sigkill_warnings(load_config_file_text(PROG)) == []


def test_config_is_frozen() -> None:
    config = parse_config(PROG, PATH)
    with pytest.raises(ValueError, match="frozen"):
        config.programs["experiment"].numprocs = 2  # type: ignore[misc]


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_the_example_config_parses() -> None:
    example = EXAMPLE
    config = load_config(example)
    program = config.programs["experiment"]
    assert program.command == ["python3", "tests/apps/svc.py", "--version", "1"]
    assert program.cwd == example.parent
    assert program.readiness is not None and program.readiness.http
    assert program.proxy is not None
    assert program.proxy.template == example.parent / "templates/nginx.conf.j2"
    assert program.proxy.template.is_file()
    assert program.proxy.dest.is_relative_to(config.state_dir)


def test_the_example_s_watch_entries_uncommented_are_valid_and_warn_of_nothing(
    tmp_path: Path,
) -> None:
    """Its commented ``watch:`` block, as an operator would uncomment it: valid, and not on the
    keys of the example's own program (check warned of its drain_pid, which drains a program
    the same supervisor drains itself)."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index("# watch:")
    block = [line.removeprefix("# ") for line in lines[start:]]
    copy = tmp_path / "flipvisor.yaml"
    copy.write_text("\n".join([*lines[:start], *block]) + "\n", encoding="utf-8")
    parsed = load_config_file(copy)
    assert [entry.drain_pid is not None for entry in parsed.config.watch] == [False, True]
    assert watch_warnings(parsed) == []


def _field_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for arg in (field.annotation, *get_args(field.annotation)):
            for inner in (arg, *get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    names |= _field_names(inner)
    return names


def test_the_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = sorted(name for name in _field_names(Config) if f"{name}:" not in text)
    assert not missing, f"flipvisor.yaml.example does not mention {missing}"


@pytest.mark.parametrize(
    "readiness", ["", "    readiness: {notify: true}\n"], ids=["none", "notify"]
)
def test_a_fixed_port_is_accepted_where_readiness_cannot_be_fooled(readiness: str) -> None:
    """Without a probe there is nothing to fool, and sd_notify comes from the new workers."""
    config = parse_config(PROG + "    socket: {port: 8080}\n" + readiness, PATH)
    assert config.programs["experiment"].socket.port == 8080


@pytest.mark.parametrize(
    ("first_host", "second_host"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "::")],
    ids=["same-host", "wildcard-first", "wildcard-second"],
)
def test_two_programs_cannot_share_a_fixed_port(first_host: str, second_host: str) -> None:
    """Only one could bind it: said by ``check``, not by a start that fails later."""
    text = dedent(
        f"""\
        programs:
          a:
            command: x
            socket: {{host: "{first_host}", port: 8080}}
          b:
            command: y
            socket:
              host: "{second_host}"
              port: 8080
        """
    )
    # Each address said as whose it is (QA 13: `[::]:P is metrics.listen's already` named the
    # program's address as the other key's).
    taken = (
        "is programs.a's already"
        if first_host == second_host
        else f"overlaps programs.a's {host_port(first_host, 8080)}"
    )
    assert problems_of(text) == [
        f"{PATH}:9: programs.b.socket.port: {host_port(second_host, 8080)} {taken} "
        "(each fixed port belongs to one program)"
    ]


def host_port(host: str, port: int) -> str:
    """As the problems write an address: IPv6 bracketed (`[::]:8080`; `:::8080` was ambiguous)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize(
    ("metrics_host", "program_host", "clashes"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),
        ("127.0.0.1", "::", True),
        ("localhost", "127.0.0.1", True),  # a name: the addresses it resolves to (found by QA)
        ("127.0.0.2", "127.0.0.1", False),
        ("0.0.0.0", "::1", False),  # IPv4's wildcard leaves IPv6 addresses free
        ("::1", "0.0.0.0", False),
        ("0.0.0.0", "::", True),  # a program's `::` is dual-stack: it takes IPv4's port too
    ],
)
def test_a_program_cannot_take_the_metrics_port(
    metrics_host: str, program_host: str, clashes: bool
) -> None:
    """`run` binds the metrics endpoint first; the program would go fatal at every start with
    "in use by pid <the supervisor>" (found by QA)."""
    text = dedent(
        f"""\
        metrics: {{listen: "{metrics_host}:9100"}}
        programs:
          web:
            command: x
            socket: {{host: "{program_host}", port: 9100}}
        """
    )
    taken = (
        "is metrics.listen's already"
        if metrics_host == program_host
        else f"overlaps metrics.listen's {host_port(metrics_host, 9100)}"
    )
    expected = [
        f"{PATH}:5: programs.web.socket.port: {host_port(program_host, 9100)} {taken} "
        "(the supervisor's metrics endpoint listens there)"
    ]
    if clashes:
        assert problems_of(text) == expected
    else:
        assert parse_config(text, PATH).programs["web"].socket.port == 9100


def test_programs_on_different_hosts_or_ports_may_use_fixed_ports() -> None:
    text = dedent(
        """\
        programs:
          a: {command: x, socket: {host: 127.0.0.1, port: 8080}}
          b: {command: y, socket: {host: 127.0.0.2, port: 8080}}
          c: {command: z, socket: {host: 127.0.0.1, port: 8081}}
          d: {command: w}
          e: {command: v}
        """
    )
    assert len(parse_config(text, PATH).programs) == 5


def test_a_program_name_too_long_for_its_files_is_refused() -> None:
    # Its log and history files could not be created (`check` said ok, the logs were lost).
    assert len(parse_config(f"programs:\n  {'a' * 200}: {{command: x}}\n", PATH).programs) == 1
    (problem,) = problems_of(f"programs:\n  {'a' * 201}: {{command: x}}\n")
    assert "a program name is at most 200 characters" in problem and "not 201" in problem


def test_a_state_dir_too_long_for_the_control_socket_is_refused() -> None:
    # `run` died with a traceback binding it ("AF_UNIX path too long"); `check` said ok.
    fits = "/" + "s" * (107 - len("/flipvisor.sock") - 1)
    assert parse_config(f"state_dir: {fits}\n", PATH).state_dir == Path(fits)
    (problem,) = problems_of(f"state_dir: {fits}s\n")
    assert problem.startswith(f"{PATH}:1: state_dir: {fits}s is too long: the control socket")
    assert "choose a shorter state_dir" in problem


def test_a_notify_socket_path_too_long_is_refused() -> None:
    name = "n" * 80  # /var/lib/flipvisor/notify/<name>-<generation>.sock: over 107 bytes
    text = f"programs:\n  {name}:\n    command: x\n    readiness: {{notify: true}}\n"
    (problem,) = problems_of(text)
    assert problem.startswith(f"{PATH}:4: programs.{name}.readiness.notify: the notify socket")
    assert len(parse_config(text.replace("{notify: true}", "{http: /}"), PATH).programs) == 1


def test_two_programs_cannot_share_a_proxy_file(tmp_path: Path) -> None:
    """Each flip rewrites the whole file for its own program: `check` said ok, and one program's
    routing was silently lost (a reload removing the other left the file on a drained port)."""
    text = dedent(
        """\
        programs:
          a:
            command: x
            proxy: {template: t.j2, dest: out/shared.conf}
          b:
            command: y
            proxy:
              template: t.j2
              dest: ./out/../out/shared.conf
        """
    )
    shared = PATH.parent / "out" / "shared.conf"
    assert problems_of(text) == [
        f"{PATH}:9: programs.b.proxy.dest: {PATH.parent}/out/../out/shared.conf (that is "
        f"{shared}) is programs.a.proxy.dest already (each proxy file belongs to one program, "
        "which rewrites all of it at every flip); give each program its own dest"
    ]


def test_a_proxy_file_shared_through_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    text = dedent(
        f"""\
        programs:
          a: {{command: x, proxy: {{template: t.j2, dest: {tmp_path}/real/x.conf}}}}
          b: {{command: y, proxy: {{template: t.j2, dest: {tmp_path}/link/x.conf}}}}
        """
    )
    (problem,) = problems_of(text, tmp_path / "flipvisor.yaml")
    assert problem.startswith(f"{tmp_path}/flipvisor.yaml:3: programs.b.proxy.dest: ")
    assert "is programs.a.proxy.dest already" in problem


ONE_WRITER = (
    "(a file has one writer: a program rewrites all of it at every flip, a watch entry at every "
    "change of its keys); give each its own dest"
)


def test_two_watch_entries_cannot_share_a_dest() -> None:
    """Each render rewrites the whole file from its own keys: `check` said ok, and the two entries
    overwrote each other at every change."""
    text = dedent(
        """        watch:
          - keys: [a/port/current]
            template: t.j2
            dest: out/shared.conf
          - keys: [a/pid/previous]
            drain_pid: {}
          - keys: [b/port/current]
            template: t.j2
            dest: ./out/../out/shared.conf
        """
    )
    shared = PATH.parent / "out" / "shared.conf"
    assert problems_of(text) == [
        f"{PATH}:9: watch.2.dest: {PATH.parent}/out/../out/shared.conf (that is {shared}) is "
        f"watch.0.dest already {ONE_WRITER}"
    ]


def test_a_watch_entry_cannot_write_a_programs_proxy_file(tmp_path: Path) -> None:
    """`run` runs the watch entries beside the programs: a flip and a render fought over the file.
    Compared after realpath, as between programs; the writer further down is the one named."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    program = (
        f"programs:\n  a: {{command: x, proxy: {{template: t, dest: {tmp_path}/real/a.conf}}}}\n"
    )
    watch = f"watch:\n  - {{keys: [k], template: t, dest: {tmp_path}/link/a.conf}}\n"
    config = tmp_path / "flipvisor.yaml"
    assert problems_of(program + watch, config) == [
        f"{config}:4: watch.0.dest: {tmp_path}/link/a.conf (that is {tmp_path}/real/a.conf) is "
        f"programs.a.proxy.dest already {ONE_WRITER}"
    ]
    assert problems_of(watch + program, config) == [
        f"{config}:4: programs.a.proxy.dest: {tmp_path}/real/a.conf is watch.0.dest already "
        f"{ONE_WRITER}"
    ]
    other = watch.replace("a.conf", "b.conf")
    assert len(parse_config(program + other, config).watch) == 1


def test_programs_with_their_own_proxy_files_are_accepted() -> None:
    text = dedent(
        """\
        programs:
          a: {command: x, proxy: {template: t.j2, dest: out/a.conf}}
          b: {command: y, proxy: {template: t.j2, dest: out/b.conf}}
          c: {command: z}
          d: {command: w}
        """
    )
    assert len(parse_config(text, PATH).programs) == 4


# Every number of seconds in the file, as (YAML text, line, dotted location). A `.inf` in any of
# them made `stop`, `shutdown` or SIGTERM wait forever (`.nan` was refused already).
DURATIONS = [
    ("registry: {timeout: V}\n", 1, "registry.timeout"),
    (PROG + "    readiness: {http: /h, timeout: V}\n", 4, "programs.experiment.readiness.timeout"),
    (
        PROG + "    readiness: {http: /h, interval: V}\n",
        4,
        "programs.experiment.readiness.interval",
    ),
    (PROG + "    drain: {delay: V}\n", 4, "programs.experiment.drain.delay"),
    (PROG + "    drain: {timeout: V}\n", 4, "programs.experiment.drain.timeout"),
    (PROG + "    restart: {window: V}\n", 4, "programs.experiment.restart.window"),
    (
        PROG + "    proxy: {template: t, dest: d, timeout: V}\n",
        4,
        "programs.experiment.proxy.timeout",
    ),
    (PROG + "    rollback_window: V\n", 4, "programs.experiment.rollback_window"),
    (
        "watch:\n  - keys: [a/b/pid/previous]\n    drain_pid: {timeout: V}\n",
        3,
        "watch.0.drain_pid.timeout",
    ),
]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".Inf", "1.0e+400", ".nan"])
@pytest.mark.parametrize(("text", "line", "where"), DURATIONS, ids=[d[2] for d in DURATIONS])
def test_every_duration_must_be_finite(text: str, line: int, where: str, value: str) -> None:
    assert problems_of(text.replace("V", value)) == [
        f"{PATH}:{line}: {where}: must be a finite number"
    ]
    parse_config(text.replace("V", "2.5"), PATH)  # the same key with a finite value is fine


@pytest.mark.parametrize(("text", "line", "where"), DURATIONS, ids=[d[2] for d in DURATIONS])
def test_every_duration_has_an_upper_bound(text: str, line: int, where: str) -> None:
    """`1.0e+300` is finite, and was accepted: a typo that made a drain or a probe wait for ever
    (and arithmetic on it overflow). A day is the bound (a week for rollback_window)."""
    limit, words = (604800, "one week") if where.endswith("rollback_window") else (86400, "one day")
    for value in ("1.0e+300", f"{limit + 0.5}"):
        assert problems_of(text.replace("V", value)) == [
            f"{PATH}:{line}: {where}: must be at most {limit:g} seconds ({words})"
        ]
    parse_config(text.replace("V", f"{limit}"), PATH)  # the bound itself is allowed


def _float_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """The dotted names of every float field under ``model`` (``*``: any program or entry)."""
    found: set[str] = set()
    for name, field in model.model_fields.items():
        container = get_origin(field.annotation) in {dict, list}
        for arg in (field.annotation, *get_args(field.annotation)):
            if arg is float:
                found.add(prefix + name)
            elif isinstance(arg, type) and issubclass(arg, BaseModel):
                found |= _float_fields(arg, f"{prefix}{name}.{'*.' if container else ''}")
    return found


def test_every_duration_is_in_the_finite_test() -> None:
    """A number of seconds added to a model later must be checked too."""
    covered = {
        where.replace("programs.experiment.", "programs.*.").replace("watch.0.", "watch.*.")
        for _, _, where in DURATIONS
    }
    assert _float_fields(Config) == covered


def test_a_file_that_is_not_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    """A Latin-1 "é" in a comment ended `check`, `run` and SIGHUP's reload in a traceback."""
    config = tmp_path / "flipvisor.yaml"
    config.write_bytes(b"state_dir: st\n# caf\xe9\nprograms: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.exit_code == EXIT_USAGE
    assert str(caught.value) == (
        f"{config}:2: not UTF-8: byte 0xe9 at column 6 (invalid continuation byte); save the "
        "file as UTF-8 (for example with `iconv -f latin1 -t utf-8`)"
    )


NO_USER = "nosuchuser-flipvisor"  # no passwd entry on any test host


@pytest.mark.parametrize(
    ("text", "line", "where"),
    [
        (f"state_dir: ~{NO_USER}/fv\n", 1, "state_dir"),
        (PROG + f"    cwd: ~{NO_USER}\n", 4, "programs.experiment.cwd"),
        (
            PROG + f"    proxy: {{template: t, dest: ~{NO_USER}/d}}\n",
            4,
            "programs.experiment.proxy.dest",
        ),
        (f"registry: {{ca: ~{NO_USER}/ca.pem}}\n", 1, "registry.ca"),
    ],
    ids=["state_dir", "cwd", "proxy.dest", "registry.ca"],
)
def test_a_home_folder_of_an_unknown_user_is_named(text: str, line: int, where: str) -> None:
    """`~user` of no such user ended in pathlib's "Could not determine home directory" traceback."""
    (problem,) = problems_of(text)
    assert problem.startswith(f"{PATH}:{line}: {where}: unknown user '{NO_USER}' in '~{NO_USER}")
    assert problem.endswith("write the folder out, or create the user"), problem


def test_a_section_left_empty_means_its_defaults() -> None:
    """`drain:` with nothing under it (YAML null) was "must be a mapping", while `readiness:` and
    `proxy:` left empty mean unset: every mapping section now takes null as its defaults."""
    text = dedent(
        """\
        registry:
        logs:
        watch:
        programs:
          experiment:
            command: x
            env:
            socket:
            drain:
            restart:
            readiness:
            proxy:
        """
    )
    assert parse_config(text, PATH) == parse_config(PROG, PATH)
    assert parse_config("programs:\n", PATH) == Config()
    vars_null = PROG + "    proxy:\n      template: t\n      dest: d\n      vars:\n"
    proxy = parse_config(vars_null, PATH).programs["experiment"].proxy
    assert proxy is not None and proxy.vars == {}


@pytest.mark.timeout(20)
def test_aliases_of_aliases_are_refused_before_they_expand() -> None:
    """A "billion laughs": nine lists of nine aliases of the one before, 9**9 values once
    expanded. Refused at once (found by QA: `check` hung, and a SIGHUP's reload would have held
    the supervisor's event loop), naming where the expansion went past the bound."""
    anchors = ['  a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    anchors += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(
        ["x:", *anchors, "programs:", "  web:", "    command: x", "    env:", "      BOMB: *a8"]
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text + "\n", PATH)
    said = str(caught.value)
    assert re.match(rf"{re.escape(str(PATH))}:\d+:\d+: not valid YAML: the document expands", said)
