"""Samplers whose position is global, so a run can resume mid-epoch on any number of ranks.

`ResumableDistributedSampler` feeds training: its state is (epoch, samples consumed in the epoch's
global order), never a per-rank position, so a checkpoint taken on 4 ranks resumes on 2 with the same
global batches and no sample repeated or skipped. `ShardedEvalBatches` splits the validation set so
every sample is evaluated exactly once and every rank runs the same number of forward passes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from dtrain.errors import ConfigError, DtrainError

log = logging.getLogger(__name__)


def epoch_order(dataset_len: int, seed: int, epoch: int) -> list[int]:
    """The global sample order of one epoch: a permutation that depends on seed + epoch only."""
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(dataset_len, generator=gen).tolist()


class ResumableDistributedSampler:
    """Yields this rank's micro-batches forever; the trainer calls `advance` after each optimizer step.

    One optimizer step consumes `global_batch_size` consecutive indices of the epoch order. They are
    split into `grad_accum` micro-steps, and each micro-step's indices into `world_size` contiguous
    slices, rank r taking slice r. The union over ranks of one step is therefore the same for any
    world size. With `drop_last` the tail of an epoch shorter than a global batch is skipped;
    without it the last global batch is filled up with indices from the start of the same epoch.
    Use it as `DataLoader(dataset, batch_sampler=sampler)`.
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        drop_last: bool = True,
    ) -> None:
        _check_sizes(dataset_len, global_batch_size, grad_accum, world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside [0, world_size={world_size})")
        self.dataset_len = dataset_len
        self.global_batch_size = global_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0
        # the global batch of the checkpoint this sampler resumed from (None: a fresh start); the
        # order continues batch for batch only when it equals global_batch_size
        self.saved_global_batch_size: int | None = None

    @property
    def micro_batch_size(self) -> int:
        """Samples one rank processes in one micro-step."""
        return self.global_batch_size // (self.grad_accum * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        if self.drop_last:
            return self.dataset_len // self.global_batch_size
        return math.ceil(self.dataset_len / self.global_batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Global samples consumed by one epoch (a multiple of the global batch size)."""
        return self.steps_per_epoch * self.global_batch_size

    @property
    def epoch_float(self) -> float:
        """Epoch plus the fraction of the current epoch already consumed, for logging."""
        return self.epoch + self.consumed / self.samples_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, pos = self.epoch, self.consumed
        micro = self.micro_batch_size
        per_micro_step = micro * self.world_size
        while True:
            order = self._padded_order(epoch)
            while pos < self.samples_per_epoch:
                for k in range(self.grad_accum):
                    start = pos + k * per_micro_step + self.rank * micro
                    yield order[start : start + micro]
                pos += self.global_batch_size
            epoch, pos = epoch + 1, 0

    def _padded_order(self, epoch: int) -> list[int]:
        order = epoch_order(self.dataset_len, self.seed, epoch)
        missing = self.samples_per_epoch - len(order)
        return order + order[:missing] if missing > 0 else order

    def advance(self, n_global_samples: int) -> None:
        """Record that one or more optimizer steps consumed `n_global_samples` samples."""
        if n_global_samples < 0 or n_global_samples % self.global_batch_size:
            raise DtrainError(
                f"advance({n_global_samples}): expected a multiple of the global batch size "
                f"{self.global_batch_size}"
            )
        self.consumed += n_global_samples
        while self.consumed >= self.samples_per_epoch:
            self.consumed -= self.samples_per_epoch
            self.epoch += 1

    def state_dict(self) -> dict[str, int]:
        """JSON-able global position; identical on every rank."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the world size and grad accumulation may differ."""
        missing = {"epoch", "consumed", "dataset_len"} - set(state)
        if missing:
            raise ConfigError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        if int(state["dataset_len"]) != self.dataset_len:
            raise ConfigError(
                f"sampler state was saved for a dataset of {state['dataset_len']} samples, but the "
                f"dataset now has {self.dataset_len}: resume with the same data, or start a new run"
            )
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            log.warning("sampler seed %d in the checkpoint overrides the configured %d", seed, self.seed)
            self.seed = seed
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        saved_gbs = int(state.get("global_batch_size", self.global_batch_size))
        if consumed % self.global_batch_size:
            rounded = consumed - consumed % self.global_batch_size
            log.warning(
                "global batch size changed from %d to %d: %d consumed samples is not a multiple, "
                "rounding down to %d (up to %d samples of epoch %d are seen twice)",
                saved_gbs, self.global_batch_size, consumed, rounded, consumed - rounded, epoch,
            )
            consumed = rounded
        if consumed >= self.samples_per_epoch:
            epoch, consumed = epoch + 1, 0
        self.epoch, self.consumed = epoch, consumed
        self.saved_global_batch_size = saved_gbs


class ShardedEvalBatches:
    """Per-rank evaluation batches that cover the whole set once, the same number on every rank.

    Evaluation step s covers indices [s*B*W, (s+1)*B*W) in order; they are split into `world_size`
    equal contiguous slices of at most `batch_size`. A rank whose slice is short (only at the end) is
    padded by repeating an index, so all ranks run every forward pass (FSDP needs that). Yields
    (indices, n_valid): only the first n_valid entries count when summing metrics.
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int, world_size: int) -> None:
        if dataset_len < 1:
            raise ConfigError("the validation set is empty: evaluation needs at least one sample")
        if batch_size < 1:
            raise ConfigError(f"eval batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside [0, world_size={world_size})")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return math.ceil(self.dataset_len / (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[tuple[list[int], int]]:
        per_step = self.batch_size * self.world_size
        for start in range(0, self.dataset_len, per_step):
            end = min(start + per_step, self.dataset_len)
            size = math.ceil((end - start) / self.world_size)
            lo = min(start + self.rank * size, end)
            hi = min(lo + size, end)
            indices = list(range(lo, hi))
            n_valid = len(indices)
            filler = indices[0] if indices else start
            yield indices + [filler] * (size - n_valid), n_valid

    def index_batches(self) -> list[list[int]]:
        """Only the index lists, e.g. for `DataLoader(batch_sampler=...)`; pair with `valid_counts`."""
        return [indices for indices, _ in self]

    def valid_counts(self) -> list[int]:
        """n_valid of each batch, in the order of `index_batches`."""
        return [n for _, n in self]


def _check_sizes(dataset_len: int, global_batch_size: int, grad_accum: int, world_size: int) -> None:
    if global_batch_size < 1 or grad_accum < 1 or world_size < 1:
        raise ConfigError(
            f"global batch size ({global_batch_size}), grad accumulation ({grad_accum}) and world "
            f"size ({world_size}) must all be >= 1"
        )
    if global_batch_size % (grad_accum * world_size):
        raise ConfigError(
            f"global batch size {global_batch_size} is not divisible by grad_accum ({grad_accum}) x "
            f"world size ({world_size}) = {grad_accum * world_size}: choose a global batch size that "
            f"is a multiple of {grad_accum * world_size}"
        )
    if dataset_len < global_batch_size:
        raise ConfigError(
            f"the training set has {dataset_len} samples, fewer than one global batch of "
            f"{global_batch_size}: lower the global batch size or use more data"
        )
