"""The one per-step collective: every rank's stop/save reasons, OR-ed by a MAX all-reduce.

Each rank raises the flags it sees (its own signal, its own clock, its own loss); the agreed word is
identical on all ranks, so all of them act at the same step. To keep the ~0.3 ms gloo latency off
the critical path, ordinary steps start the all-reduce asynchronously and read its result at the
next step; steps that end with a decision everyone waits for (evaluation, the last step) exchange
synchronously. Which steps are synchronous is a pure function of the step number, so ranks agree.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as torch_dist

_BITS = 8


class Flag(enum.IntFlag):
    NONE = 0
    EARLY_STOP = 1
    PREEMPT = 2
    NON_FINITE = 4
    TIME_BUDGET = 8
    SAVE_NOW = 16

    @property
    def stops(self) -> bool:
        return bool(self & (Flag.EARLY_STOP | Flag.PREEMPT | Flag.NON_FINITE | Flag.TIME_BUDGET))


class StepAgreement:
    """Exchanges flags once per step over `group` (None = default group; nothing when world is 1)."""

    def __init__(self, group: torch_dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
        self._group = group
        self._device = device or torch.device("cpu")
        self._active = torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
        self._pending: tuple[torch_dist.Work, torch.Tensor] | None = None
        self.exchanges = 0

    def _start(self, flags: Flag) -> tuple[torch_dist.Work, torch.Tensor]:
        bits = torch.tensor([(int(flags) >> i) & 1 for i in range(_BITS)], dtype=torch.int32, device=self._device)
        work = torch_dist.all_reduce(bits, op=torch_dist.ReduceOp.MAX, group=self._group, async_op=True)
        assert work is not None
        self.exchanges += 1
        return work, bits

    @staticmethod
    def _finish(pending: tuple[torch_dist.Work, torch.Tensor]) -> Flag:
        work, bits = pending
        work.wait()
        return Flag(sum(int(b) << i for i, b in enumerate(bits.tolist())))

    def step(self, local: Flag, *, sync: bool) -> Flag:
        """Agreed flags: those raised at the previous (async) step, plus `local` now when `sync`.

        When the previous step's flags ask for an action (stop or save), this step's flags are
        exchanged synchronously too, so e.g. a non-finite loss at this very step is known before
        anything is saved.
        """
        if not self._active:
            return local
        agreed = Flag.NONE
        if self._pending is not None:
            agreed = self._finish(self._pending)
            self._pending = None
        if sync or agreed:
            return agreed | self._finish(self._start(local))
        self._pending = self._start(local)
        return agreed

    def drain(self) -> Flag:
        """Wait for an in-flight exchange (before leaving the loop, so no collective dangles)."""
        if self._pending is None:
            return Flag.NONE
        agreed = self._finish(self._pending)
        self._pending = None
        return agreed
