"""CheckpointManager: save (sync or async), find, load and prune checkpoints under one root URL.

Every method that moves tensors is a collective over the checkpoint process group (a gloo group of
its own, so a background save never interleaves with training collectives). With async_save the
save call returns after staging a host copy (with overlap_staging, even before: background.py);
the write runs on one background thread, at most one save is in flight, and its error is raised
by the next save(), wait() or close(): a failed background save loses that checkpoint only (the
previous committed one stays the newest).

A writer holds a lease on its root (lease.py) from its first save (or `acquire_lease()`) until
close(), so a second job pointed at the same root fails with a message naming the holder.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import weakref
import zlib
from typing import Any

import torch
from torch import nn

from dtrain.checkpoint import comm, retention, storage
from dtrain.checkpoint.background import BackgroundSaves, walk_at_call
from dtrain.checkpoint.faultpoints import fault_point
from dtrain.checkpoint.format import DAMAGED, MANIFEST, CheckpointDamagedError, Manifest
from dtrain.checkpoint.gcpause import gc_paused
from dtrain.checkpoint.lease import DEFAULT_TTL_S, Lease
from dtrain.checkpoint.localfs import out_of_space, storage_full
from dtrain.checkpoint.restore import KeyDiff, load_checkpoint
from dtrain.checkpoint.retention import (
    NO_MANIFEST,
    CheckpointInfo,
    best_of,
    read_info,
    scan,
    step_dir,
    step_dirs,
)
from dtrain.checkpoint.snapshot import PreparedSave, capture, execute, prepare
from dtrain.checkpoint.state import Optimizers, Stateful, as_tuple, check_targets
from dtrain.checkpoint.tools import refuse_non_finite
from dtrain.errors import CheckpointError, ConfigError, MissingBucketError

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
        (restore_latest then falls back to the previous checkpoint); it reads the checkpoint twice.
        overlap_staging (with async_save and an optimizer): the state is walked and copied after
        save() returns, behind the next forward/backward, and the next optimizer.step() waits for
        it; only for loops in which nothing but optimizer.step() changes parameters and optimizer
        state, since a change made in place in between would land in the checkpoint."""
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
        self._said_unranked = False  # warned that a save's metrics lack the monitor
        # None: dtrain's own gloo checkpoint group (None itself when there is a single process)
        self.group = comm.default_group() if process_group is None else process_group
        self._saves = BackgroundSaves(self._finish) if async_save else None
        # overlap_staging: the state dict walk and the copy to host memory run in the background
        # while the next forward/backward run (background.py). Only for loops where nothing but
        # optimizer.step() changes parameters and optimizer state (ours).
        self.overlap_staging = overlap_staging
        self.check_finite = check_finite
        self.lease = Lease(self.root, self.storage_options, job_id, lease_ttl_s) if lease else None
        if self.lease is not None:  # a manager dropped without close() still gives the lease back
            weakref.finalize(self, self.lease.release)

    # ---- saving ---------------------------------------------------------------------------------
    @gc_paused()
    def save(self, step: int, *, model: nn.Module, optimizer: Optimizers = None,
             stateful: dict[str, Stateful] | None = None, extra: dict[str, Any] | None = None,
             metrics: dict[str, float] | None = None, reason: str = "periodic") -> None:
        """Collective: checkpoint everything at `step` into `<root>/step-{step:09d}/`. A step
        already committed under the root is not saved again (committed checkpoints never change;
        logged at INFO), so a second save of one step keeps the first. `stateful` and `extra` are
        rank 0's (every rank loads them): they must be the same on every rank."""
        step, recorded = _checked_step(step), _checked_metrics(metrics)
        if recorded and self.keep_best_k and self.monitor not in recorded and not self._said_unranked:
            self._said_unranked = True  # metrics without the monitor: a typo (or train-only metrics)
            if comm.rank(self.group) == 0:
                log.warning("checkpoint step %d: the metrics passed (%s) lack the monitor %r that keep_best_k=%d "
                            "ranks by, so this checkpoint can never count as the best; if that is a typo, pass "
                            "monitor= one of them (said once)", step, ", ".join(sorted(recorded)), self.monitor,
                            self.keep_best_k)
        optimizers = as_tuple(optimizer)
        check_targets(model, optimizers, "save")
        self.wait()
        deferred = self._saves is not None and self.overlap_staging and bool(optimizers) and not walk_at_call(model)
        if deferred:  # prepare runs in the background: a lost lease must still fail this call
            with comm.every_rank_calls(f"save(step={step})", self.group):  # the save's first collective
                self.acquire_lease()
            lease_error = None
        else:  # rank 0's lease check rides on prepare's agreement: one collective fewer
            lease_error = self._lease_error()
        fault_point("save_begin")
        captured = capture(comm.rank(self.group), stateful=stateful or {}, extra=extra or {}, error=lease_error)
        plan = functools.partial(prepare, step_dir(self.root, step), step, captured, model=model,
                                 optimizers=optimizers, metrics=recorded, reason=reason, group=self.group,
                                 storage_options=self.storage_options)
        if deferred:
            assert self._saves is not None
            self._saves.submit_overlapped(plan, model, optimizers)
            return
        prep = plan()
        if prep.skip:
            return
        if self._saves is None:
            fault_point("prepared")
            self._finish(prep)
        elif self.overlap_staging and optimizers:
            self._saves.submit_overlapped(lambda: prep, model, optimizers)
        else:
            fault_point("prepared")
            self._saves.submit(prep)

    @gc_paused()  # runs on the background thread too
    def _finish(self, prep: PreparedSave) -> None:
        manifest = execute(prep, self.group, self.storage_options)
        fault_point("committed")
        if manifest is not None:  # rank 0, after the commit
            log.info("checkpoint %s committed (%d files, %.1f MiB, reason %s)", prep.dir_url,
                     len(manifest.files), manifest.total_bytes / 2**20, manifest.reason)
            self._apply_retention()
        fault_point("saved")

    def apply_retention(self) -> None:
        """Rank 0 applies the retention rules now, as after every commit (at start-up: a restart with
        a lower keep_last_n frees the space at once, not after a save that may not fit)."""
        if comm.rank(self.group) == 0:
            self._apply_retention()

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
        if self._saves is not None:
            self._saves.wait()

    def check_root(self) -> None:
        """Collective: rank 0 makes sure the root can be written (a local one is created; on S3 its
        bucket must exist), and every rank raises the same error if not: at start-up, not at the
        first save after the training it would lose. MissingBucketError for a bucket that is not there."""
        problem = None
        if comm.rank(self.group) == 0:
            try:
                storage.makedirs(self.root, self.storage_options)
                if self.lease is not None:  # taking the lease next need not check the root again
                    self.lease.root_checked()
            except MissingBucketError as e:
                problem = (True, str(e))
            except (CheckpointError, OSError) as e:
                problem = (False, str(e) if isinstance(e, CheckpointError) else f"{self.root}: {e}")
        problem = comm.broadcast_object(problem, self.group)
        if problem is not None:
            raise (MissingBucketError if problem[0] else CheckpointError)(problem[1])

    def acquire_lease(self) -> None:
        """Collective: rank 0 takes (or renews) the lease on the root and keeps it alive; every rank
        raises the same CheckpointError, naming the holder, if another job holds it. Every save checks
        the lease too (rank 0's answer travels with the save's first agreement); call this at
        start-up to refuse before any work is done."""
        if self.lease is not None:
            error = comm.broadcast_object(self._lease_error(), self.group)
            if error:
                raise CheckpointError(error)

    def _lease_error(self) -> str | None:
        """Rank 0: take or renew the lease (and keep it alive); why it cannot, or None. Other ranks: None."""
        if self.lease is None or comm.rank(self.group) != 0:
            return None
        try:
            self.lease.acquire()
            self.lease.start_heartbeat()
        except Exception as e:
            if isinstance(e, CheckpointError):
                return str(e)
            hint = ""
            if out_of_space(e) and storage.is_local(self.root):
                hint = (f". {storage_full(storage.local_path(self.root))}: free space there, or use a "
                        f"checkpoint.root with room")
            return f"checkpoint root {self.root} cannot be used: taking the lease {self.lease.url}: " \
                   f"{type(e).__name__}: {e}{hint}"
        return None

    def close(self) -> None:
        """Wait for the save in flight, stop the background thread, give the lease back."""
        try:
            if self._saves is not None:
                self._saves.close()
        finally:
            if self.lease is not None:
                self.lease.release()

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
             stateful: dict[str, Stateful] | None = None, strict: bool = True,
             optional: tuple[str, ...] = (), restore_rng: bool = True) -> dict[str, Any]:
        """Collective: load a checkpoint into the given components; returns its `extra` dict.
        `optional`: components of `stateful` the checkpoint may lack (saved before they existed,
        as early stopping turned on for a running job): they keep their state, with a warning.
        The process-wide random streams (Python, NumPy, torch CPU and CUDA) are set to this rank's
        saved ones, as a resume needs; `restore_rng=False` leaves them (loading the best weights
        mid-run for an evaluation, say)."""
        self.wait()  # never let a load's collectives interleave with a background save's
        return self._load(self.resolve(ckpt), None, model, optimizer, stateful, strict, optional, restore_rng)

    def _load(self, url: str, manifest: Manifest | None, model: nn.Module, optimizer: Optimizers,
              stateful: dict[str, Stateful] | None, strict: bool, optional: tuple[str, ...] = (),
              restore_rng: bool = True) -> dict[str, Any]:
        fault_point("load_begin")
        if self.check_finite:
            refuse_non_finite(url, self.storage_options)
        with comm.every_rank_calls(f"load({url!r})", self.group, same="checkpoint"):  # not under `if rank == 0:`
            _, extra, _ = load_checkpoint(url, model=model, optimizers=as_tuple(optimizer), stateful=stateful,
                                          strict=strict, group=self.group, storage_options=self.storage_options,
                                          manifest=manifest, optional=optional, restore_rng=restore_rng)
        fault_point("loaded")
        return extra

    def restore_latest(self, *, model: nn.Module, optimizer: Optimizers = None,
                       stateful: dict[str, Stateful] | None = None, optional: tuple[str, ...] = (),
                       strict: bool = True, set_aside_damaged: bool = False
                       ) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """Load the newest committed checkpoint; if it is damaged, warn why and try the one before.
        None if there is no committed checkpoint at all. `optional`, `strict`: as in `load`. Manifests are
        read newest first and only as far back as needed, and the one loaded is parsed once (a
        manifest of 16k tensors takes 0.14 s to parse; the scan of every kept checkpoint parsed
        each, then the load the newest again).

        `set_aside_damaged` (for the job that writes this root, as the trainer): rank 0 renames a
        damaged checkpoint's manifest to `manifest.json.damaged`, so it stops counting as committed.
        Left as it was, it stayed the newest: retention kept it and deleted the sound checkpoints
        written after the fallback, and the run, reaching its step again, did not save over it. Only
        once an older one loads: with every one damaged none is renamed (renamed, the restart that
        follows the error found no checkpoint and silently started the run from step 0)."""
        check_targets(model, as_tuple(optimizer), "restore_latest")
        self.wait()
        if storage.exists(storage.join(self.root, MANIFEST), self.storage_options):
            raise CheckpointError(f"the manager's root {self.root} is a checkpoint directory, not a root of them: "
                                  f"pass its parent as the root, or load({self.root!r}, ...) to load this one")
        damaged: list[str] = []
        for step, url in reversed(step_dirs(self.root, self.storage_options)):
            info, manifest = read_info(url, step, self.storage_options)
            if manifest is None:
                level = logging.INFO if info.problem == NO_MANIFEST else logging.WARNING
                log.log(level, "ignoring %s, newer than the newest committed checkpoint: %s", url, info.problem)
                continue
            try:
                extra = self._load(url, manifest, model, optimizer, stateful, strict, optional)
            except CheckpointDamagedError as e:  # raised on every rank alike (load_checkpoint agrees)
                if self._first_to_say(str(e)):
                    log.warning("checkpoint %s is damaged, falling back to the previous committed one: %s", url, e)
                damaged.append(url)
                continue
            if set_aside_damaged:  # only once a sound one is loaded: see the docstring
                for bad in damaged:
                    self._set_aside(bad)
            return info, extra
        if damaged:
            raise CheckpointError(f"every committed checkpoint under {self.root} is damaged: {damaged}; "
                                  f"run `dtrain ckpt verify` on them, or remove them to start fresh")
        return None

    def _first_to_say(self, text: str) -> bool:
        """Collective: whether no lower rank has the same `text` to log (one small all-reduce of each
        rank's hash of it), so that what every rank saw is said once, by rank 0, and ranks that saw
        different things each say theirs."""
        said = [w[0] for w in comm.agree_words([zlib.crc32(text.encode("utf-8"))], self.group)]
        me = comm.rank(self.group)
        return said[me] not in said[:me]

    def _set_aside(self, url: str) -> None:
        """Rank 0: a damaged checkpoint's manifest to `manifest.json.damaged` (the files stay, for
        `dtrain ckpt verify`; the step directory now counts as incomplete and is replaced when the
        run saves that step again, or removed by retention once older than the newest commit)."""
        if comm.rank(self.group) != 0:
            return
        try:
            storage.rename(storage.join(url, MANIFEST), storage.join(url, DAMAGED), self.storage_options)
            log.warning("set %s aside (manifest.json -> %s): it no longer counts as committed", url, DAMAGED)
        except (OSError, CheckpointError) as e:
            log.warning("could not set the damaged checkpoint %s aside: %s", url, e)

    def resolve(self, ckpt: CheckpointInfo | str) -> str:
        """The directory `load` reads for `ckpt`: a checkpoint directory (URL, or a step directory's
        name under this root), or a root (its newest committed checkpoint)."""
        if isinstance(ckpt, CheckpointInfo):
            return ckpt.url
        if storage.exists(storage.join(ckpt, MANIFEST), self.storage_options):
            return ckpt
        inside = storage.join(self.root, ckpt)
        if "://" not in ckpt and not ckpt.startswith("/") and storage.exists(
                storage.join(inside, MANIFEST), self.storage_options):
            return inside
        try:
            return retention.resolve(ckpt, self.storage_options)  # a root: its newest committed checkpoint
        except MissingBucketError:
            raise
        except CheckpointError:
            raise CheckpointError(f"{ckpt} is not a committed checkpoint nor a root holding one (no manifest.json "
                                  f"there, under it or under {self.root}); see `dtrain ckpt ls {self.root}`") from None


def load_model(url: str, model: nn.Module, *, strict: bool = True,
               storage_options: dict[str, Any] | None = None) -> KeyDiff:
    """Load only model weights, in a plain process: `url` is a checkpoint directory or a root
    (then its newest committed checkpoint is used). Optimizer and RNG state are ignored.
    `strict=False` loads the tensors the model and the checkpoint share (a pretrained body into
    a model with a new head, say) and returns the keys left out, as torch's `load_state_dict`
    does; a shared key whose shape or dtype differs is still an error."""
    return load_weights(url, model, strict=strict, storage_options=storage_options)[1]


def load_weights(url: str, model: nn.Module, *, strict: bool = True, group: comm.ProcessGroup = None,
                 storage_options: dict[str, Any] | None = None) -> tuple[str, KeyDiff]:
    """`load_model` as a collective over `group` (each rank gets its shards; the trainer's
    `checkpoint.init_from`). Returns the checkpoint directory loaded and the keys left out. A
    root is resolved on every rank: it must not be written to meanwhile."""
    target = retention.resolve(url, storage_options)
    with torch.no_grad():
        _, _, diff = load_checkpoint(target, model=model, strict=strict, group=group,
                                     storage_options=storage_options, restore_rng=False)
    return target, diff


def _checked_step(step: object) -> int:
    """A step as an int (NumPy and 0-d integer tensors too); a clear error for anything else, before
    any directory is made."""
    try:
        if isinstance(step, bool):
            raise TypeError
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r} "
                              f"({type(step).__name__})") from None
    if value < 0:
        raise CheckpointError(f"checkpoint step must be >= 0, got {value}")
    return value


def _checked_metrics(metrics: dict[str, Any] | None) -> dict[str, float | None] | None:
    """Metrics as the manifest stores them: floats (from tensors and NumPy scalars too), None for a
    non-finite value (strict JSON has no NaN); an error naming the key of one that is not a number."""
    if metrics is None:
        return None
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise CheckpointError(f"checkpoint metrics[{key!r}] must be a number, got {value!r}") from None
        out[str(key)] = number if math.isfinite(number) else None
    return out
