"""Where a client finds its supervisor: ``state_dir`` read from the config file without pydantic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flipvisor.config_file import load_config
from flipvisor.errors import ConfigError
from flipvisor.locate import DEFAULT_STATE_DIR, locate, log_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_relative_state_dir_is_resolved_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "conf" / "flipvisor.yaml", "state_dir: run/state\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    where = locate(Path(os.path.relpath(config, elsewhere)))
    assert where.state_dir == tmp_path / "conf" / "run" / "state"
    assert where.socket_path == tmp_path / "conf" / "run" / "state" / "flipvisor.sock"
    assert (
        log_path(where.state_dir, "web") == tmp_path / "conf" / "run" / "state" / "logs" / "web.log"
    )


def test_agrees_with_the_full_loader(tmp_path: Path) -> None:
    """The client and the supervisor must compute the same socket path for the same file."""
    target = write(
        tmp_path / "real" / "flipvisor.yaml",
        "state_dir: ./state\nprograms:\n  web:\n    command: ['true']\n",
    )
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    link = link_dir / "flipvisor.yaml"
    link.symlink_to(target)
    for path in (target, link):
        assert locate(path).state_dir == load_config(path).state_dir


def test_absolute_and_home_state_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = tmp_path / "abs"
    assert locate(write(tmp_path / "a.yaml", f"state_dir: {absolute}\n")).state_dir == absolute
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert locate(write(tmp_path / "b.yaml", "state_dir: ~/fv\n")).state_dir == (
        tmp_path / "home" / "fv"
    )


@pytest.mark.parametrize("text", ["programs: {}\n", "programs:\n", "# a comment\nwatch: []\n"])
def test_default_state_dir(tmp_path: Path, text: str) -> None:
    assert locate(write(tmp_path / "f.yaml", text)).state_dir == DEFAULT_STATE_DIR


@pytest.mark.parametrize("text", ["", "# nothing\n", "---\n"])
def test_an_empty_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    """Not the default state_dir: a client reaches the supervisor of a file truncated under it
    through its run record, saying that the file is empty, as for any other broken file."""
    path = write(tmp_path / "f.yaml", text)
    with pytest.raises(ConfigError, match=rf"^{path}: (the file|its document) is empty"):
        locate(path)


def test_program_names(tmp_path: Path) -> None:
    where = locate(
        write(
            tmp_path / "f.yaml",
            "programs:\n  web: {command: [a]}\n  api: {command: [b]}\n",
        )
    )
    assert where.programs == frozenset({"web", "api"})
    # Not a mapping: the supervisor's validation reports it; the client just knows no names.
    assert locate(write(tmp_path / "g.yaml", "programs: [web]\n")).programs == frozenset()


def test_bad_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "f.yaml", "state_dir: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        locate(path)
    # Where in the file, and what: not PyYAML's 'in "<unicode string>"' lines. (The problem's
    # wording differs between libyaml and PyYAML's pure-Python parser; the marks do not.)
    message = str(info.value)
    assert message.startswith(f"{path}:2:1: not valid YAML: "), message
    assert message.endswith("(while parsing a flow sequence at line 1, column 12)"), message
    assert "unicode string" not in message and "\n" not in message


@pytest.mark.parametrize("value", ["5", "[a, b]", "{a: b}", "true", "null"])
def test_non_string_state_dir(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="state_dir: must be a path"):
        locate(write(tmp_path / "f.yaml", f"state_dir: {value}\n"))


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        locate(write(tmp_path / "f.yaml", "- state_dir\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        locate(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)
    assert "-c PATH or $FLIPVISOR_CONFIG" in str(info.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """`status`, `reload`... read the file too: a config error (exit 2), never a traceback."""
    config = tmp_path / "flipvisor.yaml"
    config.write_bytes(b"state_dir: st\nprograms:\n  w\xff: {command: x}\n")
    with pytest.raises(ConfigError, match=rf"^{config}:3: not UTF-8: byte 0xff at column 4 "):
        locate(config)


def test_a_state_dir_in_the_home_of_an_unknown_user_is_a_config_error(tmp_path: Path) -> None:
    """Every client command reads state_dir: exit 2 with the line, not a RuntimeError traceback."""
    config = write(tmp_path / "f.yaml", "# the supervisor's\n\nstate_dir: ~nosuchuser-fv/st\n")
    with pytest.raises(ConfigError) as caught:
        locate(config)
    assert str(caught.value).startswith(
        f"{config}:3: state_dir: unknown user 'nosuchuser-fv' in '~nosuchuser-fv/st'"
    )
