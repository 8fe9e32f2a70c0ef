"""One save, in three phases: `prepare` (collective, foreground: who writes what, plus the JSON
state), `stage` (host copies, for async saves only) and `execute` (write files, gather reports,
manifest last; may run on a background thread since its collectives use the checkpoint group).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dtrain.checkpoint import comm, rng, storage
from dtrain.checkpoint.format import MANIFEST, STATE, Manifest, rng_file
from dtrain.checkpoint.jsoncodec import encode
from dtrain.checkpoint.plan import Box, assign, local_boxes
from dtrain.checkpoint.state import (
    Stateful,
    flatten,
    get_states,
    json_state,
    stateful_states,
    strategy_of,
    versions,
)
from dtrain.checkpoint.writer import RankReport, commit, write_rank
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class PreparedSave:
    dir_url: str
    step: int
    rank: int
    world: int
    items: list[tuple[Box, torch.Tensor]] = field(default_factory=list)
    meta: dict[str, Box] = field(default_factory=dict)
    small_files: dict[str, bytes] = field(default_factory=dict)  # state.json (rank 0), rng file
    manifest_fields: dict[str, Any] = field(default_factory=dict)
    skip: bool = False
    error: str | None = None  # a failure after `prepare` (staging): reported, not raised, so every
    # rank still takes part in the commit's collectives and learns of it

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b, _ in self.items)


def _clean_metrics(metrics: dict[str, float] | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in (metrics or {}).items():
        f = float(v)
        out[str(k)] = f if math.isfinite(f) else None
    return out


def prepare(dir_url: str, step: int, *, model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...],
            stateful: dict[str, Stateful], extra: dict[str, Any], metrics: dict[str, float] | None,
            reason: str, group: comm.ProcessGroup, storage_options: storage.StorageOptions) -> PreparedSave:
    """Collective: decide this rank's share and build the JSON state. Raises on every rank if any
    rank cannot save; returns `skip=True` everywhere if this step is already committed."""
    rank, world = comm.rank(group), comm.world(group)
    payload: dict[str, Any] = {"boxes": [], "error": None, "skip": False, "json": None}
    data: dict[str, torch.Tensor] = {}
    rng_bytes = b""
    try:
        model_sd, optim_sd = get_states(model, optimizers, for_save=True)
        tensors, leaves = flatten(model_sd, optim_sd)
        payload["boxes"], data = local_boxes(tensors)
        rng_bytes = json.dumps(rng.capture(), allow_nan=False, separators=(",", ":")).encode("utf-8")
        if rank == 0:
            payload["skip"] = _prepare_directory(dir_url, storage_options)
            payload["json"] = {
                "model_optim": encode(json_state(leaves, optim_sd), "$.optimizer"),
                "stateful": encode(stateful_states(stateful), "$.stateful"),
                "extra": encode(dict(extra), "$.extra"),
                "strategy": strategy_of(model, world),
            }
    except Exception as e:  # every rank must learn of it, or the others would wait forever
        log.exception("rank %d cannot prepare checkpoint %s", rank, dir_url)
        payload["error"] = f"rank {rank}: {type(e).__name__}: {e}"
    gathered = comm.all_gather_object(payload, group)
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise CheckpointError(f"cannot save checkpoint {dir_url}: " + "; ".join(errors))
    prep = PreparedSave(dir_url, step, rank, world, small_files={rng_file(rank, world): rng_bytes})
    if gathered[0]["skip"]:
        prep.skip = True
        return prep
    owner, prep.meta = assign([g["boxes"] for g in gathered])
    prep.items = [(b, data[b.key]) for b in payload["boxes"] if owner[b.id] == rank]
    head = gathered[0]["json"]
    prep.manifest_fields = {"step": step, "strategy": head["strategy"], "metrics": _clean_metrics(metrics),
                            "reason": reason, "versions": versions()}
    if rank == 0:
        body = {"format": "dtrain-state", "step": step, "world_size": world, "strategy": head["strategy"],
                "versions": versions(), **head}
        prep.small_files[STATE] = json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return prep


def _prepare_directory(dir_url: str, storage_options: storage.StorageOptions) -> bool:
    """Rank 0, before anyone writes: True if this step is already committed (then skip the save);
    else remove leftovers of an earlier attempt at the same step and create the directory."""
    if storage.exists(storage.join(dir_url, MANIFEST), storage_options):
        log.info("checkpoint %s is already committed; not saving it again", dir_url)
        return True
    if storage.list_dir(dir_url, storage_options):
        log.warning("removing the incomplete checkpoint %s left by an earlier attempt", dir_url)
        storage.remove(dir_url, storage_options)
    storage.makedirs(dir_url, storage_options)
    return False


def stage(prep: PreparedSave, cache: dict[tuple[Any, ...], torch.Tensor] | None = None) -> PreparedSave:
    """Host copies of this rank's share (pinned for device tensors) so training can go on.

    With a `cache` (the manager's; safe because at most one save is in flight) the buffers of the
    previous save are reused: fresh memory costs page faults (pinned memory: a slow allocation),
    which here doubled the time of the copy itself. Buffers this save cannot reuse are freed
    before any new one is allocated, so host memory never holds more than one staged copy."""
    pin = torch.cuda.is_available()
    staged = []
    fresh: dict[tuple[Any, ...], torch.Tensor] = {}
    slots = [(box.id, t.dtype, tuple(t.shape), pin and t.is_cuda) for box, t in prep.items]
    if cache is not None:  # free what this save cannot reuse before allocating: never two copies
        for stale in set(cache) - set(slots):
            del cache[stale]
    for (box, t), slot in zip(prep.items, slots, strict=True):
        host = cache.get(slot) if cache is not None else None
        if host is None:
            host = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu", pin_memory=pin and t.is_cuda)
        host.copy_(t.detach(), non_blocking=pin and t.is_cuda)
        fresh[slot] = host
        staged.append((box, host))
    if pin and any(t.is_cuda for _, t in prep.items):
        torch.cuda.synchronize()
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return replace(prep, items=staged)


def execute(prep: PreparedSave, group: comm.ProcessGroup, storage_options: storage.StorageOptions
            ) -> Manifest | None:
    """Collective: write this rank's files, then commit. Manifest on rank 0, None elsewhere."""
    if prep.rank != 0:
        storage.makedirs(prep.dir_url, storage_options)
    if prep.error is not None:
        report = RankReport(prep.rank, error=prep.error)
    else:
        report = write_rank(prep.dir_url, prep.rank, prep.world, prep.items, prep.small_files, storage_options)
    return commit(prep.dir_url, report, prep.meta, group, storage_options, **prep.manifest_fields)
