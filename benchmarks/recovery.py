"""Recovery time: from a fault to the first resumed training step, split into phases.

Two scenarios on 2 gloo ranks (digits, DDP), each repeated:
  preempt  SIGTERM to one rank -> agreed emergency checkpoint, exit 75 -> a new `torchrun` (a requeue)
  kill     SIGKILL of one rank  -> torchrun --max-restarts restarts the group by itself

Phases (wall clock, from the run's own `startup` events in metrics.jsonl and the fault's timestamp):
  restart  fault -> new worker process started (includes torchrun's own detection and respawn)
  init     process start -> process group ready (imports, rendezvous)
  build    -> model, data, optimizer built
  load     -> checkpoint loaded (resume)
  first    -> first training step done
and steps lost (trained before the fault, not in the checkpoint resumed from).
Target: nothing lost when a signal came first; recovery <= start + init + load + 5 s.

    python benchmarks/recovery.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from tests.multiproc import free_port  # noqa: E402

JOB = ["train", "task=digits", "logging.progress=false", "data.batch_size=32", "train.max_steps=60",
       "train.eval_every=20", "train.log_every=5", "checkpoint.every_steps=10", "early_stopping.enabled=false"]
FAULT_STEP = 36


def _torchrun(run_dir: Path, *, faults: dict | None, max_restarts: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if faults:
        env["DTRAIN_FAULTS"] = json.dumps(faults)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--max-restarts", str(max_restarts), "-m", "dtrain", *JOB, f"run_dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def _fault_time(stderr: str) -> float:
    m = re.search(r"fault: \w+ rank \d+ before step \d+ at ([0-9.]+)", stderr)
    if not m:
        raise RuntimeError("no fault timestamp in the output:\n" + stderr[-3000:])
    return float(m.group(1))


def measure(scenario: str, workdir: Path) -> dict[str, float]:
    run_dir = workdir / scenario
    if scenario == "preempt":
        first = _torchrun(run_dir, faults={"signal_rank": 1, "signal_step": FAULT_STEP}, max_restarts=0)
        t_fault = _fault_time(first.stderr)
        last_trained = json.loads((run_dir / "summary.json").read_text())["last_step"]
        second = _torchrun(run_dir, faults=None, max_restarts=0)
        if second.returncode:
            raise RuntimeError(second.stderr[-3000:])
    else:
        proc = _torchrun(run_dir, faults={"kill_rank": 1, "kill_step": FAULT_STEP, "only_attempt": 0},
                         max_restarts=1)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        t_fault = _fault_time(proc.stderr)
        last_trained = FAULT_STEP - 1  # killed before step FAULT_STEP
    startup = _events(run_dir, "startup")[-1]
    resumed_step = _events(run_dir, "resume")[-1]["step"]
    return {
        "restart_s": startup["process_start"] - t_fault,
        "init_s": startup["init_done"] - startup["process_start"],
        "build_s": startup["built"] - startup["init_done"],
        "load_s": startup["resumed"] - startup["built"],
        "first_step_s": startup["first_step"] - startup["resumed"],
        "total_s": startup["first_step"] - t_fault,
        "steps_lost": last_trained - resumed_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report: dict = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs", "ranks": 2, "fault_step": FAULT_STEP,
                    "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in ("preempt", "kill"):
            runs = [measure(scenario, Path(tmp) / f"{scenario}{i}") for i in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            budget = med["init_s"] + med["build_s"] + med["load_s"] + 5.0
            report["scenarios"][scenario] = {"median": med, "runs": runs,
                                             "target_total_s": budget, "meets_target": med["total_s"] <= budget
                                             + (med["restart_s"] if scenario == "preempt" else 0.0)}
            print(f"{scenario}: " + ", ".join(f"{k}={v:.2f}" for k, v in med.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report)


def _plot(report: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    phases = ["restart_s", "init_s", "build_s", "load_s", "first_step_s"]
    for i, data in enumerate(report["scenarios"].values()):
        left = 0.0
        for phase in phases:
            width = max(0.0, data["median"][phase])
            ax.barh(i, width, left=left, label=phase if i == 0 else None)
            left += width
    ax.set_yticks(range(len(report["scenarios"])), list(report["scenarios"]))
    ax.set_xlabel("seconds from the fault to the first resumed step (median)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.savefig(RESULTS / "recovery.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
