"""The config checks that need no process group, data, checkpoint or torch.

Every worker makes them before it joins the group, and launch/torchrun.sh before torchrun starts,
so a bad config exits 2 at once instead of after torchrun's in-place restarts. Without torch (the
option types of the built-in tasks live apart from their models), the launcher's check takes a
fraction of a second instead of the 2-3 s that importing torch added to every start.
"""

from __future__ import annotations

from dtrain.config import JobConfig, check_world_size
from dtrain.errors import ConfigError
from dtrain.tasks import make_options, task_options


def check_task_options(cfg: JobConfig) -> None:
    """Task name and its model/data options are checked before any process group starts."""
    model_config, data_config = task_options(cfg.task)
    make_options(model_config, cfg.model, "model")
    make_options(data_config, cfg.data.options, "data.options")


def check_backend(backend: str) -> None:
    """A backend this machine cannot run is a config no restart fixes: ConfigError (exit 2), not 1.
    Only 'nccl' asks torch (is CUDA there?)."""
    if backend != "nccl":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("dist.backend='nccl' needs CUDA, and none is available; use 'auto' or 'gloo'")


def check_before_start(cfg: JobConfig, world_size: int | None) -> None:
    """The task and its options, the batch split over `world_size` ranks (None where it is not known
    before the rendezvous) and the backend."""
    check_task_options(cfg)
    if world_size is not None:
        check_world_size(cfg, world_size)
    check_backend(cfg.dist.backend)
