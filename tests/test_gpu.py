"""What only a GPU shows: nccl, bf16 autocast, FSDP2 mixed precision, pinned-memory async save,
resume after a kill. Run with `make test-gpu` on a CUDA machine; everywhere else they skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import dtrain, summary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
multi_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl with 2 ranks needs 2 GPUs")

GPT = ["train", "--config", "configs/gpt-1b-small.yaml", "logging.progress=false"]


def _ok(proc) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.mark.timeout(300)
def test_single_gpu_bf16_autocast_trains_and_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "bf16"
    proc = dtrain([*GPT, f"run_dir={run_dir}", "parallel.strategy=none", "train.autocast=auto"])
    _ok(proc)
    assert "device=cuda:0" in proc.stderr
    assert summary(run_dir)["last_step"] == 6


@multi_gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_two_ranks(tmp_path: Path, strategy: str) -> None:
    run_dir = tmp_path / strategy
    proc = dtrain([*GPT, f"run_dir={run_dir}", f"parallel.strategy={strategy}"], nproc=2)
    _ok(proc)
    if strategy == "fsdp":
        assert "params bf16/reduce fp32" in proc.stderr
    assert summary(run_dir)["world_size"] == 2


@pytest.mark.timeout(300)
def test_async_save_from_gpu_memory_and_resume_after_kill(tmp_path: Path) -> None:
    run_dir = tmp_path / "kill"
    job = [*GPT, f"run_dir={run_dir}", "parallel.strategy=none", "checkpoint.async_save=true",
           "checkpoint.every_steps=2", "train.max_steps=8", "checkpoint.keep_last_n=0", "checkpoint.keep_best_k=0"]
    faults = json.dumps({"kill_rank": 0, "kill_step": 6})
    first = dtrain(job, env={"DTRAIN_FAULTS": faults})
    assert first.returncode == -9
    _ok(dtrain(job))
    s = summary(run_dir)
    assert s["resumed_from"].endswith("step-000000004") and s["last_step"] == 8


def test_async_save_stages_into_pinned_memory_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    from dtrain.checkpoint import CheckpointManager

    pinned: list[bool] = []
    real_empty = torch.empty

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        pinned.append(bool(kwargs.get("pin_memory")))
        return real_empty(*args, **kwargs)

    model = torch.nn.Linear(64, 64).cuda()
    mgr = CheckpointManager("memory://gpu-pinned", async_save=True)
    monkeypatch.setattr(torch, "empty", spy)
    mgr.save(1, model=model)
    monkeypatch.setattr(torch, "empty", real_empty)
    mgr.wait()
    assert pinned and all(pinned), "host staging buffers of CUDA tensors must be pinned"
    other = torch.nn.Linear(64, 64).cuda()
    mgr.load(mgr.latest_committed(), model=other)  # type: ignore[arg-type]
    mgr.close()
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
