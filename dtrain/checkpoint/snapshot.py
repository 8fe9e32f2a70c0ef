"""One save, in phases: `capture` (at the call: the state that changes outside optimizer.step()),
`prepare` (collective: who writes what, plus the JSON state), `stage` (host copies, for async saves
only) and `execute` (write files, gather reports, manifest last). Every phase after `capture` may
run on a background thread: their collectives use the checkpoint group.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dtrain.checkpoint import comm, retention, rng, storage
from dtrain.checkpoint.format import NEWER_SCHEMA, STATE, Manifest, rng_file
from dtrain.checkpoint.jsoncodec import encode
from dtrain.checkpoint.localfs import out_of_space
from dtrain.checkpoint.plan import Box, assign, digest, first_with_same_memory, local_boxes, tied_boxes
from dtrain.checkpoint.state import (
    Stateful,
    flatten,
    get_states,
    json_state,
    stateful_states,
    strategy_of,
    versions,
)
from dtrain.checkpoint.writer import RankReport, commit, no_space_hint, write_rank
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


@dataclass
class Captured:
    """What a save reads at the call itself: the state that changes outside optimizer.step() (RNG
    streams, sampler, scheduler, early stopping, `extra`), so the rest of `prepare` may run later,
    behind the next forward/backward. A failure is kept, to be reported through `prepare`'s
    collective (raising on one rank would leave the others waiting in it)."""

    rng: bytes = b""
    head: dict[str, Any] | None = None  # rank 0: the encoded components and extra
    error: str | None = None
    stateful_crcs: dict[str, int] | None = None  # each component's state, hashed: see _warn_per_rank_state


_UNKNOWN = -1  # a stateful hash word that compares with nothing (this rank could not encode its state)
_WARNED: set[str] = set()  # components already said to differ between ranks (said once per process)


def capture(rank: int, *, stateful: dict[str, Stateful], extra: dict[str, Any], error: str | None = None
            ) -> Captured:
    """This rank's RNG streams; on rank 0 also the components and `extra`, JSON-encoded (the other
    ranks' copies of them are the same). `error`: why this rank already knows the save must fail."""
    if error is not None:
        return Captured(error=error)
    try:
        rng_bytes = json.dumps(rng.capture(), allow_nan=False, separators=(",", ":")).encode("utf-8")
        head = None if rank else {"stateful": encode(stateful_states(stateful), "$.stateful"),
                                  "extra": encode(dict(extra), "$.extra")}
    except Exception as e:
        log.exception("rank %d cannot capture its checkpoint state", rank)
        return Captured(error=f"rank {rank}: {type(e).__name__}: {e}")
    try:  # only rank 0's components are saved; the others' are hashed, to tell when they differ
        states = head["stateful"] if head is not None else encode(stateful_states(stateful), "$.stateful")
        crcs = {k: zlib.crc32(json.dumps(v, sort_keys=True, separators=(",", ":")).encode("utf-8"))
                for k, v in states.items()}
    except Exception:  # (not rank 0) never saved, so never an error: nothing to compare
        crcs = None
    return Captured(rng_bytes, head, stateful_crcs=crcs)


def prepare(dir_url: str, step: int, captured: Captured, *, model: nn.Module,
            optimizers: tuple[torch.optim.Optimizer, ...], metrics: dict[str, float | None] | None,
            reason: str, group: comm.ProcessGroup, storage_options: storage.StorageOptions) -> PreparedSave:
    """Collective: decide this rank's share and build the JSON state. Raises on every rank if any
    rank cannot save; returns `skip=True` everywhere if this step is already committed."""
    rank, world = comm.rank(group), comm.world(group)
    error, skip, head = captured.error, False, None
    boxes: list[Box] = []
    data: dict[str, torch.Tensor] = {}
    tied: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    try:
        if error is None:
            model_sd, optim_sd = get_states(model, optimizers, for_save=True)
            tensors, leaves = flatten(model_sd, optim_sd)
            boxes, data = local_boxes(tensors)
            tied = tied_boxes(boxes, data)
            if rank == 0:
                skip = _prepare_directory(dir_url, step, storage_options)
                head = {"model_optim": encode(json_state(leaves, optim_sd), "$.optimizer"),
                        **(captured.head or {}), "strategy": strategy_of(model, world)}
    except Exception as e:  # every rank must learn of it, or the others would wait forever
        log.exception("rank %d cannot prepare checkpoint %s", rank, dir_url)
        error = f"rank {rank}: {type(e).__name__}: {e}"
        if out_of_space(e) and storage.is_local(dir_url):  # e.g. no inode left for the step directory
            error += no_space_hint(dir_url)
    # one small all-reduce: [failed, skip, hash of the box list, hash of the components] per rank;
    # the messages, box lists and component hashes travel only when ranks differ (a failure; sharded
    # state; components that differ)
    crcs = captured.stateful_crcs
    stateful_word = _UNKNOWN if crcs is None else zlib.crc32(json.dumps(sorted(crcs.items())).encode("utf-8"))
    with comm.every_rank_calls(f"save(step={step})", group):  # the save's first collective
        table = comm.agree_words([error is not None, skip, digest(boxes, tied), stateful_word], group)
    if any(failed for failed, *_ in table):
        errors = [e for e in comm.all_gather_object(error, group) if e]
        raise CheckpointError(f"cannot save checkpoint {dir_url}: " + "; ".join(errors))
    prep = PreparedSave(dir_url, step, rank, world, small_files={rng_file(rank, world): captured.rng})
    if table[0][1]:
        prep.skip = True
        return prep
    words = [w[3] for w in table]
    if words[0] != _UNKNOWN and any(w not in (words[0], _UNKNOWN) for w in words):
        _warn_per_rank_state(comm.all_gather_object(crcs, group), rank, step)
    same = all(h == table[0][2] for _, _, h, _ in table)
    # ties are known to hold on every rank only when every rank hashed the same boxes and ties
    owner, prep.meta = assign([boxes] * world, tied) if same else assign(comm.all_gather_object(boxes, group))
    prep.items = [(b, data[b.key]) for b in boxes if owner[b.id] == rank]
    prep.manifest_fields = {"step": step, "strategy": head["strategy"] if head else None,
                            "metrics": dict(metrics or {}), "reason": reason, "versions": versions()}
    if head is not None:  # rank 0
        body = {"format": "dtrain-state", "step": step, "world_size": world, "strategy": head["strategy"],
                "versions": versions(), **head}
        prep.small_files[STATE] = json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return prep


def _warn_per_rank_state(crcs: list[dict[str, int] | None], rank: int, step: int) -> None:
    """Rank 0: name each `stateful` component whose state differs between ranks, once per process. A
    checkpoint keeps rank 0's and loads it into every rank (documented), so the others' is lost."""
    mine = crcs[0] or {}
    for key in sorted(set().union(*(c or {} for c in crcs))):
        others = [r for r, c in enumerate(crcs) if c is not None and c.get(key) != mine.get(key)]
        if rank == 0 and others and key not in _WARNED:
            _WARNED.add(key)
            log.warning("checkpoint step %d: stateful[%r] differs between ranks (rank(s) %s hold other state than "
                        "rank 0): a checkpoint keeps rank 0's and loads it into every rank, so theirs is lost on "
                        "resume; keep per-rank state in your own files (each rank's RNG streams are saved "
                        "already). Said once per component", step, key, others)


def _prepare_directory(dir_url: str, step: int, storage_options: storage.StorageOptions) -> bool:
    """Rank 0, before anyone writes: True if this step is already committed (then skip the save);
    else remove leftovers of an earlier attempt at the same step and create the directory. A
    manifest that is there but unusable (damaged, another step's) does not make the step committed:
    resume skipped it, and skipping the save too left the step with no sound checkpoint."""
    info, _ = retention.read_info(dir_url, step, storage_options)
    if info.committed:
        log.info("checkpoint %s is already committed; not saving it again", dir_url)
        return True
    if info.problem is not None and NEWER_SCHEMA in info.problem:  # never destroy what a newer dtrain wrote
        raise CheckpointError(f"{dir_url} holds a checkpoint of a newer dtrain ({info.problem}); this one will not "
                              f"save over it: upgrade dtrain, or use another checkpoint root")
    if info.problem != retention.NO_MANIFEST:
        log.warning("replacing the checkpoint %s, whose manifest is unusable: %s", dir_url, info.problem)
        storage.remove(dir_url, storage_options)
    elif storage.list_dir(dir_url, storage_options):
        log.warning("removing the incomplete checkpoint %s left by an earlier attempt", dir_url)
        storage.remove(dir_url, storage_options)
    storage.makedirs(dir_url, storage_options)
    return False


def stage(prep: PreparedSave, cache: dict[Hashable, torch.Tensor] | None = None) -> PreparedSave:
    """Host copies of this rank's share (pinned for device tensors) so training can go on. Items
    that are the same memory (tied weights) share one copy, which the writer then writes once."""
    firsts = first_with_same_memory([t for _, t in prep.items])
    unique = [i for i, j in enumerate(firsts) if i == j]
    copies = dict(zip(unique, stage_copies([(prep.items[i][0].id, prep.items[i][1]) for i in unique], cache),
                      strict=True))
    return replace(prep, items=[(box, copies[j]) for (box, _), j in zip(prep.items, firsts, strict=True)])


def stage_copies(tensors: list[tuple[Hashable, torch.Tensor]], cache: dict[Hashable, torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """Host copies of `(key, tensor)` pairs, in order; device tensors go to pinned memory.

    With a `cache` (the manager's; safe because at most one save is in flight) the buffers of the
    previous save are reused by key, dtype and shape: fresh memory costs page faults (pinned
    memory: a slow allocation), which here doubled the time of the copy itself. Buffers this save
    cannot reuse are freed before any new one is allocated, so host memory never holds more than
    one staged copy."""
    pin = torch.cuda.is_available()
    slots = [(key, t.dtype, tuple(t.shape), pin and t.is_cuda) for key, t in tensors]
    if cache is not None:  # free what this save cannot reuse before allocating: never two copies
        for stale in set(cache) - set(slots):
            del cache[stale]
    out: list[torch.Tensor] = []
    fresh: dict[Hashable, torch.Tensor] = {}
    for (_, t), slot in zip(tensors, slots, strict=True):
        host = cache.get(slot) if cache is not None else None
        if host is None:
            host = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu", pin_memory=pin and t.is_cuda)
        host.copy_(t.detach(), non_blocking=pin and t.is_cuda)
        fresh[slot] = host
        out.append(host)
    if pin and any(t.is_cuda for _, t in tensors):
        torch.cuda.synchronize()
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return out


def execute(prep: PreparedSave, group: comm.ProcessGroup, storage_options: storage.StorageOptions
            ) -> Manifest | None:
    """Collective: write this rank's files, then commit. Manifest on rank 0, None elsewhere."""
    error = prep.error
    if error is None and prep.rank != 0:
        try:  # rank 0 made it in `prepare`; on node-local disks each host needs its own
            storage.makedirs(prep.dir_url, storage_options)
        except Exception as e:  # reported like a failed write: raised here, this rank would skip
            # the commit's gather, and rank 0 would wait in it until the timeout
            log.exception("rank %d could not create %s", prep.rank, prep.dir_url)
            error = f"rank {prep.rank}: creating {prep.dir_url}: {type(e).__name__}: {e}"
    if error is not None:
        report = RankReport(prep.rank, error=error)
    else:
        report = write_rank(prep.dir_url, prep.rank, prep.world, prep.items, prep.small_files, storage_options)
    return commit(prep.dir_url, report, prep.meta, group, storage_options, **prep.manifest_fields)
