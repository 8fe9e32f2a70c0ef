"""Run `dtrain` as users do: a subprocess, under torchrun for several ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A small, fast digits job: ~1 s of compute per 50 steps on 2 cores.
FAST = ["task=digits", "logging.progress=false", "data.batch_size=32", "data.eval_batch_size=128",
        "train.log_every=5", "scheduler.warmup_steps=0", "scheduler.decay=constant"]


def dtrain(args: list[str], *, nproc: int = 1, env: dict[str, str] | None = None, timeout: float = 120,
           max_restarts: int = 0, torchrun: bool = False) -> subprocess.CompletedProcess[str]:
    """`dtrain ARGS` (nproc == 1 and not torchrun) or `torchrun --nproc-per-node N -m dtrain ARGS`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    full_env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, "-m", "dtrain", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
               "--max-restarts", str(max_restarts), "-m", "dtrain", *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value; a resumed run's later lines win, as in the plot."""
    out: dict[int, float] = {}
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def rank_summaries(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]
