"""Two jobs pointed at one checkpoint root: the second refuses with a message naming the root and
the holder, a crashed holder does not block the root for ever, a restart of the same job goes on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dtrain.checkpoint import storage, verify
from dtrain.checkpoint.lease import LEASE_FILE, Lease, read_holder
from dtrain.errors import CheckpointError
from tests.reliability.conftest import REPO, s3_options

JOB = """
import json, os, sys, torch
from dtrain.checkpoint import CheckpointManager
from dtrain.errors import CheckpointError
root, job, hold, so = sys.argv[1], sys.argv[2], sys.argv[3] == "hold", json.loads(sys.argv[4])
mgr = CheckpointManager(root, storage_options=so, job_id=job, lease_ttl_s=float(os.environ.get("TTL", "60")))
try:
    mgr.acquire_lease()
    mgr.save(1, model=torch.nn.Linear(2, 2))
except CheckpointError as e:
    print(f"REFUSED: {e}", flush=True)
    sys.exit(1)
print("HOLDING", flush=True)
if hold:
    sys.stdin.read()  # until the test closes our stdin
mgr.close()
print("RELEASED", flush=True)
"""


def start(root: str, job: str, so: dict[str, Any] | None, hold: bool, ttl: float = 60) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", JOB, root, job, "hold" if hold else "once", json.dumps(so)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "TTL": str(ttl)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen[str], word: str, timeout: float = 40) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {word!r} from the job (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    if request.param == "local":
        return str(tmp_path / "ckpts"), None
    moto = request.getfixturevalue("moto")
    return f"s3://{moto.bucket()}/run", s3_options(moto.endpoint)


@pytest.mark.timeout(120)
def test_second_job_refuses_naming_the_root_and_the_holder(tmp_path: Path) -> None:
    """Local root; on S3 the same protocol runs through conditional PUTs (tests below)."""
    url, so = str(tmp_path / "ckpts"), None
    a = start(url, "job-a", so, hold=True, ttl=1.5)  # a short TTL: only the heartbeat keeps it alive
    try:
        wait_line(a, "HOLDING")
        time.sleep(2.0)  # longer than the TTL: the lease is alive only because it is being renewed
        b = subprocess.run([sys.executable, "-c", JOB, url, "job-b", "once", json.dumps(so)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert b.returncode == 1, b.stdout + b.stderr[-2000:]
        msg = b.stdout
        for needle in (f"checkpoint root {url} is in use by another job", "job 'job-a'", f"pid {a.pid}",
                       f"host {socket.gethostname()}", "since ", "DTRAIN_JOB_ID=job-a"):
            assert needle in msg, (needle, msg)
        assert verify(f"{url}/step-000000001", so) == []  # the holder's checkpoint is untouched
        assert a.stdin is not None
        a.stdin.close()  # the first job finishes and gives the lease back
        wait_line(a, "RELEASED")
        assert a.wait(30) == 0
        assert read_holder(url, so) is None
        b = subprocess.run([sys.executable, "-c", JOB, url, "job-b", "once", json.dumps(so)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert b.returncode == 0 and "RELEASED" in b.stdout, b.stderr[-2000:]
    finally:
        stop(a)


@pytest.mark.timeout(90)
def test_a_crashed_holder_on_this_host_does_not_block_the_root(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpts")
    a = start(url, "job-a", None, hold=True)
    try:
        wait_line(a, "HOLDING")
        os.kill(a.pid, signal.SIGKILL)  # no close(): its lease file stays behind, unexpired
        a.wait()
        holder = read_holder(url)
        assert holder is not None and holder.pid == a.pid and holder.job_id == "job-a"
        b = subprocess.run([sys.executable, "-c", JOB, url, "job-b", "once", "null"], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert b.returncode == 0, b.stdout + b.stderr[-2000:]
        assert "taking over the checkpoint lease" in b.stderr and f"pid {a.pid}" in b.stderr
    finally:
        stop(a)


def forge(url: str, so: dict[str, Any] | None, *, job: str, host: str, renewed_ago: float, ttl: float = 60) -> None:
    """A lease as another host would have written it."""
    now = time.time()
    body = {"job_id": job, "host": host, "pid": 1, "since": now - 3600, "renewed": now - renewed_ago,
            "ttl_s": ttl, "token": "elsewhere"}
    storage.makedirs(url, so)
    Lease(url, so)._write(json.dumps(body).encode(), None)  # as a first writer would (create if absent)


@pytest.mark.timeout(60)
def test_takeover_rules(root: tuple[str, dict[str, Any] | None]) -> None:
    url, so = root
    forge(url, so, job="job-x", host="other-host", renewed_ago=5)
    with pytest.raises(CheckpointError, match=r"job 'job-x' \(host other-host, pid 1\).*expires in 5\d s"):
        Lease(url, so, job_id="job-y").acquire()
    same_job = Lease(url, so, job_id="job-x")  # the same job restarted (Slurm requeue, torchrun restart)
    same_job.acquire()
    holder = read_holder(url, so)
    assert holder is not None and holder.token == same_job.token and holder.pid == os.getpid()
    same_job.release()
    assert read_holder(url, so) is None
    forge(url, so, job="job-x", host="other-host", renewed_ago=61)  # expired: its job stopped renewing
    other = Lease(url, so, job_id="job-z")
    other.acquire()
    assert read_holder(url, so).job_id == "job-z"  # type: ignore[union-attr]
    other.release()


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_s3_lease_is_a_compare_and_swap(moto) -> None:  # type: ignore[no-untyped-def]
    """Two jobs that both read "no lease" and both write: the conditional PUT lets one win."""
    url, so = f"s3://{moto.bucket()}/run", s3_options(moto.endpoint)
    first, second = Lease(url, so, job_id="job-1"), Lease(url, so, job_id="job-2")
    second._read = lambda: (None, None)  # type: ignore[method-assign]  # it read before the first wrote
    first.acquire()
    with pytest.raises(CheckpointError, match="another job changed the lease"):
        second.acquire()
    assert read_holder(url, so).job_id == "job-1"  # type: ignore[union-attr]
    first.release()


def test_lease_file_is_named_in_the_error(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpts")
    forge(url, None, job="job-x", host="other-host", renewed_ago=0)
    with pytest.raises(CheckpointError) as e:
        Lease(url, job_id="job-y").acquire()
    assert os.path.join(url, LEASE_FILE) in str(e.value)


@pytest.mark.timeout(60)
def test_acquire_on_a_fresh_lease_of_ours_does_not_rewrite_it(root: tuple[str, dict[str, Any] | None]) -> None:
    """Every save calls acquire(): on a lease renewed less than ttl/3 ago it only checks the file
    (no write, no fsync or PUT); the heartbeat and an older lease renew it; a lease taken over
    meanwhile is still refused."""
    url, so = root
    lease = Lease(url, so, job_id="job-a", ttl_s=3.0)
    lease.acquire()
    first = read_holder(url, so)
    assert first is not None
    lease.acquire()
    assert read_holder(url, so) == first  # fresh: untouched
    lease.acquire(renew=True)  # the heartbeat's call
    renewed = read_holder(url, so)
    assert renewed is not None and renewed.renewed > first.renewed and renewed.token == first.token
    time.sleep(1.1)  # older than ttl/3
    lease.acquire()
    later = read_holder(url, so)
    assert later is not None and later.renewed > renewed.renewed
    storage.remove(storage.join(url, LEASE_FILE), so)  # someone else's lease now
    forge(url, so, job="job-x", host="other-host", renewed_ago=0)
    with pytest.raises(CheckpointError, match="job 'job-x'"):
        lease.acquire()


def _until(what: str, cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.mark.timeout(30)
def test_the_heartbeat_outlives_a_storage_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal that fails past its retries (on S3 a CheckpointError: 'cannot write the lease')
    is tried again at the next beat; the heartbeat used to end there for good, so the lease ran
    out between saves and another job could take the root."""
    url = str(tmp_path / "ckpts")
    lease = Lease(url, job_id="job-a", ttl_s=0.6)  # a beat every 0.2 s
    lease.acquire()
    real, failures = Lease._write, [0]

    def flaky(self: Lease, data: bytes, etag: str | None) -> None:
        if failures[0] < 3:
            failures[0] += 1
            raise CheckpointError(f"{self.url}: cannot write the lease: ConnectionError: the endpoint is down")
        real(self, data, etag)
    monkeypatch.setattr(Lease, "_write", flaky)
    lease.start_heartbeat()
    try:
        _until("three renewals failed", lambda: failures[0] == 3)
        before = read_holder(url)
        assert before is not None
        _until("a renewal after the outage", lambda: read_holder(url).renewed > before.renewed)  # type: ignore[union-attr]
    finally:
        lease.release()


@pytest.mark.timeout(30)
def test_the_heartbeat_ends_when_another_job_holds_the_lease_and_starts_again_with_the_next_save(
        tmp_path: Path) -> None:
    url = str(tmp_path / "ckpts")
    lease = Lease(url, job_id="job-a", ttl_s=0.6)
    lease.acquire()
    storage.remove(storage.join(url, LEASE_FILE), None)
    forge(url, None, job="job-x", host="other-host", renewed_ago=0, ttl=0.6)  # taken over while we stalled
    lease.start_heartbeat()
    try:
        _until("the heartbeat ends", lambda: lease._thread is not None and not lease._thread.is_alive())
        time.sleep(0.7)  # the other job stopped renewing: its lease expired
        lease.acquire()  # the next save takes it back...
        taken = read_holder(url)
        assert taken is not None and taken.job_id == "job-a"
        lease.start_heartbeat()  # ...and keeps it alive again
        _until("the heartbeat renews it", lambda: read_holder(url).renewed > taken.renewed)  # type: ignore[union-attr]
    finally:
        lease.release()
