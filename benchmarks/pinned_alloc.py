"""How long the first async save's pinned staging buffers take to allocate, by allocator setting.

The first async save of a process allocates its pinned host buffers (8.4 s for 16 GiB on an H200,
`checkpoint_gpu_16g.md`); later saves reuse them. torch's host allocator can pin memory either with
cudaHostAlloc (the default) or by allocating pageable memory and registering it with
cudaHostRegister on several threads (PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
pinned_num_register_threads:N). Each setting runs in a fresh process: allocate `--gib` GiB as
tensors of `--tensor-mib` MiB (as staging does, one buffer per tensor), then copy device tensors
into them, twice (the second copy shows the steady state). Writes JSON and a table to --out.

    python benchmarks/pinned_alloc.py --gib 8 --out benchmarks/results/pinned_alloc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SETTINGS = {
    "cudaHostAlloc (default)": "",
    "cudaHostRegister, 1 thread": "pinned_use_cuda_host_register:True,pinned_num_register_threads:1",
    "cudaHostRegister, 8 threads": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
    "cudaHostRegister, 16 threads": "pinned_use_cuda_host_register:True,pinned_num_register_threads:16",
}


def child(gib: float, tensor_mib: int) -> dict[str, float]:
    n = max(1, int(gib * 1024 // tensor_mib))
    numel = tensor_mib << 18  # float32
    src = [torch.ones(numel, device="cuda") for _ in range(n)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host = [torch.empty(numel, pin_memory=True) for _ in range(n)]
    alloc = time.perf_counter() - t0
    copies = []
    for _ in range(2):
        t0 = time.perf_counter()
        for h, s in zip(host, src, strict=True):
            h.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    assert all(h.is_pinned() for h in host) and bool(host[-1][-1] == 1)
    return {"alloc_s": alloc, "first_copy_s": copies[0], "copy_s": copies[1], "bytes": n * numel * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--tensor-mib", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pinned_alloc"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.gib, args.tensor_mib)))
        return
    rows: dict[str, dict[str, Any]] = {}
    for name, conf in SETTINGS.items():
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf) if conf else {
            k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
        proc = subprocess.run([sys.executable, __file__, "--child", "--gib", str(args.gib), "--tensor-mib",
                               str(args.tensor_mib)], env=env, capture_output=True, text=True, timeout=300)
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
            "error": proc.stderr[-2000:]}
        print(name, rows[name], flush=True)
    gpu = torch.cuda.get_device_name(0)
    report = {"benchmark": "pinned_alloc", "gpu": gpu, "torch": torch.__version__, "gib": args.gib,
              "tensor_mib": args.tensor_mib, "cpus": os.cpu_count(), "results": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    base = rows["cudaHostAlloc (default)"].get("alloc_s")
    lines = [f"Pinned staging buffers on {gpu} ({os.cpu_count()} CPUs), torch {torch.__version__}: "
             f"{args.gib} GiB as {args.tensor_mib} MiB tensors, one fresh process per setting.", "",
             "| setting | allocate | vs default | first copy | steady copy |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error | | | |")
            continue
        ratio = f"{base / r['alloc_s']:.2f}x faster" if base else "-"
        lines.append(f"| {name} | {r['alloc_s']:.2f} s | {ratio} | {r['first_copy_s']:.2f} s | {r['copy_s']:.2f} s |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, Path(args.out).with_suffix(".png"), f"{args.gib} GiB pinned staging on {gpu}")


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU machine's image may lack it; the JSON and table are written anyway
        return
    ok = {k: v for k, v in rows.items() if "error" not in v}
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(ok), [v["alloc_s"] for v in ok.values()], label="allocate")
    ax.barh(list(ok), [v["copy_s"] for v in ok.values()], left=[v["alloc_s"] for v in ok.values()], label="copy")
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
