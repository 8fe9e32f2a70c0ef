"""A corpus of broken and hostile checkpoints, made from a sound one, and how dtrain must react.

Each case rewrites the newest of two committed checkpoints (step 2) and names the file the error
must mention. `judge` loads the root as a resume would (restore_latest, check_finite on) and
verifies the broken checkpoint: a case is *accepted* (the failure this suite exists to prevent) when
the resume loads wrong values from it, or when verify finds nothing wrong with it.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dtrain.checkpoint import CheckpointManager, verify
from dtrain.errors import CheckpointError

MODEL_FILE, OPTIM_FILE = "model-00000-of-00001.safetensors", "optim-00000-of-00001.safetensors"


class Planted:
    """Unpickling this writes a marker file: proof that something unpickled planted bytes."""

    marker = "/tmp/dtrain-reliability-unpickled"

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


PICKLE = pickle.dumps(Planted())


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def build(root: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Two committed checkpoints (steps 1, 2) of a trained model; the weights each holds."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    mgr = CheckpointManager(str(root), lease=False)
    saved = {}
    for step in (1, 2):
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).sum().backward()
        opt.step()
        opt.zero_grad()
        mgr.save(step, model=model, optimizer=opt)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.close()
    return saved


# ---- the mutations (each gets the step-2 directory; returns the file the error must name) ----------
def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _set_manifest(d: Path, body: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(body))


def _refresh(d: Path, name: str) -> None:
    """Make the manifest's size and CRC of `name` match its (changed) bytes: a consistent forgery."""
    body = _manifest(d)
    data = (d / name).read_bytes()
    for f in body["files"]:
        if f["path"] == name:
            f["size"], f["checksum"] = len(data), f"crc32:{zlib.crc32(data):08x}"
    _set_manifest(d, body)


def _bitflip(name: str, seed: int) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        data = bytearray((d / name).read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        pos = random.Random(seed).randrange(8 + n, len(data))  # somewhere in the tensor bytes
        data[pos] ^= 1 << random.Random(seed + 1).randrange(8)
        (d / name).write_bytes(bytes(data))
        return name
    return mutate


def _truncate(d: Path) -> str:
    data = (d / MODEL_FILE).read_bytes()
    (d / MODEL_FILE).write_bytes(data[:-9])
    return MODEL_FILE


def _delete(d: Path) -> str:
    (d / OPTIM_FILE).unlink()
    return OPTIM_FILE


def _pickle_as(name: str, consistent: bool) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        size = (d / name).stat().st_size
        (d / name).write_bytes(PICKLE if consistent else (PICKLE + b"\0" * size)[:size])
        if consistent:
            _refresh(d, name)
        return name
    return mutate


def _header(kind: str) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        data = bytearray((d / MODEL_FILE).read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        if kind == "huge":
            data[:8] = struct.pack("<Q", 2**62)  # claims an exabyte header
        else:
            header = json.loads(data[8:8 + n])
            names = [k for k in header if k != "__metadata__"]
            header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])  # two tensors, one span
            text = json.dumps(header, separators=(",", ":")).encode()
            if len(text) > n:
                raise AssertionError("the forged header does not fit")
            data[8:8 + n] = text + b" " * (n - len(text))
        (d / MODEL_FILE).write_bytes(bytes(data))
        _refresh(d, MODEL_FILE)  # even with the file's CRC made to match
        return MODEL_FILE
    return mutate


def _manifest_field(path: list, value: object) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        body = _manifest(d)
        node = body
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        _set_manifest(d, body)
        return "manifest.json"
    return mutate


def _manifest_bytes(data: bytes) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        (d / "manifest.json").write_bytes(data)
        return "manifest.json"
    return mutate


def _nan(d: Path) -> str:
    """A NaN written into a weight, every checksum made to match: only check_finite can tell."""
    body = _manifest(d)
    key = next(k for k in body["tensors"] if k.startswith("model/") and k.endswith("weight"))
    chunk = body["tensors"][key]["chunks"][0]
    data = bytearray((d / chunk["file"]).read_bytes())
    begin, end = chunk["data_offsets"]
    data[begin:begin + 4] = struct.pack("<f", float("nan"))
    (d / chunk["file"]).write_bytes(bytes(data))
    chunk["checksum"] = f"crc32:{zlib.crc32(bytes(data[begin:end])):08x}"
    _set_manifest(d, body)
    _refresh(d, chunk["file"])
    return chunk["file"]


CASES: dict[str, Callable[[Path], str]] = {
    **{f"bit flip in {n.split('-')[0]} shard #{s}": _bitflip(n, s) for n in (MODEL_FILE, OPTIM_FILE) for s in range(4)},
    "truncated shard": _truncate,
    "missing shard": _delete,
    "pickle planted as state.json": _pickle_as("state.json", consistent=False),
    "pickle planted as state.json, manifest forged to match": _pickle_as("state.json", consistent=True),
    "pickle planted as rng file, manifest forged to match": _pickle_as("rng-00000-of-00001.json", consistent=True),
    "pickle planted as shard, manifest forged to match": _pickle_as(MODEL_FILE, consistent=True),
    "pickle planted as manifest.json": _manifest_bytes(PICKLE),
    "safetensors header claims 2**62 bytes": _header("huge"),
    "safetensors header with overlapping offsets": _header("overlap"),
    "manifest is not JSON": _manifest_bytes(b"{not json"),
    "manifest field of the wrong type": _manifest_field(["world_size"], "two"),
    "manifest of an unknown schema version": _manifest_field(["version"], 99),
    "manifest path traversal": _manifest_field(["files", 0, "path"], "../step-000000001/" + MODEL_FILE),
    "manifest absolute path": _manifest_field(["files", 0, "path"], "/etc/passwd"),
    "manifest pointing to another bucket": _manifest_field(["files", 0, "path"], "s3://other-bucket/" + MODEL_FILE),
    "manifest of another step": _manifest_field(["step"], 7),
    "NaN in a weight (check_finite)": _nan,
}


@dataclass
class Verdict:
    case: str
    file: str
    resumed_step: int | None
    loaded_right_values: bool
    verify_problems: list[str]
    restore_error: str | None

    @property
    def accepted(self) -> bool:
        """Corrupt data loaded, or the corruption went unnoticed by verify."""
        return not self.loaded_right_values or not self.verify_problems

    @property
    def named(self) -> bool:
        """Every problem verify reports for this case names the damaged file."""
        return bool(self.verify_problems) and all(self.file in p or "manifest.json" in p for p in self.verify_problems)


def judge(template: Path, work: Path, case: str, saved: dict[int, dict[str, torch.Tensor]]) -> Verdict:
    """Copy the sound root, break step 2 as `case` says, resume from it and verify it."""
    root = work / case.replace(" ", "_").replace("*", "").replace("/", "_")
    shutil.copytree(template, root)
    file = CASES[case](root / "step-000000002")
    model = make_model(seed=5)
    resumed, error = None, None
    try:
        found = CheckpointManager(str(root), lease=False, check_finite=True).restore_latest(model=model)
        resumed = found[0].step if found else None
    except CheckpointError as e:
        error = str(e)
    state = model.state_dict()
    right = resumed is None or all(torch.equal(state[k], v) for k, v in saved[resumed].items())
    problems = verify(str(root / "step-000000002"), check_finite=True)
    return Verdict(case, file, resumed, right, problems, error)
