"""check's warnings about a `{name}` in a command that flipvisor does not replace there (a typo
like `{prot}` reached the app as written); any other braces are left alone."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from flipvisor.config_file import parse_config_file
from flipvisor.placeholders import placeholder_warnings

PATH = Path("/etc/flipvisor/flipvisor.yaml")


def warnings_of(text: str) -> list[str]:
    return [str(warning) for warning in placeholder_warnings(parse_config_file(dedent(text), PATH))]


@pytest.mark.parametrize(
    "arg",
    [
        "--port={port}",
        "{fd}",
        "g{generation}-w{worker}",
        '{"listen": 8000}',  # JSON
        "{print $1}",  # awk: not a bare name in braces
        "${HOME}/app",  # a shell's variable, for `sh -c`
        "{}",
        "{1}",
        "{ port }",
    ],
)
def test_what_is_replaced_or_is_no_placeholder_is_not_warned_about(arg: str) -> None:
    assert warnings_of(f"programs:\n  web:\n    command: [app, '{arg}']\n") == []


def test_a_mistyped_placeholder_is_named_with_the_known_ones() -> None:
    text = """\
        programs:
          web:
            command:
              - app
              - --port={prot}
              - --again={prot}
              - --name={nme}
        """
    known = "command's placeholders: {port}, {fd}, {generation}, {worker}"
    assert warnings_of(text) == [
        f"{PATH}:3: warning: programs.web.command: {{prot}} is not replaced in command, so it is "
        f"passed on as written (did you mean {{port}}?); {known}",
        f"{PATH}:3: warning: programs.web.command: {{nme}} is not replaced in command, so it is "
        f"passed on as written; {known}",
    ]


def test_each_command_has_its_own_placeholders() -> None:
    """An exec probe gets only {port}, a check_cmd only {path}, a reload_cmd none."""
    text = """\
        programs:
          web:
            command: [app, "{port}"]
            readiness: {exec: [probe, "{port}", "{fd}"]}
            proxy:
              template: t.j2
              dest: d.conf
              check_cmd: [nginx, -t, -c, "{path}", "{port}"]
              reload_cmd: [reload, "{path}"]
        watch:
          - keys: [a/b]
            template: t.j2
            dest: w.conf
            check_cmd: [check, "{dest}"]
            reload_cmd: [reload]
        """
    assert warnings_of(text) == [
        warned(4, "programs.web.readiness.exec", "fd", "readiness.exec's placeholders: {port}"),
        warned(8, "programs.web.proxy.check_cmd", "port", "proxy.check_cmd's placeholders: {path}"),
        warned(9, "programs.web.proxy.reload_cmd", "path", "proxy.reload_cmd has no placeholders"),
        warned(14, "watch.0.check_cmd", "dest", "check_cmd's placeholders: {path}"),
    ]


def warned(line: int, loc: str, name: str, known: str) -> str:
    field = loc.removeprefix("programs.web.").removeprefix("watch.0.")
    return (
        f"{PATH}:{line}: warning: {loc}: {{{name}}} is not replaced in {field}, so it is passed on "
        f"as written; {known}"
    )
