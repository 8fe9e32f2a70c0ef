"""The loop's per-step rules, from the config: when a step evaluates or saves, which flags this rank
raises after a step, and what the flags all ranks agreed on mean (save, and why; stop, and why).

Kept out of the loop so the loop reads top to bottom and the rules read as a table. Nothing here
talks to other ranks: dtrain.agreement turns the local flags into the agreed ones.
"""

from __future__ import annotations

import math
import time

from dtrain import exitcodes
from dtrain.agreement import Flag
from dtrain.config import JobConfig
from dtrain.early_stopping import EarlyStopping
from dtrain.preemption import PreemptionHandler


class StepRules:
    """Built when the loop starts. The time budgets (max_time) count the training time of every
    start of the run (`elapsed_before`: what its checkpoint recorded), as Lightning's Timer does;
    the every_minutes save clock counts from this start."""

    def __init__(self, cfg: JobConfig, early_stopping: EarlyStopping | None, preemption: PreemptionHandler,
                 elapsed_before: float = 0.0) -> None:
        self.train, self.checkpoint = cfg.train, cfg.checkpoint
        self.early_stopping, self.preemption = early_stopping, preemption
        self.t_last_save = time.monotonic()
        self.t_start = self.t_last_save - elapsed_before

    def elapsed(self) -> float:
        """Seconds of training in this run so far, earlier starts included."""
        return time.monotonic() - self.t_start

    def eval_due(self, step: int) -> bool:
        return step % self.train.eval_every == 0 or step == self.train.max_steps

    def save_due(self, step: int) -> bool:
        """checkpoint.every_steps; every_minutes saves arrive as the SAVE_NOW flag instead."""
        return bool(self.checkpoint.every_steps) and step % self.checkpoint.every_steps == 0

    def saved(self) -> None:
        """A checkpoint was just saved: the every_minutes clock restarts."""
        self.t_last_save = time.monotonic()

    def local_flags(self, loss: float, step: int) -> Flag:
        """What this rank alone sees after `step` (evaluation adds EARLY_STOP on its own)."""
        local = Flag.NONE
        if not math.isfinite(loss):
            local |= Flag.NON_FINITE
        if self.preemption.requested:
            local |= Flag.PREEMPT
        elapsed = self.elapsed()
        if self.train.max_time and elapsed > self.train.max_time:
            local |= Flag.TIME_BUDGET
        # Asked even when max_time already fired: it records early stopping's own stop reason.
        if self.early_stopping is not None and self.early_stopping.time_exceeded(elapsed, step):
            local |= Flag.TIME_BUDGET
        every = self.checkpoint.every_minutes
        if every and time.monotonic() - self.t_last_save > 60 * every:
            local |= Flag.SAVE_NOW
        return local

    def save_reason(self, agreed: Flag, evaluated: bool, save_due: bool) -> str | None:
        """The checkpoint reason this step saves with (preempted, stop, eval, every_steps, every_minutes),
        or None. Never after a non-finite loss: the last committed checkpoint stays the good one."""
        if agreed & Flag.NON_FINITE:
            return None
        if agreed & Flag.PREEMPT:
            return "preempted"
        if agreed.stops:
            return "stop"
        if evaluated and self.checkpoint.on_eval:
            return "eval"  # `dtrain ckpt ls` shows why each checkpoint was saved
        if save_due:
            return "every_steps"
        if agreed & Flag.SAVE_NOW:
            return "every_minutes"
        return None

    def stop(self, agreed: Flag) -> tuple[str, int]:
        """(summary.json's stopped_by, exit code) for agreed flags that stop; the first that applies wins."""
        if agreed & Flag.NON_FINITE:
            return "non_finite_loss", exitcodes.FAILURE
        if agreed & Flag.PREEMPT:
            return "preempted", exitcodes.PREEMPTED
        if agreed & Flag.EARLY_STOP:
            assert self.early_stopping is not None  # every rank has the same config
            return f"early_stopping:{self.early_stopping.stop_reason or 'another_rank'}", exitcodes.OK
        if self.early_stopping is not None and self.early_stopping.stop_reason == "max_time":
            return "early_stopping:max_time", exitcodes.OK  # as a restart of the stopped run says
        return "max_time", exitcodes.OK
