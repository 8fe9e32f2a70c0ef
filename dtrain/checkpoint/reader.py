"""Read stored chunks into the tensors a model/optimizer needs, whatever layout saved them.

For each destination tensor (a DTensor shard or a full tensor) the reader finds the stored chunks
whose boxes overlap the destination's box, reads exactly those chunks' byte ranges, checks their
CRC-32, and copies the overlap in place. That is all N -> M resharding and FSDP <-> DDP <-> single
process loading needs. Nothing is unpickled: bytes become tensors through `torch.frombuffer`.
"""

from __future__ import annotations

import logging
import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dtrain.checkpoint import storage
from dtrain.checkpoint.checksum import crc32_combine, format_crc, parse_crc
from dtrain.checkpoint.format import MANIFEST, STATE, CheckpointDamagedError, Chunk, Manifest, parse_manifest
from dtrain.checkpoint.jsoncodec import loads
from dtrain.checkpoint.plan import local_box
from dtrain.checkpoint.stfile import DTYPES
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)
PIECE = 8 << 20  # local disk
REMOTE_PIECE = 64 << 20  # object stores: each ranged GET has a fixed cost (moto: 8 MiB ran at 80 MiB/s, 64 at 240)


def read_manifest(dir_url: str, storage_options: storage.StorageOptions = None) -> Manifest:
    """The validated manifest of a checkpoint directory; CheckpointError if absent or invalid."""
    url = storage.join(dir_url, MANIFEST)
    try:
        data = storage.read_bytes(url, storage_options=storage_options)
    except FileNotFoundError:
        raise CheckpointError(f"{url} does not exist: {dir_url} is not a committed checkpoint "
                              f"(it may be incomplete; see `dtrain ckpt ls`)") from None
    return parse_manifest(data, url)


def read_state(dir_url: str, manifest: Manifest, storage_options: storage.StorageOptions = None) -> dict:
    """state.json, checked against the manifest's size and checksum."""
    return read_json_file(dir_url, manifest, STATE, storage_options)


def read_json_file(dir_url: str, manifest: Manifest, name: str,
                   storage_options: storage.StorageOptions = None) -> dict:
    """A small JSON file of the checkpoint, checked against the manifest's size and checksum."""
    url = storage.join(dir_url, name)
    entry = manifest.file(name)
    try:
        data = storage.read_bytes(url, storage_options=storage_options)
    except FileNotFoundError:
        raise CheckpointDamagedError(f"{url} is listed in the manifest but missing") from None
    if len(data) != entry.size or zlib.crc32(data) != parse_crc(entry.checksum):
        raise CheckpointDamagedError(f"{url}: size/checksum mismatch ({len(data)} bytes, "
                                     f"{format_crc(zlib.crc32(data))}; manifest says {entry.size} bytes, "
                                     f"{entry.checksum}); the checkpoint is damaged")
    state = loads(data, url)
    if not isinstance(state, dict):
        raise CheckpointDamagedError(f"{url}: must be a JSON object")
    return state


@dataclass
class ChunkReader:
    """Reads and verifies chunks of one checkpoint; checks each file's size once.

    A big chunk is read as `PIECE`-sized pieces on a few threads, each piece hashed right after it
    lands (file reads, S3 GETs and zlib all release the GIL), and the piece CRCs are combined: on
    2 cores this reads at about disk speed instead of read time plus hash time.
    """

    dir_url: str
    manifest: Manifest
    storage_options: storage.StorageOptions = None
    workers: int = 4
    bytes_read: int = 0
    _sizes_ok: set[str] = field(default_factory=set)
    _pool: ThreadPoolExecutor | None = None

    def _check_size(self, name: str) -> str:
        url = storage.join(self.dir_url, name)
        if name in self._sizes_ok:
            return url
        want = self.manifest.file(name).size
        try:
            got = storage.size(url, self.storage_options)
        except FileNotFoundError:
            raise CheckpointDamagedError(f"{url} is listed in the manifest but missing") from None
        if got != want:
            raise CheckpointDamagedError(f"{url}: size is {got} bytes, the manifest says {want}; the file "
                                         f"is truncated or was overwritten")
        self._sizes_ok.add(name)
        return url

    def read(self, key: str, chunk: Chunk, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk as a tensor of shape `chunk.lengths`; read into `out` when given (CPU, contiguous)."""
        url = self._check_size(chunk.file)
        begin, end = chunk.data_offsets
        if out is None:
            out = torch.empty(chunk.lengths, dtype=dtype)
        raw = out.reshape(-1).view(torch.uint8) if out.numel() else torch.empty(0, dtype=torch.uint8)
        mv = raw.numpy().data if raw.numel() else memoryview(bytearray())
        if len(mv) != end - begin:
            raise CheckpointError(f"{url}: chunk of {key!r} has {end - begin} bytes, destination {len(mv)}")
        crc = self._read_hashed(url, begin, mv)
        if crc != parse_crc(chunk.checksum):
            raise CheckpointDamagedError(f"{url}: checksum mismatch in tensor {key!r} (bytes {begin}-{end}: "
                                         f"{format_crc(crc)}, manifest says {chunk.checksum}); the file is damaged")
        self.bytes_read += end - begin
        return out

    def _read_hashed(self, url: str, begin: int, mv: memoryview) -> int:
        n = len(mv)
        step = PIECE if storage.is_local(url) else REMOTE_PIECE

        def piece(off: int) -> int:
            part = mv[off:min(off + step, n)]
            storage.read_into(url, begin + off, part, self.storage_options)
            return zlib.crc32(part)

        if n <= step:
            return piece(0) if n else 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dtrain-read")
        crc = 0
        for off, part_crc in zip(range(0, n, step), self._pool.map(piece, range(0, n, step)), strict=True):
            crc = crc32_combine(crc, part_crc, min(step, n - off))
        return crc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _overlap(a_off: tuple[int, ...], a_len: tuple[int, ...], b_off: tuple[int, ...],
             b_len: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """The intersection of two boxes as (lo, hi) per dimension, or None if they do not meet."""
    out = []
    for ao, an, bo, bn in zip(a_off, a_len, b_off, b_len, strict=True):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def fill_tensor(reader: ChunkReader, key: str, dest: torch.Tensor) -> None:
    """Fill `dest` (a full tensor or a DTensor) in place from the stored chunks of `key`."""
    entry = reader.manifest.tensors[key]
    box, local = local_box(key, dest)
    if entry.dtype != box.dtype or entry.shape != box.shape:
        raise CheckpointError(f"{reader.dir_url}: tensor {key!r}: checkpoint has {entry.dtype}{list(entry.shape)}, the model "
                              f"expects {box.dtype}{list(box.shape)}; the model config does not match")
    if math.prod(box.lengths) == 0:
        return  # an empty shard (uneven sharding) or an empty tensor: nothing to read
    dtype = DTYPES[entry.dtype]
    direct = local.device.type == "cpu" and local.is_contiguous()
    staging = local if direct else torch.empty(box.lengths, dtype=dtype)
    for chunk in entry.chunks:
        ov = _overlap(box.offsets, box.lengths, chunk.offsets, chunk.lengths)
        if ov is None:
            continue
        if chunk.offsets == box.offsets and chunk.lengths == box.lengths:
            reader.read(key, chunk, dtype, out=staging)  # same layout: straight into the destination
            continue
        src = reader.read(key, chunk, dtype)
        src_idx = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(ov, chunk.offsets, strict=True))
        dst_idx = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(ov, box.offsets, strict=True))
        staging[dst_idx].copy_(src[src_idx])
    if not direct:
        local.copy_(staging)


def check_keys(wanted: set[str], stored: set[str], what: str, where: str) -> None:
    """Strict loading: the checkpoint and the model/optimizer must hold the same keys."""
    missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
    if missing:
        raise CheckpointError(f"{where}: {what} key(s) missing from the checkpoint: {_few(missing)}; "
                              f"pass strict=False to load the rest")
    if unexpected:
        raise CheckpointError(f"{where}: checkpoint has {what} key(s) the target does not: "
                              f"{_few(unexpected)}; pass strict=False to ignore them")


def _few(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

