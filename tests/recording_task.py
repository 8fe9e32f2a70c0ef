"""The digits task, recording what each rank trains on: for tests that follow samples across restarts.

With DTRAIN_TEST_RECORD=<dir>, every micro-batch appends one JSON line to <dir>/rank-R.jsonl: the world
size, the training-set indices of the batch and one number drawn from the global torch RNG (the stream
dropout would use). The model, data and losses are digits' own, so runs match plain digits runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import Dataset

from dtrain.models import digits
from dtrain.tasks import Task


class Indexed(Dataset):
    """A dataset whose samples also carry their index."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.inner[i]
        return x, y, i


def build_datasets(cfg: digits.DigitsDataConfig, seed: int) -> tuple[Dataset, Dataset]:
    train, val = digits.build_datasets(cfg, seed)
    return Indexed(train), val


def train_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y, idx = batch
    draw = float(torch.rand(()))
    out = os.environ.get("DTRAIN_TEST_RECORD")
    if out:
        rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
        world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        with (Path(out) / f"rank-{rank}.jsonl").open("a") as f:
            f.write(json.dumps({"world": world, "idx": idx.tolist(), "rand": draw}) + "\n")
    return digits.train_loss(model, (x, y))


def take_records(out: Path) -> dict[int, list[dict[str, Any]]]:
    """rank -> its records since the last call (the files are removed, so the next run starts empty)."""
    records = {}
    for path in sorted(out.glob("rank-*.jsonl")):
        records[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
    return records


TASK = Task(name="recording", model_config=digits.DigitsModelConfig, data_config=digits.DigitsDataConfig,
            build_model=digits.build_model, build_datasets=build_datasets, train_loss=train_loss,
            eval_per_sample=digits.eval_per_sample)
