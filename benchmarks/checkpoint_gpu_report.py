"""Targets, table and plot of checkpoint_gpu.py's samples (kept apart like checkpoint_report.py).

Targets are judged on per-round paired ratios: each round runs every method once, so a slow phase
of the disk hits both sides of a ratio.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import benchmarks.checkpoint_io as cio
from benchmarks.checkpoint_report import paired, size_label

EXTRA = ("device_peak_save", "device_peak_load", "host_peak_load")  # bytes; max over repeats


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """checkpoint_io.aggregate (medians of the *_s timings, max host peak, verified, every sample)
    plus the device peaks and whether staging was pinned."""
    out = cio.aggregate(samples)
    ok = [s for s in samples if "error" not in s]
    for k in EXTRA:
        vals = [s[k] for s in ok if s.get(k) is not None]
        out[k] = max(vals) if vals else None
    if ok:
        out["staging_pinned"] = ok[0]["staging_pinned"] if len({s["staging_pinned"] for s in ok}) == 1 else "mixed"
    return out


def _judge(size: int, name: str, rounds: list[float], bound: float, lower: bool = False) -> dict[str, Any]:
    """Met: the median of the per-round values passes and >= 60% of rounds pass; missed: it fails
    and <= 40% pass; else inconclusive (the rule of checkpoint_report.targets)."""
    if not rounds:
        return {"size": size, "target": name, "value": None, "bound": bound, "verdict": "not measured"}
    ok = sum(x <= bound if lower else x >= bound for x in rounds)
    mid = statistics.median(rounds)
    good = mid <= bound if lower else mid >= bound
    verdict = "met" if good and ok >= 0.6 * len(rounds) else "missed" if not good and ok <= 0.4 * len(rounds) \
        else "inconclusive"
    return {"size": size, "target": name, "value": round(mid, 4), "per_round": [round(x, 4) for x in rounds],
            "rounds_met": f"{ok}/{len(rounds)}", "bound": bound, "verdict": verdict}


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n, by in results.items():
        sync, asy, dcp = by.get("dtrain", {}), by.get("dtrain-async", {}), by.get("dcp", {})
        frac = [a["stall_s"] / s["save_s"] for a, s in zip(asy.get("samples", []), sync.get("samples", []),
                                                            strict=False) if "stall_s" in a and "save_s" in s]
        out.append(_judge(int(n), "dtrain async stall <= 5% of dtrain sync save", frac, 0.05, lower=True))
        out.append(_judge(int(n), "dtrain save >= DCP save (speed ratio)", paired(sync, dcp, "save"), 1.0))
        for ref in ("dcp-async", "dcp-async-pinned"):
            if ref in by:
                out.append(_judge(int(n), f"dtrain async stall <= {ref} stall (their stall / ours)",
                                  paired(asy, by[ref], "stall"), 1.0))
        out.append(_judge(int(n), "dtrain load >= DCP load (speed ratio)", paired(sync, dcp, "load"), 1.0))
    return out


def _row(n: int, m: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {size_label(n)} | {m} | error: {r['error']} |" + " |" * 7
    t = {k: f"{r[k]:.2f} s, {n / r[k] / 1e9:.2f} GB/s" if r.get(k) else "-" for k in ("save_s", "load_s")}
    stall = f"{r['stall_s']:.3f} s (first {r['stall_first_s']:.3f} s)" if "stall_s" in r else "-"
    mib = [f"{r[k] / 2**20:.0f}" if r.get(k) is not None and r[k] >= 0 else "-"
           for k in ("peak_extra", "device_peak_save")]
    return (f"| {size_label(n)} | {m} | {t['save_s']} | {stall} | {t['load_s']} | {r.get('verified', '-')} | "
            f"{mib[0]} | {mib[1]} | {r.get('staging_pinned', '-')} |")


def write_outputs(report: dict[str, Any], out: Path) -> None:
    report["targets"] = targets(report["results"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    m, g = report["machine"], report["machine"]["gpu"]
    where = (f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB, driver {g['driver']}, CUDA {g['cuda']}, "
             f"{g['count']} GPU(s))" if "name" in g else f"{g['device']} (smoke run, no GPU)")
    lines = [f"Checkpoint from {where}; host {m['cpu']}, {m['cores']} CPUs, {m['memory_bytes'] / 2**30:.0f} GiB, "
             f"disk {m['disk']}; torch {m['torch']}; state {report['args']['dtype']} (parameters + AdamW exp_avg + "
             f"exp_avg_sq); {report['created']}. Medians over the repeats; GB/s = 1e9 B/s; async rows: the second "
             "save (steady state), save = until durable; loads are cold and bit-checked.", "",
             "| size | method | save | async stall | load | verified | host peak extra MiB | "
             "device peak extra MiB | staging pinned |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(int(n), meth, r) for n, by in report["results"].items() for meth, r in by.items()]
    lines += ["", "Targets (value: median of the per-round ratios or fractions; met also needs >= 60% of rounds):",
              "", "| size | target | value | bound | rounds | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {size_label(t['size'])} | {t['target']} | {t['value']} | {t['bound']} | {t.get('rounds_met', '-')} "
              f"| {'**missed**' if t['verdict'] == 'missed' else t['verdict']} |" for t in report["targets"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, out.with_suffix(".png"), where)
    print("\n".join(lines), flush=True)


def plot(report: dict[str, Any], path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, fig, axes = report["results"], *plt.subplots(1, 3, figsize=(17, 5))
    methods = sorted({m for by in res.values() for m in by})
    color = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}  # the same in every panel
    sizes = sorted(int(n) for n in res)
    for ax, key, title in ((axes[0], "save_s", "save GB/s (async: until durable)"),
                           (axes[1], "load_s", "cold load GB/s"), (axes[2], "stall_s", "async stall (s)")):
        for m in methods:
            pts = [(n, res[str(n)][m][key]) for n in sizes if res[str(n)].get(m, {}).get(key)]
            if pts:
                y = [s if key == "stall_s" else n / s / 1e9 for n, s in pts]
                ax.plot([n for n, _ in pts], y, marker="o", linestyle="--" if "async" in m else "-", label=m,
                        color=color[m], linewidth=2.5 if m.startswith("dtrain") else 1.2)
        ax.set(xscale="log", yscale="log" if key == "stall_s" else "linear", xlabel="state size", title=title)
        ax.set_xticks(sizes, [size_label(n) for n in sizes], minor=False)
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"Checkpoint from device memory: {where}, torch {report['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
