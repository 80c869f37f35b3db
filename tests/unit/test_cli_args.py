"""The command line's number arguments: refused with what is wrong, before anything is asked."""

from __future__ import annotations

import argparse

import pytest

from flipvisor.cli_parser import count, seconds


@pytest.mark.parametrize(("text", "value"), [("2", 2.0), ("0.5", 0.5), ("1e3", 1000.0)])
def test_seconds_accepts_positive_finite_numbers(text: str, value: float) -> None:
    assert seconds(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "nan", "inf", "-inf", "soon", ""])
def test_seconds_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"seconds > 0, not {text!r}"):
        seconds(text)


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("50", 50)])
def test_count_accepts_whole_numbers(text: str, value: int) -> None:
    assert count(text) == value


@pytest.mark.parametrize("text", ["-1", "2.5", "many"])
def test_count_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f">= 0, not {text!r}"):
        count(text)
