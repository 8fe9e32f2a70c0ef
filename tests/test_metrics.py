from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from dtrain.metrics import MetricsLogger
from tests.reliability.conftest import tmpfs


@pytest.mark.timeout(30)
def test_a_full_disk_drops_metric_records_whole_and_training_goes_on(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """metrics.jsonl lives in the run directory, by default on the disk that holds the checkpoints.
    When that disk fills up, rank 0's write failed with a bare OSError: rank 0 alone left the loop
    (the others then failed with 'Connection closed by peer'), and a record that half fit left a
    torn line. Now a record is written whole or not at all, with a warning naming the file, as
    train.log (through logging) already behaved; the checkpoint save is what stops a run."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        metrics = MetricsLogger(disk, enabled=True, progress=False, tensorboard=False, max_steps=10, start_step=0)
        metrics.log(1, {"train/loss": 1.0})
        st = os.statvfs(disk)
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize))
        big = {"note": "x" * 9000}  # needs new pages whatever is left of the current one
        with caplog.at_level(logging.WARNING, logger="dtrain.metrics"):
            metrics.log(2, big)
            metrics.log(3, big)
            ballast.unlink()
            metrics.log(4, {"train/loss": 0.5})
        metrics.close()
        lines = (disk / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 4]
        warned = [r.getMessage() for r in caplog.records]
        assert any(f"{disk}/metrics.jsonl" in m and "No space left on device" in m for m in warned), warned
        assert any("2 record(s)" in m for m in warned), warned
