"""The resumable sampler and the sharded eval batches: coverage, world-size independence, resume."""

from __future__ import annotations

import json
import logging
import os
from itertools import islice

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from dtrain.data import ResumableDistributedSampler, ShardedEvalBatches
from dtrain.errors import ConfigError


def make_ranks(n: int, gbs: int, accum: int, world: int, seed: int = 7, **kw: bool) -> list:
    return [ResumableDistributedSampler(n, gbs, accum, r, world, seed, **kw) for r in range(world)]


def run_steps(samplers: list, n_steps: int) -> list[list[int]]:
    """Simulate the trainer on every rank: pull grad_accum micro-batches, then advance.

    Returns the global batch of each step, concatenated micro-step by micro-step, rank by rank.
    """
    iters = [iter(s) for s in samplers]
    steps = []
    for _ in range(n_steps):
        batch: list[int] = []
        for _ in range(samplers[0].grad_accum):
            for it in iters:
                batch += next(it)
        steps.append(batch)
        for s in samplers:
            s.advance(s.global_batch_size)
    return steps


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("accum", [1, 2])
def test_each_sample_exactly_once_per_epoch(world: int, accum: int) -> None:
    samplers = make_ranks(96, 24, accum, world)
    epoch0 = [i for b in run_steps(samplers, 4) for i in b]
    assert sorted(epoch0) == list(range(96))
    assert all(s.epoch == 1 and s.consumed == 0 for s in samplers)
    epoch1 = [i for b in run_steps(samplers, 4) for i in b]
    assert sorted(epoch1) == list(range(96))
    assert epoch1 != epoch0, "each epoch must be a new permutation"


def test_rank_gets_its_contiguous_slice_of_each_micro_step() -> None:
    (whole,) = make_ranks(48, 12, 2, 1)
    micro_steps = list(islice(iter(whole), 2))  # world 1: two micro-steps of 6
    parts = [list(islice(iter(s), 2)) for s in make_ranks(48, 12, 2, 3)]
    for k in range(2):
        assert [i for r in range(3) for i in parts[r][k]] == micro_steps[k]
        assert all(len(parts[r][k]) == 2 for r in range(3))


def test_same_global_batches_for_any_world_size_and_accumulation() -> None:
    reference = run_steps(make_ranks(100, 24, 1, 1), 10)
    for world, accum in [(2, 1), (3, 2), (4, 3), (2, 6), (8, 1)]:
        # micro-step by micro-step, rank by rank, the pieces are the global order itself
        assert run_steps(make_ranks(100, 24, accum, world), 10) == reference, (world, accum)


def test_order_depends_on_seed() -> None:
    a = run_steps(make_ranks(100, 10, 1, 1, seed=1), 1)
    b = run_steps(make_ranks(100, 10, 1, 1, seed=2), 1)
    assert a != b


@pytest.mark.parametrize("new_world,new_accum", [(1, 1), (2, 3), (3, 1)])
def test_resume_mid_epoch_with_other_world_size_continues_the_same_sequence(
    new_world: int, new_accum: int
) -> None:
    uninterrupted = run_steps(make_ranks(150, 12, 1, 1), 30)  # 12 steps per epoch: 2.5 epochs

    before = make_ranks(150, 12, 1, 4)
    first = run_steps(before, 17)
    state = json.loads(json.dumps(before[0].state_dict()))
    assert all(s.state_dict() == state for s in before), "sampler state must be global"
    assert state["epoch"] == 1 and state["consumed"] == 5 * 12

    after = make_ranks(150, 12, new_accum, new_world, seed=999)  # seed comes from the checkpoint
    for s in after:
        s.load_state_dict(state)
    rest = run_steps(after, 13)
    assert [sorted(b) for b in first + rest] == [sorted(b) for b in uninterrupted]


def test_prefetching_does_not_move_the_state() -> None:
    (s,) = make_ranks(100, 10, 1, 1)
    it = iter(s)
    fetched = list(islice(it, 25))  # a DataLoader may run ahead of the optimizer steps
    assert s.state_dict()["epoch"] == 0 and s.state_dict()["consumed"] == 0
    s.advance(10 * 3)
    assert list(islice(iter(s), 1)) == [fetched[3]]


def test_epoch_rollover_and_epoch_float() -> None:
    (s,) = make_ranks(50, 8, 1, 1)  # 6 steps per epoch, 2 samples dropped
    assert s.steps_per_epoch == 6 and s.epoch_float == 0.0
    run_steps([s], 3)
    assert s.epoch_float == pytest.approx(0.5)
    steps = run_steps([s], 9)
    assert s.epoch == 2 and s.consumed == 0 and s.epoch_float == 2.0
    epoch1 = [i for b in steps[3:] for i in b]
    assert len(set(epoch1)) == 48


def test_without_drop_last_the_last_batch_is_filled_from_the_epoch_start() -> None:
    (s,) = make_ranks(50, 8, 1, 1, drop_last=False)
    steps = run_steps([s], 7)
    flat = [i for b in steps for i in b]
    assert set(flat) == set(range(50)) and len(flat) == 56
    assert flat[50:] == flat[:6]
    assert s.epoch == 1 and s.consumed == 0


def test_works_as_dataloader_batch_sampler() -> None:
    data = TensorDataset(torch.arange(100) * 10)
    samplers = make_ranks(100, 20, 1, 2)
    loaders = [DataLoader(data, batch_sampler=s) for s in samplers]
    (batch0,) = next(iter(loaders[0]))
    (batch1,) = next(iter(loaders[1]))
    expected = run_steps(make_ranks(100, 20, 1, 1), 1)[0]
    assert torch.cat([batch0, batch1]).tolist() == [i * 10 for i in expected]


def test_changed_global_batch_size_aligned_is_fine_and_misaligned_rounds_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    (s,) = make_ranks(100, 12, 1, 1)
    s.advance(48)
    aligned = ResumableDistributedSampler(100, 24, 1, 0, 1, 7)
    aligned.load_state_dict(s.state_dict())
    assert (aligned.epoch, aligned.consumed) == (0, 48)

    s.advance(12)  # consumed 60: not a multiple of 24
    rounded = ResumableDistributedSampler(100, 24, 1, 0, 1, 7)
    with caplog.at_level(logging.WARNING, logger="dtrain.data"):
        rounded.load_state_dict(s.state_dict())
    assert (rounded.epoch, rounded.consumed) == (0, 48)
    assert "rounding down to 48" in caplog.text


def test_changed_dataset_length_is_refused() -> None:
    (s,) = make_ranks(100, 10, 1, 1)
    other = ResumableDistributedSampler(101, 10, 1, 0, 1, 7)
    with pytest.raises(ConfigError, match="dataset of 100 samples.*now has 101"):
        other.load_state_dict(s.state_dict())


def test_bad_sizes_raise_config_error_with_the_numbers() -> None:
    with pytest.raises(ConfigError, match=r"global batch size 10 is not divisible.*grad_accum \(2\).*= 6"):
        ResumableDistributedSampler(100, 10, 2, 0, 3, 0)
    with pytest.raises(ConfigError, match="has 5 samples, fewer than one global batch of 8"):
        ResumableDistributedSampler(5, 8, 1, 0, 1, 0)
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        ResumableDistributedSampler(100, 8, 1, 2, 2, 0)


@pytest.mark.parametrize("n", [1, 7, 64, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 8, 16])
def test_eval_batches_cover_each_sample_once_with_equal_counts(n: int, world: int, batch: int) -> None:
    shards = [ShardedEvalBatches(n, batch, r, world) for r in range(world)]
    per_rank = [list(s) for s in shards]
    assert len({len(p) for p in per_rank}) == 1, "every rank must run the same number of batches"
    assert all(len(p) == len(shards[0]) for p in per_rank)
    valid: list[int] = []
    for step in zip(*per_rank, strict=True):
        assert len({len(idx) for idx, _ in step}) == 1, "ranks' batches in one step have one shape"
        for idx, n_valid in step:
            assert 0 <= n_valid <= len(idx) <= batch
            assert all(0 <= i < n for i in idx)
            valid += idx[:n_valid]
    assert sorted(valid) == list(range(n))
    assert shards[0].valid_counts() == [nv for _, nv in per_rank[0]]
    assert shards[0].index_batches() == [idx for idx, _ in per_rank[0]]


def test_eval_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="validation set is empty"):
        ShardedEvalBatches(0, 4, 0, 1)
    with pytest.raises(ConfigError, match="eval batch size"):
        ShardedEvalBatches(10, 0, 0, 1)


def _gather_epoch_worker(rank: int, world: int, store_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        sampler = ResumableDistributedSampler(60, 12, 2, rank, world, seed=3)
        loader = DataLoader(TensorDataset(torch.arange(60)), batch_sampler=sampler)
        seen = []
        it = iter(loader)
        for _ in range(sampler.steps_per_epoch):
            for _ in range(sampler.grad_accum):
                (batch,) = next(it)
                seen.append(batch)
            sampler.advance(sampler.global_batch_size)
        mine = torch.cat(seen)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"ranks": [g.tolist() for g in gathered], "state": sampler.state_dict()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_two_gloo_processes_cover_the_epoch(tmp_path: os.PathLike) -> None:
    out = os.path.join(tmp_path, "seen.json")
    mp.spawn(_gather_epoch_worker, args=(2, os.path.join(tmp_path, "store"), out), nprocs=2, join=True)
    with open(out) as f:
        result = json.load(f)
    r0, r1 = result["ranks"]
    assert len(r0) == len(r1) == 30
    assert sorted(r0 + r1) == list(range(60))
    assert not set(r0) & set(r1)
    assert result["state"]["epoch"] == 1 and result["state"]["consumed"] == 0
