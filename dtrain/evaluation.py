"""Evaluation over the WHOLE validation set, sharded over ranks, with one all-reduce of sums and
counts at the end, so every rank holds bit-identical metric values."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain import dist
from dtrain.data import ShardedEvalBatches
from dtrain.errors import DtrainError
from dtrain.tasks import to_device


def _collate(dataset: Dataset, indices: list[int]) -> Any:
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def _check_per_sample(values: dict[str, torch.Tensor], batch: int) -> None:
    """One value per sample, or the padding cannot be masked and the means are wrong: a batch mean
    (shape []) failed with an IndexError, one of shape [1] was silently counted as one sample's."""
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or value.ndim < 1 or value.shape[0] != batch or value.numel() != batch:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DtrainError(
                f"the task's eval_per_sample returned {name!r} of shape {shape} for a batch of {batch} samples; "
                f"it must return one value per sample, shape ({batch},) (e.g. F.cross_entropy(logits, y, "
                f"reduction='none'), not the batch mean)")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    per_sample: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Returns {"val/<name>": mean over the whole set} for each per-sample value the task reports
    (over each rank's first `max_batches` batches when given: a sanity check, not a metric).

    Every rank runs the same number of batches (padding is masked out), because an FSDP forward is
    itself a collective.
    """
    env = dist.env()
    batches = ShardedEvalBatches(len(dataset), batch_size, env.rank, env.world_size)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    names: list[str] | None = None
    sums: torch.Tensor | None = None
    count = 0
    try:
        for i_batch, (indices, n_valid) in enumerate(batches):
            if max_batches is not None and i_batch >= max_batches:  # the same count on every rank
                break
            batch = to_device(_collate(dataset, indices), device)
            with autocast or contextlib.nullcontext():
                values = per_sample(model, batch)
            _check_per_sample(values, len(indices))
            if names is None:
                names = sorted(values)
                sums = torch.zeros(len(names) + 1, dtype=torch.float64)
            assert sums is not None
            for i, name in enumerate(names):
                sums[i] += values[name][:n_valid].double().sum().cpu()
            count += n_valid
    finally:
        model.train(was_training)
    if names is None or sums is None:  # an empty validation set on every rank
        return {}
    sums[-1] = count
    if env.backend == "nccl":
        sums = sums.to(device)
    dist.all_reduce_sum_(sums)
    total = float(sums[-1].item())
    return {f"val/{name}": float(sums[i].item()) / total for i, name in enumerate(names)}
