"""manifest.json: the one file that makes a checkpoint exist. Written last by rank 0; read strictly.

A manifest lists every file with size and checksum, and every tensor with its global shape, dtype and
the boxes (offsets, lengths into the global tensor) each file holds, with the box's absolute byte
range in that file (`data_offsets`, [begin, end) from the start of the file) and its own CRC.
Anything read from disk is untrusted: paths must stay inside the checkpoint directory, numbers must
be numbers, chunks must tile their tensor exactly.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from dtrain.checkpoint.checksum import parse_crc
from dtrain.checkpoint.gcpause import gc_paused
from dtrain.checkpoint.stfile import DTYPES, itemsize
from dtrain.errors import CheckpointError

SCHEMA_VERSION = 1
KNOWN_VERSIONS = (1,)
MANIFEST = "manifest.json"
NEWER_SCHEMA = "is not known to this dtrain"  # in the error for a manifest a newer dtrain wrote
DAMAGED = MANIFEST + ".damaged"  # a damaged checkpoint's manifest, renamed by a resume that skipped it
STATE = "state.json"
_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


def rng_file(rank: int, world: int) -> str:
    """Each rank's RNG states live in their own small file, so no rank reads the others'."""
    return f"rng-{rank:05d}-of-{world:05d}.json"


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative to the checkpoint directory
    size: int
    checksum: str  # "crc32:xxxxxxxx" of the whole file


@dataclass(frozen=True, slots=True)
class Chunk:
    file: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    data_offsets: tuple[int, int]  # absolute byte range [begin, end) in `file`
    checksum: str  # crc32 of exactly those bytes


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]  # global shape
    chunks: tuple[Chunk, ...]

    @property
    def stored_bytes(self) -> int:
        """The bytes of all its chunks in the files."""
        return sum(c.data_offsets[1] - c.data_offsets[0] for c in self.chunks)

    @property
    def first_byte(self) -> tuple[str, int]:
        """(file, offset) of its first stored chunk: sorting keys by it puts them in file order."""
        return min(((c.file, c.data_offsets[0]) for c in self.chunks), default=("", 0))


@dataclass(frozen=True, slots=True)
class Manifest:
    step: int
    created: float
    world_size: int
    strategy: str
    files: tuple[FileEntry, ...]
    tensors: dict[str, TensorEntry]
    metrics: dict[str, float | None] = field(default_factory=dict)
    reason: str = "periodic"
    versions: dict[str, str] = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        """One line per file and per tensor: readable with `cat`, and each line goes through json's C
        encoder (an indented dump runs the pure-Python one: 1 s for 16k tensors, dataclasses.asdict 2 s)."""
        head = {"version": self.version, "step": self.step, "created": self.created, "world_size": self.world_size,
                "strategy": self.strategy, "reason": self.reason, "metrics": self.metrics, "versions": self.versions}
        dump = json.JSONEncoder(allow_nan=False).encode
        files = ",\n  ".join(dump({"path": f.path, "size": f.size, "checksum": f.checksum}) for f in self.files)
        tensors = ",\n  ".join(f"{dump(k)}: {dump(_tensor_json(t))}" for k, t in sorted(self.tensors.items()))
        return (dump(head)[:-1] + f',\n "files": [\n  {files}],\n "tensors": {{\n  {tensors}}}}}\n').encode("utf-8")

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise CheckpointError(f"manifest lists no file {path!r}")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _tensor_json(t: TensorEntry) -> dict[str, Any]:
    return {"dtype": t.dtype, "shape": t.shape, "chunks": [
        {"file": c.file, "offsets": c.offsets, "lengths": c.lengths, "data_offsets": c.data_offsets,
         "checksum": c.checksum} for c in t.chunks]}


def check_relative_path(path: object, where: str, field_name: str) -> str:
    """A path inside the checkpoint directory: plain segments, no `..`, no root, no scheme."""
    if not isinstance(path, str) or not path:
        raise CheckpointError(f"{where}: field {field_name} must be a non-empty string, got {path!r}")
    segments = path.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise CheckpointError(
                f"{where}: field {field_name} = {path!r} points outside the checkpoint directory "
                f"(absolute, '..', a URL scheme or another bucket); refusing to read it")
    return path


@gc_paused()  # tens of thousands of entries, none in a cycle (16k tensors: 280 -> 150 ms)
def parse_manifest(data: bytes, where: str) -> Manifest:
    """Validate manifest bytes read from `where`; every problem is a CheckpointError naming it."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e}); the checkpoint is damaged") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to be a manifest; the file is damaged or hostile") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{where}: must be a JSON object, got {type(body).__name__}")
    v = _get(body, "version", int, where)
    if v not in KNOWN_VERSIONS:
        raise CheckpointError(f"{where}: schema version {v} {NEWER_SCHEMA} (it reads "
                              f"{list(KNOWN_VERSIONS)}); upgrade dtrain to read this checkpoint")
    files = tuple(_file(f, i, where) for i, f in enumerate(_get(body, "files", list, where)))
    sizes = {f.path: f.size for f in files}
    if len(sizes) != len(files):
        raise CheckpointError(f"{where}: field files lists a path twice")
    tensors_raw = _get(body, "tensors", dict, where)
    tensors = {}
    while tensors_raw:  # each parsed entry is dropped once converted: peak memory is one copy, not two
        k, t = tensors_raw.popitem()
        tensors[k] = _tensor(k, t, sizes, where)
    tensors = dict(reversed(tensors.items()))  # popitem() went last to first: keep the file's order
    metrics = _get(body, "metrics", dict, where)
    for k, m in metrics.items():
        if m is not None and (not isinstance(m, (int, float)) or isinstance(m, bool)):
            raise CheckpointError(f"{where}: field metrics[{k!r}] must be a number or null, got {m!r}")
    versions = _get(body, "versions", dict, where)
    return Manifest(
        step=_uint(_get(body, "step", int, where), where, "step"),
        created=_seconds(_get(body, "created", (int, float), where), where, "created"),
        world_size=_positive(_get(body, "world_size", int, where), where, "world_size"),
        strategy=_get(body, "strategy", str, where),
        files=files, tensors=tensors, metrics=dict(metrics),
        reason=_get(body, "reason", str, where),
        versions={str(k): str(x) for k, x in versions.items()},
        version=v,
    )


def _get(body: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in body:
        raise CheckpointError(f"{where}: required field {key!r} is missing")
    val = body[key]
    if not isinstance(val, typ) or isinstance(val, bool):
        raise CheckpointError(f"{where}: field {key!r} has the wrong type ({type(val).__name__})")
    return val


def _seconds(v: int | float, where: str, name: str) -> float:
    """A Unix time that tools can print: finite, not before 1970, within what time.gmtime accepts."""
    try:
        t = float(v)
        ok = math.isfinite(t) and t >= 0 and time.gmtime(t) is not None
    except (OverflowError, OSError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: field {name} = {v!r} is not a time (a finite, non-negative number of "
                              f"seconds since 1970); the manifest is damaged")
    return t


def _positive(v: int, where: str, name: str) -> int:
    if v < 1:
        raise CheckpointError(f"{where}: field {name} must be at least 1, got {v}; the manifest is damaged")
    return v


def _uint(v: object, where: str, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointError(f"{where}: field {name} must be a non-negative integer, got {v!r}")
    return v


def _ints(v: object, where: str, name: str) -> tuple[int, ...]:
    if type(v) is list and all(type(x) is int and x >= 0 for x in v):  # fast path: manifests are big
        return tuple(v)
    if not isinstance(v, list):
        raise CheckpointError(f"{where}: field {name} must be a list of integers, got {v!r}")
    return tuple(_uint(x, where, name) for x in v)


def _file(f: object, i: int, where: str) -> FileEntry:
    if not isinstance(f, dict):
        raise CheckpointError(f"{where}: field files[{i}] must be an object")
    path = check_relative_path(f.get("path"), where, f"files[{i}].path")
    checksum = f.get("checksum")
    if parse_crc(checksum) is None:  # type: ignore[arg-type]
        raise CheckpointError(f"{where}: field files[{i}].checksum {checksum!r} is not 'crc32:<8 hex>'")
    return FileEntry(path, _uint(f.get("size"), where, f"files[{i}].size"), checksum)  # type: ignore[arg-type]


def _tensor(key: str, t: object, sizes: dict[str, int], where: str) -> TensorEntry:
    name = f"tensors[{key!r}]"
    if not isinstance(t, dict):
        raise CheckpointError(f"{where}: field {name} must be an object")
    dt = t.get("dtype")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise CheckpointError(f"{where}: field {name}.dtype {dt!r} is not a known dtype")
    shape = _ints(t.get("shape"), where, f"{name}.shape")
    raw_chunks = t.get("chunks")
    if not isinstance(raw_chunks, list):
        raise CheckpointError(f"{where}: field {name}.chunks must be a list")
    chunks = tuple(_chunk(c, name, j, dt, shape, sizes, where) for j, c in enumerate(raw_chunks))
    if len(chunks) == 1 and chunks[0].lengths == shape:  # the usual case: one chunk that is the tensor
        return TensorEntry(dt, shape, chunks)  # type: ignore[arg-type]
    _check_tiling(chunks, shape, where, name)
    return TensorEntry(dt, shape, chunks)  # type: ignore[arg-type]


def _chunk(c: object, tensor_name: str, j: int, dt: str, shape: tuple[int, ...], sizes: dict[str, int],
           where: str) -> Chunk:
    if type(c) is dict:  # fast path, the same checks as `_checked_chunk` (which names what is wrong)
        path: Any = c.get("file")
        offsets: Any = c.get("offsets")
        lengths: Any = c.get("lengths")
        span: Any = c.get("data_offsets")
        if (type(path) is str and path in sizes and _is_uints(offsets) and _is_uints(lengths)
                and _is_uints(span) and len(offsets) == len(lengths) == len(shape) and len(span) == 2
                and span[0] <= span[1] <= sizes[path]):
            for o, n, d in zip(offsets, lengths, shape, strict=True):
                if o + n > d:
                    break
            else:
                checksum: Any = c.get("checksum")
                if span[1] - span[0] == math.prod(lengths) * itemsize(dt) and parse_crc(checksum) is not None:
                    return Chunk(path, tuple(offsets), tuple(lengths), (span[0], span[1]), checksum)
    return _checked_chunk(c, tensor_name, j, dt, shape, sizes, where)


def _is_uints(v: object) -> bool:
    if type(v) is not list:
        return False
    for x in v:
        if type(x) is not int or x < 0:
            return False
    return True


def _checked_chunk(c: object, tensor_name: str, j: int, dt: str, shape: tuple[int, ...], sizes: dict[str, int],
                   where: str) -> Chunk:
    name = f"{tensor_name}.chunks[{j}]"
    if not isinstance(c, dict):
        raise CheckpointError(f"{where}: field {name} must be an object")
    path = c.get("file")
    if not isinstance(path, str) or path not in sizes:  # every listed path was validated already
        check_relative_path(path, where, f"{name}.file")
        raise CheckpointError(f"{where}: field {name}.file {path!r} is not listed in files")
    offsets = _ints(c.get("offsets"), where, f"{name}.offsets")
    lengths = _ints(c.get("lengths"), where, f"{name}.lengths")
    if len(offsets) != len(shape) or len(lengths) != len(shape):
        raise CheckpointError(f"{where}: field {name} has offsets/lengths of the wrong rank for shape {shape}")
    if any(o + n > s for o, n, s in zip(offsets, lengths, shape, strict=True)):
        raise CheckpointError(f"{where}: field {name} box {offsets}+{lengths} lies outside shape {shape}")
    span = _ints(c.get("data_offsets"), where, f"{name}.data_offsets")
    if len(span) != 2 or span[0] > span[1] or span[1] > sizes[path]:
        raise CheckpointError(f"{where}: field {name}.data_offsets {list(span)} is not inside "
                              f"{path!r} ({sizes[path]} bytes)")
    if span[1] - span[0] != math.prod(lengths) * itemsize(dt):  # type: ignore[arg-type]
        raise CheckpointError(f"{where}: field {name}.data_offsets spans {span[1] - span[0]} bytes, "
                              f"box {lengths} of {dt} needs {math.prod(lengths) * itemsize(dt)}")  # type: ignore[arg-type]
    checksum = c.get("checksum")
    if parse_crc(checksum) is None:  # type: ignore[arg-type]
        raise CheckpointError(f"{where}: field {name}.checksum {checksum!r} is not 'crc32:<8 hex>'")
    return Chunk(path, offsets, lengths, (span[0], span[1]), checksum)  # type: ignore[arg-type]


def _check_tiling(chunks: tuple[Chunk, ...], shape: tuple[int, ...], where: str, name: str) -> None:
    """Chunks must cover the tensor exactly once, or loading would leave bytes uninitialised.

    Non-empty, pairwise disjoint boxes whose volumes add up to the tensor's are an exact tiling.
    A sweep along dim 0 compares a box only with boxes whose dim-0 range it meets, so the usual
    dim-0 sharding costs O(n log n) instead of all pairs."""
    boxes = sorted((c for c in chunks if math.prod(c.lengths)), key=lambda c: c.offsets)
    total = sum(math.prod(c.lengths) for c in boxes)
    if total != math.prod(shape):
        raise CheckpointError(f"{where}: field {name} chunks cover {total} of {math.prod(shape)} "
                              f"elements; the checkpoint is incomplete")
    if not shape:
        if len(boxes) > 1:
            raise CheckpointError(f"{where}: field {name} has {len(boxes)} chunks for a scalar")
        return
    active: list[Chunk] = []
    for b in boxes:
        active = [a for a in active if a.offsets[0] + a.lengths[0] > b.offsets[0]]
        for a in active:
            if all(ao < bo + bn and bo < ao + an
                   for ao, an, bo, bn in zip(a.offsets, a.lengths, b.offsets, b.lengths, strict=True)):
                raise CheckpointError(f"{where}: field {name} has overlapping chunks at {a.offsets} and {b.offsets}")
        active.append(b)


class CheckpointDamagedError(CheckpointError):
    """The stored bytes are wrong: a file is missing or truncated, or a checksum does not match.
    Resume falls back to the previous committed checkpoint on this error (and only on this one)."""


class NonFiniteTensorError(CheckpointDamagedError):
    """A float tensor holds NaN or inf and the load asked for finite values only (check_finite)."""
