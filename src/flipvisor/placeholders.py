"""The placeholders flipvisor replaces in the commands of a config, and ``check``'s warnings about
a ``{name}`` that looks like one but is none of them (``{prot}``: a typo the program would get as
written).

Replacement is plain (``str.replace``), so any other braces are kept on purpose: a JSON argument,
an awk program or a jq filter holds them. A ``{word}`` is legitimate there too (``awk '{print}'``,
``jq '{name}'``), which is why it is a warning, printed by ``check`` without changing its exit
code, and never an error that would refuse a file ``run`` has always accepted.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence

from .config_file import ConfigFile
from .problems import Problem

# What is replaced where: worker.py fills in a worker's command, probe.py an exec probe and proxy.py
# a check_cmd (a program's proxy or a watch entry's); nothing is replaced in a reload_cmd.
COMMAND = ("port", "fd", "generation", "worker")
READINESS_EXEC = ("port",)
CHECK_CMD = ("path",)
RELOAD_CMD: tuple[str, ...] = ()

# A name in braces, as a placeholder is written; not a shell's `${name}`, which is one's variable.
_LOOKS_LIKE = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholder_warnings(parsed: ConfigFile) -> list[Problem]:
    """A warning for each ``{name}`` in a command that flipvisor does not replace there."""
    found: list[Problem] = []
    for name, program in parsed.config.programs.items():
        where = ("programs", name)
        found += _unknown(parsed, (*where, "command"), program.command, COMMAND)
        if program.readiness is not None:
            found += _unknown(
                parsed, (*where, "readiness", "exec"), program.readiness.exec, READINESS_EXEC
            )
        if program.proxy is not None:
            proxy = program.proxy
            found += _unknown(parsed, (*where, "proxy", "check_cmd"), proxy.check_cmd, CHECK_CMD)
            found += _unknown(parsed, (*where, "proxy", "reload_cmd"), proxy.reload_cmd, RELOAD_CMD)
    for index, entry in enumerate(parsed.config.watch):
        where = ("watch", str(index))
        found += _unknown(parsed, (*where, "check_cmd"), entry.check_cmd, CHECK_CMD)
        found += _unknown(parsed, (*where, "reload_cmd"), entry.reload_cmd, RELOAD_CMD)
    return found


def _unknown(
    parsed: ConfigFile, loc: tuple[str, ...], argv: Sequence[str] | None, known: Sequence[str]
) -> Iterator[Problem]:
    seen: set[str] = set()
    for arg in argv or ():
        for name in _LOOKS_LIKE.findall(arg):
            if name in known or name in seen:
                continue
            seen.add(name)
            field = ".".join(loc[2:])  # command, readiness.exec, proxy.check_cmd...
            yield parsed.problem(loc, _message(field, name, known), warning=True)


def _message(field: str, name: str, known: Sequence[str]) -> str:
    """``{prot} is not replaced ... (did you mean {port}?); command's placeholders are ...``"""
    said = f"{{{name}}} is not replaced in {field}, so it is passed on as written"
    guess = difflib.get_close_matches(name, known, n=1)
    if guess:
        said += f" (did you mean {{{guess[0]}}}?)"
    if not known:
        return f"{said}; {field} has no placeholders"
    listed = ", ".join(f"{{{placeholder}}}" for placeholder in known)
    return f"{said}; {field}'s placeholders: {listed}"
