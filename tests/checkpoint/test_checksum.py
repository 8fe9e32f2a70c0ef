from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.checkpoint.checksum import BackgroundCrc, crc32, crc32_combine, format_crc, parse_crc


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_our_crc32_is_zlibs_crc32(data: bytes, start: int, cut: int) -> None:
    """Checkpoints written with python-isal's CRC must verify with zlib's and the other way round."""
    view = memoryview(data)[cut:]
    assert crc32(view, start) == zlib.crc32(view, start)
    assert crc32(bytearray(data)) == zlib.crc32(data)


def test_background_crc_matches_in_order() -> None:
    parts = [bytes([i]) * (1000 + i) for i in range(50)]
    with ThreadPoolExecutor(1) as pool:
        c = BackgroundCrc(pool)
        for p in parts:
            c.update(p)
        assert c.value() == zlib.crc32(b"".join(parts))


def test_format_and_parse() -> None:
    assert parse_crc(format_crc(0xDEADBEEF)) == 0xDEADBEEF
    assert parse_crc("crc32:xyz") is None and parse_crc(None) is None  # type: ignore[arg-type]
