"""Turn checkpoint_io.py's samples into ratios, target verdicts, a Markdown table and a plot.

Kept apart from the measurements so `checkpoint_io.py --replot results.json` can redo every derived
figure from the stored samples. Ratios against a reference come two ways: of the medians, and
paired (each round runs every method once, in a shuffled order, so round i of dtrain is compared
with round i of the reference: a slow phase of this shared disk then hits both sides of the ratio).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

LOCAL = ["raw", "raw-direct", "torch", "safetensors", "dcp", "dtrain", "dtrain-async", "raw-2r", "dcp-2r", "dtrain-2r",
         "dtrain-async-2r"]
REMOTE = ["s3fs", "dtrain-s3"]


def write_outputs(report: dict[str, Any], out: Path) -> None:
    report["targets"] = targets(report["results"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    plot(report, out.with_suffix(".png"))
    print(table)


def size_label(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def with_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for n, by in results.items():
        size = int(n)
        for r in by.values():
            if "error" in r:
                continue
            r["save_gbps"] = size / r["save_s"] / 1e9
            ok = [x for x in r.get("samples", []) if "error" not in x]
            r["save_gbps_range"] = [size / max(x["save_s"] for x in ok) / 1e9, size / min(x["save_s"] for x in ok) / 1e9]
            if "load_s" in r:
                r["load_gbps"] = size / r["load_s"] / 1e9
                r["load_gbps_range"] = [size / max(x["load_s"] for x in ok) / 1e9,
                                        size / min(x["load_s"] for x in ok) / 1e9]
            r["peak_extra_frac"] = r["peak_extra"] / size
            if "stall_s" in r:
                r["stall_frac_of_sync"] = None
        for m, r in by.items():
            if "error" in r:
                continue
            # S3 rows compare with the plain s3fs put/get; 2-rank rows with DCP on 2 ranks
            refs = {"raw": "s3fs"} if m in REMOTE else {"raw": "raw", "dcp": "dcp-2r" if m.endswith("-2r") else "dcp"}
            if m.endswith("-2r") and "raw-2r" in by:
                refs["raw2r"] = "raw-2r"
            for col, ref in refs.items():
                base = by.get(ref, {})
                if "save_gbps" in base:
                    r[f"save_vs_{col}"] = r["save_gbps"] / base["save_gbps"]
                if "load_gbps" in base and "load_gbps" in r:
                    r[f"load_vs_{col}"] = r["load_gbps"] / base["load_gbps"]
            sync = by.get(m.replace("-async", ""), {})
            if "stall_s" in r and "save_s" in sync:
                r["stall_frac_of_sync"] = r["stall_s"] / sync["save_s"]
    return results


def paired(d: dict[str, Any], r: dict[str, Any], what: str) -> list[float]:
    """dtrain's GB/s over the reference's, round by round (rounds where either failed are left out)."""
    out = []
    for a, b in zip(d.get("samples", []), r.get("samples", []), strict=False):
        if f"{what}_s" in a and f"{what}_s" in b and a[f"{what}_s"] > 0:
            out.append(b[f"{what}_s"] / a[f"{what}_s"])
    return out


def verdict(name: str, n: str, suffix: str, value: float, ratios: list[float], bound: float) -> dict[str, Any]:
    """A speed target judged on per-round ratios (see `targets`)."""
    mid, passing = statistics.median(ratios), sum(x >= bound for x in ratios)
    word = ("met" if mid >= bound and passing >= math.ceil(0.6 * len(ratios)) else
            "missed" if mid < bound and passing <= math.floor(0.4 * len(ratios)) else "inconclusive")
    return {"size": int(n), "ranks": 2 if suffix else 1, "target": name, "value": round(value, 3),
            "paired": round(mid, 3), "paired_all": [round(x, 3) for x in ratios],
            "rounds_met": f"{passing}/{len(ratios)}", "bound": bound, "met": mid >= bound, "verdict": word}


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for dtrain, per size and rank count. Speed targets are judged on the
    paired ratios: "met" when their median passes and at least 60% of the rounds pass, "missed"
    when the median fails and at most 40% pass, "inconclusive" otherwise."""
    out = []
    for n, by in results.items():
        for suffix in ("", "-2r"):
            d, a = by.get("dtrain" + suffix, {}), by.get("dtrain-async" + suffix, {})
            if "save_gbps" not in d:
                continue
            speed = {"save >= 0.9x raw write": ("save", "raw", 0.9),
                     "save >= DCP (same ranks)": ("save", "dcp" + suffix, 1.0),
                     "save > torch.save": ("save", "torch", 1.0),
                     "load >= 0.9x raw read": ("load", "raw", 0.9)}
            if not suffix:  # dtrain writes big files with O_DIRECT: the floor that bypasses the cache too
                speed["save >= 0.9x an O_DIRECT raw write (raw-direct)"] = ("save", "raw-direct", 0.9)
            if suffix:  # every rank needs the whole replicated state, so two ranks read it twice: the
                # floor is raw-2r (each rank writes every other tensor, then reads all of them)
                del speed["load >= 0.9x raw read"]
                speed.update({"save >= 0.9x raw write (2 ranks, raw-2r)": ("save", "raw-2r", 0.9),
                              "load >= 0.9x raw read (each rank reads all, raw-2r)": ("load", "raw-2r", 0.9)})
            for name, (what, ref, bound) in speed.items():
                r = by.get(ref, {})
                if f"{what}_gbps" not in r or f"{what}_gbps" not in d:
                    continue
                ratios = paired(d, r, what)
                if ratios:
                    out.append(verdict(name, n, suffix, d[f"{what}_gbps"] / r[f"{what}_gbps"], ratios, bound))
            # the same bytes on the same blocks: what the load adds, file placement aside; from the
            # A B B A reads when the run has them (two of each side, early and late after the save)
            num, den = (("abba_raw_same_files_s", "abba_load_s") if "abba_load_s" in d else
                        ("raw_same_files_load_s", "load_s"))
            same = [x[num] / x[den] for x in d.get("samples", []) if x.get(num) and x.get(den)]
            if same:
                out.append(verdict("load >= 0.9x a raw read of its own files", n, suffix, d[num] / d[den], same, 0.9))
            limits = {"async stall <= 10% of sync save": (a.get("stall_frac_of_sync"), 0.10),
                      "peak extra memory <= 1.1x one rank's state": (d.get("peak_extra_frac"), 1.10),
                      "async peak extra memory <= 1.1x one rank's state": (a.get("peak_extra_frac"), 1.10)}
            for name, (value, bound) in limits.items():
                if value is not None:
                    out.append({"size": int(n), "ranks": 2 if suffix else 1, "target": name, "value": round(value, 3),
                                "bound": bound, "met": value <= bound, "verdict": "met" if value <= bound else "missed"})
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Checkpoint I/O on {m['cpu']} ({m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, "
             f"disk {m['disk']}), torch {m['torch']}, {report['created']}, load average "
             f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}. GB/s = 1e9 B/s; loads are cold; "
             "peak extra = extra host memory of the save / state size (per rank: each rank holds the whole "
             "replicated state); async stall = time save() blocks, steady state (% of the sync save) and "
             "first save. \"vs raw\" of the S3 rows is vs the plain s3fs put/get; \"vs DCP\" of 2-rank rows is vs DCP "
             "on 2 ranks. GB/s are medians over the repeats, (min-max) after them; ratios are of the medians.", "",
             "| size | method | save GB/s | vs raw | vs DCP | load GB/s | vs raw | peak extra | async stall |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    def spread(r: dict[str, Any], what: str) -> str:
        lo_hi = r.get(f"{what}_gbps_range") or [0.0, 0.0]
        if f"{what}_gbps" not in r:
            return "-"
        return f"{r[what + '_gbps']:.2f}" + (f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if r.get("repeats_ok", 1) > 1 else "")

    for n, by in report["results"].items():
        for meth, r in by.items():
            if "error" in r:
                lines.append(f"| {size_label(int(n))} | {meth} | error: {r['error']} | | | | | | |")
                continue
            stall = (f"{r['stall_s']:.3f} s ({r['stall_frac_of_sync']:.0%}); first {r['stall_first_s']:.3f} s"
                     if r.get("stall_frac_of_sync") is not None else "-")
            lines.append(f"| {size_label(int(n))} | {meth} | {spread(r, 'save')} | {f(r.get('save_vs_raw'))} | "
                         f"{f(r.get('save_vs_dcp'))} | {spread(r, 'load')} | {f(r.get('load_vs_raw'))} | "
                         f"{f(r['peak_extra_frac'], '{:.0%}')} | {stall} |")
    lines += ["", "Targets: value = ratio of the medians (or the stall / memory fraction); paired = median of the "
              "per-round ratios (each round runs every method once, so a slow phase of the disk hits both sides); "
              "rounds = rounds that pass. Met: paired median passes and at least 60% of rounds pass; missed: it "
              "fails and at most 40% pass; else inconclusive.", "",
              "| size | ranks | target | value | paired | rounds | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {size_label(t['size'])} | {t['ranks']} | {t['target']} | {t['value']} | {t.get('paired', '-')} | "
              f"{t.get('rounds_met', '-')} | {'**missed**' if t['verdict'] == 'missed' else t['verdict']} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Save and load GB/s against size (bars: min-max over repeats), against ranks, S3, memory, stall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    sizes = sorted(int(n) for n in res)
    local = [m for m in LOCAL if any(m in res[str(n)] for n in sizes)]
    colors: dict[str, Any] = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(LOCAL)}
    colors.update({"s3fs": "tab:gray", "dtrain-s3": "tab:purple"})

    def style(m: str) -> dict[str, Any]:
        return {"color": colors[m], "marker": "o", "linestyle": "--" if m.endswith("-2r") else "-",
                "linewidth": 2.5 if m.startswith("dtrain") else 1.2, "label": m}

    def points(m: str, key: str) -> list[tuple[float, float, float, float]]:
        out = []
        for n in sizes:
            r = res[str(n)].get(m, {})
            if r.get(key) is not None:
                lo, hi = r.get(key + "_range", [r[key], r[key]])
                out.append((n / 2**20, r[key], r[key] - lo, hi - r[key]))
        return out

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    for ax, key, title in ((axes[0][0], "save_gbps", "save GB/s (to fsync), median and min-max"),
                           (axes[0][1], "load_gbps", "cold load GB/s, median and min-max"),
                           (axes[1][0], "peak_extra_frac", "peak extra host memory of a save / state per rank"),
                           (axes[1][1], "stall_frac_of_sync", "async stall / sync save time (steady state)")):
        for m in local:
            pts = points(m, key)
            if pts:
                x, y, lo, hi = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=[lo, hi], capsize=3, **style(m))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state size (MiB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[1][1].axhline(0.10, color="black", linewidth=0.8, linestyle=":")
    axes[1][0].axhline(1.10, color="black", linewidth=0.8, linestyle=":")
    ax = axes[0][2]  # scaling with ranks at each size
    for base in ("dtrain", "dtrain-async", "dcp"):
        for n in sizes:
            ranks = [(w, res[str(n)][m]["save_gbps"]) for w, m in ((1, base), (2, base + "-2r"))
                     if res[str(n)].get(m, {}).get("save_gbps") is not None]
            if len(ranks) == 2:
                ax.plot(*zip(*ranks, strict=True), marker="o", color=colors[base], alpha=0.4 + 0.6 * n / sizes[-1],
                        label=f"{base} {size_label(n)}")
    ax.set_xticks([1, 2])
    ax.set_xlabel("ranks (gloo, replicated state)")
    ax.set_title("save GB/s against ranks")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[1][2]  # S3 through moto
    s3 = [n for n in sizes if any(m in res[str(n)] for m in REMOTE)]
    for i, m in enumerate(REMOTE):
        for j, key in enumerate(("save_gbps", "load_gbps")):
            vals = [res[str(n)].get(m, {}).get(key) or 0 for n in s3]
            ax.bar([k * 5 + j * 2 + i for k in range(len(s3))], vals, color=colors[m],
                   hatch="//" if key == "load_gbps" else None, label=f"{m} {key.split('_')[0]}")
    ax.set_xticks([k * 5 + 1.5 for k in range(len(s3))], [size_label(n) for n in s3])
    ax.set_title("S3 (moto on loopback): save, load GB/s")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"Checkpoint I/O: {m['cpu']}, {m['cores']} cores, disk {m['disk']}, torch {m['torch']}, "
                 f"load average {m['loadavg_start'][0]:.1f}->{m['loadavg_end'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
