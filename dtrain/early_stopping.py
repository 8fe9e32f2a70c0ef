"""Early stopping with Keras/Lightning semantics, as a pure object the trainer feeds reduced metrics.

No collectives live here: the trainer passes in a value that is already identical on every rank and
then agrees the stop through its one per-step flag all-reduce (see shared/DESIGN.md, "Agreement").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from typing import Any

from dtrain.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_MODES = ("min", "max")
_STATE_VERSION = 1
# Machine-readable reasons; summary.json writes them as "early_stopping:<reason>".
STOP_REASONS = ("patience", "baseline", "stopping_threshold", "divergence_threshold", "non_finite", "max_time")


def _encode_float(value: float | None) -> float | str | None:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _decode_float(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CheckpointError(f"early-stopping state key {key!r} holds {value!r}; expected a number or null")
    try:
        return float(value)
    except ValueError:
        raise CheckpointError(f"early-stopping state key {key!r} holds {value!r}; expected a number") from None


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def check_monitor(monitor: str, available: Collection[str], used_by: str = "") -> None:
    """ConfigError if the evaluation does not produce `monitor` (early_stopping.monitor; `used_by`
    says what else ranks by it), listing the metrics that exist."""
    if monitor not in available:
        names = ", ".join(sorted(available)) or "(none)"
        raise ConfigError(
            f"early_stopping.monitor={monitor!r}{used_by} is not a metric the evaluation produces; "
            f"the metrics that exist are: {names}. Set early_stopping.monitor to one of them."
        )


class EarlyStopping:
    """Stop when the monitored metric stops improving, or when a goal, a limit or a time budget is hit.

    Options mean what they mean in ``keras.callbacks.EarlyStopping`` and Lightning's ``EarlyStopping``.
    Where the two differ, or where our step-based, resumable setting needs a choice, we chose:

    * Improvement is Keras' test, which Lightning shares: mode min means ``value + min_delta < best``,
      mode max means ``value - min_delta > best`` (strict: a change of exactly min_delta is not an
      improvement). min_delta must be >= 0; Keras silently takes abs() of it and Lightning flips its sign
      by mode, so a negative value would mean different things to each: we reject it.
    * The first counted evaluation with a finite value is always an improvement (best starts at
      -/+inf as in Lightning). NaN is never an improvement.
    * ``wait`` counts evaluations since the last one that reset it; an improvement resets it to 0
      (Lightning's wait_count and Keras' wait agree on this without a baseline). We stop when wait
      reaches patience, checked only on evaluations that did not reset it, so patience=0 stops at the
      first evaluation without improvement, as in both.
    * baseline (Keras only): an improvement resets wait only if it also beats the baseline, so if no
      evaluation beats the baseline within ``patience`` evaluations we stop (reason "baseline"), even
      if the values kept improving on each other. That is the documented Keras meaning; Keras 3 code
      skips the patience check on any improvement and never stops on epoch 0, so it can run longer.
      best still tracks the best value seen, so restore_best has a checkpoint to go back to.
    * start_from_step (Keras' start_from_epoch, in steps): evaluations at step < start_from_step are
      ignored entirely, including the finite check, as Keras ignores everything before its start.
    * Order within one evaluation: non-finite check, divergence threshold, improvement bookkeeping,
      stopping threshold, patience. Lightning checks both thresholds before improvement and so never
      records the value that reached the goal as best; we record it first so restore_best returns the
      weights that reached the goal. A diverged value never becomes best (as in Lightning).
      Both thresholds are strict comparisons, as in Lightning (min: value < stopping_threshold stops,
      value > divergence_threshold stops).
    * max_time (like Lightning's Timer, elapsed >= max_time) is a separate method because the trainer
      agrees the time budget every step, not only at evaluations.
    * state_dict() carries best/wait/reason but not patience: the config decides patience on resume
      (Lightning restores patience from the checkpoint instead), so a user may extend a stopped run
      (`still_stopped`: a raised patience, a removed threshold or a longer max_time lift the stop).
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        min_delta: float = 0.0,
        patience: int = 3,
        baseline: float | None = None,
        start_from_step: int = 0,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        max_time: float | None = None,
        restore_best: bool = True,
        verbose: bool = False,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"early_stopping.monitor={monitor!r} must name a metric, e.g. 'val/loss'")
        if mode not in _MODES:
            raise ConfigError(f"early_stopping.mode={mode!r} is not allowed; choose one of: min, max")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"early_stopping.patience={patience!r} must be an integer >= 0")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ConfigError(f"early_stopping.min_delta={min_delta!r} must be a finite number >= 0")
        if isinstance(start_from_step, bool) or not isinstance(start_from_step, int) or start_from_step < 0:
            raise ConfigError(f"early_stopping.start_from_step={start_from_step!r} must be an integer >= 0")
        if max_time is not None and not (math.isfinite(max_time) and max_time > 0):
            raise ConfigError(f"early_stopping.max_time={max_time!r} must be a number of seconds > 0 or null")
        for key, limit in (("baseline", baseline), ("stopping_threshold", stopping_threshold),
                           ("divergence_threshold", divergence_threshold)):
            if limit is not None and not math.isfinite(limit):
                raise ConfigError(f"early_stopping.{key}={limit!r} must be a finite number or null")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.patience = patience
        self.baseline = baseline
        self.start_from_step = start_from_step
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.max_time = max_time
        self.restore_best = restore_best
        self.verbose = verbose
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.stopped_step: int | None = None
        self.stop_reason: str | None = None
        self.stop_message: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> EarlyStopping:
        """Build from an object with the same field names (dtrain.config.EarlyStoppingConfig)."""
        names = ("monitor", "mode", "min_delta", "patience", "baseline", "start_from_step", "check_finite",
                 "stopping_threshold", "divergence_threshold", "max_time", "restore_best")
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})

    # -- comparisons -------------------------------------------------------------------------------
    def _better(self, value: float, reference: float) -> bool:
        """Keras' improvement test of value against reference, min_delta included."""
        if self.mode == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    def is_improvement(self, value: float) -> bool:
        """Would this value become the new best? (No state changes.)"""
        value = float(value)
        if math.isnan(value):
            return False
        reference = self.best if self.best is not None else (math.inf if self.mode == "min" else -math.inf)
        return self._better(value, reference)

    def _beats_baseline(self, value: float) -> bool:
        return self.baseline is None or self._better(value, self.baseline)

    def _op(self) -> str:
        return "<" if self.mode == "min" else ">"

    # -- the decision ------------------------------------------------------------------------------
    def update(self, value: float, step: int) -> bool:
        """Count one evaluation of the monitored metric at `step`; True means stop now.

        A time budget that `time_exceeded` found spent stays spent (time only grows): this
        evaluation is still counted, and unless it stops for a reason of its own, the max_time
        stop is kept and True returned."""
        value = float(value)
        if step < self.start_from_step:
            return False
        if self.stop_reason == "max_time":
            spent = (self.stopped_step, self.stop_reason, self.stop_message)
            self._judge(value, step)
            if self.stop_reason is None:
                self.stopped_step, self.stop_reason, self.stop_message = spent
            return True
        return self._judge(value, step)

    def _judge(self, value: float, step: int) -> bool:
        """`update` without the time budget: this evaluation's own verdict."""
        self.stopped_step = self.stop_reason = self.stop_message = None
        if self.check_finite and not math.isfinite(value):
            return self._stop("non_finite", step, f"{self.monitor}={value} is not finite")
        if self.divergence_threshold is not None and self._worse_than(value, self.divergence_threshold):
            return self._stop("divergence_threshold", step,
                              f"{self.monitor}={value:.6g} is worse than divergence_threshold="
                              f"{self.divergence_threshold}")
        reset = False
        if self.is_improvement(value):
            self.best, self.best_step = value, step
            reset = self._beats_baseline(value)
            self._say(f"{self.monitor} improved to {value:.6g} at step {step}")
        if reset:
            self.wait = 0
        else:
            self.wait += 1
        if self.stopping_threshold is not None and self._reached(value, self.stopping_threshold):
            return self._stop("stopping_threshold", step,
                              f"{self.monitor}={value:.6g} {self._op()} stopping_threshold={self.stopping_threshold}")
        if not reset and self.wait >= self.patience:
            if self.baseline is not None and (self.best is None or not self._better(self.best, self.baseline)):
                return self._stop("baseline", step,
                                  f"{self.monitor} did not beat baseline={self.baseline} in {self.wait} "
                                  f"evaluations (best {_fmt(self.best)})")
            return self._stop("patience", step,
                              f"{self.monitor} did not improve in {self.wait} evaluations "
                              f"(best {_fmt(self.best)} at step {self.best_step})")
        return False

    def _reached(self, value: float, threshold: float) -> bool:
        return value < threshold if self.mode == "min" else value > threshold

    def _worse_than(self, value: float, threshold: float) -> bool:
        return value > threshold if self.mode == "min" else value < threshold

    def time_exceeded(self, elapsed_s: float, step: int | None = None) -> bool:
        """True once the wall-clock budget is spent (elapsed_s >= max_time); records reason "max_time"."""
        if self.max_time is None or elapsed_s < self.max_time:
            return False
        if self.stop_reason is None:
            self._stop("max_time", step, f"time budget max_time={self.max_time}s spent ({elapsed_s:.1f}s)")
        return True

    def _stop(self, reason: str, step: int | None, detail: str) -> bool:
        self.stopped_step, self.stop_reason = step, reason
        self.stop_message = f"early stopping ({reason}) at step {step}: {detail}"
        (log.info if self.verbose else log.debug)(self.stop_message)
        return True

    def _say(self, message: str) -> None:
        (log.info if self.verbose else log.debug)(message)

    def still_stopped(self, elapsed_s: float) -> bool:
        """After a resume: whether a restored stop holds under this config. A raised patience, a
        stopping_threshold removed or no longer reached by the best value, or a longer max_time
        (than `elapsed_s`, the run's training time so far) lets the stopped run go on; a
        non-finite or diverged value keeps it stopped."""
        reason = self.stop_reason
        if reason is None:
            return False
        lifted = ((reason in ("patience", "baseline") and self.wait < self.patience)
                  or (reason == "stopping_threshold" and (self.stopping_threshold is None or self.best is None
                                                          or not self._reached(self.best, self.stopping_threshold)))
                  or (reason == "max_time" and (self.max_time is None or elapsed_s < self.max_time)))
        if lifted:
            log.info("early stopping had stopped this run (%s); under this config it goes on", self.stop_message)
            self.stopped_step = self.stop_reason = self.stop_message = None
        return not lifted

    @property
    def should_stop(self) -> bool:
        """True when the last update (or time_exceeded) asked to stop."""
        return self.stop_reason is not None

    def check_metrics(self, available: Collection[str]) -> None:
        """Raise ConfigError at the first evaluation if the monitored metric is never produced."""
        check_monitor(self.monitor, available)

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (non-finite floats as strings) saved in every checkpoint's state.json."""
        return {
            "version": _STATE_VERSION,
            "monitor": self.monitor,
            "mode": self.mode,
            "best": _encode_float(self.best),
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped_step": self.stopped_step,
            "stop_reason": self.stop_reason,
            "stop_message": self.stop_message,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue counting where a checkpointed run left off; the config still decides the options."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"early-stopping state is {type(state).__name__}, expected a JSON object")
        missing = [k for k in ("monitor", "mode", "best", "best_step", "wait") if k not in state]
        if missing:
            raise CheckpointError(f"early-stopping state lacks keys {missing}; the checkpoint is incomplete")
        if state["monitor"] != self.monitor or state["mode"] != self.mode:
            raise ConfigError(
                f"the checkpoint's early stopping watched {state['monitor']!r} (mode {state['mode']!r}) but "
                f"the config says {self.monitor!r} (mode {self.mode!r}); its best/wait do not apply. "
                "Keep the monitor and mode of the run you resume, or start a new run directory."
            )
        wait = state["wait"]
        if isinstance(wait, bool) or not isinstance(wait, int) or wait < 0:
            raise CheckpointError(f"early-stopping state key 'wait' holds {wait!r}; expected an integer >= 0")
        reason = state.get("stop_reason")
        if reason is not None and reason not in STOP_REASONS:
            raise CheckpointError(f"early-stopping state key 'stop_reason' holds unknown {reason!r}")
        self.best = _decode_float(state["best"], "best")
        self.best_step = state["best_step"]
        self.wait = wait
        self.stopped_step = state.get("stopped_step")
        self.stop_reason = reason
        self.stop_message = state.get("stop_message")
