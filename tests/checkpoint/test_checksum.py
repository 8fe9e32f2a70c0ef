from __future__ import annotations

import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.checkpoint.checksum import (
    INLINE,
    BackgroundCrc,
    combine_py,
    crc32,
    crc32_combine,
    format_crc,
    parse_crc,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert combine_py(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)  # the fallback without isal


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_our_crc32_is_zlibs_crc32(data: bytes, start: int, cut: int) -> None:
    """Checkpoints written with python-isal's CRC must verify with zlib's and the other way round."""
    view = memoryview(data)[cut:]
    assert crc32(view, start) == zlib.crc32(view, start)
    assert crc32(bytearray(data)) == zlib.crc32(data)


@pytest.mark.parametrize("cut", [0, 3])
def test_big_buffers_match_zlib_from_bytes_and_tensor_memory(cut: int) -> None:
    """The GIL-free route for big pieces: read-only bytes, a writable tensor view, a continuation."""
    t = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    view = memoryview(t.numpy())[cut:]
    data = bytes(view)
    assert crc32(view) == crc32(data) == zlib.crc32(data)
    assert crc32(view, 12345) == zlib.crc32(data, 12345)


def test_hashing_a_big_buffer_lets_other_threads_run() -> None:
    """A reader thread must get the GIL back while another thread hashes (else hashing and reading
    take turns): python-isal (1.9 here) releases it, as zlib does; this fails if a release does not."""
    data = bytes(256 << 20)
    ticks = 0
    hashing = threading.Thread(target=lambda: [crc32(data) for _ in range(4)])  # ~0.1 s of hashing
    hashing.start()
    while hashing.is_alive():
        ticks += 1
        time.sleep(0)  # gives the GIL up once per tick
    # GIL held by each hash: about one tick per call (measured: 4); released: thousands
    assert ticks > 200, ticks


def test_background_crc_matches_in_order() -> None:
    """Small buffers are hashed inline, big ones on the thread: the order must hold across both."""
    parts = [bytes([i]) * (1000 + i + (INLINE if i % 3 == 0 else 0)) for i in range(50)]
    with ThreadPoolExecutor(1) as pool:
        c = BackgroundCrc(pool)
        for p in parts:
            c.update(p)
        assert c.value() == zlib.crc32(b"".join(parts))


def test_format_and_parse() -> None:
    assert parse_crc(format_crc(0xDEADBEEF)) == 0xDEADBEEF
    assert parse_crc("crc32:xyz") is None and parse_crc(None) is None  # type: ignore[arg-type]
