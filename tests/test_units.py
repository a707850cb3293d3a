"""runtime.units: parse_size / fmt_bytes."""

import math

import pytest

from runtime.units import GiB, KiB, MiB, fmt_bytes, parse_size


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GiB), ("24gib", 24 * GiB), ("24 GiB", 24 * GiB), ("  24GiB ", 24 * GiB),
    ("24GB", 24 * 10**9), ("24gb", 24 * 10**9), ("24G", 24 * GiB), ("24g", 24 * GiB),
    ("512MiB", 512 * MiB), ("512MB", 512 * 10**6), ("512M", 512 * MiB),
    ("1.5GiB", int(1.5 * GiB)), (".5GiB", GiB // 2), ("2.GiB", 2 * GiB),
    ("100KB", 100_000), ("100KiB", 100 * KiB), ("4K", 4 * KiB),
    ("123", 123), ("123B", 123), ("0", 0), ("1TiB", 1024 * GiB), ("2TB", 2 * 10**12),
    ("1e3", 1000),
])
def test_parse_strings(text, expected):
    assert parse_size(text) == expected


def test_parse_numbers():
    assert parse_size(0) == 0
    assert parse_size(12345) == 12345
    assert parse_size(1.9) == 1
    assert parse_size(float(GiB)) == GiB


@pytest.mark.parametrize("bad", ["-1GiB", "-5", -1, -0.5, "", "   ", "abc", "24XB", "GiB", "1.2.3GiB",
                                 float("nan"), float("inf"), "nan", "inf", True, False, None, [1]])
def test_parse_rejects(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad, name="max_gpu_memory")
    msg = str(info.value)
    assert "max_gpu_memory" in msg
    assert repr(bad) in msg
    assert "24GiB" in msg


def test_parse_default_name():
    with pytest.raises(ValueError, match="size="):
        parse_size("lots")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (17, "17 B"), (1023, "1023 B"), (4 * KiB, "4.0 KiB"), (1536, "1.5 KiB"),
    (512 * MiB, "512.0 MiB"), (int(1.5 * GiB), "1.50 GiB"), (24 * GiB, "24.00 GiB"),
    (2 * 1024 * GiB, "2.00 TiB"), (-2 * GiB, "-2.00 GiB"),
])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


def test_roundtrip():
    for n in (1, 1000, KiB, 3 * MiB, 7 * GiB):
        text = fmt_bytes(n)
        assert math.isclose(parse_size(text.replace(" ", "")), n, rel_tol=0.01)
