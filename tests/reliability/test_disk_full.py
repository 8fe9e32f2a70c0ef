"""A checkpoint disk that fills up, on a real (tmpfs) filesystem: nothing partial is left behind to
hold the space, the error names the file and says what to do, every rank stops together, and the
committed checkpoints stay the newest and load. Skipped where mounting is not allowed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dtrain.checkpoint import storage
from tests.reliability.conftest import tmpfs


def fill(disk: Path, leave: int = 0) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [64 << 10, 8 << 20])  # through the page cache; O_DIRECT
def test_a_write_that_runs_out_of_space_leaves_no_file(tmp_path: Path, size: int) -> None:
    """The buffered file's close() flushes again and fails again; that second error used to skip
    the removal, so a truncated file stayed behind holding the space."""
    with tmpfs(tmp_path / "disk", "16m") as disk:
        fill(disk, leave=32 << 10)
        url = str(disk / "x.safetensors")
        with pytest.raises(OSError) as e:
            with storage.open_write(url, size=size) as f:
                f.write(b"\1" * size)
        assert e.value.errno == errno.ENOSPC
        assert not os.path.exists(url), os.listdir(disk)
