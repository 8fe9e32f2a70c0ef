"""Property-based tests of the parsers that read untrusted bytes: manifest.json, state.json (the JSON
codec) and safetensors headers. Whatever they are given, they return a value or raise
CheckpointError, never another exception type, and valid manifests round-trip."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtrain.checkpoint import jsoncodec
from dtrain.checkpoint.format import Chunk, FileEntry, Manifest, TensorEntry, parse_manifest
from dtrain.checkpoint.stfile import DTYPES, itemsize, read_header
from dtrain.errors import CheckpointError

pytestmark = pytest.mark.timeout(120)
WHERE = "s3://bucket/run/step-000000007/manifest.json"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=30)
# keys and values the parsers look for, so random structures reach deep into them
FIELDS = ["version", "step", "created", "world_size", "strategy", "files", "tensors", "metrics", "reason",
          "versions", "path", "size", "checksum", "dtype", "shape", "chunks", "file", "offsets", "lengths",
          "data_offsets", "__dtrain__", "v", "tensor", "float", "tuple", "dict", "bytes", "F32", "BF16",
          "crc32:0000abcd", "model-00000-of-00001.safetensors", "../x", "s3://other/x"]
near_values = st.recursive(scalars | st.sampled_from(FIELDS),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6), max_leaves=40)


def only_checkpoint_errors(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except CheckpointError:
        return None


@FUZZ
@given(st.binary(max_size=400))
def test_manifest_parser_on_random_bytes(data: bytes) -> None:
    only_checkpoint_errors(parse_manifest, data, WHERE)


@FUZZ
@given(near_values)
def test_manifest_parser_on_random_json(body: Any) -> None:
    only_checkpoint_errors(parse_manifest, json.dumps(body).encode(), WHERE)


def _valid() -> dict[str, Any]:
    return {"version": 1, "step": 3, "created": 1.0, "world_size": 1, "strategy": "none", "reason": "periodic",
            "metrics": {}, "versions": {}, "files": [{"path": "m.safetensors", "size": 64, "checksum": "crc32:00000000"}],
            "tensors": {"model/w": {"dtype": "F32", "shape": [2, 2], "chunks": [
                {"file": "m.safetensors", "offsets": [0, 0], "lengths": [2, 2], "data_offsets": [0, 16],
                 "checksum": "crc32:00000001"}]}}}


PATHS = [["version"], ["step"], ["created"], ["files", 0, "path"], ["files", 0, "size"], ["tensors", "model/w", "shape"],
         ["tensors", "model/w", "dtype"], ["tensors", "model/w", "chunks", 0, "offsets"],
         ["tensors", "model/w", "chunks", 0, "data_offsets"], ["tensors", "model/w", "chunks", 0, "file"],
         ["tensors", "model/w", "chunks"], ["metrics"], ["versions"], ["files"]]


@FUZZ
@given(st.sampled_from(PATHS), near_values)
def test_manifest_parser_on_one_mutated_field(path: list[Any], value: Any) -> None:
    body = _valid()
    node = body
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    only_checkpoint_errors(parse_manifest, json.dumps(body).encode(), WHERE)


DEEP = (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000)


def test_deep_nesting_and_huge_numbers_are_checkpoint_errors() -> None:
    for data in DEEP:
        with pytest.raises(CheckpointError, match="manifest.json"):
            parse_manifest(data, WHERE)
    body = _valid()
    body["created"] = 10**400  # valid JSON, too big for a float
    with pytest.raises(CheckpointError, match="created"):
        parse_manifest(json.dumps(body).encode(), WHERE)


def test_deeply_nested_state_json_is_a_checkpoint_error() -> None:
    for data in DEEP:
        with pytest.raises(CheckpointError, match="state.json"):
            jsoncodec.loads(data, "state.json")


def test_safetensors_header_with_a_list_dtype_is_a_checkpoint_error() -> None:
    text = json.dumps({"a": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(text)) + text + b"\0" * 4
    with pytest.raises(CheckpointError, match="dtype"):
        read_header(lambda s, e: data[s:e], len(data), "x.safetensors")


# ---- valid manifests round-trip -------------------------------------------------------------------
@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    n_files = draw(st.integers(1, 3))
    names = [f"model-{i:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
    tensors: dict[str, TensorEntry] = {}
    used = dict.fromkeys(names, 0)
    for t in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        rows = draw(st.integers(0, 6))
        cols = draw(st.integers(1, 3))
        cuts = sorted(set(draw(st.lists(st.integers(0, rows), max_size=3))) | {0, rows})
        chunks = []
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            f = draw(st.sampled_from(names))
            nbytes = (hi - lo) * cols * itemsize(dtype)
            chunks.append(Chunk(f, (lo, 0), (hi - lo, cols), (used[f], used[f] + nbytes),
                                f"crc32:{draw(st.integers(0, 2**32 - 1)):08x}"))
            used[f] += nbytes
        tensors[f"model/t{t}"] = TensorEntry(dtype, (rows, cols), tuple(chunks))
    metric = st.none() | st.floats(allow_nan=False, allow_infinity=False)
    return Manifest(step=draw(st.integers(0, 10**9)), created=draw(st.floats(0, 4e9)), world_size=n_files,
                    strategy=draw(st.sampled_from(["ddp", "fsdp", "none"])),
                    files=tuple(FileEntry(n, used[n] + draw(st.integers(0, 64)),
                                          f"crc32:{draw(st.integers(0, 2**32 - 1)):08x}") for n in names),
                    tensors=tensors, metrics=draw(st.dictionaries(st.text(max_size=8), metric, max_size=3)),
                    reason=draw(st.text(max_size=10)), versions={"torch": "2.13"})


@settings(max_examples=150, deadline=None)
@given(manifests())
def test_valid_manifests_round_trip(m: Manifest) -> None:
    assert parse_manifest(m.to_json(), WHERE) == m


# ---- state.json: the JSON codec --------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300))
def test_state_codec_on_random_bytes(data: bytes) -> None:
    only_checkpoint_errors(jsoncodec.loads, data, "state.json")


@FUZZ
@given(near_values)
def test_state_codec_on_random_json(body: Any) -> None:
    only_checkpoint_errors(jsoncodec.loads, json.dumps(body).encode(), "state.json")


state_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6) | st.integers(0, 9), inner, max_size=3), max_leaves=20)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@settings(max_examples=200, deadline=None)
@given(state_values)
def test_state_codec_round_trips(value: Any) -> None:
    assert _same(jsoncodec.loads(jsoncodec.dumps(value), "state.json"), value)


# ---- safetensors headers ---------------------------------------------------------------------------
@FUZZ
@given(near_values, st.integers(0, 64))
def test_safetensors_header_parser_on_random_headers(header: Any, data_len: int) -> None:
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + b"\0" * data_len
    only_checkpoint_errors(read_header, lambda s, e: data[s:e], len(data), "x.safetensors")


@FUZZ
@given(st.binary(max_size=200))
def test_safetensors_header_parser_on_random_bytes(data: bytes) -> None:
    only_checkpoint_errors(read_header, lambda s, e: data[s:e], len(data), "x.safetensors")
