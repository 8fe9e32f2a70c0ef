"""The training loop, and nothing else: it calls components (evaluation, checkpoint manager, early
stopping, preemption) and they never call back into it. The process around it (dist init, logging,
teardown) is dtrain.run; what it leaves behind (summary.json) is dtrain.summary.

    Trainer(cfg, env).fit() -> exit code      resume, loop until an agreed stop, save, summarise
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dtrain import __version__, dist, exitcodes
from dtrain.agreement import Flag, StepAgreement
from dtrain.checkpoint import CheckpointManager, rng, storage
from dtrain.checkpoint.manager import load_weights
from dtrain.checkpoint.reader import read_manifest, read_state
from dtrain.config import JobConfig, changes, check_world_size, saved_form
from dtrain.data import ResumableDistributedSampler
from dtrain.early_stopping import EarlyStopping, check_monitor
from dtrain.errors import CheckpointError, CheckpointMismatchError, ConfigError, MissingBucketError
from dtrain.evaluation import evaluate
from dtrain.faults import FaultInjector
from dtrain.metrics import MetricsLogger
from dtrain.optim import build_optimizer, build_scheduler
from dtrain.parallel import unwrap, wrap_model
from dtrain.preemption import PreemptionHandler, ignore_stop_signals
from dtrain.step_rules import StepRules
from dtrain.summary import Outcome, write_summary
from dtrain.tasks import Task, get_task, make_options, to_device

log = logging.getLogger(__name__)
# early stopping may be turned on for a job whose checkpoints were saved without it: it starts fresh
_OPTIONAL = ("early_stopping",)
_MIXED = ("a new run's checkpoints would mix with them (retention and the best checkpoint look at the whole "
          "root, and a step already committed there is not saved again).")


def _saved_config(url: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The config a checkpoint was saved with (its extra), None if it cannot be read."""
    try:
        state = read_state(url, read_manifest(url, storage_options), storage_options)
        saved = (state.get("extra") or {}).get("config")
    except (CheckpointError, OSError, AttributeError):
        return None
    return saved if isinstance(saved, dict) else None


def stream_seed(seed: int, rank: int, step: int) -> int:
    """A 64-bit seed for one rank's random streams from `step` on, different for every (seed, rank, step)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest(), "big")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds every component from a JobConfig, then `fit()` runs the loop."""

    def __init__(self, cfg: JobConfig, env: dist.DistEnv, preemption: PreemptionHandler | None = None) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        self.task: Task = get_task(cfg.task)
        model_cfg = make_options(self.task.model_config, cfg.model, "model")
        data_cfg = make_options(self.task.data_config, cfg.data.options, "data.options")
        check_world_size(cfg, env.world_size)

        seed_everything(cfg.seed)  # same seed everywhere: identical initial weights on every rank
        if cfg.train.deterministic and env.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self.train_ds, self.val_ds = self.task.build_datasets(data_cfg, cfg.seed)
        self.model = wrap_model(self.task.build_model(model_cfg), cfg.parallel, env, self.task.fsdp_blocks)
        # From here on each rank draws its own random stream (dropout masks must differ between
        # ranks); the data order does not depend on it (the sampler has its own generator).
        seed_everything(cfg.seed + 1 + env.rank)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.train.max_steps)
        self.sampler = ResumableDistributedSampler(
            len(self.train_ds), cfg.data.batch_size, cfg.data.grad_accum,  # type: ignore[arg-type]
            env.rank, env.world_size, cfg.seed,
        )
        es = cfg.early_stopping
        self.early_stopping = EarlyStopping.from_config(es) if es.enabled else None
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(
            cfg.checkpoint_root, storage_options=dict(ck.storage_options), async_save=ck.async_save,
            keep_last_n=ck.keep_last_n or None, keep_best_k=ck.keep_best_k or None,
            keep_every_n_steps=ck.keep_every_n_steps or None, monitor=es.monitor, mode=es.mode,
            overlap_staging=True,  # only optimizer.step() changes parameters in this loop
            job_id=ck.job_id or None, lease=ck.lease, lease_ttl_s=ck.lease_ttl_s, check_finite=ck.check_finite,
        )
        # `run` hands over the handler it installed at process start: a stop signal during start-up
        # (process group, build, checkpoint load) is already in it
        self.preemption = preemption or PreemptionHandler()
        self.faults = FaultInjector.from_config(cfg.faults, env.rank, env.world_size)
        ddp = self.model if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else None
        self.agreement = StepAgreement(device=env.device if env.backend == "nccl" else None, ddp=ddp)
        self.step = 0
        self.last_saved_step = -1
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1  # a checkpoint carries the metrics of an evaluation at its own step only
        self.origin: str | None = None  # the resume=<url> this run first started from (see `resume`)
        self.elapsed_before = 0.0  # training seconds of earlier starts (the time budgets count them)
        self.rules: StepRules | None = None
        # (sum, count) of this rank's losses since the last log line; saved (averaged over ranks) so
        # the first line after a resume reports the same window as an uninterrupted run
        self.loss_window: tuple[float, int] = (0.0, 0)
        self.startup: dict[str, float] = {}  # wall-clock phases up to the first step (recovery figures)

    # ---- components the checkpoint carries ------------------------------------------------------
    def _stateful(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scheduler": self.scheduler, "sampler": self.sampler}
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping
        return state

    def _extra(self) -> dict[str, Any]:
        window = (dist.all_reduce_mean(self.loss_window[0]), self.loss_window[1])
        elapsed = self.rules.elapsed() if self.rules else self.elapsed_before
        return {"step": self.step, "loss_window": list(window), "last_eval": dict(self.last_eval),
                "last_eval_step": self.last_eval_step, "origin": self.origin, "elapsed_s": elapsed,
                "world_size": self.env.world_size, "strategy": self.cfg.parallel.strategy, "config": saved_form(self.cfg),
                "dtrain_version": __version__, "torch_version": torch.__version__}

    def save(self, reason: str) -> None:
        if self.step == self.last_saved_step:
            return
        self.faults.before_save(self.step)
        # Metrics of an earlier evaluation would make this checkpoint tie with the one saved at that
        # evaluation (and, newer, win "best" and push it out under keep_best_k): they describe other weights.
        metrics = self.last_eval if self.last_eval_step == self.step else None
        self.checkpoints.save(
            self.step, model=self.model, optimizer=self.optimizer, stateful=self._stateful(),
            extra=self._extra(), metrics=metrics or None, reason=reason,
        )
        self.last_saved_step = self.step

    def resume(self) -> str | None:
        """Load the checkpoint `resume` asks for; returns its URL, or None for a fresh start.

        A root holds one run's trajectory: retention and the best checkpoint look at all of it, and a
        step already committed there is not saved again. So a start that would not continue the
        root's newest checkpoint (resume=never, or resume=<url> on a root with checkpoints that do
        not descend from that url) is refused rather than allowed to mix two runs. resume=<url>
        applies to the first start; a restart with the same command (a requeue) continues from the
        run's own newest checkpoint, which records the url it started from (`origin`)."""
        mode, root = self.cfg.resume, self.cfg.checkpoint_root
        try:  # without a lease nothing touched the root before the first save, after the training it lost
            self.checkpoints.check_root()
        except MissingBucketError as e:  # a typo in the URL: a restart would fail the same way
            raise ConfigError(f"checkpoint.root: {e}") from None
        # Refuse before any work if another job holds this checkpoint root (its lease names it).
        self.checkpoints.acquire_lease()
        # resume=auto needs no listing of its own: restore_latest lists the root (one scan fewer at start-up)
        own = None if mode == "auto" else self.checkpoints.latest_committed()
        if mode == "never":
            if own is not None:
                raise ConfigError(f"resume=never, but {root} already holds committed checkpoints (newest: step "
                                  f"{own.step}); {_MIXED} Use another run_dir (or checkpoint.root), resume them "
                                  f"(resume=auto), or remove them first (`dtrain ckpt prune`, or delete them)")
            return None
        try:
            if mode == "auto":
                found = self._restore_own()
                if found is None:
                    return None
                url, extra = found
            else:
                url, extra = self._resume_from(mode, own)
        except CheckpointError as e:
            newest = self.checkpoints.latest_committed() if mode == "auto" else None
            raise self._resume_error(e, mode if mode != "auto" else newest.url if newest else None) from e
        self.step = self.last_saved_step = int(extra["step"])
        window = extra.get("loss_window", [0.0, 0])
        self.loss_window = (float(window[0]), int(window[1]))
        self.elapsed_before = float(extra.get("elapsed_s", 0.0))
        last_eval = extra.get("last_eval")
        if isinstance(last_eval, dict):  # what summary.json reports if nothing is left to train
            self.last_eval = {str(k): float(v) for k, v in last_eval.items() if isinstance(v, (int, float))}
            self.last_eval_step = int(extra.get("last_eval_step", -1))
        saved_world = extra.get("world_size")
        resharded = isinstance(saved_world, int) and saved_world != self.env.world_size
        if resharded:
            # The saved per-rank RNG states do not map onto these ranks (the load left them alone): new
            # streams for this rank and step, not the run's first ones again, which would replay the
            # dropout masks (and random augmentations) of its first steps.
            seed_everything(stream_seed(self.cfg.seed, self.env.rank, self.step))
        log.info("resumed from %s at step %d%s", url, self.step, self._resume_note(saved_world if resharded else None))
        if self.step > self.cfg.train.max_steps:
            log.warning("the checkpoint is at step %d, past train.max_steps=%d: nothing is left to train",
                        self.step, self.cfg.train.max_steps)
        saved_cfg = extra.get("config")
        changed = changes(saved_cfg, saved_form(self.cfg)) if isinstance(saved_cfg, dict) else []
        if changed and self.env.is_main:  # the same on every rank: said once
            log.warning("the config differs from the one that saved %s:\n  %s", url, "\n  ".join(changed))
        return url

    def _resume_note(self, resharded_from: int | None) -> str:
        """What a resume onto another world size (the one it was saved by, else None) or global batch
        keeps; "" when neither changed."""
        notes = []
        if resharded_from is not None:
            notes.append(f"saved by {resharded_from} ranks, resharded onto {self.env.world_size}; per-rank random "
                         "streams are re-seeded from the seed, rank and step")
        saved_batch, batch = self.sampler.saved_global_batch_size, self.cfg.data.batch_size
        if saved_batch is not None and saved_batch != batch:
            notes.append(f"the global batch changed from {saved_batch} to {batch} (data.batch_size): the sample "
                         f"order goes on from where it stood in batches of {batch}, on a new trajectory")
        elif notes:
            notes.append("the global sample order continues exactly")
        return f" ({'; '.join(notes)})" if notes else ""

    def _restore_own(self) -> tuple[str, dict[str, Any]] | None:
        """The root's newest sound checkpoint, loaded; None if it has none."""
        found = self.checkpoints.restore_latest(model=self.model, optimizer=self.optimizer,
                                                stateful=self._stateful(), optional=_OPTIONAL,
                                                set_aside_damaged=True)
        if found is None:
            return None
        info, extra = found
        origin = extra.get("origin")
        self.origin = origin if isinstance(origin, str) else None
        return info.url, extra

    def _resume_from(self, mode: str, own: Any) -> tuple[str, dict[str, Any]]:
        """resume=<url>: that checkpoint on the first start, the run's own newest on a restart."""
        try:
            target = self.checkpoints.resolve(mode)
        except MissingBucketError as e:  # a typo in the URL (which the error names): no restart fixes it
            raise ConfigError(f"resume: {e}") from None
        except CheckpointError as e:  # a local path that is not there is a config error; a remote one may
            if storage.is_local(mode):  # be an outage, which a restart (exit 1) can outlast
                raise ConfigError(f"resume={mode}: {e}") from None
            raise
        if own is None or own.url == target:
            extra = self.checkpoints.load(target, model=self.model, optimizer=self.optimizer,
                                          stateful=self._stateful(), optional=_OPTIONAL)
            self.origin = mode
            return target, extra
        found = self._restore_own()
        assert found is not None  # `own` is committed; restore_latest raises if every one is damaged
        url, extra = found
        if self.origin != mode:
            inside = target.startswith(self.cfg.checkpoint_root.rstrip("/") + "/")
            back = (f" To go back to {target} in this root, remove its newer checkpoints (up to step {own.step}), "
                    f"then resume=auto." if inside else "")
            raise ConfigError(f"resume={mode}, but {self.cfg.checkpoint_root} already holds checkpoints that do not "
                              f"continue from it (newest: step {own.step}); {_MIXED} Use another run_dir (or "
                              f"checkpoint.root), or remove them first (`dtrain ckpt prune`, or delete them).{back}")
        log.info("resume=%s applies to this run's first start; the run has checkpoints of its own since: "
                 "continuing from the newest", mode)
        return url, extra

    def _resume_error(self, e: CheckpointError, tried: str | None) -> Exception:
        """The error a failed resume raises: a checkpoint that does not fit this config (exit 2, with
        the config changes since it was saved) or one that could not be read (exit 1: a restart may
        succeed); both say how to start fresh instead."""
        root = self.cfg.checkpoint_root
        fresh = (f"To start fresh instead, use another run_dir (the checkpoints under {root} are left "
                 f"untouched)")
        if not isinstance(e, CheckpointMismatchError):
            return CheckpointError(f"cannot resume: {e}. {fresh}")
        saved = _saved_config(tried, self.checkpoints.storage_options) if tried else None
        changed = changes(saved, saved_form(self.cfg)) if saved is not None else []
        since = ("; the config changed since it was saved:\n  " + "\n  ".join(changed) + "\n") if changed else ". "
        return ConfigError(
            f"cannot resume: {e.message}{since}The trainer resumes strictly (the config must build the model and "
            f"optimizer that saved it). To keep only the model weights (another optimizer, a new head), start "
            f"a run from them: checkpoint.init_from={tried or root} with another run_dir "
            f"(checkpoint.init_strict=false for a new head). {fresh}")

    def init_weights(self) -> str | None:
        """A fresh run's model weights from `checkpoint.init_from` (fine-tuning): the model only,
        on any world size and strategy; optimizer, schedule, data order and step start fresh.
        Returns the checkpoint directory loaded, or None without `init_from`."""
        url = self.cfg.checkpoint.init_from
        if not url:
            return None
        try:
            loaded, diff = load_weights(
                url, self.model, strict=self.cfg.checkpoint.init_strict, group=self.checkpoints.group,
                storage_options=dict(self.cfg.checkpoint.storage_options) or None)
        except CheckpointMismatchError as e:  # as on resume: another model config, which no restart fixes
            raise ConfigError(f"cannot initialise the model from checkpoint.init_from={url}: {e}. A shared tensor "
                              f"must have the checkpoint's shape and dtype (checkpoint.init_strict=false leaves "
                              f"out only tensors that one side lacks)") from e
        except MissingBucketError as e:  # a typo in the URL: a restart would fail the same way
            raise ConfigError(f"checkpoint.init_from: {e}") from None
        except CheckpointError as e:
            raise CheckpointError(f"cannot initialise the model from checkpoint.init_from={url}: {e}") from e
        left = f"; {len(diff.missing_keys)} tensor(s) not in it kept their initial values" if diff.missing_keys else ""
        log.info("initialised the model weights from %s%s", loaded, left)
        return loaded

    # ---- the loop -------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        mode = self.cfg.train.autocast
        if mode == "bf16" or (mode == "auto" and self.env.device.type == "cuda"):
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batches: Any) -> float:
        """One optimizer step over grad_accum micro-batches; returns this rank's mean loss."""
        accum = self.cfg.data.grad_accum
        total = 0.0
        for micro in range(accum):
            batch = to_device(next(batches), self.env.device)
            sync_ctx = (
                self.model.no_sync()
                if micro < accum - 1 and isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
                else contextlib.nullcontext()
            )
            with sync_ctx:
                with self._autocast():
                    loss = self.task.train_loss(self.model, batch) / accum
                loss.backward()
            total += float(loss.detach())
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total

    def _log_train(self, metrics_log: MetricsLogger, seconds: float, steps: int) -> None:
        mean_loss = dist.all_reduce_mean(self.loss_window[0]) / max(1, self.loss_window[1])
        rate = self.cfg.data.batch_size * steps / max(1e-9, seconds)
        lr = float(self.scheduler.get_last_lr()[0])
        metrics_log.log(self.step, {"epoch": round(self.sampler.epoch_float, 4), "train/loss": mean_loss,
                                    "lr": lr, "samples_per_s": round(rate, 1)})
        metrics_log.progress(self.step, {"loss": mean_loss, "lr": lr, "samples/s": rate, **self.last_eval})

    def fit(self) -> int:
        """Resume, train until max_steps or an agreed stop, save, write summary.json; returns the exit code."""
        try:
            return self._fit()
        except BaseException:
            # The lease back now: left to the manager's finalizer, an error at start-up (a resume that
            # fails, a bad init_from) released it at interpreter exit, where s3fs can no longer send
            # requests; 5 s of retries, then the lease stayed held for the next start to wait out.
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.checkpoints.close()
            raise

    def _fit(self) -> int:
        outcome = Outcome()
        outcome.resumed_from = self.resume()
        self.checkpoints.apply_retention()  # this config's rules, before a save needs the space
        if outcome.resumed_from is None:
            outcome.initialised_from = self.init_weights()
        self.startup["resumed"] = time.time()
        metrics_log = MetricsLogger(self.run_dir, enabled=self.env.is_main, progress=self.cfg.logging.progress,
                                    tensorboard=self.cfg.logging.tensorboard, max_steps=self.cfg.train.max_steps,
                                    start_step=self.step)
        if outcome.resumed_from:
            metrics_log.log(self.step, {"event": "resume", "from": outcome.resumed_from})
        if outcome.initialised_from:
            metrics_log.log(self.step, {"event": "init", "from": outcome.initialised_from})
        # The loader draws its workers' base seed when iterated; from the global generator that draw
        # would come after the resume restored this rank's RNG state, so a resumed run's dropout
        # masks (and every later random draw) would shift by one number. Its own generator leaves
        # the global stream to the model.
        seeds = torch.Generator().manual_seed(self.cfg.seed + 1 + self.env.rank)
        loader = DataLoader(self.train_ds, batch_sampler=self.sampler, num_workers=self.cfg.data.num_workers,
                            generator=seeds, worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        finished = self._already_stopped(outcome)
        try:
            with self.preemption.held():
                if self.preemption.requested and not finished:
                    log.warning("a stop (%s) arrived during start-up: the emergency checkpoint follows the first "
                                "step", self.preemption.signal_name)
                if not finished:
                    self._sanity_check()
                    self._train_until_stop(batches, metrics_log, outcome)
                self.agreement.drain()
                if outcome.exit_code == exitcodes.OK:
                    self.save("end")
                self.checkpoints.wait()
                if outcome.exit_code == exitcodes.OK:
                    self._restore_best()
        finally:
            metrics_log.close()
            self.checkpoints.close()
        outcome.last_step = self.step
        outcome.final_metrics = self.last_eval
        write_summary(outcome, run_dir=self.run_dir, env=self.env, cfg=self.cfg,
                      early_stopping=self.early_stopping, checkpoints=self.checkpoints)
        return outcome.exit_code

    def _already_stopped(self, outcome: Outcome) -> bool:
        """A run resumed after its early stopping fired, or after its time budget was spent, trains
        no further, unless this config lifts that stop (EarlyStopping.still_stopped)."""
        budget = self.cfg.train.max_time
        if budget and self.elapsed_before >= budget:
            outcome.stopped_by = "max_time"
            log.info("this run already spent its time budget (train.max_time=%ss); nothing left to train", budget)
            return True
        es = self.early_stopping
        if es is None or not es.still_stopped(self.elapsed_before):
            return False
        outcome.stopped_by = f"early_stopping:{es.stop_reason}"
        log.info("this run already stopped early at step %s (%s); nothing left to train", es.stopped_step,
                 es.stop_message or es.stop_reason)
        return True

    def _train_until_stop(self, batches: Any, metrics_log: MetricsLogger, outcome: Outcome) -> None:
        """Step until max_steps or a stop every rank agreed on (recorded in `outcome`)."""
        max_steps, log_every = self.cfg.train.max_steps, self.cfg.train.log_every
        rules = self.rules = StepRules(self.cfg, self.early_stopping, self.preemption, self.elapsed_before)
        t_log, steps_in_window = time.monotonic(), 0
        while self.step < max_steps:
            self.faults.at_step(self.step + 1)
            loss = self.train_step(batches)
            self.step += 1
            loss = self.faults.loss_override(self.step, loss)
            self.sampler.advance(self.cfg.data.batch_size)
            if "first_step" not in self.startup:
                self.startup["first_step"] = time.time()
                metrics_log.log(self.step, {"event": "startup", **self.startup})
            self.loss_window = (self.loss_window[0] + loss, self.loss_window[1] + 1)
            steps_in_window += 1

            local = rules.local_flags(loss, self.step)
            do_eval, save_due = rules.eval_due(self.step), rules.save_due(self.step)
            if do_eval:  # on every rank, whatever its own loss: evaluation is a collective
                local |= self._evaluate(metrics_log)
            agreed = self.agreement.step(local, sync=do_eval or save_due or self.step == max_steps)

            if self.step % log_every == 0 or agreed.stops:
                self._log_train(metrics_log, time.monotonic() - t_log, steps_in_window)
            if self.step % log_every == 0:
                # The window only restarts on log boundaries, so a stop mid-window saves the
                # partial window and a resumed run reports the same numbers as an uninterrupted one.
                t_log, steps_in_window, self.loss_window = time.monotonic(), 0, (0.0, 0)

            reason = rules.save_reason(agreed, do_eval, save_due)
            if reason is not None:
                if reason == "preempted":
                    self.checkpoints.wait()  # finish the in-flight async save before the emergency one
                self.save(reason)
                rules.saved()
            if agreed.stops:
                outcome.stopped_by, outcome.exit_code = rules.stop(agreed)
                if outcome.exit_code == exitcodes.FAILURE:
                    log.error("training loss is not finite at step %d on some rank; stopping without a "
                              "checkpoint (the last committed one is intact)", self.step)
                elif outcome.exit_code == exitcodes.PREEMPTED:
                    metrics_log.write(f"preempted by {self.preemption.signal_name or 'a peer'} at step "
                                      f"{self.step}: emergency checkpoint committed, exiting for requeue")
                return

    def _sanity_check(self) -> None:
        """Run the first `train.sanity_eval_batches` validation batches before the first step, so a
        crashing eval_per_sample or an early_stopping.monitor the evaluation never produces fails
        at start-up rather than at the first evaluation, maybe hours in. Every start runs it (fresh
        or resumed) and it leaves no trace: RNG states are put back and the model is in eval mode,
        so a resumed run stays on the uninterrupted run's trajectory."""
        n = self.cfg.train.sanity_eval_batches
        if n == 0:
            return
        t0, saved = time.monotonic(), rng.capture()
        try:
            metrics = self._run_evaluation(max_batches=n)
        finally:
            rng.restore(saved, "the sanity check")
        if self.early_stopping is not None:
            self.early_stopping.check_metrics(metrics)
        elif self.checkpoints.keep_best_k:  # without early stopping, keep_best_k still ranks by it
            check_monitor(self.cfg.early_stopping.monitor, metrics, " (which checkpoint.keep_best_k ranks by)")
        log.info("sanity check: %d validation batch(es) per rank ran in %.2fs, metrics %s (train.sanity_eval_batches)",
                 n, time.monotonic() - t0, ", ".join(sorted(metrics)) or "none")

    def _run_evaluation(self, max_batches: int | None = None) -> dict[str, float]:
        """The validation metrics (a collective), over every batch or each rank's first `max_batches`."""
        return evaluate(unwrap(self.model), self.val_ds, self.task.eval_per_sample,  # type: ignore[arg-type]
                        batch_size=self.cfg.data.eval_batch_size, device=self.env.device,
                        autocast=self._autocast(), max_batches=max_batches)

    def _evaluate(self, metrics_log: MetricsLogger) -> Flag:
        """Evaluate, log the metrics and feed early stopping; EARLY_STOP when it says stop."""
        metrics = self._run_evaluation()
        metrics.update(self.faults.metric_override(self.step, metrics))
        self.last_eval, self.last_eval_step = metrics, self.step
        metrics_log.log(self.step, {"epoch": round(self.sampler.epoch_float, 4), **self.last_eval})
        es = self.early_stopping
        if es is None:
            return Flag.NONE
        if es.stopped_step is None:
            es.check_metrics(self.last_eval)
        return Flag.EARLY_STOP if es.update(self.last_eval[es.monitor], self.step) else Flag.NONE

    def _restore_best(self) -> None:
        """Load the best committed checkpoint's weights. Chosen from storage, the same answer on every
        rank (their early-stopping states may disagree, e.g. on a rank fed a NaN: a load on some ranks
        only would leave the others waiting); a checkpoint carries metrics only when saved at an
        evaluation, so it is early stopping's best step whenever that step was saved."""
        es = self.early_stopping
        if es is None or not es.restore_best:
            return
        best = self.checkpoints.best()
        if best is None or best.step == self.step:
            return
        self.checkpoints.load(best, model=self.model)
        log.info("restored the best weights (%s=%.6g at step %d) from %s", es.monitor, best.metric(es.monitor),
                 best.step, best.url)
