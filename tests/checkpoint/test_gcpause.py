from __future__ import annotations

import gc
import threading

import pytest
import torch

import dtrain.checkpoint.snapshot as snapshot
from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.gcpause import gc_paused


@pytest.fixture(autouse=True)
def _gc_back_on():
    yield
    gc.enable()


def test_pauses_nests_and_restores() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still runs
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTRAIN_GC_PAUSE", "0")
    with gc_paused():
        assert gc.isenabled()


def test_overlapping_blocks_on_two_threads() -> None:
    """A background save and a training-thread block overlap: on again only after both end."""
    inside, leave = threading.Event(), threading.Event()

    def background() -> None:
        with gc_paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=background)
    t.start()
    assert inside.wait(10)
    with gc_paused():
        pass
    assert not gc.isenabled()  # the background block is still running
    leave.set()
    t.join(10)
    assert gc.isenabled()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("async_save", [False, True])
def test_saves_and_loads_run_with_the_collector_paused(tmp_path, monkeypatch, async_save: bool) -> None:
    seen: list[bool] = []
    real = snapshot.write_rank

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot, "write_rank", spy)
    model = torch.nn.Linear(8, 8)
    mgr = CheckpointManager(str(tmp_path), async_save=async_save)
    mgr.save(1, model=model)
    mgr.wait()
    assert seen == [False] and gc.isenabled()
    mgr.load(mgr.latest_committed(), model=model)  # type: ignore[arg-type]
    assert gc.isenabled()
    mgr.close()
