"""Fixtures for checkpoint tests: a real moto S3 server on a free port, stopped by PID."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.moto import start_moto, stop_process


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    try:
        proc, endpoint = start_moto()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield endpoint
    finally:
        stop_process(proc)


@pytest.fixture
def s3_root(moto_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A fresh bucket; returns (root URL, storage_options)."""
    import s3fs

    options = {"endpoint_url": moto_endpoint, "key": "testing", "secret": "testing"}
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}/run/checkpoints", options
