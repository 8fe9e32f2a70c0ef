from __future__ import annotations

import math
import os
import pickle
import time

import pytest
import torch

from dtrain.checkpoint import CheckpointDamagedError, CheckpointManager, localfs
from dtrain.checkpoint import reader as reader_mod
from dtrain.checkpoint.fill import _overlap
from dtrain.checkpoint.reader import read_manifest
from dtrain.errors import CheckpointError
from tests.checkpoint.models import assert_same, make_all, make_model, train

MARKER = "/tmp/dtrain-test-unpickled-{pid}"


class Boom:
    """Unpickling this creates a marker file: proof that something unpickled our bytes."""

    def __reduce__(self):  # noqa: ANN204
        return (open, (MARKER.format(pid=os.getpid()), "w"))


def test_overlap_boxes() -> None:
    assert _overlap((0, 0), (4, 4), (2, 1), (4, 2)) == ((2, 4), (1, 3))
    assert _overlap((0,), (2,), (2,), (2,)) is None
    assert _overlap((), (), (), ()) == ()


def test_load_never_unpickles(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = MARKER.format(pid=os.getpid())
    if os.path.exists(marker):
        os.unlink(marker)
    m, o, s, c = make_all()
    train(m, o, s, c, 1, data_seed=1)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model=m, optimizer=o, stateful={"sched": s})
    ckpt = tmp_path / "step-000000001"
    payload = pickle.dumps(Boom())
    for name in (".metadata", "model.pt", "optimizer.bin", "state.pkl"):
        (ckpt / name).write_bytes(payload)  # planted files a careless loader might pick up

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("something tried to unpickle during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    m2, o2, s2, _ = make_all(seed=4)
    mgr.load(str(ckpt), model=m2, optimizer=o2, stateful={"sched": s2})
    assert_same(m2.state_dict(), m.state_dict())
    # a shard replaced by a pickle (even with a consistent size) is rejected, not executed
    model_file = ckpt / "model-00000-of-00001.safetensors"
    size = model_file.stat().st_size
    model_file.write_bytes((payload + b"\0" * size)[:size])
    with pytest.raises(CheckpointDamagedError, match="model-00000-of-00001.safetensors: checksum mismatch"):
        mgr.load(str(ckpt), model=make_model())
    assert not os.path.exists(marker)


class Mixed(torch.nn.Module):
    """Tensors of very different sizes, several odd (not a multiple of a page), in file order."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes = [3000, 7, 1, 40_000, 513, 0, 65_536, 12, 5000]
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes])


def _read_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte count of every positional read the reader makes."""
    calls: list[int] = []
    real = reader_mod.preadv_into

    def counting(fd: int, url: str, offset: int, bufs: list) -> None:  # noqa: ANN001
        calls.append(sum(len(b) for b in bufs))
        real(fd, url, offset, bufs)
    monkeypatch.setattr(reader_mod, "preadv_into", counting)
    return calls


@pytest.mark.parametrize("span", [4096, 5000, 1 << 20])
def test_requests_span_tensors_and_every_tensor_is_exact(span: int, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is read in span-aligned requests that scatter into many tensors (the kernel sees a
    plain sequential read), whatever the tensor sizes; each tensor comes back bitwise."""
    src = Mixed(seed=1)
    CheckpointManager(str(tmp_path)).save(1, model=src)
    monkeypatch.setattr(reader_mod, "SPAN", span)
    calls = _read_calls(monkeypatch)
    dst = Mixed(seed=2)
    CheckpointManager(str(tmp_path)).load("step-000000001", model=dst)
    assert_same(dst.state_dict(), src.state_dict())
    data = sum(p.nbytes for p in src.parameters())
    header = (tmp_path / "step-000000001" / "model-00000-of-00001.safetensors").stat().st_size - data
    assert sum(calls) == data
    assert len(calls) == math.ceil((header + data) / span) - header // span  # one per span touched


def test_a_corrupt_byte_is_blamed_on_its_own_tensor_among_those_read_with_it(tmp_path) -> None:
    src = Mixed(seed=1)
    CheckpointManager(str(tmp_path)).save(1, model=src)
    f = tmp_path / "step-000000001" / "model-00000-of-00001.safetensors"
    man = read_manifest(str(tmp_path / "step-000000001"))
    begin, end = man.tensors["model/ws.4"].chunks[0].data_offsets  # 513 floats, mid-file
    raw = bytearray(f.read_bytes())
    raw[begin + 100] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointDamagedError, match=r"checksum mismatch in tensor 'model/ws\.4'"):
        CheckpointManager(str(tmp_path)).load("step-000000001", model=Mixed(seed=2))


@pytest.mark.parametrize("where", [0.1, 0.9])
def test_the_last_request_hashed_on_both_threads_blames_a_corrupt_byte_in_either_half(
        where: float, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole file is one request (the last one): every buffer's first half is hashed on the
    hashing thread, its second half on the reading thread; damage in either half is found."""
    src = Mixed(seed=1)
    CheckpointManager(str(tmp_path)).save(1, model=src)
    monkeypatch.setattr(reader_mod, "SPAN", 1 << 20)
    assert sum(p.nbytes for p in src.parameters()) >= reader_mod.INLINE  # not hashed inline
    dst = Mixed(seed=2)
    CheckpointManager(str(tmp_path)).load("step-000000001", model=dst)
    assert_same(dst.state_dict(), src.state_dict())
    f = tmp_path / "step-000000001" / "model-00000-of-00001.safetensors"
    begin, end = read_manifest(str(tmp_path / "step-000000001")).tensors["model/ws.6"].chunks[0].data_offsets
    raw = bytearray(f.read_bytes())
    raw[begin + int((end - begin) * where)] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointDamagedError, match=r"checksum mismatch in tensor 'model/ws\.6'"):
        CheckpointManager(str(tmp_path)).load("step-000000001", model=Mixed(seed=2))


def _saved_with_adam(tmp_path) -> tuple[Mixed, torch.optim.Adam]:  # noqa: ANN001
    """A Mixed model and its stepped Adam, saved at step 1: a model file and an optimizer file."""
    src = Mixed(seed=1)
    opt = torch.optim.Adam(src.parameters())
    for p in src.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    CheckpointManager(str(tmp_path)).save(1, model=src, optimizer=opt)
    return src, opt


def test_only_the_last_file_of_a_load_is_hashed_on_the_reading_thread(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model and optimizer files read in one load: the reading thread goes on to the next file
    while the hashing thread checks the last request of the one before (hashing half of it here
    stalled the reads between files); a corrupt byte there is still found and blamed."""
    src, opt = _saved_with_adam(tmp_path)
    monkeypatch.setattr(reader_mod, "SPAN", 1 << 20)
    shared: list[int] = []
    real = reader_mod.ChunkReader._hash_shared

    def counting(self, bufs, owners, out) -> None:  # noqa: ANN001
        shared.append(sum(len(b) for b in bufs))
        real(self, bufs, owners, out)
    monkeypatch.setattr(reader_mod.ChunkReader, "_hash_shared", counting)
    dst = Mixed(seed=2)
    dst_opt = torch.optim.Adam(dst.parameters())
    CheckpointManager(str(tmp_path)).load("step-000000001", model=dst, optimizer=dst_opt)
    assert_same(dst.state_dict(), src.state_dict())
    assert len(shared) == 1  # the optimizer file's last request, not the model file's
    f = tmp_path / "step-000000001" / "model-00000-of-00001.safetensors"
    begin, end = read_manifest(str(tmp_path / "step-000000001")).tensors["model/ws.6"].chunks[0].data_offsets
    raw = bytearray(f.read_bytes())
    raw[end - 3] ^= 0x01
    f.write_bytes(bytes(raw))
    again = Mixed(seed=2)
    with pytest.raises(CheckpointDamagedError, match=r"checksum mismatch in tensor 'model/ws\.6'"):
        CheckpointManager(str(tmp_path)).load("step-000000001", model=again, optimizer=torch.optim.Adam(again.parameters()))


def test_big_files_of_one_load_are_read_side_by_side_and_damage_is_still_blamed(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model and optimizer files (each at least SIDE_BY_SIDE_BYTES) are read at the same time
    on two threads, so the second file's readahead does not start from scratch after the first;
    the tensors come back bitwise, and a corrupt byte in either file is blamed on its tensor."""
    src, opt = _saved_with_adam(tmp_path)
    monkeypatch.setattr(reader_mod, "SPAN", 64 << 10)  # several requests per file
    monkeypatch.setattr(reader_mod, "SIDE_BY_SIDE_BYTES", 64 << 10)  # the files are ~450 KiB and ~900 KiB
    spans: dict[str, list[tuple[float, float]]] = {}
    real = reader_mod.preadv_into

    def timed(fd: int, url: str, offset: int, bufs: list) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        time.sleep(0.005)  # a slow disk: the requests of two files overlap only if they are in flight together
        real(fd, url, offset, bufs)
        spans.setdefault(os.path.basename(url), []).append((t0, time.perf_counter()))
    monkeypatch.setattr(reader_mod, "preadv_into", timed)
    dst = Mixed(seed=2)
    dst_opt = torch.optim.Adam(dst.parameters())
    CheckpointManager(str(tmp_path)).load("step-000000001", model=dst, optimizer=dst_opt)
    assert_same(dst.state_dict(), src.state_dict())
    assert_same(dst_opt.state_dict()["state"][6], opt.state_dict()["state"][6])
    (a, ra), (b, rb) = sorted(spans.items())
    assert len(ra) > 2 and len(rb) > 2, spans
    assert ra[0][0] < rb[-1][0] and rb[0][0] < ra[-1][0], f"{a} and {b} were read one after the other"
    ckpt = tmp_path / "step-000000001"
    man = read_manifest(str(ckpt))
    for key in ("model/ws.6", "optim/state/ws.6/exp_avg"):
        chunk = man.tensors[key].chunks[0]
        f = ckpt / chunk.file
        good = f.read_bytes()
        raw = bytearray(good)
        raw[chunk.data_offsets[1] - 5] ^= 0x02
        f.write_bytes(bytes(raw))
        again = Mixed(seed=2)
        with pytest.raises(CheckpointDamagedError, match=rf"{chunk.file}: checksum mismatch in tensor '{key}'"):
            CheckpointManager(str(tmp_path)).load("step-000000001", model=again,
                                                  optimizer=torch.optim.Adam(again.parameters()))
        f.write_bytes(good)


def test_skipped_tensors_leave_gaps_that_the_requests_step_over(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """strict=False into a model that lacks some stored tensors: only the wanted bytes are read."""
    src = Mixed(seed=1)
    CheckpointManager(str(tmp_path)).save(1, model=src)
    calls = _read_calls(monkeypatch)
    dst = torch.nn.Module()
    wanted = ("0", "2", "4", "8")  # a gap of one or more tensors before each but the first
    dst.ws = torch.nn.ParameterDict({i: torch.nn.Parameter(torch.zeros_like(src.ws[int(i)])) for i in wanted})
    CheckpointManager(str(tmp_path)).load("step-000000001", model=dst, strict=False)
    assert_same(dst.state_dict(), {f"ws.{i}": src.ws[int(i)] for i in wanted})
    assert sum(calls) == sum(src.ws[int(i)].nbytes for i in wanted)
    assert len(calls) == len(wanted)


def test_preadv_into_fills_many_buffers_and_names_a_short_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    monkeypatch.setattr(localfs, "IOV_MAX", 3)  # several calls for one request
    bufs = [memoryview(bytearray(n)) for n in (10, 0, 1, 2000, 7, 3000, 0, 5)]
    fd = os.open(path, os.O_RDONLY)
    try:
        localfs.preadv_into(fd, "f.bin", 100, bufs)
        assert b"".join(bytes(b) for b in bufs) == data[100:100 + 5023]
        with pytest.raises(CheckpointError, match=r"f\.bin: file is truncated: wanted bytes \[10000, 10300\), "
                                                  r"file ends at 10240"):
            localfs.preadv_into(fd, "f.bin", 10_000, [memoryview(bytearray(100)), memoryview(bytearray(200))])
    finally:
        os.close(fd)
