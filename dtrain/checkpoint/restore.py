"""Load a committed checkpoint into a model, optimizers and components, on any world size.

Every rank reads what its own shards need (ranks of one host that load the same replicated state
split it between them and copy the rest from each other: peers.py), then the ranks agree (one
small all-reduce) that all of them succeeded before any state is set, so a damaged file seen by
one rank fails every rank the same way, and `restore_latest` on every rank falls back to the same
older checkpoint. Every collective is reached by every rank, failed or not (`_Outcome`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dtrain.checkpoint import comm, directio, peers, storage
from dtrain.checkpoint.fill import check_keys, checked_box, few_keys, fill_boxes
from dtrain.checkpoint.format import CheckpointDamagedError, Manifest, rng_file
from dtrain.checkpoint.gcpause import gc_paused
from dtrain.checkpoint.plan import MODEL, OPTIM, Box
from dtrain.checkpoint.reader import ChunkReader, read_json_file, read_manifest, read_state
from dtrain.checkpoint.rng import restore as restore_rng_states
from dtrain.checkpoint.state import (
    Stateful,
    apply_json_state,
    check_loadable,
    check_targets,
    clear_optimizer_state,
    flatten,
    get_states,
    load_stateful,
    optimizer_fqns,
    set_states,
)
from dtrain.errors import CheckpointError, CheckpointMismatchError

log = logging.getLogger(__name__)
_OK, _DAMAGED, _FAILED = 0, 1, 2
_REMOTE_TENSORS_IN_FLIGHT = 8
_INIT_BUCKET_BYTES = 64 << 20
_warned_rng = False
T = TypeVar("T")


@dataclass
class _Outcome:
    """This rank's status so far: the first error ends the work, not the collectives that follow
    (every rank must reach each of them, failed or not)."""

    code: int = _OK
    error: CheckpointError | None = None

    def run(self, fn: Callable[[], T], dir_url: str) -> T | None:
        if self.code != _OK:
            return None
        try:
            return fn()
        except CheckpointDamagedError as e:
            self.code, self.error = _DAMAGED, e
        except CheckpointError as e:
            self.code, self.error = _FAILED, e
        except Exception as e:
            log.exception("loading %s failed", dir_url)
            self.code, self.error = _FAILED, CheckpointError(f"{dir_url}: {type(e).__name__}: {e}")
        return None


class KeyDiff(NamedTuple):
    """What a non-strict load left out, as torch's `load_state_dict` reports it: tensor keys of
    the model (and optimizer) the checkpoint has no tensor for, and checkpoint tensors the
    model has no place for. Model keys are the model's own state_dict names; optimizer keys keep
    the checkpoint's `optim/` names."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass
class _Target:
    """What this rank loads into: the state dicts, their tensors and non-tensor leaves, and which
    keys to read."""

    manifest: Manifest
    state: dict[str, Any]
    model_sd: dict[str, Any]
    optim_sd: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]
    leaves: dict[str, Any]
    never_stepped: dict[int, tuple[str, ...]]
    keys: list[str]
    boxes: dict[str, tuple[Box, torch.Tensor]]  # key -> this rank's box and the local data that fills it
    diff: KeyDiff  # empty when strict (a difference is an error then)


@gc_paused()
def load_checkpoint(dir_url: str, *, model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...] = (),
                    stateful: dict[str, Stateful] | None = None, strict: bool = True,
                    group: comm.ProcessGroup = None, storage_options: storage.StorageOptions = None,
                    restore_rng: bool = True, manifest: Manifest | None = None, optional: tuple[str, ...] = ()
                    ) -> tuple[Manifest, dict[str, Any], KeyDiff]:
    """Collective over `group`. Returns the manifest, the saved `extra` dict and the tensor keys a
    non-strict load left out. `manifest`: the directory's manifest when the caller has just read
    and validated it (else it is read here). `optional`: components of `stateful` the checkpoint
    may lack even when `strict` (saved before they existed): they keep their state, with a warning."""
    check_targets(model, optimizers, f"loading {dir_url}")  # the same on every rank: raised before any collective
    check_loadable(model, f"loading {dir_url}")
    out = _Outcome()
    target = out.run(lambda: _target(dir_url, model, optimizers, strict, storage_options, manifest), dir_url)
    if target is not None:
        state = target.state
        out.run(lambda: _check_components(dir_url, state, stateful, strict, optional), dir_url)
        target = target if out.code == _OK else None
    # this rank's RNG file is read while the tensors are (alone it was a cold read of ~0.6 ms after them)
    saved = target.manifest if target is not None else None
    rng_file_read = _in_background(lambda: _read_rng(dir_url, saved, group, storage_options)) \
        if saved is not None and restore_rng else None
    plan = peers.plan(target.keys if target else [], target.tensors if target else {},
                      target.manifest if target else None, target is not None, group)
    split = plan.split
    read, copied = 0, 0
    if target is not None:
        mine = target.keys if split is None else split.mine()
        # not known yet (plan.on_host None): a small load, read through the cache whatever it is
        shared = split is None and plan.on_host != 1 and not _sharded(target.tensors)
        reader = ChunkReader(dir_url, target.manifest, storage_options, defer_checks=True,
                             direct=not shared and _stored_bytes(target.manifest, mine) >= directio.MIN_LOAD)
        try:
            out.run(lambda: _read(reader, target.boxes, mine, storage.is_local(dir_url)), dir_url)
            if split is not None:  # on every rank (a split needs every rank's target): a collective
                published = peers.exchange(split, target.tensors, out.code, group)
                if out.code == _OK and published.ok():
                    done = out.run(lambda: peers.copy_from_peers(split, published, target.tensors), dir_url)
                    left, copied = done if done is not None else ([], 0)
                    out.run(lambda: _read(reader, target.boxes, sorted(left), storage.is_local(dir_url)), dir_url)
            read = reader.bytes_read
        finally:
            reader.close()
    rng_states = out.run(lambda: _finish_reading(target, strict, dir_url, rng_file_read), dir_url)
    plan.settle()
    codes = comm.agree_codes(out.code, group)  # peers have copied from this rank once it returns
    if any(codes):
        cls = CheckpointError if _FAILED in codes else CheckpointDamagedError
        if cls is CheckpointError and isinstance(out.error, CheckpointDamagedError):
            # one kind on every rank: damage that another rank's failure outweighs must not make this
            # rank alone fall back to an older checkpoint (and wait there for the others)
            raise CheckpointError(str(out.error)) from out.error
        if out.error is not None:
            raise out.error
        bad = [r for r, c in enumerate(codes) if c]
        raise cls(f"{dir_url}: rank(s) {bad} could not load this checkpoint (see their log)")
    assert target is not None  # every rank got this far without an error
    set_states(model, optimizers, target.model_sd, target.optim_sd, strict)
    clear_optimizer_state([optimizers[i] for i in target.never_stepped])
    load_stateful(stateful or {}, target.state.get("stateful") or {}, dir_url)
    if rng_states is not None:
        restore_rng_states(rng_states, dir_url)
    manifest = target.manifest
    log.info("loaded %s (step %d, saved by %d rank(s) with %s; %.1f MiB read on this rank, %.1f MiB copied "
             "from ranks on its host)", dir_url, manifest.step, manifest.world_size, manifest.strategy,
             read / 2**20, copied / 2**20)
    missing, unexpected = target.diff
    if missing or unexpected:
        log.info("loaded %s with strict=False; left as they were (not in the checkpoint): %s; not loaded (not in "
                 "the target): %s", dir_url, few_keys(missing) or "none", few_keys(unexpected) or "none")
    extra = target.state.get("extra") or {}
    return manifest, extra if isinstance(extra, dict) else {}, target.diff


def _target(dir_url: str, model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...], strict: bool,
            storage_options: storage.StorageOptions, manifest: Manifest | None) -> _Target:
    """Read the manifest and the JSON state, give the optimizers their state tensors, and list the
    keys to read (checked against the checkpoint's when `strict`)."""
    if manifest is None:
        manifest = read_manifest(dir_url, storage_options)
    state = read_state(dir_url, manifest, storage_options)
    init_optimizer_state(optimizers)
    model_sd, optim_sd = get_states(model, optimizers)
    tensors, leaves = flatten(model_sd, optim_sd)
    never_stepped = _saved_before_first_step(optimizers, optim_sd, manifest, state)
    if never_stepped:  # saved before their first step: only their param_groups load
        skip = tuple(p for prefixes in never_stepped.values() for p in prefixes)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(skip)}
        leaves = {k: v for k, v in leaves.items() if not k.startswith(skip)}
    wanted = {k for k in tensors if optimizers or k.startswith(MODEL)}
    stored = {k for k in manifest.tensors if optimizers or k.startswith(MODEL)}
    if strict:
        check_keys(wanted, stored, "tensor", dir_url)
    keys = sorted(wanted & stored)
    diff = KeyDiff([_user_key(k) for k in sorted(wanted - stored)], [_user_key(k) for k in sorted(stored - wanted)])
    # checked before any read: a peer's copy into a tensor relies on its size
    boxes = {k: checked_box(dir_url, manifest, k, tensors[k]) for k in keys}
    return _Target(manifest, state, model_sd, optim_sd, tensors, leaves, never_stepped, keys, boxes, diff)


def _user_key(key: str) -> str:
    """A model tensor's key as the model's state_dict names it; optimizer keys as stored."""
    return key[len(MODEL):] if key.startswith(MODEL) else key


def _read(reader: ChunkReader, boxes: dict[str, tuple[Box, torch.Tensor]], keys: list[str], local: bool) -> None:
    """Fill `keys` and check every byte read (a peer copies from these tensors only after this)."""
    _fill_all(reader, boxes, keys, local)
    reader.finish()


def _finish_reading(target: _Target | None, strict: bool, dir_url: str,
                    rng_state: Future[dict[str, Any] | None] | None) -> dict[str, Any] | None:
    """The JSON leaves into their state dicts, and this rank's RNG states (read in the background)."""
    assert target is not None
    apply_json_state(target.state.get("model_optim") or {}, target.leaves, target.optim_sd, strict, dir_url)
    return rng_state.result() if rng_state is not None else None


def _in_background(fn: Callable[[], T]) -> Future[T]:
    """fn() on a thread of its own; its result or error from the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)
    threading.Thread(target=run, name="dtrain-load-small", daemon=True).start()
    return future


def _check_components(dir_url: str, state: dict[str, Any], stateful: dict[str, Stateful] | None, strict: bool,
                      optional: tuple[str, ...]) -> None:
    """Before any byte is read into the model: every component to load can take its state."""
    missing = [n for n in (stateful or {}) if n not in (state.get("stateful") or {}) and n not in optional]
    if strict and missing:
        raise CheckpointMismatchError(f"{dir_url}: no state for component(s) {missing} in the checkpoint "
                                      f"(it has {sorted(state.get('stateful') or {})})", f"pass strict=False "
                                      f"to skip them, or optional={tuple(missing)!r} to let them be missing")
    for name, obj in (stateful or {}).items():
        if not callable(getattr(obj, "load_state_dict", None)):
            raise CheckpointError(f"stateful[{name!r}] ({type(obj).__name__}) has no load_state_dict(); "
                                  f"nothing was loaded")


def init_optimizer_state(optimizers: tuple[torch.optim.Optimizer, ...],
                         bucket_bytes: int = _INIT_BUCKET_BYTES) -> None:
    """Give never-stepped optimizers their state tensors (which the load then fills), one bucket
    of parameters at a time: a zero-lr step in which only that bucket has (zero) gradients.

    `get_state_dict` does the same in one step over every parameter at once: a zero gradient for
    the whole model plus the step's temporaries over all of it (measured: 450 MiB on top of a
    1 GiB model+AdamW state). Here gradients are zero-stride views (no memory) and the step runs
    the foreach path, whose temporaries are one bucket (CPU's default single-tensor AdamW holds
    two temporaries of a parameter's size). Optimizers with state, or any gradient, are left alone,
    as `get_state_dict` leaves them."""
    for optim in optimizers:
        params = [p for g in optim.param_groups for p in g["params"]]
        if optim.state or any(p.grad is not None for p in params):
            continue
        lrs = [g.get("lr") for g in optim.param_groups]
        for g in optim.param_groups:  # some optimizers move parameters even without a gradient
            if "lr" in g:
                g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
        try:
            for bucket in _buckets([p for p in params if p.requires_grad], bucket_bytes):
                _step_with_zero_grads(optim, bucket)
        except BaseException:
            optim.state.clear()  # never leave it half initialised
            raise
        finally:
            for g, lr in zip(optim.param_groups, lrs, strict=True):
                if "lr" in g:
                    g["lr"] = lr


def _step_with_zero_grads(optim: torch.optim.Optimizer, bucket: list[torch.Tensor]) -> None:
    """One step in which only `bucket` has zero gradients. First the lean way (zero-stride views,
    foreach); an optimizer that writes into its gradients or has no foreach path refuses, and
    then gets what `get_state_dict` would give it: real zeros and its own settings."""
    foreach = [g.get("foreach") for g in optim.param_groups]
    try:
        for g in optim.param_groups:
            if "foreach" in g and not g.get("fused") and not g.get("differentiable"):
                g["foreach"] = True
        for p in bucket:
            p.grad = torch.zeros_like(p) if isinstance(p, DTensor) else \
                torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)
        try:
            optim.step()
        except RuntimeError as e:
            log.debug("lean optimizer-state initialisation refused (%s); using real zero gradients", e)
            for g, f in zip(optim.param_groups, foreach, strict=True):
                if "foreach" in g:
                    g["foreach"] = f
            for p in bucket:
                p.grad = torch.zeros_like(p)
            optim.step()
    finally:
        for g, f in zip(optim.param_groups, foreach, strict=True):
            if "foreach" in g:
                g["foreach"] = f
        for p in bucket:
            p.grad = None


def _buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of at most `bucket_bytes` of (local) parameter data; a bigger parameter
    is a bucket of its own."""
    out: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        n = (p.to_local() if isinstance(p, DTensor) else p).nbytes
        if out[-1] and size + n > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return [b for b in out if b]


def _saved_before_first_step(optimizers: tuple[torch.optim.Optimizer, ...], optim_sd: dict[str, Any] | None,
                             manifest: Manifest, state: dict[str, Any]) -> dict[int, tuple[str, ...]]:
    """The optimizers that had not stepped when the checkpoint was saved (the checkpoint has
    param_groups but no state, tensor or scalar, for any of their parameters), by index, each with
    the key prefixes of its state."""
    saved = state.get("model_optim") or {}
    if not optimizers or optim_sd is None or saved.get("param_groups") is None:
        return {}
    stored = [k for k in manifest.tensors if k.startswith(OPTIM)]
    stored += [k for k in saved.get("leaves") or {} if k.startswith(OPTIM)]
    out = {}
    for i, fqns in enumerate(optimizer_fqns(optimizers, optim_sd)):
        prefixes = tuple(f"{OPTIM}{f}/" for f in fqns)
        if prefixes and not any(k.startswith(prefixes) for k in stored):
            out[i] = prefixes
    return out


def _fill_all(reader: ChunkReader, boxes: dict[str, tuple[Box, torch.Tensor]], keys: list[str], local: bool) -> None:
    """A local disk is read in one call: each file front to back, big cached files two at a time
    (see ChunkReader); an object store gets several tensors in flight, in file order, since each
    GET costs a round trip."""
    if local:
        fill_boxes(reader, [(k, *boxes[k]) for k in keys])
        return
    chunks = reader.manifest.tensors
    keys = sorted(keys, key=lambda k: chunks[k].first_byte)
    with ThreadPoolExecutor(_REMOTE_TENSORS_IN_FLIGHT, thread_name_prefix="dtrain-fetch") as pool:
        for _ in pool.map(lambda k: fill_boxes(reader, [(k, *boxes[k])]), keys):
            pass


def _stored_bytes(manifest: Manifest, keys: list[str]) -> int:
    """The bytes stored for `keys` (a sharded rank reads only part of them)."""
    return sum(manifest.tensors[k].stored_bytes for k in keys)


def _sharded(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether this rank loads shards (FSDP) rather than the whole replicated state (DDP), which
    the other ranks of its host read too."""
    return any(isinstance(t, DTensor) for t in tensors.values())


def _read_rng(dir_url: str, manifest: Manifest, group: comm.ProcessGroup,
              storage_options: storage.StorageOptions) -> dict[str, Any] | None:
    """This rank's saved RNG states when the world size matches; else warn (once) and None."""
    global _warned_rng
    world, rank = comm.world(group), comm.rank(group)
    name = rng_file(rank, world)
    if manifest.world_size == world and any(f.path == name for f in manifest.files):
        return read_json_file(dir_url, manifest, name, storage_options)
    if not _warned_rng:
        _warned_rng = True
        log.warning("%s was saved by %d rank(s), this job has %d: RNG states are not restored, so random "
                    "streams differ from an uninterrupted run", dir_url, manifest.world_size, world)
    return None
