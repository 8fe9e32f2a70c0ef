"""DistributedDataParallel: every rank holds the full model, gradients are all-reduced."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtrain.dist import DistEnv


def wrap_ddp(model: nn.Module, env: DistEnv) -> DistributedDataParallel:
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # broadcast_buffers=False: our example models have no running buffers, and a forward-time
    # broadcast would be a collective inside evaluation, where ranks may run different batch counts.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
