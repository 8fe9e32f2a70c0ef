"""Checkpoints on S3 through a real moto server."""

from __future__ import annotations

import pytest
import torch

from dtrain.checkpoint import CheckpointManager, s3upload, storage, verify, writer
from dtrain.errors import CheckpointError
from tests.checkpoint.models import assert_same, make_all, make_model, train

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_on_s3(s3_root: tuple, async_save: bool) -> None:
    root, options = s3_root
    m, o, s, c = make_all()
    train(m, o, s, c, 2, data_seed=1)
    mgr = CheckpointManager(root, storage_options=options, async_save=async_save, monitor="val/loss")
    mgr.save(2, model=m, optimizer=o, stateful={"sched": s, "counter": c}, metrics={"val/loss": 0.5})
    mgr.wait()
    assert [i.step for i in mgr.list()] == [2] and mgr.best().step == 2
    assert verify(mgr.latest_committed().url, options) == []
    m2, o2, s2, c2 = make_all(seed=3)
    info, _ = mgr.restore_latest(model=m2, optimizer=o2, stateful={"sched": s2, "counter": c2})
    assert info.url == f"{root}/step-000000002"
    assert_same(m2.state_dict(), m.state_dict())
    assert_same(o2.state_dict(), o.state_dict())
    assert c2.seen == c.seen
    mgr.close()


def test_endpoint_and_credentials_from_aws_environment(s3_root: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    root, options = s3_root
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    m = make_model()
    with CheckpointManager(root) as mgr:  # closed here: its lease goes back while moto still runs
        mgr.save(1, model=m)
    fresh = make_model(seed=4)
    with CheckpointManager(root) as mgr:
        mgr.load(f"{root}/step-000000001", model=fresh)
    assert_same(fresh.state_dict(), m.state_dict())


def test_failed_write_leaves_no_visible_checkpoint(s3_root: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    root, options = s3_root
    monkeypatch.setattr(s3upload, "PART_BYTES", 5 * 2**20)  # several parts in flight for 12 MiB
    model = torch.nn.Sequential(torch.nn.Linear(1024, 3000), torch.nn.Linear(3000, 2))  # ~12 MiB of weights
    real = writer._bytes_view
    calls = {"n": 0}

    def failing(t: torch.Tensor) -> memoryview:
        calls["n"] += 1
        if calls["n"] == 4:  # after ~12 MiB went out as parts of a multipart upload
            raise OSError("connection reset")
        return real(t)

    monkeypatch.setattr(writer, "_bytes_view", failing)
    mgr = CheckpointManager(root, storage_options=options)
    with pytest.raises(CheckpointError, match="connection reset"):
        mgr.save(1, model=model)
    assert mgr.latest_committed() is None
    # the partial object was discarded, not committed by close(): nothing at all is visible
    assert storage.list_dir(f"{root}/step-000000001", options) == []
    assert mgr.list() == []
    fs, _ = storage.filesystem(root, options)
    assert fs.list_multipart_uploads(root[len("s3://"):].split("/")[0]) == []  # aborted, not left dangling
    monkeypatch.undo()
    mgr.save(2, model=model)
    assert [(i.step, i.committed) for i in mgr.list()] == [(2, True)]  # old incomplete one collected
    mgr.close()


def test_scan_on_s3_reads_only_new_or_replaced_manifests(s3_root: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.checkpoint.test_retention import check_scan_reads_only_new_or_replaced_manifests

    root, options = s3_root
    check_scan_reads_only_new_or_replaced_manifests(root, monkeypatch, options)


def test_an_unusable_manifest_on_s3_does_not_count_as_committed_when_saving(s3_root: tuple) -> None:
    from tests.checkpoint.test_manager import check_an_unusable_manifest_is_saved_over

    root, options = s3_root
    check_an_unusable_manifest_is_saved_over(root, options)


def test_a_trainer_that_fails_at_start_gives_the_s3_lease_back(s3_root: tuple, tmp_path) -> None:
    """An error before training (here a bad init_from) left the lease to the manager's finalizer at
    interpreter exit, where s3fs can no longer send requests: 5 s of failed retries, and the lease
    stayed held for the next start. An init_from in a bucket that does not exist exited 1, saying
    only "neither a committed checkpoint nor a root": a config error (exit 2) naming the bucket."""
    from tests.launch import FAST, dtrain

    root, options = s3_root
    so = [f"checkpoint.storage_options.{k}={v}" for k, v in options.items()]
    missing = f"s3://no-such-{root[len('s3://'):].split('/')[0]}/run/checkpoints"
    bad = dtrain(["train", *FAST, f"run_dir={tmp_path / 'run'}", f"checkpoint.root={root}", *so,
                  f"checkpoint.init_from={missing}", "train.max_steps=1"])
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert (f"dtrain: config error: checkpoint.init_from: {missing}: bucket '{missing[5:].split('/')[0]}' does "
            f"not exist") in bad.stderr, bad.stderr[-2000:]
    assert "could not release" not in bad.stderr, bad.stderr[-2000:]
    assert not storage.exists(f"{root}/.dtrain-lease.json", options)


def test_start_up_with_a_lease_checks_the_bucket_once(s3_root: tuple, s3_requests) -> None:
    """check_root and then the lease each sent a HEAD of the bucket."""
    root, options = s3_root
    bucket = root[len("s3://"):].split("/")[0]
    with CheckpointManager(root, storage_options=options) as mgr, s3_requests() as seen:
        mgr.check_root()
        mgr.acquire_lease()  # as the trainer starts
    assert [r for r in seen if r[0] == "HEAD" and r[1] == f"/{bucket}"] == [("HEAD", f"/{bucket}")], seen
    assert ("PUT", f"/{bucket}/run/checkpoints/.dtrain-lease.json") in seen
