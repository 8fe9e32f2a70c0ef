"""The async half of CheckpointManager: one background thread, at most one save in flight, host
staging buffers reused from save to save, and overlapped staging.

Overlapped staging is for loops where nothing but optimizer.step() changes parameters and optimizer
state (ours). save() takes what changes elsewhere (RNG, components, `extra`: `snapshot.capture`;
model buffers, which forward updates: copied here) and returns. Walking the state dicts, the
planning collective and the copy to host memory then run on the background thread behind the next
forward/backward; an optimizer step pre-hook holds the next optimizer.step() until the copy is done.
With many small tensors the walk is most of a save's stall (4096 tensors: ~40 of ~60 ms). A model
whose forward swaps its parameters (FSDP2 unshards them) is walked at the call instead.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dtrain.checkpoint.faultpoints import fault_point
from dtrain.checkpoint.gcpause import gc_paused
from dtrain.checkpoint.snapshot import PreparedSave, stage, stage_copies
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)
_LIVE: weakref.WeakSet[BackgroundSaves] = weakref.WeakSet()
_exit_hook = False


def walk_at_call(model: nn.Module) -> bool:
    """True when the state dict must be taken inside save(): FSDP2 modules swap sharded and
    unsharded parameters during forward, so a walk behind it could see either."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identifies a model buffer (its local shard, for a DTensor) among the state dict's tensors,
    which are new views of the same memory."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.device


class BackgroundSaves:
    """Runs `finish(prepared)` of one save at a time on a background thread."""

    def __init__(self, finish: Callable[[PreparedSave], None]) -> None:
        self._finish = finish
        self._pool: ThreadPoolExecutor | None = None  # started by the first save (again after close)
        self._pending: Future[None] | None = None
        self.staging: dict[Hashable, torch.Tensor] = {}  # host buffers of the last save, reused
        self._staging_now: dict[Hashable, torch.Tensor] = {}  # model buffers, copied at the call
        self._hooks: list[Any] = []
        self._lock = threading.Lock()
        _LIVE.add(self)

    def submit(self, prep: PreparedSave) -> None:
        """Copy the tensors to host memory now, write them in the background."""
        staged = self._stage(prep, self.staging)
        fault_point("staged")
        self._submit(lambda: self._finish(staged))

    def submit_overlapped(self, prepare: Callable[[], PreparedSave], model: nn.Module,
                          optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        """Copy the model's buffers now; run `prepare` (a collective) and copy the rest in the
        background, holding every optimizer's next step() until that copy is done."""
        error = None
        local = (b.to_local() if isinstance(b, DTensor) else b for b in model.buffers())
        buffers = {_key(b): b for b in local if b.numel()}
        try:
            now = dict(zip(buffers, stage_copies(list(buffers.items()), self._staging_now), strict=True))
        except Exception as e:  # reported through the commit: the other ranks are in the collectives
            log.exception("could not stage the model buffers")
            self._staging_now.clear()
            now, error = {}, f"staging: {type(e).__name__}: {e}"
        copied = threading.Event()

        def hold(*_: Any) -> None:  # returning anything but None would replace step()'s arguments
            copied.wait()

        self._hooks = [opt.register_step_pre_hook(hold) for opt in optimizers]

        @gc_paused()
        def job() -> None:
            try:
                prep = prepare()
                if prep.skip:
                    return
                fault_point("prepared")
                if error is not None:
                    prep = _failed(prep, error)
                else:
                    prep = self._stage_rest(prep, now)
                fault_point("staged")
            finally:
                copied.set()
            self._finish(prep)

        self._submit(job)

    def _stage_rest(self, prep: PreparedSave, now: dict[tuple[Any, ...], torch.Tensor]) -> PreparedSave:
        """`prep` with host copies: the buffers' from the call, the others' made now."""
        keys = [_key(t) for _, t in prep.items]
        staged = self._stage(replace(prep, items=[it for it, k in zip(prep.items, keys, strict=True) if k not in now]),
                             self.staging)
        if staged.error is not None:
            return staged
        rest = iter(staged.items)
        return replace(prep, items=[(b, now[k]) if k in now else next(rest)
                                    for (b, _), k in zip(prep.items, keys, strict=True)])

    def _stage(self, prep: PreparedSave, cache: dict[Hashable, torch.Tensor]) -> PreparedSave:
        try:
            return stage(prep, cache)
        except Exception as e:  # e.g. out of host memory: the other ranks must still be told
            log.exception("rank %d could not stage checkpoint %s", prep.rank, prep.dir_url)
            cache.clear()
            return _failed(prep, f"staging: {type(e).__name__}: {e}")

    def _submit(self, job: Callable[[], None]) -> None:
        _finish_at_exit()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dtrain-ckpt")
        with self._lock:
            self._pending = self._pool.submit(job)
            self._pending.add_done_callback(_log_failure)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"background checkpoint save failed: {type(e).__name__}: {e}") from e
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def close(self) -> None:
        """Wait for the save in flight, then stop the thread and free the host buffers."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self.staging.clear()
            self._staging_now.clear()
            self._remove_hooks()


def finish_all() -> CheckpointError | None:
    """Wait for every save still in flight (a loop that never called wait() or close()); the first
    error, after logging each. `dist.shutdown` calls it before it destroys the process group under
    the save, and the interpreter's exit too: the last checkpoint of such a loop was lost."""
    first = None
    for saves in list(_LIVE):
        try:
            saves.wait()
        except CheckpointError as e:
            log.error("a checkpoint save still in flight when the process group or the process ended failed: %s", e)
            first = first or e
    return first


def _finish_at_exit() -> None:
    """Once per process: finish the saves in flight when the main thread ends, before the thread
    pools stop taking work (threading runs these hooks last registered first, so this one runs
    before concurrent.futures' own; a plain atexit hook runs after it, too late)."""
    global _exit_hook
    if not _exit_hook:
        threading._register_atexit(finish_all)  # type: ignore[attr-defined]
        _exit_hook = True


def _failed(prep: PreparedSave, why: str) -> PreparedSave:
    """`prep` carrying this rank's failure and nothing to write: the commit reports it to every rank."""
    return replace(prep, items=[], small_files={}, error=f"rank {prep.rank}: {why}")


def _log_failure(future: Future[None]) -> None:
    """Say so at once when a background save fails; the error itself is raised by the next
    save(), wait() or close() on the training thread."""
    if not future.cancelled() and future.exception() is not None:
        log.error("background checkpoint save failed (raised by the next save/wait/close): %s",
                  future.exception())
