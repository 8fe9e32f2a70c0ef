from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
from safetensors.torch import load_file

from dtrain.checkpoint import storage, writer
from dtrain.checkpoint.plan import Box, assign, local_box
from dtrain.checkpoint.writer import write_tensor_file
from dtrain.errors import CheckpointError

TENSORS = {
    "model/w": torch.randn(5, 3),
    "model/scalar": torch.tensor(3.5),
    "model/ids": torch.arange(7, dtype=torch.int64),
    "model/half": torch.randn(4, 2).to(torch.bfloat16),
    "model/mask": torch.tensor([True, False, True]),
    "model/empty": torch.zeros(0, 4),
    "optim/state/w/step": torch.tensor(12.0),
}


def test_written_file_is_plain_safetensors_with_true_checksums(tmp_path) -> None:
    url = str(tmp_path / "model.safetensors")
    entry, chunks = write_tensor_file(url, "model.safetensors", [local_box(k, v) for k, v in TENSORS.items()])
    loaded = load_file(url)
    for k, v in TENSORS.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    data = open(url, "rb").read()
    assert entry.size == len(data) and entry.checksum == f"crc32:{zlib.crc32(data):08x}"
    for key, c in chunks:
        b, e = c.data_offsets
        assert c.checksum == f"crc32:{zlib.crc32(data[b:e]):08x}", key


def test_bytes_stream_out_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    sizes: list[int] = []
    real = storage.open_write

    @contextlib.contextmanager
    def recording(url, storage_options=None, size=None):  # noqa: ANN001, ANN202
        with real(url, storage_options, size) as f:
            orig = f.write
            f.write = lambda b: (sizes.append(len(b)), orig(b))[1]  # type: ignore[method-assign]
            yield f

    monkeypatch.setattr(writer, "PIECE", 4096)
    monkeypatch.setattr(storage, "open_write", recording)
    big = torch.randn(64 * 1024)  # 256 KiB
    url = str(tmp_path / "big.safetensors")
    write_tensor_file(url, "big", [local_box("model/big", big)])
    assert max(sizes[1:]) <= 4096 and sum(sizes[1:]) == big.numel() * 4
    assert torch.equal(load_file(url)["model/big"], big)


def test_failure_while_writing_leaves_no_file(tmp_path) -> None:
    def broken() -> torch.Tensor:
        raise RuntimeError("device lost")

    url = str(tmp_path / "x.safetensors")
    box = Box("model/x", "F32", (2,), (0,), (2,))
    with pytest.raises(RuntimeError, match="device lost"):
        write_tensor_file(url, "x", [local_box("model/a", torch.ones(3)), (box, broken)])
    assert not (tmp_path / "x.safetensors").exists()


def test_replicated_tensors_are_written_once_and_balanced() -> None:
    sizes = [100, 90, 60, 50, 10, 10]
    boxes = [Box(f"model/t{i}", "U8", (n,), (0,), (n,)) for i, n in enumerate(sizes)]
    owner, meta = assign([boxes, boxes])
    assert len(owner) == len(sizes) and set(meta) == {b.key for b in boxes}
    load = [sum(b.nbytes for b in boxes if owner[b.id] == r) for r in (0, 1)]
    assert min(load) > 0 and abs(load[0] - load[1]) <= 10


def test_shards_go_to_their_holder_and_disagreement_is_an_error() -> None:
    a = Box("model/w", "F32", (4,), (0,), (2,))
    b = Box("model/w", "F32", (4,), (2,), (2,))
    owner, _ = assign([[a], [b]])
    assert owner[a.id] == 0 and owner[b.id] == 1
    with pytest.raises(CheckpointError, match="model/w"):
        assign([[a], [Box("model/w", "F16", (4,), (2,), (2,))]])
