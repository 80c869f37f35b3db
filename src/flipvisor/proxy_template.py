"""The proxy file's text: the flip's template context, checked so that no value can inject nginx
syntax, and the jinja2 template rendered with it (or only parsed, for ``flipvisor check``).

jinja2 is imported only when a template is first used: programs without a proxy section never
pay for it. Errors are ``ProxyError``s that name the template file and line.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config_fields import PROGRAM_NAME_RE
from .errors import ProxyError

if TYPE_CHECKING:
    import jinja2.nodes


def _where(template: Path, exc: BaseException) -> str:
    """The template file and line a render error happened in, for the message.

    jinja2 rewrites tracebacks so that frames of compiled templates carry the template's own
    file name and line (marked by ``__jinja_exception__`` in their globals); the innermost one is
    where the problem is, which may be an ``{% include %}``d file.
    """
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
        return f"{exc.filename or template}, line {exc.lineno}"
    where = str(template)
    tb = exc.__traceback__
    while tb is not None:
        if "__jinja_exception__" in tb.tb_frame.f_globals:
            where = f"{tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno}"
        tb = tb.tb_next
    return where


def parse_template(template: Path, context_names: Collection[str]) -> list[str]:
    """Parse ``template`` without rendering it: for a template whose context exists only at run
    time (a watch entry's keys), ``flipvisor check`` finds its syntax errors. Returns the names
    it looks up that are neither in ``context_names`` nor jinja2's own (``range``, ``dict``...),
    sorted, leaving out those the template guards somewhere (``x is defined``, ``x is
    undefined``, ``x | default(...)``): whoever guards a name knows that it may be missing.

    Raises:
        ProxyError: the template is missing or unreadable, or has a syntax error; the message
            names the file and line.
    """
    import jinja2
    import jinja2.meta

    try:
        source = template.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProxyError(f"proxy template {template}: cannot read: {exc}") from exc
    env = jinja2.Environment(keep_trailing_newline=True)
    try:
        parsed = env.parse(source, filename=str(template))
    except jinja2.TemplateSyntaxError as exc:
        raise ProxyError(f"proxy template {_where(template, exc)}: {exc.message}") from exc
    looked_up = jinja2.meta.find_undeclared_variables(parsed)
    return sorted(looked_up - set(context_names) - set(env.globals) - _guarded_names(parsed))


def _guarded_names(parsed: jinja2.nodes.Template) -> set[str]:
    """The names a template tests with ``is defined``/``is undefined`` or gives a ``default``."""
    import jinja2.nodes

    guarded = set()
    for node in parsed.find_all((jinja2.nodes.Test, jinja2.nodes.Filter)):
        guard = node.name in (_GUARD_TESTS if isinstance(node, jinja2.nodes.Test) else _DEFAULTS)
        if guard and isinstance(node.node, jinja2.nodes.Name):
            guarded.add(node.node.name)
    return guarded


_GUARD_TESTS = frozenset({"defined", "undefined"})
_DEFAULTS = frozenset({"default", "d"})


def render_template(template: Path, context: Mapping[str, object]) -> str:
    """Render ``template`` (a jinja2 file) with ``context``; an unknown variable is an error.

    Raises:
        ProxyError: the template is missing or unreadable, has a syntax error, uses a variable
            the context lacks, or fails while rendering; the message names the file and line.
    """
    import jinja2  # only programs with a proxy section pay for it

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # nginx config, not HTML: values are validated instead (flip_context)
        keep_trailing_newline=True,
    )
    try:
        compiled = env.get_template(template.name)
    except jinja2.TemplateNotFound as exc:
        raise ProxyError(f"proxy template {template}: no such file") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise ProxyError(f"proxy template {_where(template, exc)}: {exc.message}") from exc
    except OSError as exc:
        raise ProxyError(f"proxy template {template}: cannot read: {exc.strerror}") from exc
    try:
        return compiled.render(dict(context))
    # A template is user code: whatever it raises (an undefined variable, a failing filter) is the
    # operator's problem to fix, so it becomes a ProxyError that says where.
    except Exception as exc:
        problem = exc.message if isinstance(exc, jinja2.TemplateError) else repr(exc)
        raise ProxyError(f"proxy template {_where(template, exc)}: {problem}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _upstream_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address nginx should connect to, as it is written in an ``upstream`` server line."""
    if address.is_unspecified:
        # A socket bound to 0.0.0.0/:: is reachable on loopback; connecting to the unspecified
        # address itself only works by accident on Linux.
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"[{address}]" if address.version == 6 else str(address)


def flip_context(
    *, program: str, generation: int, host: str, port: int, pids: Sequence[int]
) -> dict[str, object]:
    """The template context of a flip, with every value checked so none can inject nginx syntax.

    ``upstreams`` lists the promoted generation's ``host:port`` (IPv6 as ``[::1]:port``).

    Raises:
        ProxyError: a value is of the wrong type, out of range, or not plain (a program name that
            is not a config program name, a host that is not an IP address, ...).
    """
    if not isinstance(program, str) or not PROGRAM_NAME_RE.fullmatch(program):
        raise ProxyError(f"proxy context: program {program!r} is not a valid program name")
    if not _is_int(generation) or generation < 1:
        raise ProxyError(f"proxy context: generation {generation!r} is not a positive integer")
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ProxyError(f"proxy context: port {port!r} is not an integer in 1..65535")
    if not isinstance(host, str):
        raise ProxyError(f"proxy context: host {host!r} is not an IP address")
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ProxyError(f"proxy context: host {host!r} is not an IP address") from exc
    # A scope id ("fe80::1%eth0") is free text to ipaddress; nginx cannot use one in any case.
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ProxyError(f"proxy context: host {host!r} has a scope id, which nginx cannot use")
    if isinstance(pids, str | bytes) or not all(_is_int(pid) and pid > 0 for pid in pids):
        raise ProxyError(f"proxy context: pids {pids!r} are not positive integers")
    return {
        "program": program,
        "generation": generation,
        "host": host,
        "port": port,
        "pids": list(pids),
        "upstreams": [f"{_upstream_host(address)}:{port}"],
    }
