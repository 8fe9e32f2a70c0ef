"""The safetensors file layout, written and read by us: an 8-byte little-endian header length, a
JSON header (tensor name -> dtype, shape, data_offsets relative to the end of the header), then the
tensor bytes back to back. The reader is strict so a hostile or damaged file gives a clear error
instead of a huge allocation or a silent overlap.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from dtrain.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
_ALIGN = 8

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype, *, what: str = "tensor") -> str:
    """The safetensors name of a torch dtype; CheckpointError for dtypes safetensors cannot hold."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"{what}: dtype {dtype} cannot be stored in safetensors") from None


def itemsize(name: str) -> int:
    return DTYPES[name].itemsize


@dataclass(frozen=True)
class StEntry:
    """One tensor in a safetensors file; begin/end are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class StHeader:
    data_start: int
    entries: dict[str, StEntry]
    metadata: dict[str, str]


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> tuple[bytes, list[StEntry]]:
    """The header bytes (length prefix included) for tensors written in the given order, and each
    tensor's absolute byte range in the file."""
    body: dict[str, object] = {}
    if metadata:
        body["__metadata__"] = metadata
    offset = 0
    rel: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, dt, shape in tensors:
        n = math.prod(shape) * itemsize(dt)
        body[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        rel.append((name, dt, shape, offset, offset + n))
        offset += n
    text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _ALIGN)  # keep tensor data 8-byte aligned, as safetensors does
    start = 8 + len(text)
    entries = [StEntry(n, d, s, start + b, start + e) for n, d, s, b, e in rel]
    return struct.pack("<Q", len(text)) + text, entries


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte prefix and return the JSON header's length."""
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{where}: not a safetensors file ({file_size} bytes, need at least 8)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: safetensors header claims {n} bytes, over the "
                              f"{MAX_HEADER_BYTES}-byte limit; the file is damaged or hostile")
    if 8 + n > file_size:
        raise CheckpointError(f"{where}: safetensors header claims {n} bytes but the file has only "
                              f"{file_size}; the file is truncated")
    return n


def parse_header(header: bytes, file_size: int, where: str) -> StHeader:
    """Strictly parse the JSON header bytes (without the 8-byte prefix) of a file of `file_size`."""
    try:
        body = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    data_start = 8 + len(header)
    data_len = file_size - data_start
    metadata = body.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: safetensors __metadata__ must map strings to strings")
    entries: dict[str, StEntry] = {}
    for name, spec in body.items():
        entries[name] = _entry(name, spec, data_start, where)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    pos = data_start
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError(f"{where}: tensor {name!r} overlaps the previous tensor's bytes")
        if begin > pos:
            raise CheckpointError(f"{where}: a gap of {begin - pos} bytes before tensor {name!r}")
        pos = end
    if pos - data_start != data_len:
        raise CheckpointError(f"{where}: tensors cover {pos - data_start} data bytes but the file holds "
                              f"{data_len}; the file is truncated or has trailing bytes")
    return StHeader(data_start, entries, dict(metadata))


def _entry(name: str, spec: object, data_start: int, where: str) -> StEntry:
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: header entry {name!r} is not an object")
    dt, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {dt!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs)
            or offs[0] > offs[1]):
        raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offs!r}")
    want = math.prod(shape) * itemsize(dt)
    if offs[1] - offs[0] != want:
        raise CheckpointError(f"{where}: tensor {name!r} spans {offs[1] - offs[0]} bytes but dtype "
                              f"{dt} and shape {shape} need {want}")
    return StEntry(name, dt, tuple(shape), data_start + offs[0], data_start + offs[1])


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(read_range: object, file_size: int, where: str) -> StHeader:
    """Read and validate a file's header with `read_range(start, end) -> bytes`."""
    n = header_length(read_range(0, min(8, file_size)), file_size, where)  # type: ignore[operator]
    return parse_header(read_range(8, 8 + n), file_size, where)  # type: ignore[operator]
