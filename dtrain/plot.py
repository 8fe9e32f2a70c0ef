"""Draw a run's train and validation loss against step, with the best and the stop step marked.

Reads only the run directory's metrics.jsonl and summary.json, so it works for any run, finished or
not, and uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend change).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dtrain.errors import DtrainError

log = logging.getLogger(__name__)

SERIES = ("train/loss", "val/loss")


def _as_float(value: Any) -> float | None:
    """Numbers, and the strings "nan"/"inf" that metrics.jsonl uses for non-finite values."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def read_metrics(path: Path) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """Loss series by name as sorted (step, value) pairs, and the steps of resume events.

    A resumed run appends to the same file and logs the steps after its checkpoint again; the later
    line for a step wins, so the curve shows the trajectory the run actually kept. A torn last line
    (a killed writer) is skipped with a warning.
    """
    series: dict[str, dict[int, float]] = {name: {} for name in SERIES}
    resumes: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is not valid JSON; skipped", path, lineno)
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int):
                continue
            if record.get("event") == "resume":
                resumes.append(step)
            for name in SERIES:
                value = _as_float(record.get(name))
                if value is not None:
                    series[name][step] = value
    return {name: sorted(points.items()) for name, points in series.items()}, sorted(set(resumes))


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DtrainError(f"{path} is not valid JSON ({e}); delete it or rerun the job to rewrite it") from e
    if not isinstance(summary, dict):
        raise DtrainError(f"{path} holds {type(summary).__name__}, expected a JSON object")
    return summary


def _draw(fig: Figure, series: dict[str, list[tuple[int, float]]], resumes: list[int],
          summary: dict[str, Any], title: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    styles: dict[str, dict[str, Any]] = {"train/loss": {"color": "tab:blue", "alpha": 0.6, "linewidth": 1.0},
              "val/loss": {"color": "tab:orange", "marker": "o", "markersize": 3, "linewidth": 1.5}}
    for name, points in series.items():
        finite = [(s, v) for s, v in points if math.isfinite(v)]
        if finite:
            ax.plot([s for s, _ in finite], [v for _, v in finite], label=name, **styles[name])
    for i, step in enumerate(resumes):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="resume" if i == 0 else None)
    best_step, last_step = summary.get("best_step"), summary.get("last_step")
    if isinstance(best_step, int):
        best = _as_float(summary.get("best_metric"))
        monitor = summary.get("monitor") or "metric"
        label = f"best step {best_step}" + (f" ({monitor}={best:.4g})" if best is not None else "")
        ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1.5, label=label)
    if isinstance(last_step, int):
        ax.axvline(last_step, color="tab:red", linestyle="-.", linewidth=1.5, label=f"stop step {last_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss plot of `run_dir` to `out` (default <run_dir>/loss.png) and return its path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DtrainError(
            f"{metrics_path} does not exist: {run_dir} is not a dtrain run directory, or the run has not "
            "logged anything yet. Pass the run_dir the job was started with."
        )
    series, resumes = read_metrics(metrics_path)
    if not any(series.values()):
        raise DtrainError(f"{metrics_path} has no {' or '.join(SERIES)} values to plot yet")
    summary = _read_summary(run_dir / "summary.json")
    stopped_by = summary.get("stopped_by", "running")  # "running" from each start until its end
    title = "still running (or ended without a summary.json)" if stopped_by == "running" else f"stopped by {stopped_by}"
    out_path = Path(out) if out is not None else run_dir / "loss.png"
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    _draw(fig, series, resumes, summary, f"{run_dir.name}: {title}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out_path)  # a reader never sees half a PNG
    log.info("wrote %s", out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    """`dtrain plot RUN_DIR [--out FILE]`: exit 0 with the PNG's path printed, 1 with the reason."""
    parser = argparse.ArgumentParser(prog="dtrain plot", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (and summary.json)")
    parser.add_argument("--out", default=None, help="where to write the PNG (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except DtrainError as e:
        print(f"dtrain plot: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
