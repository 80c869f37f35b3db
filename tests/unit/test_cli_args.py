"""The command line's number arguments: refused with what is wrong, before anything is asked."""

from __future__ import annotations

import argparse

import pytest

from flipvisor.cli_parser import COUNT_MAX, count, seconds


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


@pytest.mark.parametrize(
    "text", ["99999999999999999999999", str(COUNT_MAX + 1), "+" + "9" * 5000, "9" * 5000]
)
def test_count_takes_a_number_past_64_bits_as_every_one(text: str) -> None:
    """A script passing "everything" as a big number: every line or event, in a number the
    requests' JSON encoder takes (orjson refuses integers past 64 bits), whatever its length
    (Python converts no more than 4,300 digits)."""
    assert count(text) == COUNT_MAX
