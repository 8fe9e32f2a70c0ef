"""`dtrain ckpt`: run in-process through main([...]) and as a real `python -m dtrain` subprocess,
against checkpoints written by CheckpointManager."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dtrain.checkpoint import CheckpointManager, load_model, storage
from dtrain.checkpoint.cli import (
    build_parser,
    main,
    parse_storage_option,
    storage_options_of,
    utc,
)
from dtrain.checkpoint.clifmt import parse_size, parse_size_arg
from dtrain.errors import CheckpointError
from tests.checkpoint import workers
from tests.checkpoint.models import make_all, train
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]
LOSSES = {1: 3.0, 2: 1.0, 3: 2.0}  # step 2 is the best by val/loss, step 3 the newest
Weights = dict[int, dict[str, torch.Tensor]]


def _save_run(root: str, extra: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None,
              with_metrics: bool = True) -> Weights:
    """Three committed checkpoints; returns each step's model state_dict."""
    m, o, s, c = make_all()
    weights: Weights = {}
    # closed here: an S3 root's lease is given back while moto still runs, not at interpreter exit
    with CheckpointManager(root, storage_options=storage_options) as mgr:
        for step, loss in LOSSES.items():
            train(m, o, s, c, 1, data_seed=step)
            metrics = {"val/loss": loss, "val/acc": 1.0 / loss} if with_metrics else None
            mgr.save(step, model=m, optimizer=o, metrics=metrics, extra=extra)
            weights[step] = {k: v.clone() for k, v in m.state_dict().items()}
    return weights


@pytest.fixture
def run(tmp_path: Path) -> tuple[str, Weights]:
    """Steps 1-3 committed, plus step 4 whose manifest was removed (as if the save crashed)."""
    root = str(tmp_path / "ckpts")
    weights = _save_run(root)
    m, o, *_ = make_all(seed=1)
    with CheckpointManager(root) as mgr:
        mgr.save(4, model=m, optimizer=o)
    os.unlink(os.path.join(root, "step-000000004", "manifest.json"))
    return root, weights


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    """dtype, shape and a hash of the bytes of each tensor (the same code runs without dtrain)."""
    return {k: [str(t.dtype), list(t.shape), hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8)
                                                            .numpy().tobytes()).hexdigest()]
            for k, t in sorted(tensors.items())}


_NO_DTRAIN_LOADER = """
import hashlib, json, sys
sys.modules["dtrain"] = None  # any import of dtrain now fails: prove the file needs none
import torch
from safetensors.torch import load_file
t = load_file(sys.argv[1])
print(json.dumps({k: [str(v.dtype), list(v.shape), hashlib.sha256(v.contiguous().reshape(-1)
      .view(torch.uint8).numpy().tobytes()).hexdigest()] for k, v in sorted(t.items())}))
"""


def test_ls_shows_committed_best_and_incomplete(run: tuple[str, Weights], capsys) -> None:
    root, _ = run
    code, out, _ = cli(capsys, "ls", root)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"1", "2", "3", "4"}
    assert "committed, best val/loss" in rows["2"] and "val/loss=1" in rows["2"]
    assert rows["3"].rstrip().endswith("committed") and "KiB" in rows["3"]
    assert "incomplete: no manifest.json" in rows["4"]
    code, out, _ = cli(capsys, "ls", root, "--json", "--monitor", "val/acc", "--mode", "max")
    listed = {d["step"]: d for d in json.loads(out)}
    assert listed[2]["best"] and listed[2]["metrics"] == {"val/loss": 1.0, "val/acc": 1.0}
    assert listed[3]["committed"] and listed[3]["size_bytes"] > 0 and listed[3]["time_utc"].endswith("Z")
    assert not listed[4]["committed"] and "manifest" in listed[4]["problem"]


def test_ls_says_invalid_for_a_manifest_it_cannot_use(run: tuple[str, Weights], capsys) -> None:
    """invalid: a manifest is there but unusable; incomplete: no manifest (being written, or abandoned)."""
    root, _ = run
    path = Path(root, "step-000000001", "manifest.json")
    path.write_text(path.read_text().replace('"version": 1', '"version": 99', 1))
    code, out, _ = cli(capsys, "ls", root)
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and "invalid: " in rows["1"] and "schema version 99" in rows["1"]
    assert "incomplete: no manifest.json" in rows["4"] and "invalid" not in rows["4"]
    code, out, _ = cli(capsys, "ls", root, "--json")
    assert [d["status"] for d in json.loads(out)] == ["invalid", "committed", "committed", "incomplete"]


def test_ls_of_a_checkpoint_or_a_run_directory_says_what_to_run(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, _ = run
    for ckpt in ("step-000000003", "step-000000004"):  # committed, and incomplete
        code, out, err = cli(capsys, "ls", os.path.join(root, ckpt))
        assert code == 1 and "is a checkpoint directory, not a root" in err
        assert f"dtrain ckpt inspect {os.path.join(root, ckpt)}" in err and f"dtrain ckpt ls {root}`" in err
    run_dir = os.path.dirname(root)
    os.rename(root, os.path.join(run_dir, "checkpoints"))
    code, out, err = cli(capsys, "ls", run_dir)
    assert code == 0 and f"no checkpoints under {run_dir}" in out
    assert f"did you mean {os.path.join(run_dir, 'checkpoints')}?" in err
    (tmp_path / "empty").mkdir()
    code, out, err = cli(capsys, "ls", str(tmp_path / "empty"))
    assert code == 0 and "no checkpoints under" in out and "did you mean" not in err


def test_ls_as_a_real_command(run: tuple[str, Weights]) -> None:
    root, _ = run
    done = subprocess.run([sys.executable, "-m", "dtrain", "ckpt", "ls", root], cwd=REPO,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("STEP") and "incomplete" in done.stdout


def test_verify_exit_codes_and_names_the_file(run: tuple[str, Weights], capsys) -> None:
    root, _ = run
    ckpt = os.path.join(root, "step-000000002")
    assert cli(capsys, "verify", ckpt)[0] == 0
    optim_file = os.path.join(ckpt, "optim-00000-of-00001.safetensors")
    data = bytearray(Path(optim_file).read_bytes())
    data[len(data) // 2 + 40] ^= 0xFF
    Path(optim_file).write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify", ckpt)
    assert code == 1 and "FAILED" in out and optim_file in out and "checksum" in out
    code, out, _ = cli(capsys, "verify", os.path.join(root, "step-000000004"))
    assert code == 1 and "manifest.json" in out  # incomplete: not a sound checkpoint
    code, out, _ = cli(capsys, "verify", root)  # a root: every committed checkpoint, incomplete skipped
    assert code == 1 and f"FAILED {ckpt}" in out and "2 of 3 checkpoint(s) sound" in out
    assert f"SKIP {os.path.join(root, 'step-000000004')}" in out
    for step in (1, 2, 3):
        os.unlink(os.path.join(root, f"step-00000000{step}", "manifest.json"))
    code, out, _ = cli(capsys, "verify", root)  # only incomplete ones: nothing is sound
    assert code == 1 and "nothing verified" in out


def test_inspect_shows_tensors_and_layout(run: tuple[str, Weights], capsys) -> None:
    root, _ = run
    code, out, _ = cli(capsys, "inspect", root)  # a root means its newest committed checkpoint
    assert code == 0
    assert "step-000000003" in out and "world size  1" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("model/0.weight "))
    assert line.split()[1:4] == ["F32", "[16,", "6]"] and line.endswith("model-00000-of-00001.safetensors")
    code, out, _ = cli(capsys, "inspect", os.path.join(root, "step-000000001"), "--json")
    info = json.loads(out)
    assert info["step"] == 1 and info["strategy"] == "none"
    by_key = info["tensors"]
    assert by_key["optim/state/4.weight/exp_avg"]["chunks"][0]["file"] == "optim-00000-of-00001.safetensors"


@pytest.mark.timeout(120)
def test_export_loads_with_plain_safetensors_without_dtrain(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, weights = run
    out = str(tmp_path / "export" / "model.safetensors")
    code, stdout, _ = cli(capsys, "export", root, "--out", out)
    assert code == 0 and out in stdout and "step 3" in stdout
    done = subprocess.run([sys.executable, "-I", "-c", _NO_DTRAIN_LOADER, out], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == digest(weights[3])


@pytest.mark.parametrize("name", ["bf16", "bfloat16"])  # torch's name too, as Hugging Face users type it
def test_export_bf16_casts_floats_only(run: tuple[str, Weights], tmp_path, capsys, name: str) -> None:
    root, weights = run
    out = str(tmp_path / "m-bf16.safetensors")
    assert cli(capsys, "export", root, "--out", out, "--dtype", name)[0] == 0
    loaded = load_file(out)
    assert loaded["0.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["0.weight"], weights[3]["0.weight"].to(torch.bfloat16))
    assert loaded["1.num_batches_tracked"].dtype == torch.int64
    assert os.path.getsize(out) < os.path.getsize(os.path.join(root, "step-000000003",
                                                               "model-00000-of-00001.safetensors"))


def test_export_sharded_with_index(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, weights = run
    out = tmp_path / "sharded"
    code, stdout, err = cli(capsys, "export", root, "--out", str(out), "--max-shard-size", "500B")
    assert code == 0 and "over --max-shard-size" not in err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(str(out / s) in stdout for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights[3].values())
    assert all(os.path.getsize(out / s) < 500 + 1024 for s in shards)  # payload <= limit, plus header
    merged = {k: v for s in shards for k, v in load_file(str(out / s)).items()}
    assert digest(merged) == digest(weights[3])
    code, _, err = cli(capsys, "export", root, "--out", str(tmp_path / "one.safetensors"), "--max-shard-size", "500B")
    assert code == 1 and "give a directory as --out" in err and not (tmp_path / "one.safetensors").exists()
    code, _, err = cli(capsys, "export", root, "--out", str(tmp_path / "big"), "--max-shard-size", "300B")
    assert code == 0 and "note: tensor '0.weight' is 384 B, over --max-shard-size 300B: it gets a shard of its own" in err
    index = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())
    assert [k for k, v in index["weight_map"].items() if v == index["weight_map"]["0.weight"]] == ["0.weight"]


def test_export_echoes_the_shard_size_as_given(run: tuple[str, Weights], tmp_path, capsys) -> None:
    """0.3KB is 300 bytes, decimal as Hugging Face counts: the messages say 0.3KB, not only 0.3 KiB-ish
    figures the user never typed, with the binary reading beside it to compare with tensor sizes."""
    root, _ = run
    code, _, err = cli(capsys, "export", root, "--out", str(tmp_path / "big"), "--max-shard-size", "0.3KB")
    assert code == 0 and "over --max-shard-size 0.3KB (300 B): it gets a shard of its own" in err
    code, _, err = cli(capsys, "export", root, "--out", str(tmp_path / "one.safetensors"), "--max-shard-size", "0.5kB")
    assert code == 1 and "over --max-shard-size 0.5kB (500 B): give a directory as --out" in err
    code, _, err = cli(capsys, "export", root, "--out", str(tmp_path / "one.safetensors"), "--max-shard-size", "500B")
    assert code == 1 and "over --max-shard-size 500B: give a directory" in err  # no second reading to add


def test_export_writes_tied_weights_under_each_name(tmp_path, capsys) -> None:
    """A GPT-style head tied to the embedding is one tensor in the checkpoint; the export names it
    twice (a copy each), so the loaders that compare keys with model.state_dict(), which has both
    names, load it strictly: load_state_dict, and transformers' load_sharded_checkpoint (its key
    check is repeated here from the index). safetensors' load_model wants one name: strict=False."""
    from safetensors.torch import load_model as st_load_model

    from tests.checkpoint.workers import Tied

    model = Tied()
    with CheckpointManager(str(tmp_path / "ckpts")) as mgr:
        mgr.save(1, model=model)
    one, shards = tmp_path / "one.safetensors", tmp_path / "shards"
    assert cli(capsys, "export", str(tmp_path / "ckpts"), "--out", str(one))[0] == 0
    assert cli(capsys, "export", str(tmp_path / "ckpts"), "--out", str(shards), "--max-shard-size", "100B")[0] == 0
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(Tied().state_dict()) == {"emb.weight", "head.weight", "mid.bias", "mid.weight"}
    for loaded in (load_file(str(one)), {k: v for s in set(index["weight_map"].values())
                                         for k, v in load_file(str(shards / s)).items()}):
        fresh = Tied(seed=5)
        fresh.load_state_dict(loaded, strict=True)
        assert fresh.head.weight is fresh.emb.weight and digest(fresh.state_dict()) == digest(model.state_dict())
    fresh = Tied(seed=6)
    assert st_load_model(fresh, str(one), strict=False) == (set(), ["head.weight"])
    assert digest(fresh.state_dict()) == digest(model.state_dict())


def _damage_last_tensor(ckpt: str) -> None:
    """Flip the last byte of the model file: its last tensor (model/4.weight, the last one export
    writes) fails its checksum."""
    path = Path(ckpt, "model-00000-of-00001.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_failed_export_leaves_the_earlier_output_untouched(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, _ = run
    good, damaged = os.path.join(root, "step-000000002"), os.path.join(root, "step-000000003")
    _damage_last_tensor(damaged)
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "keep.safetensors"
    assert cli(capsys, "export", good, "--out", str(keep))[0] == 0
    shards = tmp_path / "shards"
    assert cli(capsys, "export", good, "--out", str(shards), "--max-shard-size", "500B")[0] == 0
    before, before_shards = _files(out), _files(shards)
    code, _, err = cli(capsys, "export", damaged, "--out", str(keep))
    assert code == 1 and "model/4.weight" in err
    assert _files(out) == before  # the old file, and no temporary left behind
    code, _, err = cli(capsys, "export", damaged, "--out", str(shards), "--max-shard-size", "500B")
    assert code == 1 and _files(shards) == before_shards
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(before_shards) - {"model.safetensors.index.json"}


def test_export_into_a_directory_replaces_an_earlier_export(run: tuple[str, Weights], tmp_path, capsys) -> None:
    """Stale shards, index or model.safetensors of an earlier export are removed (other files stay)."""
    root, weights = run
    out = tmp_path / "exported"
    out.mkdir()
    (out / "README.md").write_text("mine")
    counts, capsys_err = [], []
    for size in ("200B", "600B", None):  # the model is 984 B
        code, stdout, err = cli(capsys, "export", root, "--out", str(out), *(["--max-shard-size", size] if size else []))
        written = {Path(line.strip()).name for line in stdout.splitlines()[1:]}
        assert code == 0 and set(os.listdir(out)) == written | {"README.md"}
        counts.append(len(written))
        capsys_err.append(err)
    assert counts[0] > counts[1] > 2 and counts[2] == 1 and written == {"model.safetensors"}
    assert f"note: removed {counts[1]} file(s) of an earlier export from {out}: model-00001-of-00002" in capsys_err[-1]
    assert digest(load_file(str(out / "model.safetensors"))) == digest(weights[3])


def test_export_to_an_object_store_replaces_a_file_without_removing_it(run: tuple[str, Weights], tmp_path,
                                                                       capsys) -> None:
    root, weights = run
    out = f"memory://export-{tmp_path.name}/exp/model.safetensors"
    for _ in range(2):
        code, _, err = cli(capsys, "export", root, "--out", out)
        assert code == 0 and "removed" not in err
    code, _, err = cli(capsys, "export", root, "--out", f"memory://export-{tmp_path.name}/exp", "--max-shard-size", "600B")
    assert code == 0 and "removed 1 file(s) of an earlier export" in err
    from dtrain.checkpoint import storage

    names = sorted(n for n, _ in storage.list_dir(f"memory://export-{tmp_path.name}/exp"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]


def test_a_failed_export_to_an_object_store_leaves_no_index_over_mixed_shards(run: tuple[str, Weights], tmp_path,
                                                                            capsys) -> None:
    """An object store has no rename: a sharded export that failed half way had overwritten the
    first shards while the earlier export's index (same shard names) stayed, so loaders got two
    checkpoints' weights mixed, silently. The old index now goes first: loaders fail loudly."""
    root, _ = run
    good, damaged = os.path.join(root, "step-000000002"), os.path.join(root, "step-000000003")
    _damage_last_tensor(damaged)  # its last tensor, in the last shard, fails its checksum
    out = f"memory://export-{tmp_path.name}/shards"
    assert cli(capsys, "export", good, "--out", out, "--max-shard-size", "500B")[0] == 0
    code, _, err = cli(capsys, "export", damaged, "--out", out, "--max-shard-size", "500B")
    assert code == 1 and "model/4.weight" in err
    names = [n for n, _ in storage.list_dir(out)]
    assert "model.safetensors.index.json" not in names and "model-00001-of-00003.safetensors" in names


def test_export_refuses_to_write_into_the_checkpoint_it_reads(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, _ = run
    ckpt = os.path.join(root, "step-000000003")
    before = _files(Path(ckpt))
    os.symlink(ckpt, tmp_path / "link")
    for out in (os.path.join(ckpt, "model-00000-of-00001.safetensors"), ckpt, ckpt + "/", os.path.join(ckpt, "sub"),
                str(tmp_path / "link" / "model.safetensors")):
        code, _, err = cli(capsys, "export", ckpt, "--out", out)
        assert code == 1 and "is inside the checkpoint" in err and "give a path outside it" in err
        shards = [] if out.endswith(".safetensors") else ["--max-shard-size", "500B"]
        code, _, err = cli(capsys, "export", root, "--out", out, *shards)  # root: its newest
        assert code == 1 and "is inside the checkpoint" in err
    assert _files(Path(ckpt)) == before and cli(capsys, "verify", ckpt)[0] == 0
    assert cli(capsys, "export", root, "--out", root)[0] == 0  # the root itself is not a checkpoint


def test_export_best_by_metric_config_and_fallback(tmp_path, capsys) -> None:
    root = str(tmp_path / "a")
    weights = _save_run(root, extra={"config": {"early_stopping": {"monitor": "val/acc", "mode": "max"}}})
    out = str(tmp_path / "best.safetensors")
    code, _, err = cli(capsys, "export", root, "--best", "--out", out)  # monitor from the run's config
    assert code == 0 and "val/acc (max, from the run's early_stopping config): step 2" in err
    assert digest(load_file(out)) == digest(weights[2])
    code, _, err = cli(capsys, "export", root, "--best", "--monitor", "val/acc", "--mode", "min", "--out", out)
    assert code == 0 and "step 1" in err and digest(load_file(out)) == digest(weights[1])
    # --monitor without --mode: the saved config's mode when it monitors that metric, else min
    code, _, err = cli(capsys, "export", root, "--best", "--monitor", "val/acc", "--out", out)
    assert code == 0 and "val/acc (max, from --monitor, mode from the run's early_stopping config): step 2" in err
    assert digest(load_file(out)) == digest(weights[2])
    code, _, err = cli(capsys, "export", root, "--best", "--monitor", "val/loss", "--out", out)
    assert code == 0 and "val/loss (min, from --monitor, mode min by default: give --mode max" in err
    assert digest(load_file(out)) == digest(weights[2])
    code, _, err = cli(capsys, "prune", root, "--keep-best", "1", "--monitor", "val/acc", "--dry-run")
    assert code == 0 and "ranks by val/acc (max, from --monitor, mode from the run's early_stopping config)" in err
    plain = str(tmp_path / "b")
    weights = _save_run(plain, with_metrics=False)
    before = Path(out).read_bytes()
    code, _, err = cli(capsys, "export", plain, "--best", "--out", out)  # no metrics: no best to pick
    assert code == 1 and "no committed checkpoint records 'val/loss'; the metrics they record: none" in err
    assert Path(out).read_bytes() == before
    code, _, err = cli(capsys, "export", root, "--best", "--monitor", "val/los", "--out", out)
    assert code == 1 and "records 'val/los'; the metrics they record: val/acc, val/loss; --best needs" in err


def test_prune_dry_run_then_keep_last_keeps_best(run: tuple[str, Weights], capsys) -> None:
    root, _ = run
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert code == 0 and "would remove" in out and "step-000000001" in out
    assert len(os.listdir(root)) == 4
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0 and "removed 1, kept 3 of 4" in out
    # the best (step 2 by val/loss) and the newest committed survive; the newer incomplete one may be
    # a save still being written, so it stays too
    assert sorted(os.listdir(root)) == ["step-000000002", "step-000000003", "step-000000004"]
    code, out, err = cli(capsys, "prune", root, "--keep-last", "1", "--keep-best", "1",
                         "--monitor", "val/acc", "--mode", "min")
    assert code == 0 and "ranks by val/acc (min, from --monitor)" in err
    assert sorted(os.listdir(root)) == ["step-000000003", "step-000000004"]


def test_keep_best_by_a_metric_no_checkpoint_records_deletes_nothing(run: tuple[str, Weights], capsys) -> None:
    root, _ = run
    before = sorted(os.listdir(root))
    # one rule, one message, naming where the monitor came from: --keep-best had a check of its own
    # (naming it), --keep-last with a --monitor plan_prune's (which did not)
    said = (f"dtrain ckpt: error: {root}: no committed checkpoint records 'val/los'; the metrics they record: "
            f"val/acc, val/loss; prune keeps the best by monitor='val/los' (this one came from --monitor, mode min "
            f"by default: give --mode max if higher is better): pass one of them as --monitor (nothing was deleted)\n")
    code, _, err = cli(capsys, "prune", root, "--keep-best", "2", "--monitor", "val/los")  # a typo
    assert (code, err) == (1, said)
    assert sorted(os.listdir(root)) == before
    code, _, err = cli(capsys, "prune", root, "--keep-last", "1", "--monitor", "val/los")  # deleted the best, step 2
    assert (code, err) == (1, said)
    assert sorted(os.listdir(root)) == before
    for step in (1, 2, 3):
        path = Path(root, f"step-00000000{step}", "manifest.json")
        path.write_text(re.sub(r'"val/acc": [^,}]+', '"val/acc": null', path.read_text()))
    code, _, err = cli(capsys, "prune", root, "--keep-best", "1", "--monitor", "val/acc", "--mode", "max")
    assert code == 1 and "every committed checkpoint records no finite value of 'val/acc'" in err
    assert "the metrics they record: val/loss" in err and sorted(os.listdir(root)) == before


def test_errors_and_usage(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, _ = run
    code, _, err = cli(capsys, "inspect", str(tmp_path / "nothing"))
    assert code == 1 and err.startswith("dtrain ckpt: error: ") and err.count("\n") == 1
    code, _, err = cli(capsys, "export", os.path.join(root, "step-000000004"), "--out", str(tmp_path / "x"))
    assert code == 1 and "step-000000004" in err
    assert cli(capsys, "export", root)[0] == 2  # --out is required
    assert cli(capsys, "export", root, "--out", "x", "--max-shard-size", "2XB")[0] == 2
    code, _, err = cli(capsys, "export", root, "--out", str(tmp_path / "y"), "--max-shard-size", "0.5")
    assert code == 2 and "'0.5' is less than 1 byte" in err and not (tmp_path / "y").exists()
    assert cli(capsys, "ls", root, "--storage-option", "novalue")[0] == 2
    code, _, err = cli(capsys, "prune", root)
    assert code == 2 and err.startswith("usage: dtrain ckpt prune [-h]") and "--keep-last" in err
    code, out, err = cli(capsys, "prune", str(tmp_path / "nothing"), "--keep-last", "1")
    assert code == 1 and "does not exist" in err and "removed" not in out
    code, _, err = cli(capsys, "export", root, "--out", "")
    assert code == 2 and "argument --out: must not be empty" in err and not Path("model.safetensors").exists()
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for out in (afile / "x.safetensors", afile / "sub" / "x.safetensors", afile):
        shards = [] if out.suffix else ["--max-shard-size", "500B"]
        code, _, err = cli(capsys, "export", root, "--out", str(out), *shards)
        assert code == 1 and f"{afile} is a file, not a directory" in err and "Errno" not in err
    assert afile.read_text() == "not a directory"
    assert cli(capsys, "prune", root, "--keep-last", "0")[0] == 2
    assert cli(capsys, "frobnicate")[0] == 2
    assert cli(capsys, "--help")[0] == 0


def test_a_file_or_a_missing_path_given_for_a_checkpoint_is_named(run: tuple[str, Weights], tmp_path,
                                                                  capsys) -> None:
    """An exported .safetensors (or a manifest.json) given where a checkpoint belongs said only
    '[Errno 20] Not a directory', in every command and in load_model; `verify` of a path that does
    not exist said its manifest.json was missing and that it "may be incomplete"."""
    root, _ = run
    exported = str(tmp_path / "model.safetensors")
    assert cli(capsys, "export", root, "--out", exported)[0] == 0
    manifest = os.path.join(root, "step-000000003", "manifest.json")
    for argv in (["ls", exported], ["inspect", exported], ["verify", exported], ["prune", exported, "--keep-last", "1"],
                 ["export", exported, "--out", str(tmp_path / "again.safetensors")], ["inspect", manifest]):
        code, _, err = cli(capsys, *argv)
        assert code == 1 and err.count("\n") == 1 and "Errno" not in err, (argv, err)
        assert f"error: {argv[1]} is a file, not a checkpoint directory" in err, (argv, err)
    assert "loads with safetensors.torch.load_file" in cli(capsys, "inspect", exported)[2]
    assert f"give the directory it is in, {os.path.dirname(manifest)}" in cli(capsys, "inspect", manifest)[2]
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        load_model(exported, make_all()[0])
    code, out, err = cli(capsys, "verify", str(tmp_path / "nothing"))
    assert code == 1 and out == "" and f"{tmp_path / 'nothing'} does not exist" in err


def test_export_to_a_safetensors_name_that_is_a_directory(run: tuple[str, Weights], tmp_path, capsys) -> None:
    """The rename at the very end (after every tensor was read) failed with '[Errno 21] Is a
    directory' naming a temporary file."""
    root, weights = run
    target = tmp_path / "weights.safetensors"
    target.mkdir()
    code, _, err = cli(capsys, "export", root, "--out", str(target))
    assert code == 1 and f"--out {target} is a directory" in err and f"({target}/)" in err and "Errno" not in err
    assert sorted(os.listdir(tmp_path)) == ["ckpts", "weights.safetensors"] and os.listdir(target) == []
    assert cli(capsys, "export", root, "--out", f"{target}/")[0] == 0
    assert digest(load_file(str(target / "model.safetensors"))) == digest(weights[3])


def test_ls_and_inspect_survive_a_manifest_time_out_of_range(run: tuple[str, Weights], capsys) -> None:
    """A damaged `created` (1e20, NaN, negative) is an invalid manifest, not a traceback."""
    root, _ = run
    path = Path(root, "step-000000001", "manifest.json")
    good = path.read_text()
    for bad in ("1e20", "NaN", "-1e12"):
        path.write_text(re.sub(r'"created": [^,]+,', f'"created": {bad},', good, count=1))
        code, out, _ = cli(capsys, "ls", root)
        row = next(ln for ln in out.splitlines() if ln.startswith("1 "))
        assert code == 0 and "field created" in row and "-29719" not in row
        code, out, _ = cli(capsys, "ls", root, "--json")
        assert code == 0 and json.loads(out)[0]["time_utc"] is None
        code, _, err = cli(capsys, "inspect", os.path.join(root, "step-000000001"))
        assert code == 1 and "field created" in err and err.startswith("dtrain ckpt: error: ")


def test_a_manifest_that_is_a_directory_does_not_stop_the_root(run: tuple[str, Weights], tmp_path, capsys) -> None:
    root, _ = run
    bad = os.path.join(root, "step-000000070")
    os.makedirs(os.path.join(bad, "manifest.json"))
    code, out, _ = cli(capsys, "ls", root)
    row = next(ln for ln in out.splitlines() if ln.startswith("70 "))
    assert code == 0 and "manifest.json cannot be read (Is a directory)" in row
    code, out, _ = cli(capsys, "verify", root)
    assert code == 1 and f"FAILED {bad}" in out and "3 of 4 checkpoint(s) sound" in out
    assert cli(capsys, "export", root, "--out", str(tmp_path / "m.safetensors"))[0] == 0
    assert cli(capsys, "prune", root, "--keep-last", "1")[0] == 0 and os.path.isdir(bad)


def test_directories_dtrain_did_not_name_are_left_alone(run: tuple[str, Weights], capsys) -> None:
    """`step-12` (a copy of step 1) and `step-0000000002` (someone's files) are not names dtrain
    writes (step-%09d). verify took the first's name as its step (a mismatch: FAILED), while resume
    and retention skipped it; retention took the second for an incomplete step 2 and deleted it."""
    root, _ = run
    copy, other = os.path.join(root, "step-12"), os.path.join(root, "step-0000000002")
    shutil.copytree(os.path.join(root, "step-000000001"), copy)
    os.makedirs(other)
    Path(other, "notes.txt").write_text("mine")
    said = [f"{copy}: not a dtrain checkpoint directory name", f"{other}: not a dtrain checkpoint directory name"]
    code, out, err = cli(capsys, "ls", root)
    assert code == 0 and [ln.split()[0] for ln in out.splitlines()[1:]] == ["1", "2", "3", "4"], out
    assert all(s in err for s in said), err
    code, out, _ = cli(capsys, "verify", root)
    assert code == 0 and f"SKIP {copy}: not a dtrain" in out and f"SKIP {other}: not a dtrain" in out, out
    assert "3 of 3 checkpoint(s) sound" in out, out
    code, out, err = cli(capsys, "verify", copy)  # its files are sound; its name says nothing about its step
    assert code == 0 and f"OK {copy}" in out and "leave it alone" in err, (out, err)
    code, out, err = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0 and "removed 1, kept 3 of 4" in out and all(s in err for s in said), (out, err)
    with CheckpointManager(root, keep_last_n=1, keep_best_k=None) as mgr:  # the trainer's retention
        mgr.apply_retention()
        assert [i.step for i in mgr.list()] == [3, 4]
        m, o, *_ = make_all(seed=1)
        info, _ = mgr.restore_latest(model=m, optimizer=o)
    assert info.step == 3
    assert Path(other, "notes.txt").read_text() == "mine" and os.path.isfile(os.path.join(copy, "manifest.json"))


def test_argument_parsers() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    assert parse_size("1.5 kb") == 1500 and parse_size("0.5KB") == 500
    # messages echo a size as given, with its binary reading beside it where that reads otherwise
    assert str(parse_size_arg("3KB")) == "3KB (2.9 KiB)" and parse_size_arg("3KB").nbytes == 3000
    assert str(parse_size_arg(" 1.5 GB ")) == "1.5 GB (1.4 GiB)" and str(parse_size_arg("5000")) == "5000 (4.9 KiB)"
    assert [str(parse_size_arg(t)) for t in ("2MiB", "2.0 mib", "300B", "1.5GiB")] == ["2MiB", "2.0 mib", "300B", "1.5GiB"]
    for t in (1e20, float("nan"), float("inf"), -1e12, None):
        assert utc(t) == "-"
    assert utc(0) == "1970-01-01 00:00:00"
    assert parse_storage_option("endpoint_url=http://127.0.0.1:9000") == ("endpoint_url", "http://127.0.0.1:9000")
    assert parse_storage_option("anon=true") == ("anon", True)
    assert parse_storage_option('client_kwargs={"region_name": "eu-west-1"}') == (
        "client_kwargs", {"region_name": "eu-west-1"})
    assert parse_storage_option("default_block_size=5242880") == ("default_block_size", 5242880)
    # dotted keys nest, as checkpoint.storage_options.client_kwargs.endpoint_url does in the training
    # config: they reached s3fs as one keyword argument 'client_kwargs.endpoint_url' (a TypeError)
    pairs = [parse_storage_option(t) for t in ("client_kwargs.endpoint_url=http://h:9", "key=k",
                                                'client_kwargs={"region_name": "r"}', "config_kwargs.retries.mode=std")]
    assert storage_options_of(pairs) == {"client_kwargs": {"endpoint_url": "http://h:9", "region_name": "r"}, "key": "k",
                                         "config_kwargs": {"retries": {"mode": "std"}}}
    with pytest.raises(argparse.ArgumentTypeError, match="key is already set"):
        storage_options_of([("key", "k"), ("key.x", 1)])


def _sharded_save(rank: int, world: int, root: str) -> dict[str, Any] | None:
    from dtrain import dist

    dist.init(timeout_s=60)
    model = workers.wrap(workers.make_mlp(), "fsdp", world)
    opt = workers.make_optim(model)
    workers.step(model, opt, rank, world, seed=3)
    with CheckpointManager(root) as mgr:
        mgr.save(7, model=model, optimizer=opt, metrics={"val/loss": 0.5})
    full = workers.full_state(model, None)["model"]
    dist.shutdown()
    return full if rank == 0 else None


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_inspect_and_export_of_an_fsdp_checkpoint_saved_by_two_ranks(tmp_path, capsys) -> None:
    root = str(tmp_path / "fsdp")
    full = run_ranks(_sharded_save, 2, root)[0]
    code, out, _ = cli(capsys, "inspect", root)
    assert code == 0 and "world size  2" in out and "strategy    fsdp" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("model/0.weight "))
    assert "model-00000-of-00002.safetensors[0:8, 0:6]" in line
    assert "model-00001-of-00002.safetensors[8:16, 0:6]" in line
    out_file = str(tmp_path / "full.safetensors")
    assert cli(capsys, "export", root, "--out", out_file)[0] == 0
    assert digest(load_file(out_file)) == digest({k: torch.from_numpy(v) for k, v in full.items()})


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_inspect_of_a_checkpoint_saved_by_four_fsdp_ranks_stays_narrow(tmp_path, capsys) -> None:
    """Past three pieces a row names the count, the first and the last piece: its width no longer
    grows with the world size (every box used to be listed: thousands of characters at 64 ranks)."""
    root = str(tmp_path / "fsdp4")
    run_ranks(_sharded_save, 4, root)
    code, out, err = cli(capsys, "inspect", root)
    assert code == 0 and "world size  4" in out
    header, *rows = out.split("\ntensors (", 1)[1].splitlines()[1:]
    assert rows and all(ln.startswith(("model/", "optim/")) for ln in rows)
    layouts = [ln[header.index("LAYOUT"):] for ln in rows]
    row = next(ln for ln in rows if ln.startswith("model/0.weight "))
    assert row.endswith("4 pieces: model-00000-of-00004.safetensors[0:4, 0:6]; ... 2 more; "
                        "model-00003-of-00004.safetensors[12:16, 0:6]")
    # two boxes at most, whatever the world size (four used to take 4 x 45 characters)
    assert all(c.count(".safetensors[") <= 2 for c in layouts) and max(map(len, layouts)) <= 120
    assert "--json` lists every piece" in err
    code, out, _ = cli(capsys, "inspect", root, "--json")
    assert [c["file"] for c in json.loads(out)["tensors"]["model/0.weight"]["chunks"]] == [
        f"model-0000{r}-of-00004.safetensors" for r in range(4)]


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_s3_through_storage_options(s3_root: tuple[str, dict[str, Any]], tmp_path, capsys) -> None:
    root, options = s3_root
    weights = _save_run(root, storage_options=options)
    flags = [x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")]
    code, out, _ = cli(capsys, "ls", root, *flags)
    assert code == 0 and [ln.split()[0] for ln in out.splitlines()[1:]] == ["1", "2", "3"]
    assert cli(capsys, "verify", root, *flags)[0] == 0
    out_file = str(tmp_path / "from-s3.safetensors")
    assert cli(capsys, "export", root, "--best", "--out", out_file, *flags)[0] == 0
    assert digest(load_file(out_file)) == digest(weights[2])
    shards = root.rsplit("/", 2)[0] + "/exported"  # the bucket's exported/: shards and the index on S3
    for _ in range(2):  # the second replaces the first (its index removed first, then written last)
        assert cli(capsys, "export", root, "--out", shards, "--max-shard-size", "500B", *flags)[0] == 0
    index = json.loads(storage.read_bytes(f"{shards}/model.safetensors.index.json", storage_options=options))
    assert set(index) == {"metadata", "weight_map"} and index["metadata"]["total_size"] == 984
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        (tmp_path / name).write_bytes(storage.read_bytes(f"{shards}/{name}", storage_options=options))
        merged.update(load_file(str(tmp_path / name)))
    assert digest(merged) == digest(weights[3]) and set(merged) == set(index["weight_map"])
    code, _, err = cli(capsys, "ls", root)  # no endpoint: a one-line error, not a traceback
    assert code == 1 and err.startswith("dtrain ckpt: error: ")


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_ls_prune_and_verify_list_an_s3_root_once(s3_root: tuple[str, dict[str, Any]], s3_requests, capsys) -> None:
    """Each listed the root twice (a scan, then the lookalike notes) and asked whether it and its
    manifest.json exist (a HEAD and a one-key LIST each): four LIST round trips where one does."""
    root, options = s3_root
    _save_run(root, storage_options=options)
    storage.makedirs(storage.join(root, "step-12"), options)
    storage.write_atomic(storage.join(root, "step-12", "x"), b"a copy", options)  # a lookalike, to be noted
    flags = [x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")]
    for argv in (["ls", root], ["prune", root, "--keep-last", "2", "--dry-run"], ["verify", root]):
        with s3_requests() as seen:
            code, out, err = cli(capsys, *argv, *flags)
        assert code == 0 and f"{root}/step-12: not a dtrain checkpoint directory name" in out + err, (argv, err)
        lists = [url for method, url in seen if method == "GET" and "list-type=2" in url]
        assert len(lists) == 1, (argv, lists)


def _check_a_set_aside_checkpoint_is_reported(root: str, options: dict[str, Any], capsys) -> None:
    """A damaged newest checkpoint that a resume set aside (manifest.json -> manifest.json.damaged)
    was listed as "incomplete: no manifest.json", and `verify` of it said only "not a committed
    checkpoint": the files kept "for verify" could not be verified."""
    _save_run(root, storage_options=options)
    bad = storage.join(root, "step-000000003")
    storage.remove(storage.join(bad, "model-00000-of-00001.safetensors"), options)
    m, o, *_ = make_all(seed=2)
    with CheckpointManager(root, storage_options=options) as mgr:
        info, _ = mgr.restore_latest(model=m, optimizer=o, set_aside_damaged=True)
    assert info.step == 2
    flags = [x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")]
    code, out, _ = cli(capsys, "ls", root, *flags)
    assert code == 0 and re.search(r"^3 .*set aside: damaged, its manifest renamed manifest.json.damaged", out, re.M), out
    code, out, _ = cli(capsys, "ls", root, "--json", *flags)
    assert [r["status"] for r in json.loads(out)] == ["committed", "committed", "set aside"]
    code, out, _ = cli(capsys, "verify", bad, *flags)
    assert code == 1 and "set aside as damaged" in out, out
    assert "model-00000-of-00001.safetensors: listed in the manifest but missing" in out, out
    code, out, _ = cli(capsys, "verify", root, *flags)
    assert code == 0 and f"SKIP {bad}: damaged" in out and "2 of 2 checkpoint(s) sound" in out, out


def test_a_set_aside_checkpoint_is_reported_by_ls_and_verify(tmp_path, capsys) -> None:
    _check_a_set_aside_checkpoint_is_reported(str(tmp_path / "ckpts"), {}, capsys)


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_a_set_aside_checkpoint_on_s3_is_reported_by_ls_and_verify(s3_root: tuple[str, dict[str, Any]],
                                                                    capsys) -> None:
    """On S3 the set-aside is storage.rename -> s3fs mv (copy, then delete)."""
    root, options = s3_root
    _check_a_set_aside_checkpoint_is_reported(root, options, capsys)


def test_every_ckpt_command_in_the_readme_parses(capsys) -> None:
    """README told users to run `dtrain ckpt export ROOT --best` (three times) without --out, which
    export requires: a usage error. A bare mention (`dtrain ckpt verify`) is no command line."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r"dtrain ckpt ((?:ls|inspect|verify|export|prune)\b[^`\n#|]*)", text)
    lines = [shlex.split(re.sub(r"\[[^]]*\]", "", c)) for c in found]  # `[--dtype bf16]`: optional
    lines = [argv for argv in lines if len(argv) > 1]
    assert len(lines) >= 7 and sum(argv[0] == "export" for argv in lines) >= 4
    for argv in lines:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README's `dtrain ckpt {' '.join(argv)}` is a usage error: {capsys.readouterr().err}")


def test_help_through_the_top_level_command(capsys) -> None:
    """`dtrain ckpt --help` reaches this parser (a leading option must not stop at `dtrain`'s)."""
    from dtrain.cli import main as dtrain_main

    try:
        code = dtrain_main(["ckpt", "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0 and "usage: dtrain ckpt" in capsys.readouterr().out
