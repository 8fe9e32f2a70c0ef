from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import threading
import uuid

import pytest
import torch

from dtrain.checkpoint import CheckpointDamagedError, CheckpointManager, load_model, storage
from dtrain.errors import CheckpointError, ConfigError
from tests.checkpoint.models import assert_same, make_all, make_model, train


def saved_run(root: str, steps: tuple[int, ...] = (2,), **kw) -> tuple:  # noqa: ANN003
    m, o, s, c = make_all()
    mgr = CheckpointManager(root, **kw)
    done = 0
    for step in steps:
        train(m, o, s, c, step - done, data_seed=step)
        done = step
        mgr.save(step, model=m, optimizer=o, stateful={"sched": s, "counter": c}, extra={"note": "hi"},
                 metrics={"val/loss": 1.0 / step})
    mgr.close()
    return mgr, m, o, s, c


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_resume_continues_bitwise_identical(scheme: str, tmp_path) -> None:
    root = str(tmp_path) if scheme == "local" else f"memory://ckpt-{uuid.uuid4().hex}"
    # uninterrupted: 4 steps
    m0, o0, s0, c0 = make_all()
    train(m0, o0, s0, c0, 2, data_seed=2)
    rng_before = torch.get_rng_state()
    train(m0, o0, s0, c0, 2, data_seed=4)
    # interrupted at step 2, resumed in fresh objects
    mgr, *_ = saved_run(root, steps=(2,))
    torch.manual_seed(12345)  # a "new process": different RNG state until restored
    m, o, s, c = make_all(seed=7)
    info, extra = mgr.restore_latest(model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert info.step == 2 and extra == {"note": "hi"} and c.seen == 16
    assert torch.equal(torch.get_rng_state(), rng_before)
    train(m, o, s, c, 2, data_seed=4)
    assert_same(m.state_dict(), m0.state_dict(), "model")
    assert_same(o.state_dict(), o0.state_dict(), "optim")
    assert s.state_dict() == s0.state_dict() and c.seen == c0.seen


def test_incomplete_directory_is_invisible_then_collected(tmp_path) -> None:
    mgr, *_ = saved_run(str(tmp_path), steps=(2,))
    (tmp_path / "step-000000001").mkdir()
    (tmp_path / "step-000000001" / "model-00000-of-00001.safetensors").write_bytes(b"partial")
    (tmp_path / "step-000000009").mkdir()  # newer and incomplete (being written elsewhere)
    listing = {i.step: i.committed for i in mgr.list()}
    assert listing == {1: False, 2: True, 9: False}
    assert mgr.latest_committed().step == 2
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        mgr.load(str(tmp_path / "step-000000001"), model=make_model())
    m, o, s, c = make_all()
    mgr.save(3, model=m, optimizer=o)
    assert {i.step for i in mgr.list()} == {2, 3, 9}  # older incomplete one collected, newer kept


def corrupt_first_model_file(ckpt: str, how: str) -> str:
    path = os.path.join(ckpt, "model-00000-of-00001.safetensors")
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[-3] ^= 0xFF
    else:
        data = data[: len(data) - 5]
    open(path, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize(("how", "needle"), [("flip", "checksum mismatch"), ("truncate", "truncated")])
def test_damaged_newest_falls_back_with_a_warning(how: str, needle: str, tmp_path, caplog) -> None:
    mgr, *_ = saved_run(str(tmp_path), steps=(2, 4))
    bad = corrupt_first_model_file(str(tmp_path / "step-000000004"), how)
    m, o, s, c = make_all(seed=3)
    with pytest.raises(CheckpointDamagedError) as e:
        mgr.load(mgr.latest_committed(), model=m, optimizer=o)
    assert bad in str(e.value) and needle in str(e.value)
    with caplog.at_level(logging.WARNING):
        info, _ = mgr.restore_latest(model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert info.step == 2
    assert any("step-000000004" in r.message and needle in r.message for r in caplog.records)
    assert c.seen == 16


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_a_damaged_newest_set_aside_stops_counting_and_is_saved_again(scheme: str, tmp_path) -> None:
    """Left committed, a damaged newest checkpoint stayed "newest": retention kept it and deleted
    the sound ones written after the fallback, and reaching its step the run did not save over it."""
    root = str(tmp_path) if scheme == "local" else f"memory://ckpt-{uuid.uuid4().hex}"
    saved_run(root, steps=(2, 4), keep_last_n=2)
    bad = storage.join(root, "step-000000004")
    if scheme == "local":
        corrupt_first_model_file(bad, "flip")
    else:
        storage.remove(storage.join(bad, "model-00000-of-00001.safetensors"))
    m, o, s, c = make_all(seed=3)
    mgr = CheckpointManager(root, keep_last_n=2)
    info, _ = mgr.restore_latest(model=m, optimizer=o, stateful={"sched": s, "counter": c}, set_aside_damaged=True)
    assert info.step == 2 and mgr.latest_committed().step == 2
    assert storage.exists(storage.join(bad, "manifest.json.damaged"))  # the evidence stays, for verify
    train(m, o, s, c, 1, data_seed=3)
    mgr.save(3, model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert [i.step for i in mgr.list() if i.committed] == [2, 3]  # the sound ones kept
    train(m, o, s, c, 1, data_seed=4)
    mgr.save(4, model=m, optimizer=o, stateful={"sched": s, "counter": c})  # saved again, not skipped
    assert [i.step for i in mgr.list() if i.committed] == [3, 4]
    assert not storage.exists(storage.join(bad, "manifest.json.damaged"))
    m2, o2, *_ = make_all(seed=5)
    mgr.load(mgr.latest_committed(), model=m2, optimizer=o2)
    assert_same(m2.state_dict(), m.state_dict())
    mgr.close()


def check_an_unusable_manifest_is_saved_over(root: str, options: dict | None = None) -> None:
    """A newest checkpoint whose manifest is there but unusable (not JSON) is skipped by resume; the
    save of its step said "already committed; not saving it again" (only the file's existence was
    checked), so the run went on with no sound checkpoint of that step (its final one, at max_steps)."""
    saved_run(root, steps=(2, 4), storage_options=options)
    bad = storage.join(root, "step-000000004")
    storage.write_atomic(storage.join(bad, "manifest.json"), b'{"schema": 1, "trunc', options)
    m, o, s, c = make_all(seed=3)
    with CheckpointManager(root, storage_options=options) as mgr:  # closed even on failure: S3's lease
        info, _ = mgr.restore_latest(model=m, optimizer=o, stateful={"sched": s, "counter": c},
                                     set_aside_damaged=True)
        assert info.step == 2
        train(m, o, s, c, 2, data_seed=4)
        mgr.save(4, model=m, optimizer=o, stateful={"sched": s, "counter": c})
        assert [(i.step, i.committed) for i in mgr.list()] == [(2, True), (4, True)]
        m2, o2, *_ = make_all(seed=5)
        mgr.load(mgr.latest_committed(), model=m2, optimizer=o2)
    assert_same(m2.state_dict(), m.state_dict())


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_an_unusable_manifest_does_not_count_as_committed_when_saving(scheme: str, tmp_path) -> None:
    check_an_unusable_manifest_is_saved_over(str(tmp_path) if scheme == "local" else f"memory://ckpt-{uuid.uuid4().hex}")


def test_a_save_never_replaces_a_newer_dtrains_checkpoint(tmp_path) -> None:
    """An unusable manifest is saved over, but not one of a schema this dtrain does not know: that is
    a newer dtrain's checkpoint, which an older one resuming the root must not destroy."""
    _, m, o, s, c = saved_run(str(tmp_path), steps=(2, 4))
    path = tmp_path / "step-000000004" / "manifest.json"
    path.write_text(path.read_text().replace('"version": 1', '"version": 99', 1))
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(CheckpointError, match="newer dtrain"):
        mgr.save(4, model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert '"version": 99' in path.read_text()
    mgr.close()


@pytest.mark.parametrize("set_aside", [False, True])
def test_all_damaged_is_an_error_not_a_fresh_start(set_aside: bool, tmp_path) -> None:
    """Also with set_aside_damaged (the trainer): it renamed every damaged manifest before raising,
    so the restart after that error (exit 1) found no checkpoint and started from step 0."""
    mgr, *_ = saved_run(str(tmp_path), steps=(2, 4))
    for step in (2, 4):
        corrupt_first_model_file(str(tmp_path / f"step-{step:09d}"), "flip")
    for _ in range(2):  # the restart fails the same way
        with pytest.raises(CheckpointError, match="every committed checkpoint"):
            mgr.restore_latest(model=make_model(), set_aside_damaged=set_aside)
    assert [(i.step, i.committed) for i in mgr.list()] == [(2, True), (4, True)]


def test_no_checkpoint_means_none(tmp_path) -> None:
    assert CheckpointManager(str(tmp_path / "empty")).restore_latest(model=make_model()) is None


def test_manifest_records_the_installed_versions(tmp_path) -> None:
    """The manifest's versions come from the modules (no package-metadata read in a save), and
    pyproject takes dtrain's version from the module: they must be what is installed."""
    mgr, *_ = saved_run(str(tmp_path))
    manifest = json.loads((tmp_path / "step-000000002" / "manifest.json").read_text())
    assert manifest["versions"] == {"dtrain": importlib.metadata.version("dtrain"), "torch": torch.__version__}


def test_model_mismatch_names_the_tensor(tmp_path) -> None:
    mgr, *_ = saved_run(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"step-000000002: tensor 'model/0\.bias'.*F32\[16\].*F32\[32\]"):
        mgr.load(mgr.latest_committed(), model=make_model(hidden=32))
    bigger = torch.nn.Sequential(*make_model(), torch.nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: 'model/5\.bias', 'model/5\.weight'"):
        mgr.load(mgr.latest_committed(), model=bigger)
    smaller = torch.nn.Sequential(*list(make_model())[:2])
    with pytest.raises(CheckpointError, match=r"target does not: 'model/4\.bias'"):
        mgr.load(mgr.latest_committed(), model=smaller)
    mgr.load(mgr.latest_committed(), model=smaller, strict=False)
    with pytest.raises(CheckpointError, match=r"no state for component\(s\) \['sampler'\]"):
        mgr.load(mgr.latest_committed(), model=make_model(), stateful={"sampler": make_all()[3]})


def test_an_optional_component_missing_from_the_checkpoint_keeps_its_state(tmp_path, caplog) -> None:
    """`optional`: a component added after the checkpoint was saved (early stopping turned on for
    a running job) keeps its state, with a warning, while strict still covers everything else."""
    mgr, *_ = saved_run(str(tmp_path))
    late = make_all()[3]
    late.seen = 7
    with caplog.at_level(logging.WARNING):
        found = mgr.restore_latest(model=make_model(), stateful={"late": late}, optional=("late",))
    assert found is not None and late.seen == 7
    assert "no state for component 'late'; it keeps its current state" in caplog.text
    with pytest.raises(CheckpointError, match=r"no state for component\(s\) \['other'\]"):
        mgr.load(mgr.latest_committed(), model=make_model(), stateful={"late": late, "other": make_all()[3]},
                 optional=("late",))


def test_model_only_load_and_load_model_from_root(tmp_path) -> None:
    _, m, *_ = saved_run(str(tmp_path), steps=(2, 3))
    fresh = make_model(seed=9)
    load_model(str(tmp_path), fresh)
    assert_same(fresh.state_dict(), m.state_dict())
    fresh2 = make_model(seed=9)
    load_model(f"file://{tmp_path}/step-000000003", fresh2)
    assert_same(fresh2.state_dict(), m.state_dict())


def test_load_model_non_strict_loads_the_shared_tensors_and_names_the_rest(tmp_path, caplog) -> None:
    """Fine-tuning: a pretrained body into a model whose head differs. strict=True names the keys
    and says to pass strict=False, which load_model takes; the keys left out come back."""
    _, m, *_ = saved_run(str(tmp_path), steps=(2,))
    body = list(make_model(seed=9))[:4]
    new_head = torch.nn.Sequential(*body, torch.nn.Linear(16, 4), torch.nn.Linear(4, 3))  # 4 matches, 5 is new
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: 'model/5\.bias'.*pass strict=False"):
        load_model(str(tmp_path), new_head)
    head_before = new_head[5].weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="dtrain.checkpoint.restore"):
        diff = load_model(str(tmp_path), new_head, strict=False)
    assert diff.missing_keys == ["5.bias", "5.weight"] and diff.unexpected_keys == []
    assert "not in the checkpoint): '5.bias', '5.weight'; not loaded (not in the target): none" in caplog.text
    loaded = {k: v for k, v in new_head.state_dict().items() if not k.startswith("5.")}
    assert_same(loaded, m.state_dict())
    assert torch.equal(new_head[5].weight, head_before)  # left as it was
    headless = torch.nn.Sequential(*list(make_model(seed=9))[:2])
    diff = load_model(str(tmp_path), headless, strict=False)
    assert diff.missing_keys == [] and diff.unexpected_keys == ["4.bias", "4.weight"]
    assert load_model(str(tmp_path), make_model(seed=9)) == ([], [])
    with pytest.raises(CheckpointError, match=r"tensor 'model/0\.bias'.*F32\[16\].*F32\[32\]"):
        load_model(str(tmp_path), make_model(hidden=32), strict=False)  # a shared key of another shape


def test_manifest_pointing_outside_is_refused(tmp_path) -> None:
    mgr, *_ = saved_run(str(tmp_path))
    mpath = tmp_path / "step-000000002" / "manifest.json"
    body = json.loads(mpath.read_text())
    body["files"][0]["path"] = "../../elsewhere/model.safetensors"
    mpath.write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"manifest\.json: field files\[0\]\.path"):
        mgr.load(str(tmp_path / "step-000000002"), model=make_model())
    assert mgr.latest_committed() is None
    assert "files[0].path" in mgr.list()[0].problem


def test_resume_says_why_a_newer_checkpoint_is_ignored(tmp_path, caplog) -> None:
    mgr, *_ = saved_run(str(tmp_path), steps=(2, 4))
    mpath = tmp_path / "step-000000004" / "manifest.json"
    mpath.write_text(mpath.read_text().replace('"version": 1', '"version": 7'))
    with caplog.at_level(logging.WARNING):
        info, _ = mgr.restore_latest(model=make_model())
    assert info.step == 2
    assert any("step-000000004" in r.message and "schema version 7" in r.message for r in caplog.records)


def test_resume_parses_only_the_manifest_it_loads_and_only_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process resuming from a root of three checkpoints parses one manifest, once; a
    damaged newest costs one more (the fallback's), and the scan after it parses nothing again."""
    from dtrain.checkpoint import format as fmt
    from dtrain.checkpoint import reader, retention

    mgr, *_ = saved_run(str(tmp_path), steps=(2, 4, 6))
    parsed: list[str] = []
    real = fmt.parse_manifest

    def counting(data: bytes, where: str) -> fmt.Manifest:
        parsed.append(where.split("/")[-2])
        return real(data, where)
    for mod in (retention, reader):
        monkeypatch.setattr(mod, "parse_manifest", counting)
    monkeypatch.setattr(retention, "_SEEN", {})  # a new process has validated nothing yet
    monkeypatch.setattr(retention, "_BY_IDENTITY", {})
    m, o, s, c = make_all(seed=3)
    info, _ = CheckpointManager(str(tmp_path)).restore_latest(model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert info.step == 6 and info.committed and parsed == ["step-000000006"]
    corrupt_first_model_file(str(tmp_path / "step-000000006"), "flip")
    parsed.clear()
    monkeypatch.setattr(retention, "_SEEN", {})
    monkeypatch.setattr(retention, "_BY_IDENTITY", {})
    fresh = CheckpointManager(str(tmp_path))
    info, _ = fresh.restore_latest(model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert info.step == 4 and parsed == ["step-000000006", "step-000000004"]
    assert [i.step for i in fresh.list() if i.committed] == [2, 4, 6]
    assert parsed == ["step-000000006", "step-000000004", "step-000000002"]  # only the one never seen


def test_same_step_twice_is_skipped(tmp_path) -> None:
    mgr, m, o, *_ = saved_run(str(tmp_path))
    before = (tmp_path / "step-000000002" / "manifest.json").read_bytes()
    mgr.save(2, model=m, optimizer=o)
    assert (tmp_path / "step-000000002" / "manifest.json").read_bytes() == before


def test_bad_options_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        CheckpointManager(str(tmp_path), mode="lowest")
    with pytest.raises(ConfigError, match="keep_best_k needs a monitor"):
        CheckpointManager(str(tmp_path), keep_best_k=2)
    with pytest.raises(ConfigError, match="keep_last_n"):
        CheckpointManager(str(tmp_path), keep_last_n=0)


def test_async_save_snapshots_state_at_the_call(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = storage.open_write

    def gated(url, storage_options=None, size=None):  # noqa: ANN001, ANN202
        release.wait(30)
        return real(url, storage_options, size)

    monkeypatch.setattr(storage, "open_write", gated)
    m, o, s, c = make_all()
    train(m, o, s, c, 1, data_seed=1)
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    mgr.save(1, model=m, optimizer=o)
    assert mgr.latest_committed() is None  # still being written
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # training goes on while the save is in flight
    release.set()
    mgr.wait()
    fresh = make_model(seed=5)
    mgr.load(mgr.latest_committed(), model=fresh)
    assert_same(fresh.state_dict(), expected)
    mgr.close()


def test_async_background_error_is_raised_on_the_next_call(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtrain.checkpoint import writer

    def broken(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise OSError("disk full")

    m, o, *_ = make_all()
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    monkeypatch.setattr(writer, "write_tensor_file", broken)
    mgr.save(1, model=m, optimizer=o)  # returns: the failure happens in the background
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="disk full"):
        mgr.save(2, model=m, optimizer=o)
    assert mgr.latest_committed() is None
    mgr.save(3, model=m, optimizer=o)  # the error was reported once; saving works again
    mgr.close()
    assert [i.step for i in mgr.list() if i.committed] == [3]
    monkeypatch.setattr(writer, "write_tensor_file", broken)
    mgr2 = CheckpointManager(str(tmp_path), async_save=True)
    mgr2.save(4, model=m, optimizer=o)
    with pytest.raises(CheckpointError, match="disk full"):
        mgr2.close()


def test_saving_before_the_first_step_does_not_change_the_run(tmp_path) -> None:
    m0, o0, s0, c0 = make_all()
    train(m0, o0, s0, c0, 2, data_seed=5)  # never saved
    m, o, s, c = make_all()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(0, model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert not o.state  # the save did not initialise the optimizer
    m2, o2, s2, c2 = make_all(seed=8)
    train(m2, o2, s2, c2, 1, data_seed=9)  # a stepped optimizer, to be reset by the load
    mgr.restore_latest(model=m2, optimizer=o2, stateful={"sched": s2, "counter": c2})
    assert not o2.state
    train(m2, o2, s2, c2, 2, data_seed=5)
    assert_same(m2.state_dict(), m0.state_dict())
    assert_same(o2.state_dict(), o0.state_dict())


def _two_optimizers(seed: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    """A model whose halves have their own AdamW (as a GAN's generator and discriminator would)."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return m, [torch.optim.AdamW(m[0].parameters(), lr=0.01), torch.optim.AdamW(m[1].parameters(), lr=0.01)]


def _steps(m: torch.nn.Module, opts: list[torch.optim.Optimizer], n: int, which: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        m(torch.randn(16, 4, generator=g)).pow(2).mean().backward()
        for i in which:
            opts[i].step()
        for o in opts:
            o.zero_grad()


def test_an_optimizer_that_has_not_stepped_next_to_one_that_has(tmp_path) -> None:
    """The save leaves the fresh optimizer fresh (its first step stays step 1 for Adam's bias
    correction), and a resumed run follows the uninterrupted one exactly."""
    m0, o0 = _two_optimizers(seed=1)
    _steps(m0, o0, 2, which=(0,), seed=3)
    _steps(m0, o0, 2, which=(0, 1), seed=4)  # the reference: never saved
    m, o = _two_optimizers(seed=1)
    _steps(m, o, 2, which=(0,), seed=3)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(2, model=m, optimizer=o)
    assert o[0].state and not o[1].state  # the save did not initialise the second optimizer
    m2, o2 = _two_optimizers(seed=7)
    _steps(m2, o2, 1, which=(0, 1), seed=9)  # both stepped: the load must reset the second
    mgr.restore_latest(model=m2, optimizer=o2)
    assert o2[0].state and not o2[1].state
    _steps(m2, o2, 2, which=(0, 1), seed=4)
    assert_same(m2.state_dict(), m0.state_dict())
    for a, b in zip(o2, o0, strict=True):
        assert_same(a.state_dict(), b.state_dict())


def test_async_staging_failure_is_reported_through_the_commit(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtrain.checkpoint import background

    def no_memory(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise MemoryError("cannot allocate host buffer")

    monkeypatch.setattr(background, "stage", no_memory)
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    mgr.save(1, model=make_model())
    with pytest.raises(CheckpointError, match="staging: MemoryError: cannot allocate host buffer"):
        mgr.close()
    assert mgr.latest_committed() is None


def test_overlapped_staging_returns_at_once_and_holds_the_next_optimizer_step(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With overlap_staging the copy to host memory runs in the background; save() returns before it
    is done, and the next optimizer.step() waits for it, so the checkpoint is the state at the call."""
    from dtrain.checkpoint import background as manager_mod

    gate = threading.Event()
    real_stage = manager_mod.stage

    def slow_stage(prep, cache):  # noqa: ANN001, ANN202
        if threading.current_thread().name.startswith("dtrain-ckpt"):
            gate.wait(30)
        return real_stage(prep, cache)

    monkeypatch.setattr(manager_mod, "stage", slow_stage)
    m, o, s, c = make_all()
    train(m, o, s, c, 1, data_seed=1)
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    mgr = CheckpointManager(str(tmp_path), async_save=True, overlap_staging=True)
    mgr.save(1, model=m, optimizer=o)  # returns although the background copy is blocked
    stepper = threading.Thread(target=lambda: train(m, o, s, c, 1, data_seed=2))
    stepper.start()
    stepper.join(0.5)
    assert stepper.is_alive(), "optimizer.step() must wait for the background copy"
    gate.set()
    stepper.join(30)
    mgr.wait()
    after = m.state_dict()
    assert any(not torch.equal(after[k], expected[k]) for k in expected), "the step did run after the save"
    fresh = make_model(seed=5)
    mgr.load(mgr.latest_committed(), model=fresh)
    assert_same(fresh.state_dict(), expected)
    mgr.close()
    assert not o._optimizer_step_pre_hooks, "hooks are removed once the save is done"


def test_overlapped_save_walks_the_state_in_the_background_yet_keeps_the_state_at_the_call(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state dict walk and planning of an overlapped save run behind the next forward; what
    changes outside optimizer.step() (buffers updated by forward, components, RNG) is still saved
    as it was when save() was called."""
    from dtrain.checkpoint import manager as manager_mod

    gate, walking = threading.Event(), threading.Event()
    real_prepare = manager_mod.prepare

    def slow_prepare(*a, **k):  # noqa: ANN002, ANN003, ANN202
        assert threading.current_thread().name.startswith("dtrain-ckpt"), "the walk runs in the background"
        walking.set()
        gate.wait(30)
        return real_prepare(*a, **k)

    monkeypatch.setattr(manager_mod, "prepare", slow_prepare)
    m, o, s, c = make_all()
    train(m, o, s, c, 2, data_seed=1)
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    expected_sched, expected_counter, expected_rng = s.state_dict(), c.state_dict(), torch.get_rng_state()
    mgr = CheckpointManager(str(tmp_path), async_save=True, overlap_staging=True)
    mgr.save(2, model=m, optimizer=o, stateful={"sched": s, "counter": c})
    assert walking.wait(30) and not gate.is_set(), "save() returned while the walk is blocked"
    m(torch.randn(8, 6)).pow(2).mean().backward()  # forward updates BatchNorm's running stats
    s.step()
    c.seen += 100
    assert not torch.equal(m.state_dict()["1.running_mean"], expected["1.running_mean"])
    gate.set()
    o.step()  # held until the copy is done
    mgr.wait()
    m2, o2, s2, c2 = make_all(seed=7)
    mgr.load(mgr.latest_committed(), model=m2, optimizer=o2, stateful={"sched": s2, "counter": c2})
    assert_same(m2.state_dict(), expected)
    assert s2.state_dict() == expected_sched and c2.state_dict() == expected_counter
    assert torch.equal(torch.get_rng_state(), expected_rng)
    mgr.close()


def test_async_manager_saves_again_after_close(tmp_path) -> None:
    m, o, s, c = make_all()
    mgr = CheckpointManager(str(tmp_path), async_save=True, overlap_staging=True)
    mgr.save(1, model=m, optimizer=o)
    mgr.close()
    train(m, o, s, c, 1, data_seed=3)
    mgr.save(2, model=m, optimizer=o)
    mgr.close()
    assert [i.step for i in mgr.list() if i.committed] == [1, 2]


@pytest.mark.parametrize("async_save", [False, True])
def test_tied_weights_are_stored_once_and_load_tied(tmp_path, capsys, async_save: bool) -> None:
    from safetensors import safe_open

    from dtrain.checkpoint.cli import main as ckpt_main
    from tests.checkpoint.workers import Tied

    model = Tied()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.arange(6)).sum().backward()
    opt.step()
    mgr = CheckpointManager(str(tmp_path), async_save=async_save)
    mgr.save(1, model=model, optimizer=opt)
    mgr.save(2, model=model, optimizer=opt)  # async: the second save reuses the staging copies
    mgr.close()
    step_dir = tmp_path / "step-000000002"
    with safe_open(str(step_dir / "model-00000-of-00001.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["model/emb.weight", "model/mid.bias", "model/mid.weight"]
    fresh = Tied(seed=3)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    mgr.load(str(step_dir), model=fresh, optimizer=fresh_opt)
    assert fresh.head.weight is fresh.emb.weight
    assert_same(fresh.state_dict(), model.state_dict())
    diff = load_model(str(step_dir), Tied(seed=4))
    assert diff == ([], [])
    assert ckpt_main(["inspect", str(step_dir)]) == 0
    head_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model/head.weight"))
    assert head_row.endswith("the bytes of model/emb.weight (tied)")


def test_save_arguments_are_checked_before_anything_is_written(tmp_path) -> None:
    import numpy as np

    mgr = CheckpointManager(str(tmp_path))
    m = make_model()
    mgr.save(np.int64(5), model=m)  # NumPy and 0-d integer tensors are steps too
    mgr.save(torch.tensor(6), model=m)
    for step in (True, 7.0, "3", -1):
        with pytest.raises(CheckpointError, match="step must be"):
            mgr.save(step, model=m)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"metrics\['val/loss'\] must be a number"):
        mgr.save(8, model=m, metrics={"val/loss": "bad"})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="save needs model="):
        mgr.save(9, model=None)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000005", "step-000000006"]
    mgr.close()


def test_a_component_that_cannot_load_is_named(tmp_path) -> None:
    class NoLoad:
        def state_dict(self) -> dict:
            return {"epoch": 1}

    class Broken(NoLoad):
        def load_state_dict(self, state: dict) -> None:
            raise KeyError("epoch")

    mgr, m, *_ = saved_run(str(tmp_path), steps=(2,))
    CheckpointManager(str(tmp_path)).save(3, model=m, stateful={"sampler": NoLoad()})
    before = {k: v.clone() for k, v in make_model(seed=9).state_dict().items()}
    target = make_model(seed=9)
    with pytest.raises(CheckpointError, match=r"stateful\['sampler'\] \(NoLoad\) has no load_state_dict"):
        mgr.load(str(tmp_path / "step-000000003"), model=target, stateful={"sampler": NoLoad()})
    assert_same(target.state_dict(), before)  # refused before anything was set
    with pytest.raises(CheckpointError, match=r"stateful\['sampler'\].load_state_dict failed \(KeyError"):
        mgr.load(str(tmp_path / "step-000000003"), model=target, stateful={"sampler": Broken()})


def test_restore_latest_refuses_a_checkpoint_directory_as_root_and_load_can_keep_the_rng(tmp_path) -> None:
    saved_run(str(tmp_path), steps=(2,))
    with pytest.raises(CheckpointError, match="is a checkpoint directory, not a root"):
        CheckpointManager(str(tmp_path / "step-000000002")).restore_latest(model=make_model())
    mgr, model = CheckpointManager(str(tmp_path)), make_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mgr.load(mgr.latest_committed(), model=model, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)
    mgr.load(mgr.latest_committed(), model=model)  # a resume's load sets the saved streams
    assert not torch.equal(torch.rand(3), expected)
