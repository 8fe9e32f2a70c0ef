"""The few collectives checkpointing needs, over the checkpoint process group (None = one process).

Object collectives (pickle between our own live processes) are used only while saving; the load
path agrees with a plain tensor all-reduce, so nothing read from storage is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for a single process


def rank(group: ProcessGroup) -> int:
    return 0 if group is None else dist.get_rank(group)


def world(group: ProcessGroup) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_object(obj: Any, group: ProcessGroup) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, group: ProcessGroup) -> Any:
    """Rank 0's `obj` on every rank."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def agree_codes(code: int, group: ProcessGroup) -> list[int]:
    """Every rank's status code (0 = fine), identical on every rank: one small tensor all-reduce."""
    if group is None:
        return [code]
    codes = torch.zeros(dist.get_world_size(group), dtype=torch.int32)
    codes[dist.get_rank(group)] = int(code)
    dist.all_reduce(codes, op=dist.ReduceOp.SUM, group=group)
    return [int(c) for c in codes.tolist()]


def barrier(group: ProcessGroup) -> None:
    if group is not None:
        dist.barrier(group=group)


def default_group() -> ProcessGroup:
    """dtrain's checkpoint gloo group, or None when there is no multi-rank process group."""
    from dtrain import dist as dtrain_dist

    return dtrain_dist.checkpoint_group()
