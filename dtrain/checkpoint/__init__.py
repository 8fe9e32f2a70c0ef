"""Rank-aware sharded checkpoints: safetensors files per rank, manifest.json written last.

    mgr = CheckpointManager("s3://bucket/run/checkpoints", async_save=True, keep_last_n=3)
    mgr.save(step, model=model, optimizer=opt, stateful={"scheduler": sched}, metrics={"val/loss": v})
    mgr.restore_latest(model=model, optimizer=opt, stateful={"scheduler": sched})
"""

from __future__ import annotations

from dtrain.checkpoint.format import CheckpointDamagedError, Manifest
from dtrain.checkpoint.manager import CheckpointManager, load_model
from dtrain.checkpoint.retention import CheckpointInfo
from dtrain.checkpoint.tools import TensorInfo, export, inspect, list_checkpoints, prune, verify

__all__ = [
    "CheckpointDamagedError",
    "CheckpointInfo",
    "CheckpointManager",
    "Manifest",
    "TensorInfo",
    "export",
    "inspect",
    "list_checkpoints",
    "load_model",
    "prune",
    "verify",
]
