from __future__ import annotations

import os
import uuid

import pytest

from dtrain.checkpoint import storage
from dtrain.errors import CheckpointError


@pytest.fixture(params=["local", "file", "memory"])
def base(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return f"file://{tmp_path}"
    return f"memory://ckpt-{uuid.uuid4().hex}"


def test_write_read_list_remove(base: str) -> None:
    d = storage.join(base, "step-000000001")
    storage.makedirs(d)
    with storage.open_write(storage.join(d, "a.bin")) as f:
        f.write(b"0123456789")
    storage.write_atomic(storage.join(d, "m.json"), b"{}")
    assert storage.read_bytes(storage.join(d, "a.bin")) == b"0123456789"
    assert storage.read_bytes(storage.join(d, "a.bin"), 2, 5) == b"234"
    buf = bytearray(4)
    storage.read_into(storage.join(d, "a.bin"), 6, memoryview(buf))
    assert bytes(buf) == b"6789"
    assert storage.size(storage.join(d, "a.bin")) == 10
    assert storage.list_dir(base) == [("step-000000001", True)]
    assert [n for n, _ in storage.list_dir(d)] == ["a.bin", "m.json"]
    storage.remove(d)
    assert storage.list_dir(base) == []
    assert not storage.exists(storage.join(d, "a.bin"))


def test_failed_write_leaves_nothing(base: str) -> None:
    storage.makedirs(base)
    url = storage.join(base, "partial.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(url) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("boom")
    assert not storage.exists(url)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path) -> None:
    url = str(tmp_path / "manifest.json")
    storage.write_atomic(url, b"one")
    storage.write_atomic(url, b"two")
    assert open(url, "rb").read() == b"two"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_short_read_is_a_clear_error(tmp_path) -> None:
    url = str(tmp_path / "f.bin")
    storage.write_atomic(url, b"abc")
    with pytest.raises(CheckpointError, match=r"f\.bin: file is truncated"):
        storage.read_into(url, 1, memoryview(bytearray(10)))


def test_missing_file_raises_file_not_found(base: str) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "nope"))
    assert storage.list_dir(storage.join(base, "nothing-here")) == []


def test_s3_endpoint_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage._options("s3://b/x", None)["endpoint_url"] == "http://127.0.0.1:1"
    assert storage._options("s3://b/x", {"endpoint_url": "http://o"})["endpoint_url"] == "http://o"
    assert "endpoint_url" not in storage._options("memory://x", None)


def test_remote_failures_name_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    class Denied:
        def invalidate_cache(self, path: str) -> None:
            pass

        def ls(self, path: str, detail: bool) -> list:
            raise RuntimeError("NoCredentialsError: Unable to locate credentials")

    monkeypatch.setattr(storage, "filesystem", lambda url, so=None: (Denied(), url[5:]))
    with pytest.raises(CheckpointError, match=r"s3://bucket/run: RuntimeError: NoCredentialsError.*storage_options"):
        storage.list_dir("s3://bucket/run")
