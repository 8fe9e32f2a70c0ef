"""Big tensor files not in the page cache are read with O_DIRECT: in aligned requests, several in
flight, hashed and copied into place. Every tensor comes back bitwise for pieces that straddle
requests and blocks, damage is blamed on its tensor, a file in the page cache is read through
it, and a filesystem that refuses a direct request still gets its bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from dtrain.checkpoint import CheckpointDamagedError, CheckpointManager, directio
from dtrain.checkpoint import reader as reader_mod
from dtrain.checkpoint.fill import fill_tensor
from dtrain.checkpoint.reader import ChunkReader, read_manifest
from dtrain.errors import CheckpointError
from tests.checkpoint.models import assert_same
from tests.checkpoint.test_reader import Mixed  # tensor sizes that are not multiples of a block

REQUEST = 3 * directio.ALIGN  # small requests: many of them, and pieces across their edges


def _direct_ok(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x")
    fd = directio.open_for_read(str(probe))
    probe.unlink()
    if fd is None:
        return False
    os.close(fd)
    return True


def _drop(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An Mixed model saved, every file big enough for direct reads, dropped from the page cache;
    requests of three blocks."""
    if not directio.enabled() or not _direct_ok(tmp_path):
        pytest.skip("no O_DIRECT here")
    monkeypatch.setattr(directio, "MIN_BYTES", 1)
    monkeypatch.setattr(directio, "MIN_LOAD", 0)
    monkeypatch.setattr(reader_mod, "DIRECT_REQUEST", REQUEST)
    CheckpointManager(str(tmp_path)).save(1, model=Mixed(seed=1))
    _drop(tmp_path)
    return tmp_path / "step-000000001"


def _count_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(start, length) of every direct request, as the reader makes them."""
    calls: list[tuple[int, int]] = []
    real = ChunkReader._direct_request

    def counting(self: ChunkReader, url: str, fd: int, start: int, n: int, pieces: Any) -> list[int]:
        calls.append((start, n))
        return real(self, url, fd, start, n, pieces)
    monkeypatch.setattr(ChunkReader, "_direct_request", counting)
    return calls


def test_a_cold_file_is_read_in_aligned_direct_requests_and_every_tensor_is_exact(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_requests(monkeypatch)
    dst = Mixed(seed=2)
    CheckpointManager(str(saved.parent)).load(saved.name, model=dst)
    assert_same(dst.state_dict(), Mixed(seed=1).state_dict())
    man = read_manifest(str(saved))
    spans = sorted(c.data_offsets for t in man.tensors.values() for c in t.chunks if c.data_offsets[1] > c.data_offsets[0])
    first, last = spans[0][0], spans[-1][1]
    assert all(start % directio.ALIGN == 0 and start // REQUEST == (start + n - 1) // REQUEST for start, n in calls)
    assert len(calls) == (last - 1) // REQUEST - first // REQUEST + 1  # one request per window touched
    assert calls[0][0] == first - first % directio.ALIGN and sum(n for _, n in calls) >= last - first


def test_a_corrupt_byte_read_directly_is_blamed_on_its_own_tensor(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_requests(monkeypatch)
    f = saved / "model-00000-of-00001.safetensors"
    begin, end = read_manifest(str(saved)).tensors["model/ws.3"].chunks[0].data_offsets  # across requests
    assert begin // REQUEST != end // REQUEST
    raw = bytearray(f.read_bytes())
    raw[end - 3] ^= 0x10
    f.write_bytes(bytes(raw))
    _drop(saved)
    with pytest.raises(CheckpointDamagedError, match=r"checksum mismatch in tensor 'model/ws\.3'"):
        CheckpointManager(str(saved.parent)).load(saved.name, model=Mixed(seed=2))
    assert calls


def test_a_file_in_the_page_cache_is_read_through_it(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for f in saved.iterdir():
        f.read_bytes()  # now cached
    calls = _count_requests(monkeypatch)
    dst = Mixed(seed=2)
    CheckpointManager(str(saved.parent)).load(saved.name, model=dst)
    assert_same(dst.state_dict(), Mixed(seed=1).state_dict())
    assert calls == []
    fd = os.open(saved / "model-00000-of-00001.safetensors", os.O_RDONLY)
    try:
        assert directio.cached_fraction(fd, os.fstat(fd).st_size) == 1.0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert directio.cached_fraction(fd, os.fstat(fd).st_size) == 0.0
    finally:
        os.close(fd)


def test_a_small_load_reads_through_the_cache(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below directio.MIN_LOAD bytes in all, cold big files too are read through the page cache."""
    monkeypatch.setattr(directio, "MIN_LOAD", read_manifest(str(saved)).total_bytes + 1)
    calls = _count_requests(monkeypatch)
    dst = Mixed(seed=2)
    CheckpointManager(str(saved.parent)).load(saved.name, model=dst)
    assert_same(dst.state_dict(), Mixed(seed=1).state_dict())
    assert calls == []
    monkeypatch.setattr(directio, "MIN_LOAD", read_manifest(str(saved)).total_bytes // 2)
    _drop(saved)  # the load above left the files in the cache
    CheckpointManager(str(saved.parent)).load(saved.name, model=dst)
    assert calls  # the same load, now big enough


def test_direct_io_off_reads_through_the_cache(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTRAIN_DIRECT_IO", "0")
    calls = _count_requests(monkeypatch)
    dst = Mixed(seed=2)
    CheckpointManager(str(saved.parent)).load(saved.name, model=dst)
    assert_same(dst.state_dict(), Mixed(seed=1).state_dict()) and not calls


def test_a_refused_direct_request_is_redone_through_the_cache(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL on a direct read (a filesystem wanting a bigger alignment): the same bytes come
    through the plain descriptor instead."""
    refused: list[int] = []
    direct_fds: set[int] = set()
    real, real_open = os.preadv, directio.open_for_read

    def preadv(fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if fd in direct_fds:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset, *flags)

    def open_for_read(path: str) -> int | None:
        fd = real_open(path)
        if fd is not None:
            direct_fds.add(fd)
        return fd
    monkeypatch.setattr(directio, "open_for_read", open_for_read)
    monkeypatch.setattr(directio.os, "preadv", preadv)
    dst = Mixed(seed=2)
    CheckpointManager(str(saved.parent)).load(saved.name, model=dst)
    assert_same(dst.state_dict(), Mixed(seed=1).state_dict())
    assert refused


def test_a_file_shorter_than_its_chunks_is_a_clear_error(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated after the size check (another process): the request comes back short."""
    f = saved / "model-00000-of-00001.safetensors"
    man = read_manifest(str(saved))
    reader = ChunkReader(str(saved), man)
    try:
        reader._check_size(f.name)
        assert reader._direct[str(f)] is not None
        os.truncate(f, f.stat().st_size - 100)
        chunk = man.tensors["model/ws.8"].chunks[0]  # the last tensor
        with pytest.raises(CheckpointError, match=r"model-00000-of-00001\.safetensors: file is truncated"):
            reader.read("model/ws.8", chunk, torch.empty(5000))
    finally:
        reader.close()


def test_a_windowed_read_of_a_resharded_chunk_is_exact(saved: Path) -> None:
    """A destination the chunk does not land in whole (a transposed view) goes through the
    bounded window, which reads directly too."""
    man = read_manifest(str(saved))
    reader = ChunkReader(str(saved), man)
    try:
        dest = torch.empty(40_000, 2)[:, 0]  # every other float: not a contiguous run, so windowed
        fill_tensor(reader, "model/ws.3", dest)
        assert torch.equal(dest, Mixed(seed=1).ws[3].detach())
        assert reader._direct and all(fd is not None for fd in reader._direct.values())
    finally:
        reader.close()


def test_reads_shared_with_other_ranks_on_the_host_go_through_the_page_cache(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_requests(monkeypatch)
    reader = ChunkReader(str(saved), read_manifest(str(saved)), direct=False)
    try:
        out = torch.empty(40_000)
        fill_tensor(reader, "model/ws.3", out)
        assert torch.equal(out, Mixed(seed=1).ws[3].detach()) and calls == []
    finally:
        reader.close()
