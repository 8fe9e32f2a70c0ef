"""`dtrain train` with its checkpoint root in S3 (a real moto server), end to end: what the run
writes keeps no credentials, and a root whose bucket does not exist is a config error."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.launch import FAST, dtrain
from tests.moto import start_moto, stop_process

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    proc, url = start_moto()
    try:
        yield url
    finally:
        stop_process(proc)


def _bucket(endpoint: str) -> str:
    import s3fs

    name = f"run-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True).mkdir(name)
    return name


def _config(path: Path, endpoint: str, root: str, secret: str) -> Path:
    """A job config whose storage_options carry credentials, as a user writes them."""
    path.write_text(yaml.safe_dump({"checkpoint": {"root": root, "storage_options": {
        "key": "AKIAMYACCESSKEY", "secret": secret,
        "client_kwargs": {"endpoint_url": endpoint, "aws_session_token": "MYSESSIONTOKEN"}}}}))
    return path


def test_credentials_are_not_written_and_a_restart_does_not_take_them_for_changes(endpoint: str,
                                                                                     tmp_path: Path) -> None:
    """run_dir/config.yaml kept storage_options in plain text. Nothing the two runs write
    (config.yaml, train.log, their output, the checkpoints' state.json) may hold a credential; the
    restart, with rotated credentials, writes with them and lists only what really changed."""
    import s3fs

    bucket, run_dir = _bucket(endpoint), tmp_path / "run"
    root = f"s3://{bucket}/ck"
    base = [*FAST, f"run_dir={run_dir}", "train.eval_every=2", "checkpoint.keep_last_n=0",
            "checkpoint.keep_best_k=0"]
    first = dtrain(["train", "--config", str(_config(tmp_path / "a.yaml", endpoint, root, "FIRSTSECRET")), *base,
                    "train.max_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = dtrain(["train", "--config", str(_config(tmp_path / "b.yaml", endpoint, root, "ROTATEDSECRET")),
                     *base, "train.max_steps=4"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {root}/step-000000002 at step 2" in second.stderr, second.stderr[-3000:]
    assert "train.max_steps: 2 -> 4" in second.stderr and "storage_options" not in second.stderr, second.stderr
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
    assert fs.exists(f"{bucket}/ck/step-000000004/manifest.json")  # written with the rotated credentials
    written = {
        "config.yaml": (run_dir / "config.yaml").read_text(), "train.log": (run_dir / "train.log").read_text(),
        "output": first.stdout + first.stderr + second.stdout + second.stderr,
        "state.json": "".join(fs.cat(f"{bucket}/ck/step-00000000{s}/state.json").decode() for s in (2, 4)),
    }
    for name, text in written.items():
        for secret in ("AKIAMYACCESSKEY", "FIRSTSECRET", "ROTATEDSECRET", "MYSESSIONTOKEN"):
            assert secret not in text, f"{secret} in {name}"
    saved = yaml.safe_load(written["config.yaml"])["checkpoint"]["storage_options"]
    assert saved == {"key": "<redacted>", "secret": "<redacted>",
                     "client_kwargs": {"endpoint_url": endpoint, "aws_session_token": "<redacted>"}}


@pytest.mark.parametrize("key", ["checkpoint.root", "checkpoint.root+checkpoint.lease=false", "resume"])
def test_a_url_in_a_bucket_that_does_not_exist_is_a_config_error_before_training(endpoint: str, key: str,
                                                                                  tmp_path: Path) -> None:
    """Without a lease nothing touched the root until the first save: the run trained, then failed
    with a traceback and exit 1 (which launchers restart, to fail again); with one it exited 1 too.
    A resume=<url> in a missing bucket exited 1 saying only "neither a committed checkpoint nor a
    root" (checkpoint.init_from: tests/checkpoint/test_s3.py)."""
    import json

    url = f"s3://no-such-{uuid.uuid4().hex[:8]}/ck"
    name, _, lease = key.partition("+")
    proc = dtrain(["train", *FAST, f"run_dir={tmp_path}", f"{name}={url}", *([lease] if lease else []),
                   "train.max_steps=2"], env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                              "AWS_SECRET_ACCESS_KEY": "testing"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"dtrain: config error: {name}: {url}: bucket '{url[5:-3]}' does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()
    record = json.loads((tmp_path / "ranks" / "rank-00000.json").read_text())  # what launch/torchrun.sh reads
    assert record["exit_code"] == 2 and record["stopped_by"] == "config_error"
    summary = json.loads((tmp_path / "summary.json").read_text())  # "running" from the start until now
    assert (summary["stopped_by"], summary["exit_code"]) == ("config_error", 2) and url in summary["error"], summary
