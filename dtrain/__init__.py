"""dtrain: distributed PyTorch training that never loses work.

The public API for users who keep their own training loop (see README, "Use dtrain in your own loop"):

    env = dtrain.init()                      # process group from torchrun / Slurm / nothing
    ckpt = dtrain.CheckpointManager(root)    # sharded safetensors checkpoints, manifest last
    stopper = dtrain.EarlyStopping(...)      # Keras/Lightning semantics, no collectives inside
    with dtrain.PreemptionHandler() as preempt:  # installed on entry: signals only set a flag
    agreed = dtrain.StepAgreement().step(flags, sync=True)   # one collective per step
    sampler = dtrain.ResumableDistributedSampler(...)
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing costs milliseconds, and `python -m dtrain train` imports this first
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "init": "dtrain.dist",
    "shutdown": "dtrain.dist",
    "distributed": "dtrain.dist",
    "barrier": "dtrain.dist",
    "is_main_process": "dtrain.dist",
    "DistEnv": "dtrain.dist",
    "agree_any": "dtrain.dist",
    "all_reduce_mean": "dtrain.dist",
    "Flag": "dtrain.agreement",
    "StepAgreement": "dtrain.agreement",
    "CheckpointManager": "dtrain.checkpoint",
    "load_model": "dtrain.checkpoint",
    "EarlyStopping": "dtrain.early_stopping",
    "PreemptionHandler": "dtrain.preemption",
    "ResumableDistributedSampler": "dtrain.data",
    "Task": "dtrain.tasks",
    "register_task": "dtrain.tasks",
    "JobConfig": "dtrain.config",
    "load_config": "dtrain.config",
    "train": "dtrain.run",
    "exitcodes": "dtrain.exitcodes",
    "DtrainError": "dtrain.errors",
    "ConfigError": "dtrain.errors",
    "CheckpointError": "dtrain.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Lazy exports: `import dtrain` stays cheap and import-order safe."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
    if name == "exitcodes":
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)
