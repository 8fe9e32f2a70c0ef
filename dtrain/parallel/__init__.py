"""Parallel strategies: wrap a model for `none | ddp | fsdp` and unwrap it for evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from dtrain.config import ParallelConfig
from dtrain.dist import DistEnv
from dtrain.errors import ConfigError

log = logging.getLogger(__name__)


def wrap_model(
    model: nn.Module, cfg: ParallelConfig, env: DistEnv, blocks: Callable[[nn.Module], list[nn.Module]]
) -> nn.Module:
    """Move the model to the device and apply the configured strategy.

    With one process there is nothing to replicate or shard, so every strategy runs the plain
    module; checkpoints stay loadable across strategies because their keys never carry wrappers.
    """
    model = model.to(env.device)
    if cfg.strategy == "none" and env.world_size > 1:
        raise ConfigError(
            f"parallel.strategy='none' trains one process, but this job has {env.world_size} ranks; "
            "use parallel.strategy=ddp or fsdp"
        )
    if env.world_size == 1 or cfg.strategy == "none":
        return model
    if cfg.strategy == "ddp":
        from dtrain.parallel.ddp import wrap_ddp

        return wrap_ddp(model, env)
    from dtrain.parallel.fsdp import wrap_fsdp

    return wrap_fsdp(model, cfg, env, blocks(model))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

