"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each block is sharded on its own so only one block's parameters are gathered at a time; the root is
sharded last to catch the remaining parameters (embeddings, head).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dtrain.config import ParallelConfig
from dtrain.dist import DistEnv

log = logging.getLogger(__name__)


def wrap_fsdp(model: nn.Module, cfg: ParallelConfig, env: DistEnv, blocks: list[nn.Module]) -> nn.Module:
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and env.device.type == "cuda")
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    log.info("FSDP2 over %d ranks: %d blocks + root, params %s", env.world_size, len(blocks),
             "bf16/reduce fp32" if bf16 else "fp32")
    return model
