"""Train your own model and data with dtrain: define a Task, register it, run the trainer.

A Task is four functions and two option dataclasses; dtrain does the rest (DDP/FSDP, the resumable
sampler, whole-set evaluation, checkpoints, early stopping, preemption). Here: an MLP classifying
points of three interleaved spirals, synthetic data fixed by `data.data_seed`.

    python examples/custom_task.py                                  # one process
    torchrun --nproc-per-node 2 examples/custom_task.py             # two processes, DDP
    python examples/custom_task.py optim.lr=3e-3 model.hidden=128   # any config override

Without this script, the `dtrain` command finds the task by import path:

    PYTHONPATH=examples dtrain train task=custom_task:TASK data.options.n_train=4000
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.tasks import Task, register_task

# Both the data and the model's output layer depend on it, and each builder sees only its own
# options, so it is fixed here rather than an option of one of them.
NUM_CLASSES = 3


@dataclass
class SpiralModelConfig:  # becomes the config's `model:` section; every field needs a default
    hidden: int = 64
    depth: int = 2


@dataclass
class SpiralDataConfig:  # becomes `data.options:`
    n_train: int = 3000
    n_val: int = 600
    noise: float = 0.15
    data_seed: int = 0  # the data stay fixed when the run's seed changes


def make_spirals(n: int, cfg: SpiralDataConfig, gen: torch.Generator) -> TensorDataset:
    """`n` 2-D points on NUM_CLASSES noisy spiral arms, labelled by arm."""
    labels = torch.randint(NUM_CLASSES, (n,), generator=gen)
    radius = torch.rand(n, generator=gen)
    angle = labels * (2 * math.pi / NUM_CLASSES) + 3 * radius + cfg.noise * torch.randn(n, generator=gen)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return TensorDataset(points, labels)


def build_model(cfg: SpiralModelConfig) -> nn.Module:
    layers: list[nn.Module] = []
    width = 2
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))


def build_datasets(cfg: SpiralDataConfig, seed: int) -> tuple[TensorDataset, TensorDataset]:
    # Every rank calls this and must get the same data: use a seeded generator, never global RNG.
    gen = torch.Generator().manual_seed(cfg.data_seed)
    return make_spirals(cfg.n_train, cfg, gen), make_spirals(cfg.n_val, cfg, gen)


def train_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch  # already on the training device
    return F.cross_entropy(model(x), y)


def eval_per_sample(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    # One value per sample: the trainer drops padding and averages over the whole validation set.
    x, y = batch
    logits = model(x).float()
    return {"loss": F.cross_entropy(logits, y, reduction="none"), "acc": (logits.argmax(-1) == y).float()}


TASK = register_task(
    Task(
        name="spirals",
        model_config=SpiralModelConfig,
        data_config=SpiralDataConfig,
        build_model=build_model,
        build_datasets=build_datasets,
        train_loss=train_loss,
        eval_per_sample=eval_per_sample,
        # fsdp_blocks=lambda m: [...],  # submodules to shard one by one under parallel.strategy=fsdp
    )
)

DEFAULTS = [
    "task=spirals",
    "run_dir=runs/spirals",
    "data.batch_size=64",
    "optim.lr=1e-2",
    "train.max_steps=600",
    "train.eval_every=50",
    "train.log_every=50",
    "early_stopping.enabled=true",
    "early_stopping.monitor=val/loss",
    "early_stopping.patience=4",
]


def main(overrides: list[str]) -> int:
    from dtrain.config import load_config
    from dtrain.run import run

    cfg = load_config(None, DEFAULTS + overrides)  # later overrides win
    return run(cfg)  # the exit code says why it stopped (0 done, 75 preempted: requeue)


if __name__ == "__main__":  # the guard matters: torchrun and spawned helpers import this file
    sys.exit(main(sys.argv[1:]))
