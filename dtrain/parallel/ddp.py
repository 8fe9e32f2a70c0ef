"""DistributedDataParallel: every rank holds the full model, gradients are all-reduced."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtrain.dist import DistEnv

# torch 2.13 renamed broadcast_buffers (now deprecated, with a FutureWarning on every start) to
# forward_sync_buffers; older versions only have the first
_NO_FORWARD_SYNC: dict[str, Any] = ({"forward_sync_buffers": False}
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                    else {"broadcast_buffers": False})


def wrap_ddp(model: nn.Module, env: DistEnv) -> DistributedDataParallel:
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # No buffer broadcast in forward: it would be a collective inside evaluation, where ranks may
    # run different batch counts. (Buffers are the same on every rank at the start anyway.)
    return DistributedDataParallel(model, device_ids=device_ids, **_NO_FORWARD_SYNC)
