"""Small models, optimizers and training steps shared by the checkpoint tests (importable by
spawned workers, so kept at module level)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Counter:
    """A stateful component with a JSON-able state_dict, like a sampler."""

    def __init__(self) -> None:
        self.seen = 0
        self.best = float("inf")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.best = state["seen"], state["best"]


def make_model(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, 4))


def make_all(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any, Counter]:
    m = make_model(seed)
    o = torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)
    s = torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5)
    return m, o, s, Counter()


def train(m: nn.Module, o: torch.optim.Optimizer, s: Any, c: Counter, steps: int, data_seed: int) -> None:
    g = torch.Generator().manual_seed(data_seed)
    m.train()
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        m(x).pow(2).mean().backward()  # dropout draws from the global torch RNG
        o.step()
        o.zero_grad()
        s.step()
        c.seen += 8


def assert_same(a: dict[str, Any], b: dict[str, Any], where: str = "") -> None:
    """Bitwise equality of (nested) state dicts."""
    assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, (where, k)
            assert torch.equal(x, y), (where, k)
        elif isinstance(x, dict):
            assert_same(x, y, f"{where}.{k}")
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
                assert_same(xi, yi, f"{where}.{k}[{i}]")
        else:
            assert x == y, (where, k, x, y)
