from __future__ import annotations

import logging

import pytest

from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.retention import NO_MANIFEST, CheckpointInfo, best_of, scan, to_delete, unranked
from tests.checkpoint.models import make_all, make_model, train


def infos(losses: dict[int, float | None], incomplete: tuple[int, ...] = ()) -> list[CheckpointInfo]:
    out = [CheckpointInfo(f"/r/step-{s:09d}", s, True, metrics={} if v is None else {"val/loss": v})
           for s, v in losses.items()]
    out += [CheckpointInfo(f"/r/step-{s:09d}", s, False, problem=NO_MANIFEST) for s in incomplete]
    return sorted(out, key=lambda i: i.step)


def steps(doomed: list[CheckpointInfo]) -> list[int]:
    return [i.step for i in doomed]


RULES = dict(keep_last_n=None, keep_best_k=None, keep_every_n_steps=None, monitor="val/loss", mode="min")


def test_no_rules_keep_everything_committed_but_collect_old_incomplete() -> None:
    got = to_delete(infos({10: 1.0, 20: 0.5}, incomplete=(5, 15, 30)), **RULES)
    assert steps(got) == [5, 15]  # 30 is newer than the newest committed: may be being written


def test_keep_last_n_never_drops_the_best() -> None:
    got = to_delete(infos({10: 0.1, 20: 0.5, 30: 0.6, 40: 0.7}), **{**RULES, "keep_last_n": 2})
    assert steps(got) == [20]


def test_keep_best_k_and_milestones() -> None:
    losses = {100: 0.9, 200: 0.3, 300: 0.5, 400: 0.2, 500: 0.8, 600: None}
    got = to_delete(infos(losses), **{**RULES, "keep_best_k": 2, "keep_every_n_steps": 300})
    assert steps(got) == [100, 500]  # kept: best 400 and 200, milestones 300 and 600, newest 600


def test_mode_max_and_best_of() -> None:
    data = infos({1: 0.5, 2: 0.9, 3: 0.7})
    assert best_of(data, "val/loss", "max").step == 2
    assert best_of(data, "val/loss", "min").step == 1
    assert best_of(data, None, "min") is None
    assert steps(to_delete(data, **{**RULES, "keep_last_n": 1, "mode": "max"})) == [1]


def test_unranked_names_the_metric_and_those_recorded() -> None:
    data = infos({1: 0.5, 2: None}, incomplete=(3,))
    assert unranked(data, "val/loss") is None
    assert unranked(data, "val/los") == "no committed checkpoint records 'val/los'; the metrics they record: val/loss"
    data[1].metrics["val/acc"] = None  # in the manifest, but NaN/inf (stored as null)
    assert unranked(data, "val/acc").startswith("every committed checkpoint records no finite value of 'val/acc'")
    assert unranked(infos({}, incomplete=(1,)), "val/loss") is None  # nothing committed: nothing to rank


@pytest.mark.timeout(120)
def test_manager_prunes_after_each_commit(tmp_path) -> None:
    m, o, s, c = make_all()
    mgr = CheckpointManager(str(tmp_path), keep_last_n=2, keep_best_k=1, keep_every_n_steps=4,
                            monitor="val/loss", mode="min")
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.45, 5: 0.3, 6: 0.35, 7: 0.6}
    for step, loss in losses.items():
        train(m, o, s, c, 1, data_seed=step)
        mgr.save(step, model=m, optimizer=o, metrics={"val/loss": loss})
    assert [i.step for i in mgr.list()] == [2, 4, 6, 7]
    assert mgr.best().step == 2 and mgr.latest_committed().step == 7


@pytest.mark.timeout(120)
def test_scan_notices_a_manifest_damaged_after_it_was_read(tmp_path) -> None:
    """scan remembers manifests it validated, keyed by their bytes: a manifest changed on disk
    afterwards (same length) is read again and reported, never taken from memory."""
    m, o, s, c = make_all()
    mgr = CheckpointManager(str(tmp_path))
    for step in (1, 2):
        mgr.save(step, model=m, optimizer=o)
    assert [i.committed for i in scan(str(tmp_path))] == [True, True]
    path = tmp_path / "step-000000002" / "manifest.json"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"step": 2', b'"step": 3'))
    infos = scan(str(tmp_path))
    assert [i.committed for i in infos] == [True, False] and "step 3" in (infos[1].problem or "")
    assert mgr.latest_committed().step == 1


@pytest.mark.timeout(120)
def test_an_unreadable_manifest_is_an_invalid_checkpoint_not_an_error(tmp_path, monkeypatch) -> None:
    """A manifest.json that can never be read (here a directory) marks its checkpoint invalid: scan,
    retention and load_model go on with the others; an error that may pass (EIO) is still raised."""
    import errno

    import dtrain
    from dtrain.checkpoint import storage

    m, o, s, c = make_all()
    with CheckpointManager(str(tmp_path)) as mgr:
        for step in (1, 2):
            mgr.save(step, model=m, optimizer=o, metrics={"val/loss": 1.0 / step})
    (tmp_path / "step-000000003" / "manifest.json").mkdir(parents=True)
    (tmp_path / "step-000000000" / "manifest.json").mkdir(parents=True)
    found = scan(str(tmp_path))
    assert [(i.step, i.committed) for i in found] == [(0, False), (1, True), (2, True), (3, False)]
    assert found[3].problem is not None and found[3].problem != NO_MANIFEST
    assert str(tmp_path / "step-000000003" / "manifest.json") in found[3].problem
    assert "Is a directory" in found[3].problem
    assert steps(to_delete(found, **{**RULES, "keep_last_n": 1})) == [1]  # never the unreadable ones
    dtrain.load_model(str(tmp_path), make_all()[0])
    real = storage.read_bytes

    def eio(url: str, *args, **kwargs) -> bytes:
        if "step-000000003" in url:
            raise OSError(errno.EIO, "Input/output error", url)
        return real(url, *args, **kwargs)
    monkeypatch.setattr(storage, "read_bytes", eio)
    with pytest.raises(OSError, match="Input/output error"):
        scan(str(tmp_path))


def _scan_reads(root: str, monkeypatch: pytest.MonkeyPatch, options: dict | None = None) -> tuple[list, list[str]]:
    """scan(root) and the manifests it read."""
    from dtrain.checkpoint import retention

    read: list[str] = []
    real = retention._manifest_bytes

    def counting(url: str, so: object) -> bytes | None:
        read.append(url.rsplit("/", 1)[-1])
        return real(url, so)  # type: ignore[arg-type]
    monkeypatch.setattr(retention, "_manifest_bytes", counting)
    return scan(root, options), read


def check_scan_reads_only_new_or_replaced_manifests(root: str, monkeypatch: pytest.MonkeyPatch,
                                                    options: dict | None = None) -> None:
    from dtrain.checkpoint import retention, storage

    monkeypatch.setattr(retention, "_BY_IDENTITY", {})
    m, o, s, c = make_all()
    mgr = CheckpointManager(root, storage_options=options)
    for step in (1, 2, 3):
        train(m, o, s, c, 1, data_seed=step)
        mgr.save(step, model=m, optimizer=o, metrics={"val/loss": 1.0 / step})
    first, _ = _scan_reads(root, monkeypatch, options)
    again, read = _scan_reads(root, monkeypatch, options)
    assert read == [] and [(i.step, i.committed, i.metrics) for i in again] == [
        (i.step, i.committed, i.metrics) for i in first]
    # a manifest written anew (another job reusing the root, a hand edit): read again, new content seen
    url = storage.join(root, "step-000000002", "manifest.json")
    storage.write_atomic(url, storage.read_bytes(url, storage_options=options).replace(
        b'"val/loss": 0.5', b'"val/loss": 0.25'), options)
    later, read = _scan_reads(root, monkeypatch, options)
    assert read == ["step-000000002"] and later[1].metrics == {"val/loss": 0.25}
    storage.remove(storage.join(root, "step-000000003", "manifest.json"), options)
    gone, read = _scan_reads(root, monkeypatch, options)
    assert read == [] and not gone[2].committed and gone[2].problem == NO_MANIFEST
    mgr.close()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_scan_reads_only_new_or_replaced_manifests(tmp_path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    root = str(tmp_path / "ckpt") if where == "local" else f"memory://scan-{tmp_path.name}/ckpt"
    check_scan_reads_only_new_or_replaced_manifests(root, monkeypatch)


def test_a_store_without_versions_is_read_on_every_scan(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ETag or modification time in a store's file info: nothing tells a rewritten manifest from
    the one seen before, so each scan reads them all (correct, not faster)."""
    from fsspec.implementations.memory import MemoryFileSystem

    from dtrain.checkpoint import storage

    real = MemoryFileSystem.info
    monkeypatch.setattr(MemoryFileSystem, "info", lambda self, path, **kw: {
        k: v for k, v in real(self, path, **kw).items() if k != "created"})
    root = f"memory://noversion-{tmp_path.name}/ckpt"
    m, o, s, c = make_all()
    CheckpointManager(root).save(1, model=m, optimizer=o)
    assert storage.identity(f"{root}/step-000000001/manifest.json")[1] == storage.UNKNOWN
    for _ in range(2):
        infos, read = _scan_reads(root, monkeypatch)
        assert read == ["step-000000001"] and infos[0].committed


def test_metrics_without_the_monitor_keep_best_k_ranks_by_are_said_once(tmp_path, caplog) -> None:
    """A typo in monitor= ('val/los') silently kept no best: every save's metrics lacked it, so
    none ever counted. A save whose metrics lack the monitor is said once, naming both."""
    mgr = CheckpointManager(str(tmp_path), keep_best_k=1, monitor="val/los", lease=False)
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint.manager"):
        mgr.save(1, model=model)  # no metrics (between evaluations): nothing to say
        assert not caplog.records
        mgr.save(2, model=model, metrics={"val/loss": 0.5, "val/acc": 0.9})
        mgr.save(3, model=model, metrics={"val/loss": 0.4})
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert ("checkpoint step 2: the metrics passed (val/acc, val/loss) lack the monitor 'val/los' that "
            "keep_best_k=1 ranks by") in said[0]
    caplog.clear()
    right = CheckpointManager(str(tmp_path / "right"), keep_best_k=1, monitor="val/loss", lease=False)
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint.manager"):
        right.save(1, model=model, metrics={"val/loss": 0.5})
    assert not caplog.records
