"""dtrain.plot draws a run directory's losses to a PNG and refuses a directory without metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtrain.errors import DtrainError
from dtrain.plot import main, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, *, summary: bool = True) -> None:
    lines = []
    for step in range(1, 41):
        lines.append({"step": step, "epoch": step / 10, "time": step * 0.1, "train/loss": 2.0 / step,
                      "lr": 1e-3, "samples_per_s": 100.0})
        if step % 10 == 0:
            lines.append({"step": step, "epoch": step / 10, "time": step * 0.1,
                          "val/loss": [0.0, 0.9, 0.6, 0.7, 0.8][step // 10], "val/acc": 0.5})
    lines.append({"step": 20, "event": "resume", "from": "step-000000020"})
    lines.append({"step": 30, "train/loss": "nan"})  # non-finite values are logged as strings
    lines.append({"step": 40, "event": "early_stop", "reason": "patience"})
    text = "\n".join(json.dumps(x) for x in lines) + "\n" + '{"step": 41, "train/lo'  # torn last line
    (run_dir / "metrics.jsonl").write_text(text)
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({
            "stopped_by": "early_stopping:patience", "best_step": 20, "best_metric": 0.6,
            "monitor": "val/loss", "last_step": 40, "exit_code": 0, "resumed_from": None}))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def test_plot_run_writes_png_in_run_dir(tmp_path: Path) -> None:
    _write_run(tmp_path)
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    _assert_png(out)
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_without_summary_and_custom_out(tmp_path: Path) -> None:
    _write_run(tmp_path, summary=False)
    out = plot_run(str(tmp_path), tmp_path / "plots" / "curve.png")
    _assert_png(out)
    assert not (tmp_path / "loss.png").exists()


def test_read_metrics_keeps_latest_line_per_step(tmp_path: Path) -> None:
    _write_run(tmp_path)
    series, resumes = read_metrics(tmp_path / "metrics.jsonl")
    assert [s for s, _ in series["val/loss"]] == [10, 20, 30, 40]
    assert len(series["train/loss"]) == 40
    assert str(dict(series["train/loss"])[30]) == "nan"  # the re-logged step replaced the first value
    assert resumes == [20]


def test_missing_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DtrainError, match="metrics.jsonl"):
        plot_run(tmp_path)
    assert not (tmp_path / "loss.png").exists()


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
    _write_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "loss.png")
    _assert_png(tmp_path / "loss.png")
