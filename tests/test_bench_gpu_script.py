"""benchmarks/checkpoint_gpu.py must run first time on the GPU machine: smoke it here on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "checkpoint_gpu.py"
TARGETS = ["dtrain async stall <= 5% of dtrain sync save", "dtrain save >= DCP save (speed ratio)",
           "dtrain async stall <= dcp-async stall (their stall / ours)", "dtrain load >= DCP load (speed ratio)"]


@pytest.mark.timeout(180)
def test_cpu_smoke_run_measures_every_method_and_judges_every_target(tmp_path: Path) -> None:
    out = tmp_path / "x"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--sizes", "32M", "--repeats", "1",
                           "--out", str(out), "--dir", str(tmp_path)], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    by = report["results"][str(32 << 20)]
    assert set(by) == {"dtrain", "dtrain-async", "dcp", "dcp-async"}  # dcp-async-pinned needs CUDA
    for method, r in by.items():
        assert "error" not in r, (method, r.get("traceback"))
        assert r["save_s"] > 0
    for method in ("dtrain", "dcp"):
        assert by[method]["load_s"] > 0 and by[method]["verified"] is True
    for method in ("dtrain-async", "dcp-async"):
        assert 0 < by[method]["stall_s"] <= by[method]["save_s"]
    assert [t["target"] for t in report["targets"]] == TARGETS
    assert all(t["verdict"] in ("met", "missed", "inconclusive") for t in report["targets"])
    assert report["machine"]["gpu"] == {"device": "cpu"}
    assert "smoke run" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.md", "x.png"]  # checkpoints removed


@pytest.mark.timeout(60)
def test_verify_catches_a_tensor_the_load_missed() -> None:
    """The bit-exact check behind `verified` is not vacuous: one stale tensor fails it."""
    from benchmarks.checkpoint_gpu import build_state, scramble, verify

    cpu = torch.device("cpu")
    model, opt = build_state(3 << 20, torch.bfloat16, cpu)
    assert verify(model, opt, 3 << 20, torch.bfloat16, cpu)
    fresh, fresh_opt = build_state(3 << 20, torch.bfloat16, cpu)
    scramble(model, opt)
    assert not verify(model, opt, 3 << 20, torch.bfloat16, cpu)
    with torch.no_grad():  # "load" everything back, then spoil one element of one optimizer tensor
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            p.copy_(q)
            for k, v in fresh_opt.state[q].items():
                opt.state[p][k].copy_(v)
        assert verify(model, opt, 3 << 20, torch.bfloat16, cpu)
        opt.state[next(iter(model.parameters()))]["exp_avg_sq"].view(-1)[-1] += 1
    assert not verify(model, opt, 3 << 20, torch.bfloat16, cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.timeout(60)
def test_cuda_device_without_a_gpu_says_to_use_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1M", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and "use --device cpu" in proc.stderr
    assert not list(tmp_path.iterdir())
