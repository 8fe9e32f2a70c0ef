from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from dtrain.metrics import MetricsLogger, setup_logging
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


@pytest.mark.timeout(30)
def test_a_full_disk_drops_log_file_lines_with_one_report_not_a_traceback_each(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    """train.log was a logging.FileHandler: once its disk was full, every record printed
    '--- Logging error ---' and a traceback to stderr (logging's handleError), burying the error
    that stopped the run. Now the first failure is said once, lines go on to stderr, none is torn,
    and the file notes the gap once it can be written again."""
    root = logging.getLogger()
    level = root.level
    log = logging.getLogger("dtrain.test")
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "train.log"
        setup_logging(0, "INFO", path)
        try:
            log.info("first")
            st = os.statvfs(disk)
            ballast = disk / "ballast"
            ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize))
            for n in range(3):  # each needs new pages, whatever is left of the file's last one
                log.info("lost %d %s", n, "x" * 9000)
            ballast.unlink()
            log.info("back")
        finally:
            for h in [h for h in root.handlers if getattr(h, "_dtrain", False)]:
                root.removeHandler(h)
                h.close()
            root.setLevel(level)
        err = capfd.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err, err[:3000]
        assert err.count(f"cannot write the log file {path} (OSError: [Errno 28] No space left on device)") == 1, err
        assert all(f"lost {n} " in err for n in range(3))  # stderr still has every line
        assert f"the log file {path} is written again; 3 line(s) are missing from it" in err
        lines = path.read_text().splitlines()
        assert len(lines) == 3 and lines[0].endswith("dtrain.test: first") and lines[2].endswith("dtrain.test: back")
        assert "3 log line(s) before this one could not be written here" in lines[1]
