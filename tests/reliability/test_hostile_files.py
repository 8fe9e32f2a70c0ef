"""Hostile and broken checkpoint files: never unpickled, never loaded as good data, and each one is
reported by a clear error naming the file (the parsers alone are in tests/checkpoint/test_format.py
and test_stfile.py; this is the same inputs end to end, through resume and verify)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import CheckpointDamagedError, CheckpointManager, verify
from dtrain.checkpoint.format import NonFiniteTensorError
from dtrain.errors import CheckpointError
from tests.reliability import hostile
from tests.reliability.conftest import MotoServer, s3_options
from tests.reliability.proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("hostile") / "template"
    return root, hostile.build(root)


@pytest.mark.parametrize("case", list(hostile.CASES))
def test_broken_checkpoint_is_never_accepted(case: str, template, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if os.path.exists(hostile.Planted.marker):
        os.unlink(hostile.Planted.marker)

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("something tried to unpickle a checkpoint file")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    root, saved = template
    v = hostile.judge(root, tmp_path, case, saved)
    assert not v.accepted, v
    assert v.named, v  # every problem verify reports names the file
    # the resume either skipped the broken checkpoint (the previous one is loaded, exactly) or
    # stopped with an error naming the file; a damaged header alone cannot hurt (chunks are CRC'd)
    if v.restore_error is not None:
        assert v.file in v.restore_error or "manifest.json" in v.restore_error, v
    else:
        assert v.resumed_step == (2 if "safetensors header" in case else 1), v
    assert not os.path.exists(hostile.Planted.marker)


def test_check_finite_refuses_nan_naming_the_tensor_and_file(tmp_path: Path) -> None:
    model = hostile.make_model()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
        model[2].bias[0] = float("inf")
    mgr = CheckpointManager(str(tmp_path), lease=False)
    mgr.save(3, model=model)
    url = str(tmp_path / "step-000000003")
    with pytest.raises(NonFiniteTensorError) as e:
        CheckpointManager(str(tmp_path), lease=False, check_finite=True).load(url, model=hostile.make_model())
    msg = str(e.value)
    assert "'model/0.weight' has 1 non-finite" in msg and "'model/2.bias' has 1 non-finite" in msg
    assert f"{url}/{hostile.MODEL_FILE}" in msg
    assert isinstance(e.value, CheckpointDamagedError)  # so a resume falls back to the one before
    problems = verify(url, check_finite=True)
    assert len(problems) == 2 and all(hostile.MODEL_FILE in p for p in problems)
    assert verify(url) == []  # NaN is valid data unless asked: the bytes are sound
    fresh = hostile.make_model(seed=1)
    mgr.load(url, model=fresh)  # without check_finite it loads as saved
    assert torch.isnan(fresh[0].weight[1, 2])


@pytest.mark.s3
def test_manifest_pointing_to_another_bucket_is_never_read(moto: MotoServer, proxy: FaultProxy,
                                                           tmp_path: Path) -> None:
    """The other bucket exists and holds a file of the right name: not one request goes there."""
    import s3fs

    bucket, other = moto.bucket(), moto.bucket()
    root, so = f"s3://{bucket}/run", s3_options(proxy.endpoint)
    hostile.build(tmp_path / "local")
    fs = s3fs.S3FileSystem(**{"endpoint_url": moto.endpoint, "key": "testing", "secret": "testing"},
                           skip_instance_cache=True)
    fs.put(str(tmp_path / "local") + "/", f"{bucket}/run/", recursive=True)
    fs.put(str(tmp_path / "local" / "step-000000002" / hostile.MODEL_FILE), f"{other}/{hostile.MODEL_FILE}")
    manifest = json.loads(fs.cat(f"{bucket}/run/step-000000002/manifest.json"))
    for f in manifest["files"]:
        if f["path"] == hostile.MODEL_FILE:
            f["path"] = f"s3://{other}/{hostile.MODEL_FILE}"
    fs.pipe(f"{bucket}/run/step-000000002/manifest.json", json.dumps(manifest).encode())
    paths: list[str] = []
    proxy.on_request = lambda n, method, path: paths.append(path)
    mgr = CheckpointManager(root, storage_options=so, lease=False)
    with pytest.raises(CheckpointError, match=r"step-000000002/manifest.json.*another bucket"):
        mgr.load(f"{root}/step-000000002", model=hostile.make_model())
    found = mgr.restore_latest(model=hostile.make_model())
    assert found is not None and found[0].step == 1  # the resume skipped it
    assert paths and not any(other in p for p in paths), [p for p in paths if other in p]
    assert "another bucket" in verify(f"{root}/step-000000002", s3_options(moto.endpoint))[0]


def test_planted_pickles_beside_a_checkpoint_are_ignored(template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Files a careless loader might pick up (torch.save names, DCP's .metadata) are never opened."""
    root, saved = template
    work = tmp_path / "root"
    shutil.copytree(root, work)
    for name in ("model.pt", "optimizer.bin", ".metadata", "__0_0.distcp", "state.pkl"):
        (work / "step-000000002" / name).write_bytes(hostile.PICKLE)
    model = hostile.make_model(seed=3)
    found = CheckpointManager(str(work), lease=False).restore_latest(model=model)
    assert found is not None and found[0].step == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved[2].items())
