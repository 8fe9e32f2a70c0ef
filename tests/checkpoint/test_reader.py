from __future__ import annotations

import os
import pickle

import pytest
import torch

from dtrain.checkpoint import CheckpointDamagedError, CheckpointManager
from dtrain.checkpoint.fill import _overlap
from tests.checkpoint.models import assert_same, make_all, make_model, train

MARKER = "/tmp/dtrain-test-unpickled-{pid}"


class Boom:
    """Unpickling this creates a marker file: proof that something unpickled our bytes."""

    def __reduce__(self):  # noqa: ANN204
        return (open, (MARKER.format(pid=os.getpid()), "w"))


def test_overlap_boxes() -> None:
    assert _overlap((0, 0), (4, 4), (2, 1), (4, 2)) == ((2, 4), (1, 3))
    assert _overlap((0,), (2,), (2,), (2,)) is None
    assert _overlap((), (), (), ()) == ()


def test_load_never_unpickles(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = MARKER.format(pid=os.getpid())
    if os.path.exists(marker):
        os.unlink(marker)
    m, o, s, c = make_all()
    train(m, o, s, c, 1, data_seed=1)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model=m, optimizer=o, stateful={"sched": s})
    ckpt = tmp_path / "step-000000001"
    payload = pickle.dumps(Boom())
    for name in (".metadata", "model.pt", "optimizer.bin", "state.pkl"):
        (ckpt / name).write_bytes(payload)  # planted files a careless loader might pick up

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("something tried to unpickle during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    m2, o2, s2, _ = make_all(seed=4)
    mgr.load(str(ckpt), model=m2, optimizer=o2, stateful={"sched": s2})
    assert_same(m2.state_dict(), m.state_dict())
    # a shard replaced by a pickle (even with a consistent size) is rejected, not executed
    model_file = ckpt / "model-00000-of-00001.safetensors"
    size = model_file.stat().st_size
    model_file.write_bytes((payload + b"\0" * size)[:size])
    with pytest.raises(CheckpointDamagedError, match="model-00000-of-00001.safetensors: checksum mismatch"):
        mgr.load(str(ckpt), model=make_model())
    assert not os.path.exists(marker)
