"""Durations and sizes: documented spellings, exact round trips, clean errors for anything else."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blahvm.quantities import Duration, QuantityError, Size


@pytest.mark.parametrize("text, seconds", [
    ("90m", 5400), ("10h", 36000), ("2d", 172800), ("1w", 604800), ("45", 45), ("45s", 45),
    ("1h30m", 5400), ("1.5h", 5400), ("10:00:00", 36000), ("5:00", 300), ("7", 7), ("100:00:00", 360000),
    (" 2D ", 172800), (3600, 3600),
])
def test_durations(text, seconds):
    assert Duration.parse(text) == seconds


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("2G", 2 * 2**30), ("2g", 2 * 2**30), ("2GB", 2 * 10**9),
    ("1kB", 1000), ("1K", 1024), ("1Ki", 1024), ("1.5GiB", 3 * 2**29), ("100", 100), ("100B", 100),
    ("1TiB", 2**40), (4096, 4096),
])
def test_sizes(text, size):
    assert Size.parse(text) == size


@pytest.mark.parametrize("text", ["", "10x", "h", "1.5s5", "-1h", "1m1h", "1:2:3:4", "1::2", True, None, 1.5,
                                  "10 h", "1.h"])
def test_bad_durations(text):
    with pytest.raises(QuantityError):
        Duration.parse(text)


@pytest.mark.parametrize("text", ["", "2X", "GiB", "1.5B", "-1G", "1.2.3G", True, None, 2.0, "2 Gibibytes"])
def test_bad_sizes(text):
    with pytest.raises(QuantityError):
        Size.parse(text)


@given(st.integers(0, 10**12))
def test_duration_text_round_trips_exactly(seconds):
    assert Duration.parse(str(Duration(seconds))) == seconds
    assert Duration.parse(Duration(seconds).clock()) == seconds


@given(st.integers(0, 2**50))
def test_size_text_round_trips_exactly(size):
    assert Size.parse(str(Size(size))) == size


@given(st.text(max_size=20))
def test_any_text_parses_or_raises_a_quantity_error(text):
    for kind in (Duration, Size):
        try:
            value = kind.parse(text)
        except QuantityError as error:
            assert str(error)
        else:
            assert value >= 0


def test_canonical_spelling():
    assert str(Duration(5400)) == "90m" and str(Duration(0)) == "0s" and str(Duration(86400 * 3)) == "3d"
    assert str(Size(2 * 2**30)) == "2GiB" and str(Size(1000)) == "1000B"
    assert Size(1).mib == 1 and Size(2**20).mib == 1
