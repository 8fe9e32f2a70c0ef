from __future__ import annotations

import os

import pytest
import torch

from dtrain import dist
from dtrain.agreement import Flag, StepAgreement
from tests.multiproc import run_ranks


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node1", "node1"), ("gpu[03-05,07],cpu1", "gpu03"), ("a1,a2", "a1"), ("rack[7]-ib", "rack7-ib"),
     ("n[0012-0020]", "n0012")],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert dist.first_slurm_host(nodelist) == first


def test_detects_torchrun_slurm_and_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    assert dist.detect_launcher() == ("none", 0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert dist.detect_launcher() == ("slurm", 3, 4, 1)
    assert os.environ["MASTER_ADDR"] == "n1"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert dist.detect_launcher() == ("torchrun", 1, 2, 1)


def test_single_process_init_is_idempotent_and_helpers_are_local() -> None:
    env = dist.init()
    assert dist.init() is env
    assert (env.rank, env.world_size, env.backend, str(env.device)) == (0, 1, "none", "cpu")
    assert dist.all_reduce_mean(2.5) == 2.5
    assert dist.agree_any(True) and not dist.agree_any(False)
    assert StepAgreement().step(Flag.PREEMPT, sync=False) == Flag.PREEMPT
    dist.shutdown()
    dist.shutdown()


def _collectives(rank: int, world: int) -> dict:
    env = dist.init(timeout_s=30)
    assert dist.init() is env and env.world_size == world and env.rank == rank
    mean = dist.all_reduce_mean(float(rank + 1))
    any_true = dist.agree_any(rank == 1)
    none_true = dist.agree_any(False)
    word = dist.agree_flags(1 << rank)
    agreement = StepAgreement()
    seen = []
    # Rank 1 raises PREEMPT at step 2 on an async step: everyone sees it at step 3.
    for step in range(1, 6):
        local = Flag.PREEMPT if (rank == 1 and step == 2) else Flag.NONE
        seen.append(int(agreement.step(local, sync=(step == 5))))
    # A synchronous step returns the flag at once, on every rank.
    now = int(agreement.step(Flag.EARLY_STOP if rank == 0 else Flag.NONE, sync=True))
    dist.shutdown()
    return {"mean": mean, "any": any_true, "none": none_true, "word": word, "seen": seen, "now": now}


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_collectives_agree_on_every_rank() -> None:
    results = run_ranks(_collectives, 2)
    assert results[0] == results[1]
    r = results[0]
    assert r["mean"] == 1.5 and r["any"] is True and r["none"] is False and r["word"] == 0b11
    assert r["seen"] == [0, 0, int(Flag.PREEMPT), 0, 0]
    assert r["now"] == int(Flag.EARLY_STOP)


def _carried(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    dist.init(timeout_s=30)
    results = {}
    for carried in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agreement = StepAgreement(ddp=ddp) if carried else None
        seen = []
        gen = torch.Generator().manual_seed(rank)
        for step in range(1, 7):
            x = torch.randn(4, 8, generator=gen)
            ddp(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if agreement is not None:
                local = Flag.PREEMPT if (rank == 1 and step == 2) else Flag.NONE
                seen.append(int(agreement.step(local, sync=(step == 6))))
        results[carried] = {"seen": seen, "own": agreement.exchanges if agreement else 0,
                            "weights": [p.detach().clone() for p in model.parameters()]}
    dist.shutdown()
    same = all(torch.equal(a, b) for a, b in zip(results[False]["weights"], results[True]["weights"], strict=True))
    return {"seen": results[True]["seen"], "own": results[True]["own"], "same_weights": same}


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_flags_carried_in_ddp_gradients_agree_without_collectives_of_their_own() -> None:
    results = run_ranks(_carried, 2)
    assert results[0] == results[1]
    # raised by rank 1 at step 2, carried in step 3's backward, acted on at step 3 by both ranks;
    # then step 4 exchanges synchronously (a flag was just raised), step 6 is a sync step.
    assert results[0]["seen"] == [0, 0, int(Flag.PREEMPT), 0, 0, 0]
    assert results[0]["own"] == 2
    assert results[0]["same_weights"], "the carrier must reduce gradients exactly like DDP's default"


@pytest.mark.parametrize(("env", "cpus", "local", "want"), [
    ({}, 16, "1", {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"}),
    ({}, 12, "4", {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:True,pinned_num_register_threads:2"}),
    ({}, 8, "8", {}),  # one core per rank: cudaHostRegister on one thread is no faster than the default
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, 16, "2",
     {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,pinned_use_cuda_host_register:True,"
                                 "pinned_num_register_threads:8"}),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, 16, "1",
     {"PYTORCH_ALLOC_CONF": "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8"}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:4"}, 16, "1",
     {"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:4"}),  # the user's choice stands
])
def test_fast_pinned_memory_adds_threaded_host_register_unless_the_user_chose(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], cpus: int, local: str, want: dict[str, str]) -> None:
    _clear_alloc_conf(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    dist.fast_pinned_memory()
    got = {n: os.environ[n] for n in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF") if n in os.environ}
    assert got == want


@pytest.mark.parametrize(("env", "want"), [
    ({}, 1),
    ({"LOCAL_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "8"}, 4),  # torchrun inside Slurm
    ({"SLURM_PROCID": "5", "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "1"}, 4),
    ({"SLURM_PROCID": "9", "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}, 3),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"}, 2),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "garbled"}, 1),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_NODEID": "7"}, 1),
    ({"SLURM_TASKS_PER_NODE": "4"}, 1),  # not a Slurm task (no SLURM_PROCID): an sbatch script itself
])
def test_ranks_on_this_node_from_torchrun_or_slurm(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                   want: int) -> None:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE",
                 "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.ranks_on_this_node() == want


def test_fast_pinned_memory_splits_the_cores_among_slurm_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """srun without torchrun sets no LOCAL_WORLD_SIZE: 8 tasks on a 16-core node get 2 threads each."""
    _clear_alloc_conf(monkeypatch)
    for name in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "8")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    dist.fast_pinned_memory()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "pinned_use_cuda_host_register:True,pinned_num_register_threads:2"


def _clear_alloc_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the allocator options, and have them restored after the test: fast_pinned_memory
    sets them in os.environ itself (delenv of an unset name would restore nothing)."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _ddp_forward_without_collectives(rank: int, world: int) -> list[float]:
    import warnings

    from torch import nn

    from dtrain.parallel.ddp import wrap_ddp

    env = dist.init(timeout_s=20)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch 2.13 deprecated broadcast_buffers
        ddp = wrap_ddp(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), env)
    for _ in range(rank + 1):  # different forward counts, as in a sharded evaluation: no collective
        ddp(torch.full((4, 3), float(rank + 1)) + torch.arange(12.0).view(4, 3))
    means = ddp.module[1].running_mean.tolist()
    dist.shutdown()
    return means


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_ddp_forward_makes_no_buffer_collective_and_warns_nothing() -> None:
    results = run_ranks(_ddp_forward_without_collectives, 2)
    assert results[0] != results[1]  # each rank's running stats are its own
