"""Which bytes each rank writes: flatten state dicts into named tensors and boxes, then give every
box exactly one writer.

A box is (key, offsets, lengths) in the global tensor. A DTensor shard is a box only its holders
have; a plain tensor (DDP, or any tensor when world > 1) is the full box and every rank holds it.
Boxes held by one rank go to it; shared boxes go, largest first, to the least-loaded holder. Every
rank computes the same answer from the same gathered lists, so no extra round trip is needed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dtrain.checkpoint.stfile import dtype_name, itemsize
from dtrain.errors import CheckpointError

MODEL = "model/"
OPTIM = "optim/state/"


@dataclass(frozen=True, slots=True)
class Box:
    """One tensor piece this rank holds: where it sits in the global tensor."""

    key: str
    dtype: str
    shape: tuple[int, ...]  # global
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    # computed once: a save asks each box for these several times, and a state can hold 100k boxes
    # (functools.cached_property takes a lock on first use before Python 3.12: 2.5 us a call)
    nbytes: int = field(init=False, repr=False, compare=False)
    id: tuple[str, tuple[int, ...], tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", math.prod(self.lengths) * itemsize(self.dtype))
        object.__setattr__(self, "id", (self.key, self.offsets, self.lengths))


@dataclass
class Leaf:
    """A non-tensor value in a state dict and where it lives (to write it back on load)."""

    container: dict[Any, Any]
    subkey: Any
    value: Any


def _walk_nested(prefix: str, d: dict[Any, Any]) -> Iterator[tuple[str, dict[Any, Any], Any, Any]]:
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            yield from _walk_nested(key, v)
        else:
            yield key, d, k, v


def flatten(model_sd: dict[str, Any], optim_sd: dict[str, Any] | None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Leaf]]:
    """Tensors and non-tensor leaves under stable string keys: `model/<fqn>` and
    `optim/state/<fqn>/<name>`. Optimizer param_groups are handled separately (they are JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    leaves: dict[str, Leaf] = {}

    def put(key: str, container: dict[Any, Any], subkey: Any, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            leaves[key] = Leaf(container, subkey, value)

    for fqn, v in model_sd.items():
        put(MODEL + fqn, model_sd, fqn, v)
    if optim_sd:
        for fqn, st in optim_sd.get("state", {}).items():
            if not isinstance(st, dict):
                raise CheckpointError(f"optimizer state for {fqn!r} is a {type(st).__name__}, not a dict")
            for key, container, subkey, v in _walk_nested(OPTIM + str(fqn), st):
                put(key, container, subkey, v)
    return tensors, leaves


def local_box(key: str, t: torch.Tensor) -> tuple[Box, torch.Tensor]:
    """This rank's box of a tensor and the local data that fills it."""
    dt = dtype_name(t.dtype, what=key)
    shape = tuple(int(d) for d in t.shape)
    if isinstance(t, DTensor):
        lshape, goff = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        if tuple(local.shape) != tuple(lshape):
            raise CheckpointError(f"{key}: local shard has shape {tuple(local.shape)}, its placement "
                                  f"says {tuple(lshape)}; padded DTensor shards are not supported")
        return Box(key, dt, shape, tuple(int(o) for o in goff), tuple(int(n) for n in lshape)), local
    return Box(key, dt, shape, (0,) * len(shape), shape), t


def local_boxes(tensors: dict[str, torch.Tensor]) -> tuple[list[Box], dict[str, torch.Tensor]]:
    boxes, data = [], {}
    for key in sorted(tensors):
        box, local = local_box(key, tensors[key])
        if box.nbytes == 0 and math.prod(box.shape) != 0:
            continue  # an empty shard of a non-empty tensor (uneven sharding): nothing to write
        boxes.append(box)
        data[key] = local
    return boxes, data


def same_memory(t: torch.Tensor) -> tuple[object, ...] | None:
    """Equal for two tensors that are the same view of the same memory (tied weights: a GPT's
    output head and its token embedding), None for an empty tensor."""
    if not t.numel():
        return None
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def first_with_same_memory(tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """For each tensor, the index of the first one that is the same memory (`same_memory`; its own
    index when none before it is, or when it is None or empty): tied weights are stored once."""
    first: dict[tuple[object, ...], int] = {}
    out = []
    for i, t in enumerate(tensors):
        mem = None if t is None else same_memory(t)
        out.append(i if mem is None else first.setdefault(mem, i))
    return out


def tied_boxes(boxes: list[Box], data: dict[str, torch.Tensor]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Box id -> the id of the first box (in `boxes`' order) whose data is the same memory: tied
    weights, which the writer stores once when one rank writes both."""
    firsts = first_with_same_memory([data[b.key] for b in boxes])
    return {b.id: boxes[j].id for b, j in zip(boxes, firsts, strict=True) if boxes[j] is not b}


def digest(boxes: list[Box], tied: dict[tuple[Any, ...], tuple[Any, ...]] | None = None) -> int:
    """A signed 64-bit hash of a box list and its ties: ranks that hold the same boxes (DDP: all of
    them) learn it from one small all-reduce instead of sending each other the lists."""
    text = "\n".join(f"{b.key}\t{b.dtype}\t{b.shape}\t{b.offsets}\t{b.lengths}" for b in boxes)
    text += "".join(f"\n{a!r}={p!r}" for a, p in sorted((tied or {}).items()))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def assign(per_rank: list[list[Box]], tied: dict[tuple[Any, ...], tuple[Any, ...]] | None = None
           ) -> tuple[dict[tuple[Any, ...], int], dict[str, Box]]:
    """Owner rank of every distinct box, and one Box per key (for dtype and global shape). A box
    `tied` to another (the same memory on every rank that holds it) goes to that box's owner, so
    its bytes are written once.

    Raises if ranks disagree about a tensor's dtype or global shape."""
    holders: dict[tuple[Any, ...], list[int]] = {}
    boxes: dict[tuple[Any, ...], Box] = {}
    meta: dict[str, Box] = {}
    for rank, blist in enumerate(per_rank):
        for b in blist:
            seen = meta.setdefault(b.key, b)
            if (seen.dtype, seen.shape) != (b.dtype, b.shape):
                raise CheckpointError(f"tensor {b.key!r} is {seen.dtype}{list(seen.shape)} on one rank and "
                                      f"{b.dtype}{list(b.shape)} on rank {rank}; ranks must agree")
            holders.setdefault(b.id, []).append(rank)
            boxes[b.id] = b
    load = [0] * len(per_rank)
    owner: dict[tuple[Any, ...], int] = {}
    for bid in sorted(holders):
        if len(holders[bid]) == 1:
            owner[bid] = holders[bid][0]
            load[owner[bid]] += boxes[bid].nbytes
    shared = sorted((bid for bid in holders if len(holders[bid]) > 1),
                    key=lambda bid: (-boxes[bid].nbytes, bid))
    for bid in shared:
        primary = tied.get(bid) if tied else None
        if primary is not None and primary in owner and owner[primary] in holders[bid]:
            owner[bid] = owner[primary]
            continue
        r = min(holders[bid], key=lambda x: (load[x], x))
        owner[bid] = r
        load[r] += boxes[bid].nbytes
    return owner, meta
