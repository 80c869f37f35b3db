"""Control-socket messages: encoding, decoding, and every malformed request a client can send."""

from __future__ import annotations

import json

import pytest

from flipvisor.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from flipvisor.protocol import (
    COMMANDS,
    ProtocolError,
    Request,
    decode,
    decode_request,
    encode,
    result,
)


def test_encode_is_one_compact_line() -> None:
    line = encode({"type": "progress", "step": "spawn", "detail": "a\nb"})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1, "a newline inside a value must be escaped, not sent raw"
    assert json.loads(line) == {"type": "progress", "step": "spawn", "detail": "a\nb"}


def test_request_round_trip() -> None:
    request = Request("flip", "web", {"timeout": 5, "wait": True})
    assert decode_request(request.encode()) == request


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_known_command_decodes(command: str) -> None:
    assert decode_request(encode({"command": command})) == Request(command)


def test_missing_program_and_null_args_default() -> None:
    request = decode_request(b'{"command": "status", "args": null}')
    assert request.program is None
    assert request.args == {}


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"", "malformed"),
        (b"not json\n", "malformed"),
        (b'{"command": "status"', "malformed"),
        (b"\xff\xfe\n", "malformed"),
        (b'["status"]\n', "not an object"),
        (b'"status"\n', "not an object"),
        (b"null\n", "not an object"),
    ],
)
def test_malformed_lines_raise_protocol_error(line: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode(line)
    with pytest.raises(ProtocolError, match=words):
        decode_request(line)


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({}, "unknown command None"),
        ({"command": "explode"}, "unknown command 'explode'"),
        ({"command": "STATUS"}, "unknown command 'STATUS'"),
        ({"command": 3}, "unknown command 3"),
        ({"command": "flip", "program": 7}, "program must be a string"),
        ({"command": "flip", "program": "web", "args": [1]}, "args must be an object"),
        ({"command": "flip", "program": "web", "args": "x"}, "args must be an object"),
    ],
)
def test_bad_requests_raise_protocol_error(message: dict[str, object], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_request(encode(message))


@pytest.mark.parametrize("command", [["status"], {"a": 1}])
def test_unhashable_command_is_a_protocol_error(command: object) -> None:
    with pytest.raises(ProtocolError, match="unknown command"):
        decode_request(encode({"command": command}))


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode(b"[" * 100_000 + b"\n")


def test_result_defaults() -> None:
    assert result({"x": 1}) == {
        "type": "result",
        "ok": True,
        "exit_code": EXIT_OK,
        "result": {"x": 1},
        "error": None,
    }


def test_result_error_and_explicit_exit_code() -> None:
    failed = result(error="boom")
    assert failed["ok"] is False
    assert failed["exit_code"] == EXIT_FAILED
    assert failed["error"] == "boom"
    usage = result(error="bad", exit_code=EXIT_USAGE, hint="try status")
    assert usage["exit_code"] == EXIT_USAGE
    assert usage["hint"] == "try status"
    # An explicit exit code wins even without an error (e.g. "nothing to do" answers).
    assert result(exit_code=EXIT_USAGE)["ok"] is True


def test_encode_writes_int_keys_and_str_enums_as_json_would() -> None:
    from flipvisor.states import ProgramState

    line = encode({"counts": {3: "x"}, "state": ProgramState.RUNNING})
    assert json.loads(line) == {"counts": {"3": "x"}, "state": "running"}
    assert json.loads(line) == json.loads(json.dumps({"counts": {3: "x"}, "state": "running"}))


def test_int_keys_become_strings_as_the_stdlib_makes_them() -> None:
    message = {"type": "result", "result": {101: "a", "nested": {2: [1, {3: None}]}}}
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == json.loads(json.dumps(message))
