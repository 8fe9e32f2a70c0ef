"""Built-in task "digits": a small CNN on scikit-learn's 8x8 handwritten digits (ships with it).

The tutorial's task done right: a real image dataset with a stratified, fixed train/validation split
(the split does not move when the training seed does), inputs normalised with statistics of the
training split only, and per-sample loss and accuracy so the whole validation set is measured exactly.
By default only part of the training split is used and there is no dropout, so the model learns in a
few hundred steps and then overfits: the demo's early stopping on val/loss has something to catch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.errors import ConfigError
from dtrain.models.options import DigitsDataConfig, DigitsModelConfig
from dtrain.tasks import Task

NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """conv-relu, conv-relu, 2x2 max-pool, then a two-layer MLP head; input [B, 1, 8, 8]."""

    def __init__(self, cfg: DigitsModelConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(2 * c * 4 * 4, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def build_model(cfg: DigitsModelConfig) -> nn.Module:
    if cfg.channels < 1 or cfg.hidden < 1:
        raise ConfigError(f"model.channels ({cfg.channels}) and model.hidden ({cfg.hidden}) must be >= 1")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    return DigitsCNN(cfg)


def split_indices(labels: torch.Tensor, cfg: DigitsDataConfig) -> tuple[list[int], list[int]]:
    """Stratified (train, val) indices into the full dataset, fixed by `cfg.split_seed`."""
    from sklearn.model_selection import train_test_split

    all_idx = list(range(len(labels)))
    y = labels.tolist()
    rest, val = train_test_split(all_idx, test_size=cfg.val_fraction, stratify=y, random_state=cfg.split_seed)
    if cfg.train_fraction < 1.0:
        rest_y = [y[i] for i in rest]
        rest, _ = train_test_split(
            rest, train_size=cfg.train_fraction, stratify=rest_y, random_state=cfg.split_seed
        )
    return sorted(rest), sorted(val)


def build_datasets(cfg: DigitsDataConfig, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) TensorDatasets of ([1, 8, 8] float32, int64 label); `seed` is not used."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = split_indices(labels, cfg)
    train_x = images[train_idx]
    mean, std = train_x.mean(), train_x.std()
    normalise = lambda x: (x - mean) / std  # noqa: E731
    return (
        TensorDataset(normalise(train_x), labels[train_idx]),
        TensorDataset(normalise(images[val_idx]), labels[val_idx]),
    )


def train_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def eval_per_sample(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x).float()
    return {
        "loss": F.cross_entropy(logits, y, reduction="none"),
        "acc": (logits.argmax(dim=-1) == y).float(),
    }


TASK = Task(
    name="digits",
    model_config=DigitsModelConfig,
    data_config=DigitsDataConfig,
    build_model=build_model,
    build_datasets=build_datasets,
    train_loss=train_loss,
    eval_per_sample=eval_per_sample,
)
