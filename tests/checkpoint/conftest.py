"""Fixtures for checkpoint tests: a real moto S3 server on a free port, stopped by PID, and the
requests that reach it (moto's request recorder)."""

from __future__ import annotations

import contextlib
import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.moto import start_moto, stop_process

_RECORDING = "moto-requests.jsonl"


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # the recorder stays off until a test turns it on (s3_requests); its file goes in a temp dir
    record = tmp_path_factory.mktemp("moto") / _RECORDING
    try:
        proc, endpoint = start_moto(env={"MOTO_RECORDER_FILEPATH": str(record)})
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield endpoint
    finally:
        stop_process(proc)


def _recorder(endpoint: str, action: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method="POST"),
                           timeout=10).close()


@pytest.fixture
def s3_requests(moto_endpoint: str) -> Callable[[], contextlib.AbstractContextManager[list[tuple[str, str]]]]:
    """`with s3_requests() as seen:` fills `seen` with the (method, path?query) of every request that
    reached the moto server inside the block, once the block ends."""
    @contextlib.contextmanager
    def record() -> Iterator[list[tuple[str, str]]]:
        seen: list[tuple[str, str]] = []
        _recorder(moto_endpoint, "reset-recording")
        _recorder(moto_endpoint, "start-recording")
        try:
            yield seen
        finally:
            _recorder(moto_endpoint, "stop-recording")
            with urllib.request.urlopen(f"{moto_endpoint}/moto-api/recorder/download-recording", timeout=10) as r:
                lines = r.read().decode("utf-8").splitlines()
            for line in lines:
                entry = json.loads(line)
                seen.append((entry["method"], entry["url"].removeprefix(moto_endpoint)))
    return record


@pytest.fixture
def s3_root(moto_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A fresh bucket; returns (root URL, storage_options)."""
    import s3fs

    options = {"endpoint_url": moto_endpoint, "key": "testing", "secret": "testing"}
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}/run/checkpoints", options
