"""examples/own_loop.py run as a user would: 2 ranks under torchrun, a real SIGTERM mid-run, a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dtrain import exitcodes
from dtrain.checkpoint import CheckpointManager, list_checkpoints
from dtrain.models import digits
from tests.launch import BIN, REPO
from tests.multiproc import free_port

pytestmark = pytest.mark.multiprocess


def _start(ckpt: Path) -> subprocess.Popen[str]:
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "examples/own_loop.py", "--ckpt", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(kids)


def _final_model(ckpt: Path) -> dict[str, torch.Tensor]:
    model = digits.build_model(digits.DigitsModelConfig())
    CheckpointManager(str(ckpt)).load(list_checkpoints(str(ckpt))[-1], model=model)
    return model.state_dict()


@pytest.mark.timeout(240)
def test_own_loop_preempted_by_sigterm_resumes_to_the_same_weights(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    proc = _start(ref)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at step" in out and "exit code 0" in out

    run = tmp_path / "run"
    proc = _start(run)
    deadline = time.monotonic() + 90
    while not (run / "step-000000040" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # one rank is told; all must agree, save and exit 75
    out, _ = proc.communicate(timeout=120)
    assert f"exit code {exitcodes.PREEMPTED}" in out, out
    steps = [i.step for i in list_checkpoints(str(run)) if i.committed]
    assert steps and steps[-1] > 40
    assert steps[-1] < max(i.step for i in list_checkpoints(str(ref))), "stopped before the end"

    proc = _start(run)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exit code 0" in out, out
    a, b = _final_model(ref), _final_model(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_example_is_short() -> None:
    """The point of the example: a plain loop of about 30-60 lines of training logic."""
    lines = (REPO / "examples" / "own_loop.py").read_text().splitlines()
    body = lines[lines.index("def main() -> int:"):]
    logic = [ln for ln in body if ln.strip() and not ln.strip().startswith(("#", '"""'))]
    assert 30 <= len(logic) <= 70, len(logic)
