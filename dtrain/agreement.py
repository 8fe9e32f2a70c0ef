"""The one per-step agreement: every rank's stop/save reasons, OR-ed over ranks.

Each rank raises the flags it sees (its own signal, its own clock, its own loss); the agreed word is
identical on all ranks, so all of them act at the same step. A scalar gloo all-reduce costs about
0.3 ms here, several percent of a small model's step, so ordinary steps don't wait for it:

- pipelined: the flags of step t travel while step t+1 computes, and are read at step t+1;
- carried on DDP: with a DDP model, the flags of step t ride in the last gradient bucket of step
  t+1's backward (8 more numbers in an all-reduce that happens anyway), so no collective of their own;
- synchronous: steps that end with a decision (evaluation, checkpoint, the last step, and any step
  right after a raised flag) exchange at once, so e.g. a non-finite loss is known before a save.

Which steps are synchronous depends only on the step number and on already-agreed flags, so every
rank makes the same choice.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

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


def _bits(flags: Flag, dtype: torch.dtype = torch.int32, device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor([(int(flags) >> i) & 1 for i in range(_BITS)], dtype=dtype, device=device)


def _flag(bits: torch.Tensor) -> Flag:
    return Flag(sum(1 << i for i, b in enumerate(bits.tolist()) if b > 0))


class _GradientCarrier:
    """A DDP communication hook that appends the outgoing flags to the last gradient bucket.

    It does what DDP's default all-reduce does (divide by world size, SUM) on the gradients, and
    SUMs the flag slots, so any rank's 1 becomes non-zero everywhere.
    """

    def __init__(self, ddp: DistributedDataParallel) -> None:
        self.group = ddp.process_group
        self.world = torch_dist.get_world_size(self.group)
        self.outgoing = Flag.NONE
        self.incoming: Flag | None = None
        ddp.register_comm_hook(self, _carrier_hook)


def _carrier_hook(carrier, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations here
    grads = bucket.buffer()
    last = bucket.is_last()
    payload = torch.cat([grads, _bits(carrier.outgoing, grads.dtype, grads.device)]) if last else grads
    payload[: grads.numel()].div_(carrier.world)
    fut = torch_dist.all_reduce(payload, group=carrier.group, async_op=True).get_future()  # type: ignore[union-attr]

    def unpack(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = f.value()[0]
        if not last:
            return reduced
        carrier.incoming = _flag(reduced[grads.numel():])
        grads.copy_(reduced[: grads.numel()])
        return grads

    return fut.then(unpack)


class StepAgreement:
    """Agrees flags once per step over `group` (None = default group; a no-op when world is 1).

    Pass the DDP-wrapped model as `ddp` to carry the flags in its gradient all-reduce; then call
    `step()` once after every optimizer step (after backward), as the trainer does.
    """

    def __init__(self, group: torch_dist.ProcessGroup | None = None, device: torch.device | None = None,
                 ddp: DistributedDataParallel | None = None) -> None:
        self._group = group
        self._device = device or torch.device("cpu")
        self._active = torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
        self._pending: tuple[torch_dist.Work, torch.Tensor] | None = None
        self._carrier = _GradientCarrier(ddp) if (ddp is not None and self._active) else None
        self.exchanges = 0  # collectives of our own (not counting carried ones)

    def _start(self, flags: Flag) -> tuple[torch_dist.Work, torch.Tensor]:
        bits = _bits(flags, device=self._device)
        work = torch_dist.all_reduce(bits, op=torch_dist.ReduceOp.MAX, group=self._group, async_op=True)
        assert work is not None
        self.exchanges += 1
        return work, bits

    @staticmethod
    def _finish(pending: tuple[torch_dist.Work, torch.Tensor]) -> Flag:
        work, bits = pending
        work.wait()
        return _flag(bits)

    def _previous(self) -> Flag:
        """Flags sent at the previous step, now agreed."""
        if self._carrier is not None:
            agreed, self._carrier.incoming = self._carrier.incoming or Flag.NONE, None
            return agreed
        if self._pending is None:
            return Flag.NONE
        agreed = self._finish(self._pending)
        self._pending = None
        return agreed

    def step(self, local: Flag, *, sync: bool) -> Flag:
        """Agreed flags: those raised at the previous step, plus `local` now when `sync` (or when
        the previous step's flags ask for an action, so this step's flags are known before it)."""
        if not self._active:
            return local
        agreed = self._previous()
        if sync or agreed:
            if self._carrier is not None:
                self._carrier.outgoing = Flag.NONE
            return agreed | self._finish(self._start(local))
        if self._carrier is not None:
            self._carrier.outgoing = local
        else:
            self._pending = self._start(local)
        return agreed

    def drain(self) -> Flag:
        """Collect what is still in flight (before leaving the loop, so no collective dangles).
        Flags waiting to ride on a backward that will not happen are dropped: the loop is over."""
        if self._carrier is not None:
            self._carrier.outgoing = Flag.NONE
        return self._previous()
