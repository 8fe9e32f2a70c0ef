"""Bad configuration and environment: each gives one clear error within a bounded time.
(A world size that does not divide the batch: tests/test_trainer.py::test_batch_not_divisible_...)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import CheckpointManager, load_model, storage
from dtrain.errors import CheckpointError
from tests.multiproc import free_port
from tests.reliability.conftest import REPO, MotoServer, s3_options
from tests.reliability.proxy import FaultProxy

pytestmark = pytest.mark.timeout(90)


def test_a_local_root_that_does_not_exist_is_created(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet" / "there"
    mgr = CheckpointManager(str(root))
    mgr.save(1, model=torch.nn.Linear(2, 2))
    mgr.close()
    assert [(i.step, i.committed) for i in mgr.list()] == [(1, True)]


@pytest.mark.s3
def test_an_s3_bucket_that_does_not_exist_is_an_error_not_created(moto: MotoServer) -> None:
    bucket = f"no-such-{uuid.uuid4().hex[:8]}"
    so = s3_options(moto.endpoint)
    t = time.monotonic()
    with pytest.raises(CheckpointError, match=f"bucket '{bucket}' does not exist.*does not create buckets"):
        CheckpointManager(f"s3://{bucket}/run", storage_options=so).save(1, model=torch.nn.Linear(2, 2))
    assert time.monotonic() - t < 10  # a 404 is not retried
    fs, _ = storage.filesystem(f"s3://{bucket}", so)
    assert not fs.exists(bucket)


@pytest.mark.s3
def test_missing_s3_credentials(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # or botocore asks the instance metadata service
    root = f"s3://{moto.bucket()}/run"
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(root, storage_options={"endpoint_url": moto.endpoint}).save(1, model=torch.nn.Linear(2, 2))
    assert time.monotonic() - t < 15
    assert root in str(e.value) and "NoCredentialsError" in str(e.value) and "credentials" in str(e.value)


@pytest.mark.s3
def test_wrong_s3_credentials_fail_at_once_without_retries(moto: MotoServer, tmp_path: Path) -> None:
    """moto accepts any credentials until told to check them (its reset-auth API, what
    INITIAL_NO_AUTH_ACTION_COUNT sets at start-up): then ours are unknown to it."""
    root = f"s3://{moto.bucket()}/run"
    req = urllib.request.Request(moto.endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()
    proxy = FaultProxy(moto.port).start()
    try:
        t = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            CheckpointManager(root, storage_options=s3_options(proxy.endpoint)).save(1, model=torch.nn.Linear(2, 2))
        assert time.monotonic() - t < 10
        assert root in str(e.value) and "denied" in str(e.value) and "credentials" in str(e.value), str(e.value)
        assert proxy.counts["requests"] == 1, proxy.counts  # a 403 is never retried
        # a checkpoint to load from (resume=<url>, init_from, load_model): it said "PermissionError:
        # Forbidden (check the endpoint, ...)"
        local = CheckpointManager(str(tmp_path), storage_options=s3_options(proxy.endpoint), lease=False)
        for load in (lambda: local.resolve(root), lambda: load_model(root, torch.nn.Linear(2, 2),
                                                                     storage_options=s3_options(proxy.endpoint))):
            with pytest.raises(CheckpointError) as e:
                load()
            assert str(e.value).startswith(f"{root}/manifest.json: access denied (PermissionError: Forbidden): "
                                           f"the credentials are wrong, expired, or not allowed to use it: check "
                                           f"them"), str(e.value)
    finally:
        proxy.stop()


INIT = """
import sys, time
from dtrain import dist
from dtrain.errors import DistributedError
t = time.monotonic()
try:
    dist.init(timeout_s=float(sys.argv[1]))
except DistributedError as e:
    print(f"DistributedError after {time.monotonic() - t:.1f} s: {e}", flush=True)
    sys.exit(1)
print("joined", flush=True)
"""


def _init(rank: int, port: int, timeout_s: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-c", INIT, str(timeout_s)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.multiprocess
def test_rendezvous_that_never_completes_and_a_port_in_use() -> None:
    """Rank 0 alone, rank 1 alone, rank 0 whose MASTER_PORT is taken, rank 1 whose MASTER_PORT is
    held by a program that accepts but never answers: each a DistributedError within dist.timeout_s
    (+ the start-up of Python), all four run at once."""
    squatter = socket.create_server(("127.0.0.1", 0))  # listens, never accepts or answers
    busy = squatter.getsockname()[1]
    timeout_s = 4.0
    cases = {"rank 0 alone": _init(0, free_port(), timeout_s), "rank 1 alone": _init(1, free_port(), timeout_s),
             "rank 0, port in use": _init(0, busy, timeout_s), "rank 1, port held by a stranger": _init(1, busy, timeout_s)}
    outs = {}
    try:
        for name, proc in cases.items():
            out, err = proc.communicate(timeout=60)
            outs[name] = out
            assert proc.returncode == 1, (name, out, err[-2000:])
            seconds = float(out.split("after ")[1].split(" s")[0])
            assert seconds <= timeout_s + 3.0, (name, out)  # a client gets 2 s to end by itself
            assert "could not join the process group at 127.0.0.1:" in out and "within 4 s" in out, (name, out)
            assert "every one of the 2 ranks must start" in out, (name, out)
        assert "address already in use" in outs["rank 0, port in use"]
        assert "is MASTER_PORT free for it" in outs["rank 1, port held by a stranger"]
    finally:
        for proc in cases.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        squatter.close()
