from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from dtrain.checkpoint.stfile import encode_header, read_header
from dtrain.errors import CheckpointError

WHERE = "/ckpt/step-000000001/model-00000-of-00001.safetensors"


def parse(data: bytes):  # noqa: ANN201
    return read_header(lambda s, e: data[s:e], len(data), WHERE)


def make(header: dict, data_len: int) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * data_len


def test_reads_files_written_by_safetensors() -> None:
    data = save({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)})
    h = parse(data)
    assert h.entries["a"].shape == (3, 2) and h.entries["b"].dtype == "BF16"
    assert h.entries["a"].end - h.entries["a"].begin == 24


def test_our_header_is_aligned_and_offsets_are_absolute() -> None:
    header, entries = encode_header([("x", "F32", (2,)), ("y", "I64", ())], {"format": "pt"})
    assert len(header) % 8 == 0
    assert entries[0].begin == len(header) and entries[1].end == len(header) + 16
    assert parse(header + b"\0" * 16).metadata == {"format": "pt"}


HOSTILE = {
    "huge header length": (struct.pack("<Q", 2**63) + b"{}", "over the"),
    "header past end of file": (struct.pack("<Q", 1000) + b"{}", "truncated"),
    "too short": (b"\x01\x02", "at least 8"),
    "not json": (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    "not an object": (make([1, 2], 0), "not a JSON object"),  # type: ignore[arg-type]
    "overlap": (make({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12), "overlaps"),
    "gap": (make({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8), "gap"),
    "trailing bytes": (make({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 9), "trailing"),
    "huge shape": (make({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, 4),
                   "need"),
    "negative offset": (make({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, 4),
                        "data_offsets"),
    "unknown dtype": (make({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, 4), "dtype"),
    "bool shape": (make({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4), "shape"),
    "offsets past file": (make({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 4), "cover"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_give_clear_errors(case: str) -> None:
    data, needle = HOSTILE[case]
    with pytest.raises(CheckpointError) as e:
        parse(data)
    assert WHERE in str(e.value) and needle in str(e.value)
