"""Big tensor files written with O_DIRECT: the bytes are the same as through the page cache for
every size around the block and buffer edges, the file really bypasses the cache, and a
filesystem that refuses O_DIRECT (at fcntl or at the first write) still gets the whole file."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtrain.checkpoint import directio, storage
from dtrain.checkpoint.directio import ALIGN, MIN_BUFFER, MIN_BYTES, WRITE_BUFFER, buffer_bytes
from dtrain.checkpoint.plan import local_boxes
from dtrain.checkpoint.writer import write_tensor_file

needs_direct = pytest.mark.skipif(not directio.enabled(), reason="no O_DIRECT on this system")


def cached_pages(path: Path) -> int | None:
    """Pages of `path` in the page cache (Linux >= 6.5 cachestat); None if the kernel cannot say."""
    if not sys.platform.startswith("linux"):
        return None

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recent")]

    stat = Stat()
    fd = os.open(path, os.O_RDONLY)
    try:
        rc = ctypes.CDLL(None, use_errno=True).syscall(451, fd, ctypes.byref(Range(0, 0)), ctypes.byref(stat), 0)
    finally:
        os.close(fd)
    return None if rc != 0 else int(stat.cache)


def write_pieces(url: str, pieces: list[bytes], size: int | None) -> None:
    with storage.open_write(url, size=size) as f:
        for p in pieces:
            f.write(memoryview(p))


B = MIN_BUFFER  # the buffer size of every file of 4-8 MiB


@needs_direct
@pytest.mark.parametrize("size", [MIN_BYTES, 20 * B, 20 * B + 1, 21 * B - 1, 21 * B + ALIGN, 21 * B + ALIGN + 17])
def test_bytes_are_those_written_at_every_edge(tmp_path: Path, size: int) -> None:
    assert buffer_bytes(size) == B
    data = os.urandom(size)
    cuts = sorted({c for c in (0, 1, 4095, 100_000, B - 3, B + 5000, 7 * B, size) if c <= size})
    pieces = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    write_pieces(str(tmp_path / "direct.bin"), pieces, size)
    assert (tmp_path / "direct.bin").read_bytes() == data


def test_the_two_buffers_stay_within_a_sixteenth_of_the_file_or_two_minimal_ones() -> None:
    for size in (MIN_BYTES, 5 << 20, 64 << 20, 100 << 20, 1 << 30, 16 << 30):
        assert MIN_BUFFER <= buffer_bytes(size) <= WRITE_BUFFER and buffer_bytes(size) % ALIGN == 0
        assert 2 * buffer_bytes(size) <= max(size / 16 + 2 * ALIGN, 2 * MIN_BUFFER)


@needs_direct
def test_a_big_tensor_file_bypasses_the_page_cache_and_loads_with_plain_safetensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {"model/w": torch.randn(3 * MIN_BYTES // 4 + 3), "model/b": torch.arange(5)}
    boxes, data = local_boxes(tensors)
    items = [(b, data[b.key]) for b in boxes]
    write_tensor_file(str(tmp_path / "a.safetensors"), "a", items)
    cached = cached_pages(tmp_path / "a.safetensors")
    loaded = load_file(tmp_path / "a.safetensors")
    assert torch.equal(loaded["model/w"], tensors["model/w"]) and torch.equal(loaded["model/b"], tensors["model/b"])
    if cached is None:
        pytest.skip("this kernel cannot say what is cached (cachestat: Linux >= 6.5)")
    probe = directio.open_for_write(str(tmp_path / "probe"))
    if probe is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    os.pwrite(probe, directio.aligned_buffer(ALIGN), 0)
    os.close(probe)
    if cached_pages(tmp_path / "probe"):
        pytest.skip(f"the filesystem of {tmp_path} keeps O_DIRECT writes in memory (tmpfs)")
    assert cached <= 1  # at most the last partial block, written through the cache
    monkeypatch.setenv("DTRAIN_DIRECT_IO", "0")
    write_tensor_file(str(tmp_path / "b.safetensors"), "b", items)
    assert (cached_pages(tmp_path / "b.safetensors") or 0) > 100  # switched off: through the cache
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_filesystem_refusing_o_direct_gets_the_file_through_the_cache(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directio, "set_direct", lambda fd, on: False)
    data = os.urandom(MIN_BYTES + 123)
    write_pieces(str(tmp_path / "f.bin"), [data], len(data))
    assert (tmp_path / "f.bin").read_bytes() == data


@needs_direct
def test_a_refused_direct_write_is_redone_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.pwrite, []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:  # the second buffer: as a filesystem wanting a bigger alignment would
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(20 * B + 999)
    write_pieces(str(tmp_path / "f.bin"), [data], len(data))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert calls[1] == calls[2] == B  # retried once, at the same place


@needs_direct
def test_a_failed_write_raises_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left"):
        write_pieces(str(tmp_path / "f.bin"), [os.urandom(20 * B)], 20 * B)
    assert not (tmp_path / "f.bin").exists()


def test_small_files_and_unknown_sizes_go_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = directio.open_for_write
    monkeypatch.setattr(directio, "open_for_write", lambda path: (opened.append(path), real(path))[1])
    write_pieces(str(tmp_path / "small.bin"), [b"x" * 100], MIN_BYTES - 1)
    write_pieces(str(tmp_path / "unknown.bin"), [b"x" * 100], None)
    assert opened == [] and (tmp_path / "small.bin").read_bytes() == b"x" * 100


@needs_direct
def test_files_reuse_the_last_files_buffers_and_bigger_ones_replace_them(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    allocated: list[int] = []
    real = directio.aligned_buffer
    monkeypatch.setattr(directio, "aligned_buffer", lambda n: (allocated.append(n), real(n))[1])
    monkeypatch.setattr(directio, "_spare", [])
    small, big = MIN_BYTES, 64 * WRITE_BUFFER  # buffers of MIN_BUFFER and of WRITE_BUFFER
    for i, size in enumerate((small, small, big, small, big)):
        data = os.urandom(size)
        write_pieces(str(tmp_path / f"{i}.bin"), [data], size)
        assert (tmp_path / f"{i}.bin").read_bytes() == data
        (tmp_path / f"{i}.bin").unlink()
    assert allocated == [MIN_BUFFER, MIN_BUFFER, WRITE_BUFFER, WRITE_BUFFER]
