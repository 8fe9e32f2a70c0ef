"""The disk that holds run_dir (and by default the checkpoints) full outside a checkpoint write:
at the very end of a run (summary.json, the exit records), while a run logs (train.log), and at its
start (run_dir, config.yaml, the checkpoint root's lease). Real `dtrain train` processes on small
tmpfs mounts; skipped where mounting is not allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import FAST, REPO
from tests.reliability.conftest import tmpfs

SMALL = [*FAST, "train.max_steps=4", "train.eval_every=100", "early_stopping.enabled=false"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "DTRAIN_"))}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending,code", [("finished", 0), ("preempted", 75)])
def test_a_disk_that_fills_at_the_end_keeps_the_exit_code(tmp_path: Path, ending: str, code: int) -> None:
    """summary.json and ranks/rank-*.json were written with Path.write_text: on a disk that filled
    after the last checkpoint committed, a finished run (0) or a preempted one whose emergency
    checkpoint was committed (75) crashed with an OSError traceback and exit 1, leaving an empty
    record behind (write_text creates the file, then cannot write it). Now each record is written
    whole or not at all, a failure is one logged error naming the file and the free space, and the
    exit code stays."""
    faults = {"DTRAIN_FAULTS": json.dumps({"signal_rank": 0, "signal_step": 2})} if ending == "preempted" else {}
    with tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        run_dir.mkdir()
        earlier = {"stopped_by": "completed", "exit_code": 0, "best_checkpoint": "an earlier start's"}
        (run_dir / "summary.json").write_text(json.dumps(earlier))
        proc = subprocess.run([sys.executable, "-m", "tests.reliability.fill_at_end", "train", *SMALL,
                               f"run_dir={run_dir}", f"checkpoint.root={tmp_path / 'ckpts'}"],
                              cwd=REPO, env=_env(**faults), capture_output=True, text=True, timeout=50)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        for name in ("summary.json", "ranks/rank-00000.json"):
            assert f"cannot write {run_dir / name} (OSError: [Errno 28] No space left on device)" in proc.stderr
        assert f"The storage under {run_dir} is full (0.0 MiB free now)" in proc.stderr, proc.stderr[-3000:]
        assert f"This rank exits {code} all the same" in proc.stderr
        # nothing half-written, no temp files
        assert sorted(p.name for p in run_dir.iterdir()) == ["ballast", "config.yaml", "metrics.jsonl", "ranks",
                                                             "summary.json", "train.log"]
        # the summary of an earlier start no longer speaks for this one: "running" since this start
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["stopped_by"], summary["exit_code"]) == ("running", None), summary
        # the start record stays whole: "running", as a crashed rank leaves it (launch/torchrun.sh then
        # goes by torchrun's own exit code)
        assert os.listdir(run_dir / "ranks") == ["rank-00000.json"]
        assert json.loads((run_dir / "ranks" / "rank-00000.json").read_text())["exit_code"] is None
        assert any(p.startswith("step-") for p in os.listdir(tmp_path / "ckpts"))  # the work is saved


def _fill(disk: Path) -> None:
    st = os.statvfs(disk)
    (disk / "ballast").write_bytes(b"\0" * (st.f_bavail * st.f_frsize))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("full", ["run_dir", "checkpoint.root"])
def test_a_full_disk_at_the_start_is_a_clear_error(tmp_path: Path, full: str) -> None:
    """A run started on a full disk crashed with a bare OSError traceback (config.yaml, written with
    write_text, left empty) or, on a full checkpoint root, said only 'OSError: [Errno 28]' with no
    file and no advice. Now: exit 1 (a failure: freeing space and running again resumes) with one
    line naming the file, the free space and what to do."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        _fill(disk)
        if full == "run_dir":
            run_dir, root = disk / "run", tmp_path / "ckpts"
            expected = (f"dtrain: error: cannot write {run_dir}/config.yaml (run_dir): OSError: [Errno 28] No space "
                        f"left on device. The storage under {run_dir} is full (0.0 MiB free now): free space there, "
                        f"or use a run_dir on a disk with room")
        else:
            run_dir, root = tmp_path / "run", disk / "ckpts"
            expected = (f"dtrain: error: checkpoint root {root} cannot be used: taking the lease "
                        f"{root}/.dtrain-lease.json: OSError: [Errno 28] No space left on device. The storage under "
                        f"{root} is full (0.0 MiB free now): free space there, or use a checkpoint.root with room")
        proc = subprocess.run([sys.executable, "-m", "dtrain", "train", *SMALL, f"run_dir={run_dir}",
                               f"checkpoint.root={root}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=50)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        written = disk / ("run" if full == "run_dir" else "ckpts")
        assert [p for p in os.listdir(written) if p.endswith(("config.yaml", ".tmp"))] == []  # nothing half-written


@pytest.mark.timeout(90)
def test_torchrun_sh_without_any_exit_record_exits_with_torchruns_code_and_says_why(tmp_path: Path) -> None:
    """launch/torchrun.sh reads the ranks' exit records because torchrun turns a worker's 75 into 1.
    When the disk filled at the end, no record was written: the script exited 1 saying nothing. It
    still exits 1 (nothing shows the work is saved, and a failure is the safe answer: Slurm
    requeues it after a warning signal, and the next start resumes), but now says why."""
    torchrun = Path(sys.executable).parent / "torchrun"
    wrapper = tmp_path / "torchrun-fill-at-end"  # the real torchrun, running the workers of fill_at_end
    wrapper.write_text(f"#!{sys.executable}\nimport os, sys\nargs = sys.argv[1:]\n"
                       f"args[args.index('-m') + 1] = 'tests.reliability.fill_at_end'\n"
                       f"os.execv({str(torchrun)!r}, [{str(torchrun)!r}, *args])\n")
    wrapper.chmod(0o755)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        env = _env(TORCHRUN=str(wrapper), CONFIG="configs/digits.yaml", RUN_DIR=str(run_dir), NPROC_PER_NODE="1",
                   MAX_RESTARTS="0", PYTHON=sys.executable,
                   DTRAIN_FAULTS=json.dumps({"signal_rank": 0, "signal_step": 2}))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        proc = subprocess.run([str(REPO / "launch" / "torchrun.sh"), *SMALL, f"checkpoint.root={tmp_path / 'ckpts'}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=80)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "This rank exits 75 all the same" in proc.stderr, proc.stderr[-3000:]
        assert (f"torchrun exited 1 and no rank of this attempt recorded an exit code under {run_dir}/ranks"
                in proc.stderr), proc.stderr[-3000:]
        assert any(p.startswith("step-") for p in os.listdir(tmp_path / "ckpts"))
