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


def test_tied_tensors_are_written_once_and_both_chunks_point_at_those_bytes(tmp_path) -> None:
    emb = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    other = torch.ones(5)
    url = str(tmp_path / "x.safetensors")
    items = [local_box("model/emb", emb), local_box("model/head", emb), local_box("model/other", other),
             local_box("model/copy", emb.clone())]  # equal values, its own memory: written
    entry, chunks = write_tensor_file(url, "x", items)
    on_disk = load_file(url)
    assert sorted(on_disk) == ["model/copy", "model/emb", "model/other"]  # one name per byte range
    by_key = dict(chunks)
    assert [k for k, _ in chunks] == ["model/emb", "model/head", "model/other", "model/copy"]
    assert by_key["model/head"].data_offsets == by_key["model/emb"].data_offsets
    assert by_key["model/head"].checksum == by_key["model/emb"].checksum
    assert by_key["model/copy"].data_offsets != by_key["model/emb"].data_offsets
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert entry.size == len(raw)
    data = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert data == 2 * emb.nbytes + other.nbytes  # emb's bytes and its copy's, not a third time for head


def test_a_tied_box_goes_to_the_owner_of_the_box_it_is_tied_to() -> None:
    emb = Box("model/emb", "F32", (64,), (0,), (64,))
    head = Box("model/head", "F32", (64,), (0,), (64,))
    bias = Box("model/zbias", "F32", (8,), (0,), (8,))
    untied, _ = assign([[emb, head, bias]] * 2)
    assert untied[emb.id] != untied[head.id]  # balanced: the two big boxes land on different ranks
    owner, _ = assign([[emb, head, bias]] * 2, {head.id: emb.id})
    assert owner[head.id] == owner[emb.id] and owner[bias.id] != owner[emb.id]
