"""Storage that fails under a save: S3 killed and restarted, an endpoint that drops connections or
answers errors, a disk that fills up, a root that cannot be written. In each case the save either
commits after bounded retries or fails with a CheckpointError naming the URL; nothing partial
becomes visible, and the previous committed checkpoint still loads and verifies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain.checkpoint import CheckpointManager, storage, verify
from dtrain.checkpoint.s3upload import is_transient
from dtrain.errors import CheckpointError
from tests.launch import FAST, dtrain
from tests.reliability.conftest import REPO, MotoServer, make_model, remount, s3_options, tmpfs, train_step
from tests.reliability.proxy import FaultPlan, FaultProxy


def weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_loads(root: str, so: dict | None, step_no: int, expected: dict[str, torch.Tensor], width: int = 32) -> None:
    """The newest committed checkpoint is `step_no`, verifies, and loads the expected weights."""
    mgr = CheckpointManager(root, storage_options=so, lease=False)
    latest = mgr.latest_committed()
    assert latest is not None and latest.step == step_no, mgr.list()
    assert verify(latest.url, so) == []
    fresh, opt = make_model(seed=99, width=width)
    mgr.load(latest, model=fresh, optimizer=opt)
    for k, v in expected.items():
        assert torch.equal(fresh.state_dict()[k], v), k


# ---- S3: flaky, down, killed ----------------------------------------------------------------------
@pytest.mark.s3
@pytest.mark.timeout(120)
def test_flaky_endpoint_every_save_commits_after_retries(moto: MotoServer, proxy: FaultProxy, caplog) -> None:  # type: ignore[no-untyped-def]
    proxy.seed, proxy.plan = 7, FaultPlan(reset=0.06, drop_response=0.04, error_500=0.03, error_503=0.05)
    root = f"s3://{moto.bucket()}/run"
    m, o = make_model()
    mgr = CheckpointManager(root, storage_options=s3_options(proxy.endpoint), keep_last_n=2)
    for i in range(1, 5):
        train_step(m, o, i)
        mgr.save(i, model=m, optimizer=o)
    mgr.close()
    assert proxy.injected >= 5, proxy.counts  # faults really happened
    assert "retry 1 of" in caplog.text
    direct = s3_options(moto.endpoint)
    assert [i.step for i in CheckpointManager(root, storage_options=direct, lease=False).list()] == [3, 4]
    assert_loads(root, direct, 4, weights(m))


@pytest.mark.s3
@pytest.mark.timeout(120)
@pytest.mark.parametrize("async_save", [False, True])
def test_endpoint_down_fails_the_save_clearly_and_keeps_the_previous(moto: MotoServer, proxy: FaultProxy,
                                                                     async_save: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTRAIN_STORAGE_ATTEMPTS", "3")  # the default 5 only takes longer (report.py times it)
    root = f"s3://{moto.bucket()}/run"
    so = s3_options(proxy.endpoint)
    m, o = make_model()
    train_step(m, o, 1)
    mgr = CheckpointManager(root, storage_options=so, async_save=async_save)
    mgr.save(1, model=m, optimizer=o)
    mgr.wait()
    saved = weights(m)
    train_step(m, o, 2)
    proxy.down()
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        mgr.save(2, model=m, optimizer=o)
        mgr.wait()  # async: the background failure is raised here
    assert time.monotonic() - t < 60
    assert root in str(e.value) and "after 3 attempts" in str(e.value), str(e.value)
    proxy.up()
    assert_loads(root, s3_options(moto.endpoint), 1, saved)  # nothing of step 2 is visible
    train_step(m, o, 3)
    mgr.save(3, model=m, optimizer=o)  # training goes on: the next save commits
    mgr.close()
    assert_loads(root, s3_options(moto.endpoint), 3, weights(m))


@pytest.mark.s3
@pytest.mark.timeout(150)
@pytest.mark.parametrize("back", ["during the save", "after the save failed"])
def test_s3_server_killed_in_the_middle_of_a_save(moto: MotoServer, proxy: FaultProxy, back: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL moto at the 3rd PUT of a save. Restarted at once, the retries carry the save
    through; restarted later, the save has failed cleanly and the old checkpoint is intact."""
    # during: ~30 s of retries leave room for a restart; after: fail fast
    monkeypatch.setenv("DTRAIN_STORAGE_ATTEMPTS", "9" if back == "during the save" else "3")
    root = f"s3://{moto.bucket()}/run"
    m, o = make_model(width=64)
    train_step(m, o, 1)
    mgr = CheckpointManager(root, storage_options=s3_options(proxy.endpoint))
    mgr.save(1, model=m, optimizer=o)
    saved = weights(m)
    puts = []
    restarter: list[threading.Thread] = []

    def kill_at_third_put(n: int, method: str, path: str) -> None:
        if method == "PUT" and "step-000000002" in path:
            puts.append(path)
            if len(puts) == 3:
                if back == "during the save":  # refuse requests until the data is back, as S3 would
                    proxy.down()
                    restarter.append(threading.Thread(target=restart))
                moto.kill()
                for t in restarter:
                    t.start()

    def restart() -> None:
        moto.start(replay=True)
        proxy.up()

    proxy.on_request = kill_at_third_put
    train_step(m, o, 2)
    try:
        if back == "during the save":
            mgr.save(2, model=m, optimizer=o)
            restarter[0].join()
            assert_loads(root, s3_options(moto.endpoint), 2, weights(m), width=64)
        else:
            with pytest.raises(CheckpointError, match=root):
                mgr.save(2, model=m, optimizer=o)
            moto.start(replay=True)
            assert_loads(root, s3_options(moto.endpoint), 1, saved, width=64)  # step 2 is not committed
            train_step(m, o, 3)
            mgr.save(3, model=m, optimizer=o)
            assert_loads(root, s3_options(moto.endpoint), 3, weights(m), width=64)
    finally:
        for t in restarter:
            t.join()
        mgr.close()
    assert len(puts) >= 3
    assert verify(f"{root}/step-000000001", s3_options(moto.endpoint)) == []


def test_transient_or_not() -> None:
    """Retries are for dropped connections, 5xx and throttling, never for denied or missing."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> Exception:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    for e in (client_error("SlowDown", 503), client_error("InternalError", 500), client_error("X", 502),
              EndpointConnectionError(endpoint_url="http://x"), ConnectionResetError()):
        assert is_transient(e), e
    for e in (client_error("AccessDenied", 403), client_error("InvalidAccessKeyId", 403),
              client_error("NoSuchBucket", 404), client_error("NotImplemented", 501), FileNotFoundError(), ValueError()):
        assert not is_transient(e), e
    wrapped = PermissionError("denied")
    wrapped.__cause__ = client_error("AccessDenied", 403)
    assert not is_transient(wrapped)


# ---- local disk -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_a_save(tmp_path: Path, async_save: bool) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        root = str(disk / "ckpts")
        m, o = make_model(width=256)  # ~20k parameters: ~0.25 MB per checkpoint with AdamW state
        train_step(m, o, 1)
        mgr = CheckpointManager(root, async_save=async_save)
        mgr.save(1, model=m, optimizer=o)
        mgr.wait()
        saved = weights(m)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        ballast = disk / "ballast"
        with open(ballast, "wb") as f:
            f.write(b"\0" * (free - 48 * 1024))  # room for the lease and a file or two, not a checkpoint
        train_step(m, o, 2)
        with pytest.raises(CheckpointError) as e:
            mgr.save(2, model=m, optimizer=o)
            mgr.wait()
        assert "No space left on device" in str(e.value) and f"{root}/step-000000002" in str(e.value)
        assert not os.path.exists(f"{root}/step-000000002/manifest.json")
        assert_loads(root, None, 1, saved, width=256)
        ballast.unlink()
        train_step(m, o, 3)
        mgr.save(3, model=m, optimizer=o)  # space is back: training and saving go on
        mgr.close()
        assert_loads(root, None, 3, weights(m), width=256)
        assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-000000001", "step-000000003"]


@pytest.mark.timeout(60)
def test_read_only_root(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        root = str(disk / "ckpts")
        m, o = make_model()
        mgr = CheckpointManager(root)
        mgr.save(1, model=m, optimizer=o)
        saved = weights(m)
        remount(disk, "ro")
        train_step(m, o, 2)
        with pytest.raises(CheckpointError, match="Read-only file system") as e:
            mgr.save(2, model=m, optimizer=o)
        assert root in str(e.value)
        assert_loads(root, None, 1, saved)  # loading needs no write access
        remount(disk, "rw")
        mgr.save(2, model=m, optimizer=o)
        mgr.close()
        assert_loads(root, None, 2, weights(m))


SAVE = """
import sys, torch
from dtrain.checkpoint import CheckpointManager
from dtrain.errors import CheckpointError
try:
    CheckpointManager(sys.argv[1]).save(1, model=torch.nn.Linear(2, 2))
except CheckpointError as e:
    print(f"CheckpointError: {e}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.timeout(60)
def test_permission_denied_on_the_root() -> None:
    """We run as root, which chmod alone does not stop: the saver runs without the capabilities
    that bypass file permissions (setpriv), against a root owned by `nobody`."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux setpriv to drop the file-permission capabilities")
    base = tempfile.mkdtemp(prefix="dtrain-perm-")
    try:
        root = os.path.join(base, "ckpts")
        os.mkdir(root, 0o755)
        os.chown(root, 65534, 65534)  # nobody's: others may read it, not write it
        proc = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--",
                               sys.executable, "-c", SAVE, root], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=50)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "CheckpointError" in proc.stderr and root in proc.stderr and "Permission denied" in proc.stderr
        assert os.listdir(root) == []
    finally:
        storage.remove(base)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_trainer_exits_with_code_1_when_its_checkpoint_root_is_read_only(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m", "ro") as disk:
        proc = dtrain(["train", *FAST, f"run_dir={tmp_path / 'run'}", f"checkpoint.root={disk}/ckpts",
                       "train.max_steps=10", "checkpoint.every_steps=5", "early_stopping.enabled=false"], timeout=100)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "dtrain: error:" in proc.stderr and f"{disk}/ckpts" in proc.stderr and "Read-only" in proc.stderr


def rank_cannot_create_the_step_directory(rank: int, world: int, root: str) -> list[str]:
    """Rank 1 cannot create the step directory (a node-local disk out of inodes, say), sync and
    async: every rank must get the same CheckpointError and go on, none may wait in the commit."""
    from dtrain import dist
    from tests.checkpoint.workers import save_error, wrap

    dist.init(timeout_s=20, backend="gloo")
    m, o = make_model(width=32)
    model = wrap(m, "ddp", world)
    if rank == 1:
        real = storage.makedirs

        def refuse(url: str, so: storage.StorageOptions = None) -> None:
            if "step-" in url:
                raise OSError(28, "No space left on device", url)
            real(url, so)
        storage.makedirs = refuse  # type: ignore[assignment]
    out = []
    for n, async_save in enumerate((False, True)):
        mgr = CheckpointManager(f"{root}/ckpts-{n}", async_save=async_save)
        train_step(model, o, 1)
        out.append(save_error(mgr, 1, model=model, optimizer=o))
        train_step(model, o, 2)  # a training collective: a rank left in the commit would hang here
        mgr.close()
    dist.shutdown()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_rank_that_cannot_create_the_step_directory_fails_every_rank_without_a_hang(tmp_path: Path) -> None:
    from tests.multiproc import run_ranks

    results = run_ranks(rank_cannot_create_the_step_directory, 2, str(tmp_path))
    assert results[0] == results[1], results
    for error in results[0]:
        assert "was not committed" in error and "rank 1: creating" in error and "No space left" in error, error
