"""Rendering the proxy template: strict variables, errors that say where, a safe context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flipvisor.config_fields import TEMPLATE_CONTEXT
from flipvisor.errors import ProxyError
from flipvisor.proxy_template import flip_context, render_template

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "nginx.conf.j2"


def context(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "program": "experiment",
        "generation": 2,
        "host": "127.0.0.1",
        "port": 41234,
        "pids": [101, 102],
    }
    values.update(overrides)
    return flip_context(**values)  # type: ignore[arg-type]


def test_the_config_refuses_vars_named_like_the_flip_context() -> None:
    # config_fields.TEMPLATE_CONTEXT is what `proxy.vars` may not name: exactly the context's keys.
    assert set(context()) == TEMPLATE_CONTEXT


def test_flip_context_has_the_contract_keys() -> None:
    assert context() == {
        "program": "experiment",
        "generation": 2,
        "host": "127.0.0.1",
        "port": 41234,
        "pids": [101, 102],
        "upstreams": ["127.0.0.1:41234"],
    }


@pytest.mark.parametrize(
    ("host", "upstream"),
    [
        ("::1", "[::1]:41234"),
        ("0.0.0.0", "127.0.0.1:41234"),
        ("::", "[::1]:41234"),
        ("10.1.2.3", "10.1.2.3:41234"),
    ],
)
def test_upstreams_are_connectable_addresses(host: str, upstream: str) -> None:
    assert context(host=host)["upstreams"] == [upstream]


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": "80; include /etc/passwd"},
        {"port": "8080"},
        {"port": 0},
        {"port": 65536},
        {"port": True},
        {"port": 80.0},
        {"host": "1.2.3.4;"},
        {"host": "1.2.3.4:80; include /etc/passwd"},
        {"host": "localhost"},
        {"host": "fe80::1%;include /etc/passwd"},
        {"host": 2130706433},
        {"program": "exp;eriment"},
        {"program": "experiment {"},
        {"program": "experiment\n"},
        {"program": "-experiment"},
        {"program": ""},
        {"generation": 0},
        {"generation": "2"},
        {"pids": [101, "102; x"]},
        {"pids": "101"},
        {"pids": [-1]},
    ],
)
def test_flip_context_rejects_what_could_inject(overrides: dict[str, object]) -> None:
    with pytest.raises(ProxyError, match="proxy context"):
        context(**overrides)


def test_template_renders_upstream_and_server() -> None:
    text = render_template(TEMPLATE, {**context(), "listen": 18080})
    assert re.search(r"upstream flipvisor_experiment \{\n\s+server 127\.0\.0\.1:41234;", text)
    assert "listen 18080;" in text
    assert "proxy_pass http://flipvisor_experiment;" in text
    for directive in (
        "proxy_next_upstream error timeout;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "keepalive ",
    ):
        assert directive in text
    assert text.endswith("}\n")  # keep_trailing_newline


def test_template_listen_defaults_to_8080() -> None:
    assert "listen 8080;" in render_template(TEMPLATE, context())


def test_template_renders_ipv6_upstream() -> None:
    assert "server [::1]:41234;" in render_template(TEMPLATE, context(host="::1"))


def test_missing_variable_names_template_line_and_variable(tmp_path: Path) -> None:
    template = tmp_path / "site.conf.j2"
    template.write_text("upstream a {\n    server {{ host }}:{{ prot }};\n}\n")
    with pytest.raises(ProxyError) as caught:
        render_template(template, {"host": "127.0.0.1"})
    message = str(caught.value)
    assert str(template) in message
    assert "line 2" in message
    assert "prot" in message


def test_missing_variable_of_the_real_template(tmp_path: Path) -> None:
    values = context()
    del values["upstreams"]
    with pytest.raises(ProxyError, match=r"nginx\.conf\.j2, line \d+: 'upstreams' is undefined"):
        render_template(TEMPLATE, values)


def test_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    template = tmp_path / "broken.j2"
    template.write_text("a\nb\n{% for x in upstreams %}\nserver {{ x }};\n")
    with pytest.raises(ProxyError) as caught:
        render_template(template, context())
    message = str(caught.value)
    assert str(template) in message
    assert "line 4" in message or "line 5" in message
    assert "endfor" in message


def test_failing_filter_names_template(tmp_path: Path) -> None:
    template = tmp_path / "bad.j2"
    template.write_text("x\n{{ port // 0 }}\n")
    with pytest.raises(ProxyError, match=r"bad\.j2, line 2: ZeroDivisionError"):
        render_template(template, context())


def test_missing_template_file(tmp_path: Path) -> None:
    with pytest.raises(ProxyError, match="no such file"):
        render_template(tmp_path / "nope.j2", context())


def test_no_autoescape() -> None:
    # nginx config, not HTML: a quote must stay a quote.
    text = render_template(TEMPLATE, context())
    assert 'proxy_set_header Connection "";' in text
    assert "&#34;" not in text


def test_error_in_an_included_template_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "main.j2").write_text('upstream a {\n{% include "servers.j2" %}\n}\n')
    (tmp_path / "servers.j2").write_text("# servers\n    server {{ hots }}:{{ port }};\n")
    with pytest.raises(ProxyError, match=r"servers\.j2, line 2: 'hots' is undefined"):
        render_template(tmp_path / "main.j2", context())
