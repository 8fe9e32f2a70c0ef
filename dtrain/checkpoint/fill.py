"""Fill destination tensors from a checkpoint's chunks, whatever the saved and the current layouts.

A destination (a full tensor, or this rank's shard of a DTensor) is a box in the global tensor;
every stored chunk that overlaps it is read, straight into the destination when the overlap is the
whole chunk and a contiguous run of host memory, else through the reader's bounded window. This is
what makes N -> M ranks and FSDP <-> DDP <-> one process loads work: only boxes are compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dtrain.checkpoint.format import Chunk, Manifest
from dtrain.checkpoint.plan import Box, local_box
from dtrain.checkpoint.reader import ChunkReader
from dtrain.checkpoint.stfile import DTYPES
from dtrain.errors import CheckpointMismatchError


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
    fill_boxes(reader, [(key, *checked_box(reader.dir_url, reader.manifest, key, dest))])


def fill_boxes(reader: ChunkReader, items: Iterable[tuple[str, Box, torch.Tensor]]) -> None:
    """Fill each destination box (`key, box, local data` from `checked_box`, which the caller has
    already called: twice cost 5 us a tensor) in place from the stored chunks of its key, with
    no copy of any tensor: a chunk that lands whole in a contiguous run of host memory
    is read straight into it, all such chunks together (the reader orders them by file and
    offset and spans them with its requests); the others pass through the reader's bounded window."""
    direct: list[tuple[str, Chunk, torch.Tensor]] = []
    windowed: list[tuple[str, Chunk, torch.dtype, tuple[tuple[int, int], ...], torch.Tensor]] = []
    for key, box, local in items:
        entry = reader.manifest.tensors[key]
        if math.prod(box.lengths) == 0:
            continue  # an empty shard (uneven sharding) or an empty tensor: nothing to read
        if (len(entry.chunks) == 1 and entry.chunks[0].lengths == box.lengths
                and entry.chunks[0].offsets == box.offsets and local.device.type == "cpu" and local.is_contiguous()):
            direct.append((key, entry.chunks[0], local))  # the usual case: stored whole, loaded whole
            continue
        for chunk in entry.chunks:
            ov = _overlap(box.offsets, box.lengths, chunk.offsets, chunk.lengths)
            if ov is None:
                continue
            part = local[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(ov, box.offsets, strict=True))]
            whole = all(lo == o and hi == o + n for (lo, hi), o, n in zip(ov, chunk.offsets, chunk.lengths, strict=True))
            if whole and part.device.type == "cpu" and part.is_contiguous():
                direct.append((key, chunk, part))
            else:
                windowed.append((key, chunk, DTYPES[entry.dtype], ov, part))
    reader.read_many(direct)
    for args in windowed:
        reader.stream(*args)


def checked_box(dir_url: str, manifest: Manifest, key: str, dest: torch.Tensor) -> tuple[Box, torch.Tensor]:
    """This rank's box of `key` and the local data that fills it; raises if the checkpoint's
    dtype or global shape differs from the destination's."""
    entry = manifest.tensors[key]
    box, local = local_box(key, dest)
    if entry.dtype != box.dtype or entry.shape != box.shape:
        hint = ("load into a model of the saved dtype, then convert it (model.to(dtype))" if entry.shape == box.shape
                else "the model config does not match")
        raise CheckpointMismatchError(f"{dir_url}: tensor {key!r}: checkpoint has {entry.dtype}{list(entry.shape)}, "
                                      f"the model expects {box.dtype}{list(box.shape)}; {hint}")
    return box, local


def check_keys(wanted: set[str], stored: set[str], what: str, where: str) -> None:
    """Strict loading: the checkpoint and the model/optimizer must hold the same keys."""
    missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
    if missing:
        raise CheckpointMismatchError(f"{where}: {what} key(s) missing from the checkpoint: {few_keys(missing)}",
                                      "pass strict=False to load the rest")
    if unexpected:
        raise CheckpointMismatchError(f"{where}: checkpoint has {what} key(s) the target does not: "
                                      f"{few_keys(unexpected)}", "pass strict=False to ignore them")


def few_keys(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
