"""What a finished run leaves behind: summary.json (rank 0) and ranks/rank-NNNNN.json (every rank).

The trainer fills an `Outcome` while it runs and hands it here at the end; the per-rank files are
the proof (and the debugging aid) that all ranks agreed on where and why they stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain import exitcodes
from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.localfs import out_of_space, storage_full, write_atomic
from dtrain.config import JobConfig
from dtrain.dist import DistEnv
from dtrain.early_stopping import EarlyStopping

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Why the loop ended; becomes summary.json."""

    stopped_by: str = "max_steps"
    exit_code: int = exitcodes.OK
    last_step: int = 0
    resumed_from: str | None = None
    initialised_from: str | None = None  # checkpoint.init_from, resolved (a fresh fine-tuning run)
    final_metrics: dict[str, float] = field(default_factory=dict)


def _json_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics for strict JSON (jq, JavaScript): NaN and inf, which JSON has no numbers for, become null."""
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def attempt() -> int:
    """torchrun's restart count for this worker group (0 without torchrun): which attempt wrote a
    record. launch/torchrun.sh trusts only the records of the last attempt it ran."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def write_record(path: Path, text: str, exit_code: int | None) -> None:
    """Write a record of how the run (or this rank) ended, whole or not at all: temp name + rename, so
    a reader never sees half of one and a failed write leaves the previous one. A failure is logged,
    not raised: these are written after the last checkpoint committed (or its failure was raised),
    so a full disk at the very end must not turn exit 0 or 75 into a crash with exit 1.
    launch/torchrun.sh then finds this rank's start record ("running", as a crashed rank leaves it)
    and exits with torchrun's own code: nothing shows that the work is saved."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(str(path), str(path), text.encode("utf-8"))
    except OSError as e:
        hint = f". {storage_full(str(path.parent))}: free space there" if out_of_space(e) else ""
        if exit_code is None:  # the start record: the run goes on (prepare_run_dir reports a full disk)
            log.warning("cannot write %s (%s: %s)%s", path, type(e).__name__, e, hint)
            return
        log.error("cannot write %s (%s: %s)%s. This rank exits %d all the same: the checkpoints are not affected "
                  "(launch/torchrun.sh, which cannot tell, exits with torchrun's code)",
                  path, type(e).__name__, e, hint, exit_code)


def write_rank_record(run_dir: Path, rank: int, record: dict[str, Any]) -> None:
    """<run_dir>/ranks/rank-NNNNN.json: how this rank ended (launch/torchrun.sh reads `exit_code`)."""
    text = json.dumps({"rank": rank, "attempt": attempt(), **record}, allow_nan=False) + "\n"
    write_record(run_dir / "ranks" / f"rank-{rank:05d}.json", text, record["exit_code"])


def write_start_record(run_dir: Path, rank: int, world_size: int = 1) -> None:
    """The record says "running" (exit_code null) until this rank ends: a rank that dies leaves that
    behind, not the code an earlier attempt or run recorded (a 75 of an attempt that torchrun then
    restarted made launch/torchrun.sh report a later crash as "preempted, requeue me"). Rank 0 also
    removes the records of ranks this start does not have (a run resumed on fewer ranks): they told
    of an earlier start, and ranks/ would no longer show how this one's ranks ended, and rewrites
    summary.json as "running" too: where the final one could not be written (a full disk at the
    end), the summary of an earlier start (its "completed", its best checkpoint) spoke for this one."""
    write_rank_record(run_dir, rank, {"stopped_by": "running", "exit_code": None})
    if rank != 0:
        return
    write_run_summary(run_dir, {"stopped_by": "running", "exit_code": None, "world_size": world_size})
    for path in (run_dir / "ranks").glob("rank-*.json"):
        number = path.stem.removeprefix("rank-")
        if number.isdigit() and int(number) >= world_size:
            try:
                path.unlink()
            except OSError as e:  # only a stale record is left behind; the run goes on
                log.warning("cannot remove %s, the record of a rank this start does not have (%s)", path, e)


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Rank 0: <run_dir>/summary.json, how this start of the run is doing or ended, with its attempt."""
    text = json.dumps({**summary, "attempt": attempt()}, indent=2, allow_nan=False) + "\n"
    write_record(run_dir / "summary.json", text, summary["exit_code"])


def write_config_error(run_dir: Path, rank: int, error: str) -> None:
    """This rank's exit record for a config error, and on rank 0 summary.json ("running" since the start)."""
    record = {"stopped_by": "config_error", "exit_code": exitcodes.CONFIG_ERROR, "error": error}
    write_rank_record(run_dir, rank, record)
    if rank == 0:
        write_run_summary(run_dir, record)


def write_summary(outcome: Outcome, *, run_dir: Path, env: DistEnv, cfg: JobConfig,
                  early_stopping: EarlyStopping | None, checkpoints: CheckpointManager) -> None:
    """Every rank writes its own record; rank 0 also writes summary.json (the best checkpoint is
    looked up there only, so the other ranks do not scan the checkpoint root)."""
    write_rank_record(run_dir, env.rank, {"last_step": outcome.last_step, "stopped_by": outcome.stopped_by,
                                          "exit_code": outcome.exit_code,
                                          "final_metrics": _json_metrics(outcome.final_metrics)})
    if not env.is_main:
        return
    es = early_stopping
    best = checkpoints.best() if es is not None else None
    summary = {
        "stopped_by": outcome.stopped_by,
        "exit_code": outcome.exit_code,
        "last_step": outcome.last_step,
        "max_steps": cfg.train.max_steps,
        "monitor": es.monitor if es else None,
        "best_step": es.best_step if es else None,
        "best_metric": es.best if es and es.best is not None and math.isfinite(es.best) else None,
        "best_checkpoint": best.url if best else None,
        "resumed_from": outcome.resumed_from,
        "initialised_from": outcome.initialised_from,
        "final_metrics": _json_metrics(outcome.final_metrics),
        "world_size": env.world_size,
        "strategy": cfg.parallel.strategy,
    }
    write_run_summary(run_dir, summary)
    log.info("summary: %s", json.dumps({k: summary[k] for k in ("stopped_by", "last_step", "best_step",
                                                               "best_metric")}))
