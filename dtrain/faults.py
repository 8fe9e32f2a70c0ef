"""Deterministic fault injection for tests and chaos runs: off unless configured.

Configured by `faults.*` keys or the DTRAIN_FAULTS environment variable (JSON, same keys), so a
test can target one attempt of a restarted job:

    kill_rank / kill_step        SIGKILL this rank just before training step S
    kill_during_save_step        SIGKILL kill_rank while the checkpoint of step S is being written
    hang_rank / hang_step        sleep forever before step S (a silent peer)
    signal_rank / signal_step    send SIGTERM to ourselves before step S (a preemption)
    config_error_rank / config_error_step  raise a ConfigError on this rank alone before step S (a
                                 problem only one rank finds once the group is up: data missing on one node)
    nan_rank / nan_step          this rank's monitored validation metric becomes NaN at step S
    nan_loss_rank / nan_loss_step  this rank's training loss of step S reads as NaN (the weights stay)
    metric_rank / metric_offset  add an offset to this rank's validation metrics (ranks disagree)
    only_attempt                 apply only when TORCHELASTIC_RESTART_COUNT/SLURM_RESTART_COUNT equals it
    chaos_seed / chaos_kills     chaos: in each of the first `chaos_kills` attempts, SIGKILL a rank
                                 drawn from the seed, 1..chaos_max_gap steps after the attempt's start
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from dtrain.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class FaultInjector:
    rank: int = 0
    kill_rank: int | None = None
    kill_step: int | None = None
    kill_during_save_step: int | None = None
    hang_rank: int | None = None
    hang_step: int | None = None
    signal_rank: int | None = None
    signal_step: int | None = None
    config_error_rank: int | None = None
    config_error_step: int | None = None
    nan_rank: int | None = None
    nan_step: int | None = None
    nan_loss_rank: int | None = None
    nan_loss_step: int | None = None
    metric_rank: int | None = None
    metric_offset: float = 0.0
    only_attempt: int | None = None
    chaos_seed: int | None = None
    chaos_kills: int = 0
    chaos_max_gap: int = 12
    world_size: int = 1
    attempt: int = 0
    _first_step: int | None = None

    @classmethod
    def from_config(cls, options: dict[str, Any], rank: int, world_size: int = 1) -> FaultInjector:
        merged = dict(options)
        if os.environ.get("DTRAIN_FAULTS"):
            try:
                merged.update(json.loads(os.environ["DTRAIN_FAULTS"]))
            except json.JSONDecodeError as e:
                raise ConfigError(f"DTRAIN_FAULTS is not valid JSON: {e}") from e
        known = {f.name for f in fields(cls)} - {"rank", "world_size", "attempt", "_first_step"}
        unknown = set(merged) - known
        if unknown:
            raise ConfigError(f"unknown fault option(s) {sorted(unknown)}; known: {sorted(known)}")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0")))
        injector = cls(rank=rank, world_size=world_size, attempt=attempt, **merged)
        if injector.only_attempt is not None and injector.only_attempt != attempt:
            return cls(rank=rank)
        if merged:
            log.warning("fault injection is ON: %s", merged)
        return injector

    def _me(self, rank: int | None) -> bool:
        return rank is not None and rank == self.rank

    def chaos_target(self) -> tuple[int, int] | None:
        """(rank, steps after this attempt's first step) that chaos kills in this attempt, if any."""
        if self.chaos_seed is None or self.attempt >= self.chaos_kills:
            return None
        rng = random.Random(f"{self.chaos_seed}/{self.attempt}")
        return rng.randrange(self.world_size), rng.randint(1, self.chaos_max_gap)

    def at_step(self, step: int) -> None:
        """Called before training step `step`."""
        if self._first_step is None:
            self._first_step = step
        target = self.chaos_target()
        if target is not None and target[0] == self.rank and step == self._first_step + target[1]:
            log.warning("chaos: SIGKILL rank %d before step %d (attempt %d)", self.rank, step, self.attempt)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._me(self.kill_rank) and step == self.kill_step:
            log.warning("fault: SIGKILL rank %d before step %d at %.3f", self.rank, step, time.time())
            os.kill(os.getpid(), signal.SIGKILL)
        if self._me(self.signal_rank) and step == self.signal_step:
            log.warning("fault: SIGTERM rank %d before step %d at %.3f", self.rank, step, time.time())
            os.kill(os.getpid(), signal.SIGTERM)
        if self._me(self.config_error_rank) and step == self.config_error_step:
            log.warning("fault: ConfigError on rank %d before step %d", self.rank, step)
            raise ConfigError(f"fault: config error on rank {self.rank} alone before step {step} (faults.config_error_rank)")
        if self._me(self.hang_rank) and step == self.hang_step:
            log.warning("fault: rank %d hangs before step %d", self.rank, step)
            # A process hung in C code never runs Python signal handlers; model that by letting
            # torchrun's SIGTERM end it, instead of our flag-only handler keeping it alive 30 s more.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            threading.Event().wait()

    def before_save(self, step: int) -> None:
        """Called when the checkpoint of `step` starts; kills from a timer so the kill lands mid-write."""
        if self._me(self.kill_rank) and step == self.kill_during_save_step:
            log.warning("fault: SIGKILL rank %d during the save of step %d", self.rank, step)
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()

    def loss_override(self, step: int, loss: float) -> float:
        """The training loss this rank reports for `step` (NaN where configured)."""
        return float("nan") if self._me(self.nan_loss_rank) and step == self.nan_loss_step else loss

    def metric_override(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._me(self.metric_rank) and self.metric_offset:
            out = {k: v + self.metric_offset for k, v in metrics.items()}
        if self._me(self.nan_rank) and step == self.nan_step:
            out = {k: float("nan") for k in metrics}
        return out
