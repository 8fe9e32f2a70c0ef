"""launch/slurm.sbatch on a real one-node Slurm: warned mid-run, it checkpoints, requeues and resumes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster
from tests.launch import FAST, read_jsonl, summary
from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm.sbatch"
MAX_STEPS = 300

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]


def _submit(slurm: SlurmCluster, run_dir: Path, log: Path, *overrides: str) -> int:
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out = slurm.cmd(
        "sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", f"--cpus-per-task={slurm.cpus}",
        "--mem=4G", "--time=10:00", "--job-name=dtrain-test",
        f"--export=ALL,PATH={env_path},PYTHONPATH={REPO},CONFIG=configs/digits.yaml,RUN_DIR={run_dir},"
        # a free rendezvous port: the script's default (29400 + job id % 1000) collides with
        # another one-node cluster on this host, whose first job also has id 1
        f"NPROC_PER_NODE=2,SHUTDOWN_TIMEOUT=60,OMP_NUM_THREADS=1,RDZV_PORT={free_port()}",
        str(SBATCH), *overrides)
    return int(out.strip().split(";")[0])


def _job_if(slurm: SlurmCluster, job_id: int, **want: str) -> dict[str, str] | None:
    """The job's record when every field in `want` has the value given ("1+" = at least 1), else None."""
    job = slurm.job(job_id)
    for key, value in want.items():
        have = job.get(key, "")
        ok = int(have or 0) >= int(value[:-1]) if value.endswith("+") else have in value.split("|")
        if not ok:
            return None
    return job


def _train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_jsonl(path) if "train/loss" in r]


@pytest.mark.timeout(600)
def test_usr1_warning_checkpoints_requeues_and_resumes(slurm: SlurmCluster, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = _submit(slurm, run_dir, log, f"train.max_steps={MAX_STEPS}", "train.eval_every=20",
                     "early_stopping.enabled=false", *FAST)

    # Warn only once training makes progress: a signal before the workers' Python runs dtrain kills them.
    slurm.wait_for("training progress in metrics.jsonl", lambda: any(s >= 40 for s in _train_steps(run_dir)),
                   timeout=120)
    first = slurm.job(job_id)
    assert first["JobState"] == "RUNNING", first
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job_id))

    # The requeued job waits for its BeginTime; release it early.
    requeued = slurm.wait_for("the job to be requeued",
                              lambda: _job_if(slurm, job_id, Restarts="1+", JobState="PENDING"), timeout=120)
    preempted = summary(run_dir)
    assert preempted["stopped_by"] == "preempted" and preempted["exit_code"] == 75, preempted
    assert 0 < preempted["last_step"] < MAX_STEPS
    ckpt = run_dir / "checkpoints" / f"step-{preempted['last_step']:09d}"
    assert (ckpt / "manifest.json").exists(), f"no committed emergency checkpoint at {ckpt}"
    # slurmd refuses job credentials issued in the same second as the requeue's revocation ("Job
    # credential revoked"), which is why Slurm delays requeued jobs; 2 s is enough for that.
    slurm.cmd("scontrol", "update", f"jobid={job_id}", "StartTime=now+2")

    done = slurm.wait_for("the requeued job to finish",
                          lambda: _job_if(slurm, job_id, JobState="COMPLETED|FAILED|CANCELLED|TIMEOUT"), timeout=180)
    text = log.read_text()
    assert done["JobState"] == "COMPLETED", f"{done}\n{text[-4000:]}\n{slurm.logs(60)}"
    assert done["Restarts"] == "1", done
    assert requeued["Reason"] in ("BeginTime", "None"), requeued

    final = summary(run_dir)
    assert final["exit_code"] == 0 and final["stopped_by"] == "max_steps", final
    assert final["last_step"] == MAX_STEPS
    assert final["resumed_from"] and f"step-{preempted['last_step']:09d}" in final["resumed_from"], final
    resumes = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [preempted["last_step"]], resumes

    # One log file holds both attempts (--open-mode=append); the second knows it is a restart.
    assert "attempt 0" in text and "attempt 1" in text, text[-4000:]
    assert "requeueing job" in text and text.count("training step exited 75") == 1, text[-4000:]
    assert json.loads((run_dir / "ranks" / "rank-00001.json").read_text())["last_step"] == MAX_STEPS


@pytest.mark.timeout(30)
def test_a_dtrain_home_without_the_launcher_exits_2_naming_it(tmp_path: Path) -> None:
    """sbatch runs a copy of the script, which finds the checkout through DTRAIN_HOME (or the
    submit directory); one without launch/torchrun.sh used to end in srun's 'execve: No such file'."""
    import subprocess

    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "x", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_NUM_NODES": "1", "DTRAIN_HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done
    assert f"DTRAIN_HOME={tmp_path} has no launch/torchrun.sh" in done.stdout, done
