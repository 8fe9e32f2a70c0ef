"""CheckpointManager: save (sync or async), find, load and prune checkpoints under one root URL.

Every method that moves tensors is a collective over the checkpoint process group (a gloo group of
its own, so a background save never interleaves with training collectives). With async_save the
save call returns after staging a host copy; the write runs on one background thread, at most one
save is in flight, and its error is raised by the next save(), wait() or close(): a failed
background save loses that checkpoint only (the previous committed one stays the newest).

A writer holds a lease on its root (lease.py) from its first save (or `acquire_lease()`) until
close(), so a second job pointed at the same root fails with a message naming the holder.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from dtrain.checkpoint import comm, retention, storage
from dtrain.checkpoint.faultpoints import fault_point
from dtrain.checkpoint.format import MANIFEST, CheckpointDamagedError
from dtrain.checkpoint.gcpause import gc_paused
from dtrain.checkpoint.lease import DEFAULT_TTL_S, Lease
from dtrain.checkpoint.restore import load_checkpoint
from dtrain.checkpoint.retention import NO_MANIFEST, CheckpointInfo, best_of, scan, step_dir
from dtrain.checkpoint.snapshot import PreparedSave, execute, prepare, stage
from dtrain.checkpoint.state import Optimizers, Stateful, as_tuple
from dtrain.checkpoint.tools import refuse_non_finite
from dtrain.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


class CheckpointManager:
    """Sharded safetensors checkpoints under `root` (a path or any fsspec URL)."""

    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None, async_save: bool = False,
                 keep_last_n: int | None = None, keep_best_k: int | None = None,
                 keep_every_n_steps: int | None = None, monitor: str | None = None, mode: str = "min",
                 process_group: Any = None, overlap_staging: bool = False, job_id: str | None = None,
                 lease: bool = True, lease_ttl_s: float = DEFAULT_TTL_S, check_finite: bool = False) -> None:
        """`job_id` names this job for the root's lease (default: DTRAIN_JOB_ID, torchrun's run id,
        SLURM_JOB_ID); lease=False skips it. check_finite: loads refuse NaN/inf in float tensors
        (restore_latest then falls back to the previous checkpoint); it reads the checkpoint twice."""
        if mode not in ("min", "max"):
            raise ConfigError(f"checkpoint mode={mode!r} must be 'min' or 'max'")
        for name, v in (("keep_last_n", keep_last_n), ("keep_best_k", keep_best_k),
                        ("keep_every_n_steps", keep_every_n_steps)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"checkpoint {name}={v!r} must be a positive integer or null")
        if keep_best_k is not None and not monitor:
            raise ConfigError("checkpoint keep_best_k needs a monitor metric (e.g. monitor='val/loss')")
        self.root = root.rstrip("/") if "://" in root else root
        self.storage_options = dict(storage_options or {})
        self.async_save = async_save
        self.keep_last_n, self.keep_best_k, self.keep_every_n_steps = keep_last_n, keep_best_k, keep_every_n_steps
        self.monitor, self.mode = monitor, mode
        # None: dtrain's own gloo checkpoint group (None itself when there is a single process)
        self.group = comm.default_group() if process_group is None else process_group
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dtrain-ckpt") if async_save else None
        self._pending: Future[None] | None = None
        self._staging: dict[tuple[Any, ...], torch.Tensor] = {}  # async host buffers, reused
        # overlap_staging: parameters and optimizer state are copied to the host in the background
        # while the next forward/backward run; an optimizer step pre-hook holds the optimizer until
        # the copy is done. Only for loops where nothing but optimizer.step() changes them (ours).
        self.overlap_staging = overlap_staging
        self._staging_now: dict[tuple[Any, ...], torch.Tensor] = {}  # buffers staged in the foreground
        self._hooks: list[Any] = []
        self._lock = threading.Lock()
        self.check_finite = check_finite
        self.lease = Lease(self.root, self.storage_options, job_id, lease_ttl_s) if lease else None
        if self.lease is not None:  # a manager dropped without close() still gives the lease back
            weakref.finalize(self, self.lease.release)

    # ---- saving ---------------------------------------------------------------------------------
    @gc_paused()
    def save(self, step: int, *, model: nn.Module, optimizer: Optimizers = None,
             stateful: dict[str, Stateful] | None = None, extra: dict[str, Any] | None = None,
             metrics: dict[str, float] | None = None, reason: str = "periodic") -> None:
        """Collective: checkpoint everything at `step` into `<root>/step-{step:09d}/`."""
        self.wait()
        self.acquire_lease()
        fault_point("save_begin")
        prep = prepare(step_dir(self.root, step), step, model=model, optimizers=as_tuple(optimizer),
                       stateful=stateful or {}, extra=extra or {}, metrics=metrics, reason=reason,
                       group=self.group, storage_options=self.storage_options)
        if prep.skip:
            return
        fault_point("prepared")
        if self._pool is None:
            self._finish(prep)
            return
        optimizers = as_tuple(optimizer)
        if self.overlap_staging and optimizers:
            job = self._overlapped(prep, model, optimizers)
        else:
            staged = self._stage(prep, self._staging)
            fault_point("staged")
            job = lambda: self._finish(staged)  # noqa: E731
        with self._lock:
            self._pending = self._pool.submit(job)
            self._pending.add_done_callback(_log_failure)

    def _stage(self, prep: PreparedSave, cache: dict[tuple[Any, ...], torch.Tensor]) -> PreparedSave:
        try:
            return stage(prep, cache)
        except Exception as e:  # e.g. out of host memory: the other ranks must still be told
            log.exception("rank %d could not stage checkpoint %s", prep.rank, prep.dir_url)
            cache.clear()
            return replace(prep, items=[], small_files={}, error=f"rank {prep.rank}: staging: {type(e).__name__}: {e}")

    def _overlapped(self, prep: PreparedSave, model: nn.Module,
                    optimizers: tuple[torch.optim.Optimizer, ...]) -> Callable[[], None]:
        """Stage buffers now (forward may change them), the rest in the background; the next
        optimizer.step() waits until the background copy is done."""
        buffers = {b.data_ptr() for b in model.buffers()}
        now = [i for i, (_, t) in enumerate(prep.items) if t.data_ptr() in buffers]
        later = [i for i, (_, t) in enumerate(prep.items) if t.data_ptr() not in buffers]
        staged_now = self._stage(replace(prep, items=[prep.items[i] for i in now]), self._staging_now)
        copied = threading.Event()

        def hold(*_: Any) -> None:  # returning anything but None would replace step()'s arguments
            copied.wait()

        self._hooks = [opt.register_step_pre_hook(hold) for opt in optimizers]

        def job() -> None:
            try:
                rest = self._stage(replace(prep, items=[prep.items[i] for i in later]), self._staging)
            finally:
                copied.set()
            error = staged_now.error or rest.error
            items = dict(zip(now, staged_now.items, strict=True)) | dict(zip(later, rest.items, strict=True))
            self._finish(replace(prep, items=[items[i] for i in sorted(items)], error=error,
                                 small_files={} if error else prep.small_files))

        return job

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @gc_paused()  # runs on the background thread too
    def _finish(self, prep: PreparedSave) -> None:
        manifest = execute(prep, self.group, self.storage_options)
        fault_point("committed")
        if manifest is not None:  # rank 0, after the commit
            log.info("checkpoint %s committed (%d files, %.1f MiB, reason %s)", prep.dir_url,
                     len(manifest.files), manifest.total_bytes / 2**20, manifest.reason)
            self._apply_retention()
        fault_point("saved")

    def _apply_retention(self) -> None:
        try:
            infos = scan(self.root, self.storage_options)
            doomed = retention.to_delete(infos, keep_last_n=self.keep_last_n, keep_best_k=self.keep_best_k,
                                         keep_every_n_steps=self.keep_every_n_steps, monitor=self.monitor,
                                         mode=self.mode)
            retention.apply(infos, doomed, self.storage_options)
        except Exception as e:  # pruning must never fail a committed save
            log.warning("checkpoint retention under %s failed: %s", self.root, e)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
                self._remove_hooks()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"background checkpoint save failed: {type(e).__name__}: {e}") from e

    def acquire_lease(self) -> None:
        """Collective: rank 0 takes (or renews) the lease on the root and keeps it alive; every rank
        raises the same CheckpointError, naming the holder, if another job holds it. Every save
        calls it; call it at start-up to refuse before any work is done."""
        if self.lease is None:
            return
        error = None
        if comm.rank(self.group) == 0:
            try:
                self.lease.acquire()
                self.lease.start_heartbeat()
            except Exception as e:
                error = str(e) if isinstance(e, CheckpointError) else (
                    f"checkpoint root {self.root} cannot be used: {type(e).__name__}: {e}")
        error = comm.broadcast_object(error, self.group)
        if error:
            raise CheckpointError(error)

    def close(self) -> None:
        """Wait for the save in flight, stop the background thread, give the lease back."""
        try:
            self.wait()
        finally:
            if self.lease is not None:
                self.lease.release()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._staging.clear()
            self._staging_now.clear()
            self._remove_hooks()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- finding --------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory, oldest first; incomplete ones have committed=False."""
        return scan(self.root, self.storage_options)

    def latest_committed(self) -> CheckpointInfo | None:
        committed = [i for i in self.list() if i.committed]
        return committed[-1] if committed else None

    def best(self) -> CheckpointInfo | None:
        return best_of(self.list(), self.monitor, self.mode)

    # ---- loading --------------------------------------------------------------------------------
    def load(self, ckpt: CheckpointInfo | str, *, model: nn.Module, optimizer: Optimizers = None,
             stateful: dict[str, Stateful] | None = None, strict: bool = True) -> dict[str, Any]:
        """Collective: load a checkpoint into the given components; returns its `extra` dict."""
        self.wait()  # never let a load's collectives interleave with a background save's
        url = self._resolve(ckpt)
        fault_point("load_begin")
        if self.check_finite:
            refuse_non_finite(url, self.storage_options)
        _, extra = load_checkpoint(url, model=model, optimizers=as_tuple(optimizer), stateful=stateful,
                                   strict=strict, group=self.group, storage_options=self.storage_options)
        fault_point("loaded")
        return extra

    def restore_latest(self, *, model: nn.Module, optimizer: Optimizers = None,
                       stateful: dict[str, Stateful] | None = None) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """Load the newest committed checkpoint; if it is damaged, warn why and try the one before.
        None if there is no committed checkpoint at all."""
        self.wait()
        infos = self.list()
        committed = [i for i in infos if i.committed]
        newest = committed[-1].step if committed else -1
        for i in infos:
            if not i.committed and i.step > newest:
                level = logging.INFO if i.problem == NO_MANIFEST else logging.WARNING
                log.log(level, "ignoring %s, newer than the newest committed checkpoint: %s", i.url, i.problem)
        damaged: list[str] = []
        for info in reversed(committed):
            try:
                extra = self.load(info, model=model, optimizer=optimizer, stateful=stateful)
            except CheckpointDamagedError as e:
                log.warning("checkpoint %s is damaged, falling back to the previous committed one: %s",
                            info.url, e)
                damaged.append(info.url)
                continue
            return info, extra
        if damaged:
            raise CheckpointError(f"every committed checkpoint under {self.root} is damaged: {damaged}; "
                                  f"run `dtrain ckpt verify` on them, or remove them to start fresh")
        return None

    def _resolve(self, ckpt: CheckpointInfo | str) -> str:
        if isinstance(ckpt, CheckpointInfo):
            return ckpt.url
        if storage.exists(storage.join(ckpt, MANIFEST), self.storage_options):
            return ckpt
        inside = storage.join(self.root, ckpt)
        if "://" not in ckpt and not ckpt.startswith("/") and storage.exists(
                storage.join(inside, MANIFEST), self.storage_options):
            return inside
        raise CheckpointError(f"{ckpt} is not a committed checkpoint (no manifest.json there or under "
                              f"{self.root}); see `dtrain ckpt ls {self.root}`")


def _log_failure(future: Future[None]) -> None:
    """Say so at once when a background save fails; the error itself is raised by the next
    save(), wait() or close() on the training thread."""
    if not future.cancelled() and future.exception() is not None:
        log.error("background checkpoint save failed (raised by the next save/wait/close): %s",
                  future.exception())


def load_model(url: str, model: nn.Module, *, storage_options: dict[str, Any] | None = None) -> None:
    """Load only model weights, in a plain process: `url` is a checkpoint directory or a root
    (then its newest committed checkpoint is used). Optimizer and RNG state are ignored."""
    target = url
    if not storage.exists(storage.join(url, MANIFEST), storage_options):
        committed = [i for i in scan(url, storage_options) if i.committed]
        if not committed:
            raise CheckpointError(f"{url} is neither a committed checkpoint nor a root holding one")
        target = committed[-1].url
    with torch.no_grad():
        load_checkpoint(target, model=model, group=None, storage_options=storage_options, restore_rng=False)
