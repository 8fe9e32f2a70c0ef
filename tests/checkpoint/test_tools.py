from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from dtrain.checkpoint import CheckpointManager, export, inspect, list_checkpoints, prune, verify
from dtrain.errors import CheckpointError
from tests.checkpoint.models import make_all, train


def saved(root: str, steps: tuple[int, ...] = (1,)) -> torch.nn.Module:
    m, o, s, c = make_all()
    mgr = CheckpointManager(root)
    for step in steps:
        train(m, o, s, c, 1, data_seed=step)
        mgr.save(step, model=m, optimizer=o, metrics={"val/loss": float(step)})
    return m


def test_verify_reports_each_problem_by_file(tmp_path) -> None:
    saved(str(tmp_path))
    ckpt = str(tmp_path / "step-000000001")
    assert verify(ckpt) == []
    model_file = os.path.join(ckpt, "model-00000-of-00001.safetensors")
    data = bytearray(open(model_file, "rb").read())
    data[-1] ^= 1
    open(model_file, "wb").write(bytes(data))
    os.unlink(os.path.join(ckpt, "optim-00000-of-00001.safetensors"))
    rng_file = os.path.join(ckpt, "rng-00000-of-00001.json")
    text = open(rng_file).read()
    open(rng_file, "w").write(re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), text, count=1))
    problems = verify(ckpt)
    assert any(rng_file in p and "checksum" in p for p in problems)
    assert any(model_file in p and "checksum mismatch in tensor 'model/4.weight'" in p for p in problems)
    assert any("optim-00000-of-00001.safetensors: listed in the manifest but missing" in p for p in problems)
    open(model_file, "wb").write(bytes(data[:-10]))
    assert any("size" in p and model_file in p for p in verify(ckpt))
    header_len = int.from_bytes(data[:8], "little")
    data[8:8 + header_len] = b" " * header_len  # destroy the header, keep the size
    open(model_file, "wb").write(bytes(data))
    assert any("not valid JSON" in p and model_file in p for p in verify(ckpt))
    assert verify(str(tmp_path / "nothing"))[0].endswith("(it may be incomplete; see `dtrain ckpt ls`)")


def test_inspect_lists_tensors_and_layout(tmp_path) -> None:
    saved(str(tmp_path))
    man, tensors = inspect(str(tmp_path))
    by_key = {t.key: t for t in tensors}
    assert man.step == 1 and by_key["model/0.weight"].shape == (16, 6)
    assert by_key["optim/state/0.weight/exp_avg"].chunks[0].file == "optim-00000-of-00001.safetensors"
    assert by_key["model/0.weight"].nbytes == 16 * 6 * 4


def test_export_single_file_with_cast_and_shards_with_index(tmp_path) -> None:
    m = saved(str(tmp_path / "ck"))
    out = str(tmp_path / "export" / "model.safetensors")
    assert export(str(tmp_path / "ck"), out, dtype="bf16") == [out]
    weights = load_file(out)
    assert set(weights) == set(m.state_dict())
    assert weights["0.weight"].dtype == torch.bfloat16
    assert weights["1.num_batches_tracked"].dtype == torch.int64  # integers are never cast
    assert torch.equal(weights["0.weight"], m.state_dict()["0.weight"].to(torch.bfloat16))
    files = export(str(tmp_path / "ck"), str(tmp_path / "sharded"), max_shard_bytes=400)
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(files) > 2 and set(index["weight_map"]) == set(m.state_dict())
    for name, fname in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / "sharded" / fname))[name], m.state_dict()[name])


def test_list_and_prune(tmp_path) -> None:
    saved(str(tmp_path), steps=(1, 2, 3))
    assert [i.step for i in list_checkpoints(str(tmp_path))] == [1, 2, 3]
    removed = prune(str(tmp_path), keep_last_n=1)
    assert [i.step for i in removed] == [1, 2]
    assert [i.step for i in list_checkpoints(str(tmp_path))] == [3]


def test_prune_refuses_a_monitor_no_checkpoint_records(tmp_path) -> None:
    """The API deleted the best checkpoint on a typo in the metric (ranked by nothing, nothing was
    the best); `dtrain ckpt prune` already refused it."""
    saved(str(tmp_path), steps=(1, 2, 3))  # val/loss = step: step 1 is the best
    before = sorted(os.listdir(tmp_path))
    for rules in ({"keep_best_k": 1}, {"keep_last_n": 1}, {"keep_last_n": 1, "keep_best_k": 1}):
        with pytest.raises(CheckpointError) as e:
            prune(str(tmp_path), monitor="val/los", **rules)
        assert str(e.value) == (f"{tmp_path}: no committed checkpoint records 'val/los'; the metrics they record: "
                                f"val/loss; prune keeps the best by monitor='val/los': pass one of them (nothing "
                                f"was deleted)")
        assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(CheckpointError, match="keep_best_k=1 needs monitor="):
        prune(str(tmp_path), keep_best_k=1)
    with pytest.raises(CheckpointError, match="mode='mni' must be 'min' or 'max'"):
        prune(str(tmp_path), keep_last_n=1, monitor="val/loss", mode="mni")
    assert sorted(os.listdir(tmp_path)) == before
    assert [i.step for i in prune(str(tmp_path), keep_last_n=1, monitor="val/loss", dry_run=True)] == [2]
    assert sorted(os.listdir(tmp_path)) == before
    assert [i.step for i in prune(str(tmp_path), keep_last_n=1, monitor="val/loss")] == [2]
    assert [i.step for i in list_checkpoints(str(tmp_path))] == [1, 3]


def test_export_refuses_an_out_inside_a_remote_source(tmp_path) -> None:
    root = f"memory://export-{tmp_path.name}/ck"
    saved(root)
    src = f"{root}/step-000000001"
    for out in (f"{src}/model-00000-of-00001.safetensors", src, f"{src}/", f"memory://export-{tmp_path.name}//ck/./step-000000001/x"):
        with pytest.raises(CheckpointError, match="inside the checkpoint"):
            export(src, out)
    assert verify(src) == []
    assert export(src, f"{root}/step-0000000010.safetensors") == [f"{root}/step-0000000010.safetensors"]
