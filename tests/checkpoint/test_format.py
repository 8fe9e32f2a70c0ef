from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from dtrain.checkpoint.format import SCHEMA_VERSION, parse_manifest
from dtrain.errors import CheckpointError

WHERE = "s3://bucket/run/step-000000010/manifest.json"


def valid() -> dict[str, Any]:
    return {
        "version": SCHEMA_VERSION, "step": 10, "created": 1.5, "world_size": 2, "strategy": "fsdp",
        "reason": "periodic", "metrics": {"val/loss": 0.25}, "versions": {"torch": "2.13"},
        "files": [{"path": "model-00000-of-00002.safetensors", "size": 200, "checksum": "crc32:0000abcd"},
                  {"path": "model-00001-of-00002.safetensors", "size": 200, "checksum": "crc32:0000abcd"}],
        "tensors": {"model/w": {"dtype": "F32", "shape": [4, 2], "chunks": [
            {"file": "model-00000-of-00002.safetensors", "offsets": [0, 0], "lengths": [2, 2],
             "data_offsets": [100, 116], "checksum": "crc32:00000001"},
            {"file": "model-00001-of-00002.safetensors", "offsets": [2, 0], "lengths": [2, 2],
             "data_offsets": [100, 116], "checksum": "crc32:00000002"}]}},
    }


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_valid_manifest_round_trips() -> None:
    m = parse_manifest(encode(valid()), WHERE)
    assert m.tensors["model/w"].chunks[1].offsets == (2, 0)
    again = parse_manifest(m.to_json(), WHERE)
    assert again == m


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(valid())
    node = body
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


CHUNK0 = ["tensors", "model/w", "chunks", 0]
BAD = {
    "unknown version": (mutate(["version"], 99), "schema version 99"),
    "version is a string": (mutate(["version"], "1"), "'version'"),
    "step missing": (mutate(["step"], KeyError), "'step' is missing"),
    "step negative": (mutate(["step"], -3), "step"),
    "files not a list": (mutate(["files"], {"a": 1}), "'files'"),
    "dotdot": (mutate(["files", 0, "path"], "../other-run/model.safetensors"), "files[0].path"),
    "dotdot inside": (mutate(["files", 0, "path"], "a/../../b"), "files[0].path"),
    "absolute": (mutate(["files", 0, "path"], "/etc/passwd"), "files[0].path"),
    "other bucket": (mutate(["files", 0, "path"], "s3://other-bucket/x.safetensors"), "files[0].path"),
    "chunk absolute": (mutate(CHUNK0 + ["file"], "/tmp/x"), "chunks[0].file"),
    "chunk file unlisted": (mutate(CHUNK0 + ["file"], "nope.safetensors"), "not listed in files"),
    "chunk file not a string": (mutate(CHUNK0 + ["file"], ["x"]), "chunks[0].file"),
    "size is a string": (mutate(["files", 0, "size"], "200"), "files[0].size"),
    "bad checksum": (mutate(["files", 0, "checksum"], "md5:zz"), "files[0].checksum"),
    "unknown dtype": (mutate(["tensors", "model/w", "dtype"], "F128"), "dtype"),
    "overlapping chunks": (mutate(CHUNK0 + ["offsets"], [1, 0]), "overlapping chunks"),
    "box outside shape": (mutate(CHUNK0 + ["offsets"], [3, 0]), "outside shape"),
    "bytes outside file": (mutate(CHUNK0 + ["data_offsets"], [190, 206]), "not inside"),
    "wrong byte count": (mutate(CHUNK0 + ["data_offsets"], [100, 120]), "needs 16"),
    "incomplete coverage": (mutate(["tensors", "model/w", "shape"], [6, 2]), "cover 8 of 12"),
    "metric is a string": (mutate(["metrics", "val/loss"], "low"), "metrics"),
    # a time no tool can print (ls/inspect crashed on these)
    "created too large": (mutate(["created"], 1e20), "field created = 1e+20 is not a time"),
    "created NaN": (mutate(["created"], float("nan")), "field created = nan is not a time"),
    "created inf": (mutate(["created"], float("inf")), "field created = inf is not a time"),
    "created negative": (mutate(["created"], -1e12), "field created = -1000000000000.0 is not a time"),
    "created huge integer": (mutate(["created"], 10**400), "field created"),
    "world size zero": (mutate(["world_size"], 0), "field world_size must be at least 1, got 0"),
    # each check of a chunk's fast path, which hands anything it does not accept to the checks
    # that name the field
    "chunk not an object": (mutate(CHUNK0, ["x"]), "chunks[0] must be an object"),
    "offset is a bool": (mutate(CHUNK0 + ["offsets"], [False, 0]), "chunks[0].offsets"),
    "negative length": (mutate(CHUNK0 + ["lengths"], [-2, 2]), "chunks[0].lengths"),
    "lengths not a list": (mutate(CHUNK0 + ["lengths"], "2,2"), "chunks[0].lengths"),
    "offsets of the wrong rank": (mutate(CHUNK0 + ["offsets"], [0]), "wrong rank"),
    "reversed byte range": (mutate(CHUNK0 + ["data_offsets"], [116, 100]), "not inside"),
    "three data offsets": (mutate(CHUNK0 + ["data_offsets"], [100, 116, 120]), "not inside"),
    "data offset is a float": (mutate(CHUNK0 + ["data_offsets"], [100.0, 116]), "data_offsets"),
    "bad chunk checksum": (mutate(CHUNK0 + ["checksum"], "crc32:123"), "chunks[0].checksum"),
    "chunk checksum missing": (mutate(CHUNK0 + ["checksum"], KeyError), "chunks[0].checksum"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_rejected_naming_file_and_field(case: str) -> None:
    body, needle = BAD[case]
    with pytest.raises(CheckpointError) as e:
        parse_manifest(encode(body), WHERE)
    assert WHERE in str(e.value)
    assert needle in str(e.value)


@pytest.mark.parametrize("data", [b"", b"not json{", b"[1, 2]", b"\xff\xfe", b'"a string"'])
def test_not_a_json_object(data: bytes) -> None:
    with pytest.raises(CheckpointError, match="manifest.json"):
        parse_manifest(data, WHERE)


def test_written_manifest_has_a_line_per_file_and_tensor() -> None:
    """to_json composes lines by hand (json's C encoder per entry): it must still be one valid JSON
    document, equal to the manifest, and readable with `cat` (one tensor per line)."""
    body = valid()
    body["tensors"] = {f"model/t{i}": {"dtype": "F32", "shape": [], "chunks": [
        {"file": "model-00000-of-00002.safetensors", "offsets": [], "lengths": [], "data_offsets": [100 + 4 * i, 104 + 4 * i],
         "checksum": "crc32:00000001"}]} for i in range(20)}
    body["metrics"] = {"val/loss": None, "acc": 0.5}
    m = parse_manifest(encode(body), WHERE)
    data = m.to_json()
    assert parse_manifest(data, WHERE) == m
    lines = data.decode().splitlines()
    assert sum('"model/t' in line for line in lines) == 20 and sum('"path"' in line for line in lines) == 2
    empty = parse_manifest(encode({**body, "files": [], "tensors": {}}), WHERE)
    assert parse_manifest(empty.to_json(), WHERE) == empty
