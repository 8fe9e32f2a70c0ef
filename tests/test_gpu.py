"""What only a GPU shows: nccl, bf16 autocast, FSDP2 mixed precision, pinned-memory async save,
resume after a kill. Run with `make test-gpu` on a CUDA machine; everywhere else they skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    assert "backend=nccl" in proc.stderr
    if strategy == "fsdp":
        assert "params bf16/reduce fp32" in proc.stderr
    assert summary(run_dir)["world_size"] == 2


def fsdp_bf16_save(rank: int, world: int, root: str, backend: str = "nccl") -> dict[str, Any]:
    """On a real process group (nccl on the GPU): dtrain's FSDP2 wrapping of the GPT model with bf16
    parameters and fp32 reduction, two AdamW steps, an async save of the DTensor shards; returns
    the full weights for the parent to compare with a plain-process load."""
    import torch.distributed as torch_dist

    from dtrain.checkpoint import CheckpointManager
    from dtrain.config import ParallelConfig
    from dtrain.dist import DistEnv
    from dtrain.models.gpt import GPTModelConfig, build_model, fsdp_blocks
    from dtrain.parallel.fsdp import wrap_fsdp

    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch_dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    try:
        torch.manual_seed(0)
        model = build_model(GPTModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)).to(dev)
        model = wrap_fsdp(model, ParallelConfig(strategy="fsdp", mixed_precision="auto"),
                          DistEnv(rank, world, rank, dev, backend, "env"), fsdp_blocks(model))
        seen: list[str] = []
        model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(str(out.dtype)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            idx = torch.randint(0, 256, (4, 32), device=dev)
            loss = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        param_dtypes = {str(p.dtype) for p in model.parameters()}
        mgr = CheckpointManager(root, async_save=True)
        mgr.save(2, model=model, optimizer=opt)
        mgr.wait()
        mgr.close()
        full = {k: v.full_tensor().cpu().numpy() for k, v in model.state_dict().items()}  # by value
        return {"full": full, "compute": set(seen), "param_dtypes": param_dtypes}
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_fsdp2_bf16_on_nccl_saves_shards_that_load_in_a_plain_process(tmp_path: Path) -> None:
    """nccl refuses two ranks on one device, so a one-GPU machine runs the group at world size 1:
    FSDP2's bf16 compute and fp32 sharded parameters on a real nccl group, DTensor staging into
    pinned memory, and a load of those shards into an unwrapped model, bitwise."""
    import dtrain
    from dtrain.models.gpt import GPTModelConfig, build_model
    from tests.multiproc import run_ranks

    (out,) = run_ranks(fsdp_bf16_save, 1, str(tmp_path))
    assert out["compute"] == {"torch.bfloat16"}, out["compute"]
    assert out["param_dtypes"] == {"torch.float32"}
    plain = build_model(GPTModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    dtrain.load_model(str(tmp_path), plain)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, torch.from_numpy(out["full"][k])), k


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


@pytest.mark.timeout(400)
def test_gpu_run_with_dropout_resumes_bitwise_after_kill(tmp_path: Path) -> None:
    """Exact resume on the GPU: FSDP2 bf16 compute, dropout (inside SDPA and nn.Dropout, drawn from
    the CUDA generator that checkpoints carry), async saves; a run killed after its step-4 save and
    resumed ends with the weights and losses of an uninterrupted run. Two uninterrupted runs are
    compared first: where this GPU's kernels are not deterministic, exact resume cannot be asked."""
    from safetensors.torch import load_file

    from dtrain.checkpoint import export
    from tests.launch import losses

    job = [*GPT, "model.dropout=0.1", "train.max_steps=8", "train.eval_every=4", "checkpoint.every_steps=2",
           "checkpoint.keep_last_n=0", "checkpoint.keep_best_k=0", "early_stopping.enabled=false"]

    def final(run_dir: Path) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{run_dir.name}.safetensors"
        export(str(run_dir / "checkpoints" / "step-000000008"), str(out))
        return load_file(str(out))

    runs = {name: tmp_path / name for name in ("ref", "ref2", "kill")}
    for name in ("ref", "ref2"):
        _ok(dtrain([*job, f"run_dir={runs[name]}"]))
    ref, ref2 = final(runs["ref"]), final(runs["ref2"])
    if ref.keys() != ref2.keys() or not all(torch.equal(ref[k], ref2[k]) for k in ref):
        pytest.skip("two uninterrupted runs already differ on this GPU (non-deterministic kernels)")
    killed = dtrain([*job, f"run_dir={runs['kill']}"], env={"DTRAIN_FAULTS": json.dumps({"kill_rank": 0, "kill_step": 6})})
    assert killed.returncode == -9, killed.stderr[-3000:]
    _ok(dtrain([*job, f"run_dir={runs['kill']}"]))
    assert summary(runs["kill"])["resumed_from"].endswith("step-000000004")
    resumed = final(runs["kill"])
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), f"tensor {k} differs after the resume"
    assert losses(runs["kill"]) == losses(runs["ref"])


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


def test_overlapped_async_save_of_cuda_state_keeps_the_state_at_the_call() -> None:
    """overlap_staging walks and copies the CUDA state on the background thread while the next
    forward runs on the GPU: BatchNorm buffers changed by that forward and the held optimizer
    step must not leak into the checkpoint; the staging buffers are pinned."""
    from dtrain.checkpoint import CheckpointManager

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 8)).cuda()
        return m, torch.optim.AdamW(m.parameters(), lr=0.1)

    def step(m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
        m(torch.randn(32, 64, device="cuda")).square().mean().backward()
        o.step()
        o.zero_grad()

    torch.manual_seed(0)
    model, opt = make()
    step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    mgr = CheckpointManager("memory://gpu-overlap", async_save=True, overlap_staging=True)
    mgr.save(1, model=model, optimizer=opt)
    step(model, opt)  # forward changes the buffers at once; step() waits for the background copy
    mgr.wait()
    staged = mgr._saves.staging if mgr._saves else {}
    from_device = [t for slot, t in staged.items() if slot[3]]  # AdamW's `step` tensors live on the CPU
    assert from_device and all(t.is_pinned() for t in from_device)
    other, other_opt = make()
    mgr.load(mgr.latest_committed(), model=other, optimizer=other_opt)  # type: ignore[arg-type]
    mgr.close()
    for k, v in other.state_dict().items():
        assert torch.equal(v, expected[k]), k
    for k, v in other_opt.state[next(iter(other.parameters()))].items():
        assert torch.equal(v, expected_opt[k]), k


_FORGETFUL_CUDA = """
import sys, torch, dtrain
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 64)).cuda()
mgr = dtrain.CheckpointManager(sys.argv[1], async_save=True)
mgr.save(1, model=model)
with torch.no_grad():
    model[0].weight.add_(1.0)  # the next step changes the weights while the save writes from pinned copies
mgr.save(2, model=model)
torch.save({k: v.cpu() for k, v in model.state_dict().items()}, sys.argv[2])
# no mgr.wait() / mgr.close(): the process just ends
"""


@pytest.mark.timeout(120)
def test_async_save_of_cuda_state_in_flight_at_exit_is_committed(tmp_path: Path) -> None:
    """An own loop that forgets wait()/close(): the save staged in pinned memory is finished at the
    interpreter's exit (before CUDA and the thread pools go) and holds the weights at the call."""
    import os
    import subprocess
    import sys

    import dtrain
    from tests.launch import REPO

    root, expected = tmp_path / "ckpts", tmp_path / "expected.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", _FORGETFUL_CUDA, str(root), str(expected)], env=env,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (root / "step-000000002" / "manifest.json").exists(), done.stderr[-4000:]
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 64))
    dtrain.load_model(str(root), model)
    want = torch.load(expected, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
