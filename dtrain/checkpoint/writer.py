"""Write one rank's share of a checkpoint, streaming, and commit the whole checkpoint.

A tensor file is written header first, then each tensor's bytes straight from the tensor's memory
in pieces of at most `PIECE` bytes: no whole-file buffer, so extra memory stays at one piece (a
device tensor is copied to the host a piece at a time). A helper thread computes each piece's
CRC-32 while it is written (a tensor under `INLINE` bytes is hashed in place: a thread hand-off
costs more). The file is a standard safetensors file (`safetensors.torch.load_file` reads it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dtrain.checkpoint import comm, retention, storage
from dtrain.checkpoint.checksum import INLINE, BackgroundCrc, crc32, crc32_combine, format_crc
from dtrain.checkpoint.format import MANIFEST, Chunk, FileEntry, Manifest, TensorEntry, parse_manifest
from dtrain.checkpoint.localfs import out_of_space, storage_full
from dtrain.checkpoint.plan import MODEL, Box, first_with_same_memory
from dtrain.checkpoint.stfile import encode_header
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)
PIECE = 64 << 20


@dataclass
class RankReport:
    """What one rank wrote (or why it could not)."""

    rank: int
    files: list[FileEntry] = field(default_factory=list)
    chunks: list[tuple[str, Chunk]] = field(default_factory=list)
    error: str | None = None
    out_of_space: bool = False  # the error is ENOSPC or EDQUOT: the commit's message says what to do


def _bytes_view(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _pieces(t: torch.Tensor) -> Iterator[memoryview]:
    """The tensor's bytes in pieces of at most `PIECE`: views of host memory, or, for a device
    tensor, host copies made one piece at a time (never a host copy of the whole tensor)."""
    if t.device.type == "cpu":
        view = _bytes_view(t)
        for i in range(0, len(view), PIECE):
            yield view[i:i + PIECE]
        return
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    for i in range(0, flat.numel(), PIECE):
        yield _bytes_view(flat[i:i + PIECE])


def write_tensor_file(url: str, name: str, items: Sequence[tuple[Box, torch.Tensor | Callable[[], torch.Tensor]]],
                      storage_options: storage.StorageOptions = None, metadata: dict[str, str] | None = None,
                      ) -> tuple[FileEntry, list[tuple[str, Chunk]]]:
    """Stream `items` into a safetensors file at `url`; return its entry and each chunk's record.
    A callable item is called just before its bytes are written (export builds tensors lazily).

    Items that are the same memory as an earlier one (tied weights) are written once: the file's
    header names the first, and the others' chunks point at its bytes (a safetensors header may
    not name one byte range twice; the manifest may)."""
    firsts = first_with_same_memory([None if callable(t) else t for _, t in items])
    kept = [i for i, j in enumerate(firsts) if i == j]  # the items whose bytes go into the file
    written = [items[i] for i in kept]
    position = {i: n for n, i in enumerate(kept)}  # kept item -> its header entry
    header, entries = encode_header([(b.key, b.dtype, b.lengths) for b, _ in written], metadata)
    file_crc = crc32(header)
    chunks: list[tuple[str, Chunk]] = []
    crcs: list[BackgroundCrc | int] = []
    size = entries[-1].end if entries else len(header)
    with ThreadPoolExecutor(1, thread_name_prefix="dtrain-crc") as pool, \
            storage.open_write(url, storage_options, size) as f:
        f.write(header)
        for (box, t), entry in zip(written, entries, strict=True):
            tensor = t() if callable(t) else t
            if tensor.nbytes != entry.end - entry.begin:
                raise CheckpointError(f"{name}: tensor {box.key!r} has {tensor.nbytes} bytes, expected "
                                      f"{entry.end - entry.begin}")
            if tensor.nbytes < INLINE and tensor.device.type == "cpu":  # small: no thread, no generator
                view = _bytes_view(tensor)
                f.write(view)
                crcs.append(crc32(view))
                continue
            crc = BackgroundCrc(pool)
            for piece in _pieces(tensor):
                crc.update(piece)
                f.write(piece)
                crc.value()  # hashing is faster than writing: this costs nothing and keeps one piece alive
            crcs.append(crc)
            del tensor  # a lazily built tensor (export) is freed before the next one is built
        stored: list[Chunk] = []
        for (box, _), entry, hashed in zip(written, entries, crcs, strict=True):
            c = hashed if isinstance(hashed, int) else hashed.value()
            file_crc = crc32_combine(file_crc, c, entry.end - entry.begin)
            stored.append(Chunk(name, box.offsets, box.lengths, (entry.begin, entry.end), format_crc(c)))
        for i, ((box, _), j) in enumerate(zip(items, firsts, strict=True)):
            at = stored[position[j]]
            chunks.append((box.key, at if i == j else
                           Chunk(name, box.offsets, box.lengths, at.data_offsets, at.checksum)))
    return FileEntry(name, size, format_crc(file_crc)), chunks


def write_small_file(url: str, name: str, data: bytes, storage_options: storage.StorageOptions = None) -> FileEntry:
    with storage.open_write(url, storage_options) as f:
        f.write(data)
    return FileEntry(name, len(data), format_crc(crc32(data)))


def file_names(rank: int, world: int) -> tuple[str, str]:
    return (f"model-{rank:05d}-of-{world:05d}.safetensors", f"optim-{rank:05d}-of-{world:05d}.safetensors")


def write_rank(dir_url: str, rank: int, world: int, items: list[tuple[Box, torch.Tensor]],
               small_files: dict[str, bytes], storage_options: storage.StorageOptions = None) -> RankReport:
    """Write this rank's files; any error is captured in the report so every rank learns of it."""
    report = RankReport(rank)
    name = ""
    try:
        for name, part in zip(file_names(rank, world), _split(items), strict=True):
            if part:
                entry, chunks = write_tensor_file(storage.join(dir_url, name), name, part, storage_options)
                report.files.append(entry)
                report.chunks.extend(chunks)
        for name, data in small_files.items():
            report.files.append(write_small_file(storage.join(dir_url, name), name, data, storage_options))
    except Exception as e:  # reported to every rank and re-raised there
        log.exception("rank %d failed to write its checkpoint files under %s", rank, dir_url)
        # an OSError from a write names no file: say which one
        report.error = f"rank {rank}: writing {name}: {type(e).__name__}: {e}"
        report.out_of_space = out_of_space(e)
    return report


def _split(items: list[tuple[Box, torch.Tensor]]) -> tuple[list[tuple[Box, torch.Tensor]], ...]:
    model = [it for it in items if it[0].key.startswith(MODEL)]
    optim = [it for it in items if not it[0].key.startswith(MODEL)]
    return model, optim


def build_manifest(reports: list[RankReport], meta: dict[str, Box], *, step: int, world_size: int,
                   strategy: str, metrics: dict[str, float | None], reason: str,
                   versions: dict[str, str]) -> Manifest:
    chunks: dict[str, list[Chunk]] = {k: [] for k in meta}
    files: list[FileEntry] = []
    for r in reports:
        files.extend(r.files)
        for key, c in r.chunks:
            chunks[key].append(c)
    tensors = {k: TensorEntry(b.dtype, b.shape, tuple(sorted(chunks[k], key=lambda c: c.offsets)))
               for k, b in meta.items()}
    return Manifest(step=step, created=time.time(), world_size=world_size, strategy=strategy,
                    files=tuple(sorted(files, key=lambda f: f.path)), tensors=tensors,
                    metrics=dict(metrics), reason=reason, versions=versions)


def commit(dir_url: str, report: RankReport, meta: dict[str, Box], group: comm.ProcessGroup,
           storage_options: storage.StorageOptions = None, **manifest_fields: object) -> Manifest | None:
    """Gather every rank's report on rank 0, which writes manifest.json only if all succeeded, LAST.
    Any failure is raised on every rank, after rank 0 removed the uncommitted directory. Returns the
    manifest on rank 0, None elsewhere."""
    reports: list[RankReport] | None = comm.gather_object(report, group)
    manifest = None
    outcome: str | None = None
    if reports is not None:  # rank 0
        errors = [r.error for r in reports if r.error]
        full = any(r.out_of_space for r in reports)
        if errors:
            outcome = "; ".join(errors)
        else:
            try:
                manifest = build_manifest(reports, meta, world_size=len(reports), **manifest_fields)  # type: ignore[arg-type]
                data = manifest.to_json()
                parse_manifest(data, storage.join(dir_url, MANIFEST))  # never commit what we cannot read
                storage.write_atomic(storage.join(dir_url, MANIFEST), data, storage_options)
                retention.remember(dir_url, data, manifest)
            except Exception as e:
                log.exception("writing the manifest of %s failed", dir_url)
                outcome = f"rank 0: writing {MANIFEST}: {type(e).__name__}: {e}"
                full = out_of_space(e)
        if outcome is not None and storage.is_local(dir_url):
            _remove_uncommitted(dir_url, storage_options)
        if outcome is not None and full:
            outcome += no_space_hint(dir_url)
    if comm.broadcast_code(outcome is not None, group):  # the reason travels only on failure
        outcome = comm.broadcast_object(outcome, group)
        raise CheckpointError(f"checkpoint {dir_url} was not committed: {outcome}")
    return manifest


def _remove_uncommitted(dir_url: str, storage_options: storage.StorageOptions) -> None:
    """Rank 0, after a failed save, once every rank has reported (nobody writes there any more):
    remove the step directory, whose files would otherwise hold the space of a checkpoint that
    will never be committed (on a full disk, the space the next save needs). Local storage only:
    an object store does not fill up, and when it is down each removal would wait out the retries
    again. Best effort: left behind, the directory is only incomplete, and retention removes it
    once a newer checkpoint commits."""
    try:
        if storage.exists(storage.join(dir_url, MANIFEST), storage_options):
            return  # the manifest landed before the failure: never remove what may read as committed
        storage.remove(dir_url, storage_options)
        log.info("removed %s, which was not committed", dir_url)
    except Exception as e:
        log.warning("could not remove the uncommitted checkpoint %s: %s", dir_url, e)


def no_space_hint(dir_url: str) -> str:
    """What a user whose checkpoint storage is full should know and do, for a failed save of `dir_url`."""
    root = storage.parent(dir_url) if storage.is_local(dir_url) else dir_url
    return (f". {storage_full(root)}: free space there, or keep fewer checkpoints "
            f"(checkpoint.keep_last_n; a save needs room for one more checkpoint than retention keeps, since "
            f"older ones are removed only after it commits). The committed checkpoints are intact, and a "
            f"restart resumes from the newest")
