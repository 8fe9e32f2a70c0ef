"""What a user of CheckpointManager in their own loop gets wrong, and what they see then: real
saves and loads, 2 gloo ranks where the mistake is a distributed one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dtrain.checkpoint import CheckpointManager, load_model
from dtrain.errors import CheckpointError, CheckpointMismatchError
from tests.launch import REPO
from tests.multiproc import run_ranks


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _stepped(model: nn.Module, optim: torch.optim.Optimizer) -> None:
    model(torch.ones(2, 4)).sum().backward()
    optim.step()
    optim.zero_grad()


@pytest.mark.timeout(60)
def test_optimizer_with_other_param_groups_is_refused_and_left_whole(tmp_path: Path) -> None:
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _stepped(model, optim)
    with CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, model=model, optimizer=optim)
    split = _model()  # the head got its own learning rate since the save
    optim2 = torch.optim.AdamW([{"params": split[0].parameters()}, {"params": split[2].parameters(), "lr": 1e-4}])
    with pytest.raises(CheckpointMismatchError, match=r"param groups do not match.*1 group\(s\).*optimizer=None"):
        CheckpointManager(str(tmp_path)).restore_latest(model=split, optimizer=optim2)
    assert [g["lr"] for g in optim2.param_groups] == [1e-3, 1e-4]  # before: group 0 lost its 'lr'


@pytest.mark.timeout(60)
def test_optimizer_over_another_models_parameters_is_named(tmp_path: Path) -> None:
    model = _model()
    optim = torch.optim.AdamW(_model().parameters())  # built from a second copy of the model
    with CheckpointManager(str(tmp_path)) as mgr:
        with pytest.raises(CheckpointError, match=r"optimizer\[0\] \(AdamW\) holds 4 parameter\(s\) that are not"):
            mgr.save(1, model=model, optimizer=optim)  # before: "rank 0: KeyError: 0"
        mgr.save(1, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointError, match=r"optimizer\[0\] \(AdamW\) holds 4 parameter\(s\) that are not"):
        CheckpointManager(str(tmp_path)).restore_latest(model=model, optimizer=optim)
    with pytest.raises(CheckpointError, match="needs model=<the torch.nn.Module itself>, got OrderedDict"):
        load_model(str(tmp_path), model.state_dict())  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_load_into_a_meta_model_is_refused(tmp_path: Path) -> None:
    with CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, model=_model())
    with torch.device("meta"):
        model = _model()
    with pytest.raises(CheckpointError, match=r"'0\.weight' is on the meta device.*to_empty"):
        load_model(str(tmp_path), model)  # before: "loaded", and every tensor still empty
    model.to_empty(device="cpu")
    load_model(str(tmp_path), model)
    assert torch.equal(model[0].weight, _model()[0].weight)


class _NumpyState:
    """A user's component whose state holds NumPy arrays (its own RandomState)."""

    def __init__(self) -> None:
        self.rs = np.random.RandomState(3)

    def state_dict(self) -> dict[str, object]:
        return {"rs": self.rs.get_state(), "table": np.arange(6, dtype=np.float16).reshape(2, 3)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.rs.set_state(state["rs"])
        self.table = state["table"]


@pytest.mark.timeout(60)
def test_numpy_arrays_in_a_component_round_trip(tmp_path: Path) -> None:
    model, mine = _model(), _NumpyState()
    mine.rs.rand(5)
    with CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, model=model, stateful={"mine": mine})  # before: ValueError, array of size 1
    back = _NumpyState()
    CheckpointManager(str(tmp_path)).restore_latest(model=model, stateful={"mine": back})
    assert back.rs.rand() == mine.rs.rand()
    assert back.table.dtype == np.float16 and back.table.tolist() == [[0, 1, 2], [3, 4, 5]]


_FORGETFUL = """
import sys, torch, dtrain
model = torch.nn.Linear(256, 256)
mgr = dtrain.CheckpointManager(sys.argv[1], async_save=True)
for step in (1, 2):
    mgr.save(step, model=model)
# no mgr.wait() / mgr.close(): the process just ends
"""


@pytest.mark.timeout(60)
def test_async_save_in_flight_at_process_exit_is_committed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _FORGETFUL, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "step-000000002" / "manifest.json").exists(), done.stderr  # before: lost at exit


def _save_then_shutdown(rank: int, world: int, root: str) -> bool:
    import dtrain

    dtrain.init(timeout_s=30)
    model = nn.Linear(256, 256)
    mgr = dtrain.CheckpointManager(root, async_save=True)
    mgr.save(1, model=model)
    dtrain.shutdown()  # no wait()/close(): before, the group was destroyed under the save
    return Path(root, "step-000000001", "manifest.json").exists()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_shutdown_finishes_an_async_save_in_flight(tmp_path: Path) -> None:
    assert any(run_ranks(_save_then_shutdown, 2, str(tmp_path)))


def _save_on_rank0_only(rank: int, world: int, root: str, marker: str) -> list[tuple[float, str]]:
    import datetime

    import torch.distributed as dist

    import dtrain

    dtrain.init(timeout_s=3)
    model = nn.Linear(2, 2)
    optim = torch.optim.SGD(model.parameters())
    # sync, and overlapped (its first collective is the lease's), each on a group of its own
    managers = [dtrain.CheckpointManager(f"{root}/sync", lease=False),
                dtrain.CheckpointManager(f"{root}/overlapped", async_save=True, overlap_staging=True,
                                         process_group=dist.new_group(backend="gloo",
                                                                      timeout=datetime.timedelta(seconds=3)))]
    loader = dtrain.CheckpointManager(f"{root}/load", lease=False,
                                      process_group=dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3)))
    loader.save(1, model=model)  # together: a checkpoint for rank 0 to load alone
    if rank == 1:  # never calls save() or load(): waits (at most 40 s) until rank 0 has given up
        deadline = time.monotonic() + 40
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return []
    out = []
    try:
        for mgr in managers:
            start = time.monotonic()
            try:
                mgr.save(7, model=model, optimizer=optim)
                mgr.wait()
            except Exception as e:
                out.append((time.monotonic() - start, f"{type(e).__name__}: {e}"))
            else:
                raise AssertionError("a save on one rank only did not fail")
        start = time.monotonic()
        try:
            loader.load(loader.latest_committed(), model=model)  # the best weights for an evaluation, say
        except Exception as e:
            out.append((time.monotonic() - start, f"{type(e).__name__}: {e}"))
        else:
            raise AssertionError("a load on one rank only did not fail")
        plain = nn.Linear(2, 2)
        dtrain.load_model(f"{root}/load", plain)  # what the README says to use instead: no collective
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values(),
                                                     strict=True))
    finally:
        Path(marker).touch()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_save_or_load_on_one_rank_only_fails_after_the_dist_timeout(tmp_path: Path) -> None:
    """It waited 30 min (the checkpoint group's own default), then said only gloo's "Timed out
    waiting 3000ms for recv operation to complete"; a load under `if rank == 0:` (the best weights
    for an evaluation on one rank, say) said the same."""
    said = run_ranks(_save_on_rank0_only, 2, str(tmp_path / "ckpt"), str(tmp_path / "gave-up"))[0]
    assert len(said) == 3, said
    for (waited, error), call in zip(said, ("save(step=7)", "save(step=7)", "load("), strict=True):
        assert waited < 15, waited  # dist timeout_s=3; before, the checkpoint group waited 30 min
        what, same = ("save", "step") if call.startswith("save") else ("load", "checkpoint")
        assert error.startswith(f"CheckpointError: {call}"), error
        assert (f" on rank 0: waited for the other ranks until the timeout ran out (dtrain.init(timeout_s=...), "
                f"dist.timeout_s): {what}() is a collective that every rank must call, with the same {same}") in error
        assert "Timed out waiting 3000ms" in error  # gloo's own words stay, at the end
