"""Checkpoints from GPU memory: dtrain against DCP (sync save, async stall, load) in one run.

Issue 8 item 3. Every measurement is a fresh spawned process that builds a model-like state on
`--device` (a Blob of make_state's tensors in `--dtype`, plus AdamW state set as after one step:
exp_avg = p/2, exp_avg_sq = |p|/4; the size counts all three) and saves it one way:
dtrain (CheckpointManager.save), dtrain-async (async_save=True: stall = until save() returns, i.e.
the copy to host memory, pinned on CUDA; total = until wait()), dcp (dcp.save of get_state_dict),
dcp-async (dcp.async_save as shipped: a fresh unpinned host copy per call; total = until result())
and, on CUDA, dcp-async-pinned (one DefaultStager with pinned memory and non-blocking copies kept
across saves: DCP's like-for-like setting). Async methods save twice and report the second
(steady state); the first checkpoint is deleted before it, so the disk holds one. dtrain and dcp
then load cold (page cache dropped) into the same tensors, NaN-filled first, and every tensor is
checked bit-exact against the state rebuilt from the seed. dtrain-async runs without
overlap_staging (which hides the copy behind the next forward), so its stall is the whole copy.

Repeats go round-robin; medians and per-round paired ratios judge the targets: dtrain's async
stall <= 5% of its sync save, dtrain save >= DCP's, dtrain async stall <= each DCP async stall,
dtrain load >= DCP's. `--largest` adds the biggest size within 70% of free GPU memory, 40% of
available host memory (staging holds a full copy) and 80% of free disk. Outputs are written after
every size and `--append` merges into an existing JSON, so a long run can be split into short
calls. Single process only: a 2-GPU nccl mode needs a sharded or replicated state and a launcher;
not done, as the lent GPU machine has one GPU.

    python benchmarks/checkpoint_gpu.py [--sizes 1G,4G,16G] [--largest] [--repeats 3] [--append]
    python benchmarks/checkpoint_gpu.py --device cpu --sizes 64M --repeats 1   # smoke run, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.checkpoint_io as cio  # noqa: E402
from benchmarks.checkpoint_gpu_report import aggregate, write_outputs  # noqa: E402
from benchmarks.checkpoint_io import Blob  # noqa: E402
from benchmarks.checkpoint_report import size_label  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- the state (built in the measuring process) --------------------------------------------------
def _host_params(nbytes: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float32 parameters whose cast to `dtype` takes a third of `nbytes` (seeded: same every time)."""
    return cio.make_state((nbytes // 3) // dtype.itemsize * 4 // 1024 * 1024)


def _adam(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's state after one step, derived exactly (scaling by powers of 2) from the parameter."""
    return {"step": torch.tensor(1.0), "exp_avg": p.detach() * 0.5, "exp_avg_sq": p.detach().abs() * 0.25}


def build_state(nbytes: int, dtype: torch.dtype, dev: torch.device) -> tuple[Blob, torch.optim.AdamW]:
    host = _host_params(nbytes, dtype)
    model = Blob({k: host.pop(k).to(dev, dtype) for k in list(host)}).requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        opt.state[p] = _adam(p)
    return model, opt


def scramble(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            for t in (p, *opt.state[p].values()):
                t.fill_(float("nan"))


def verify(model: Blob, opt: torch.optim.Optimizer, nbytes: int, dtype: torch.dtype, dev: torch.device) -> bool:
    """Every parameter and optimizer tensor bit-exact against the state rebuilt from the seed."""
    host = _host_params(nbytes, dtype)
    for name in model.names:
        p, want = model.get_parameter(name.replace(".", "_")), host.pop(name).to(dev, dtype)
        state, expected = opt.state[p], _adam(want)
        if not (torch.equal(p.detach(), want) and float(state["step"]) == 1.0
                and all(torch.equal(state[k], expected[k]) for k in ("exp_avg", "exp_avg_sq"))):
            return False
    return True


# ---- one method, in a fresh process --------------------------------------------------------------
def _step_dir(d: str, step: int) -> str:
    return os.path.join(d, f"step-{step:09d}")  # dtrain's layout; DCP gets the same names


def _device_peak(dev: torch.device, fn: Callable[[], Any]) -> int | None:
    """Runs fn; the device memory it allocated at peak above what was allocated before (CUDA)."""
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else 0
    fn()
    if cuda:
        torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base if cuda else None


def _peak(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """checkpoint_io.peak_extra: (seconds, extra host RSS, result); RSS -1 where /proc is read-only."""
    try:
        return cio.peak_extra(fn)
    except OSError:  # raised by the VmHWM reset, before fn runs
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, -1, out


Saver = tuple[Callable[[int], Any], Callable[[Any], Any], Callable[[], Any] | None, Callable[[], Any], Any]


def _pinned(staging: dict[Any, torch.Tensor]) -> bool | None:
    """Whether dtrain's host buffers staged from the device are pinned (None: none staged)."""
    slots = [(slot, t) for slot, t in staging.items() if slot[3]]  # slot[3]: staged from the device
    return all(t.is_pinned() for _, t in slots) if slots else None


def _saver(method: str, model: Blob, opt: torch.optim.Optimizer, d: str, dev: torch.device) -> Saver:
    """(start(step) -> handle, finish(handle), load or None, close, pinned() -> bool | None)."""
    if method.startswith("dtrain"):
        from dtrain.checkpoint import CheckpointManager

        mgr = CheckpointManager(d, async_save=method == "dtrain-async")
        return (lambda step: mgr.save(step, model=model, optimizer=opt), lambda _: mgr.wait(),
                None if "async" in method else lambda: mgr.load(_step_dir(d, 1), model=model, optimizer=opt),
                mgr.close, lambda: _pinned(mgr._saves.staging if mgr._saves else {}))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}

    def load() -> None:  # what a user writes: DCP fills the live tensors, set_state_dict applies them
        m, o = get_state_dict(model, opt)
        dcp.load({"model": m, "optim": o}, checkpoint_id=_step_dir(d, 1))
        set_state_dict(model, opt, model_state_dict=m, optim_state_dict=o)

    if method == "dcp":
        return lambda step: dcp.save(sd, checkpoint_id=_step_dir(d, step)), lambda _: None, load, lambda: None, \
            lambda: None
    def new_stager() -> DefaultStager | None:
        return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                                            use_non_blocking_copy=True)) if method == "dcp-async-pinned" else None

    stager = [new_stager()]

    def start(step: int) -> Any:
        # torch <= 2.11's async_save closes a caller's stager after one save (2.13 closes only its own):
        # its deepcopy table is empty then, so that DCP pays a fresh pinned allocation per save.
        if stager[0] is not None and not getattr(getattr(stager[0], "_state_dict_stager", None),
                                                 "_deepcopy_dispatch", True):
            stager[0] = new_stager()
        return dcp.async_save(sd, checkpoint_id=_step_dir(d, step), async_stager=stager[0])

    return (start, lambda fut: fut.result(), None, lambda: stager[0].close() if stager[0] else None,
            lambda: stager[0] is not None and dev.type == "cuda")


def measure(method: str, nbytes: int, dtype_name: str, device: str, d: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process
    dev, dtype = torch.device(device), DTYPES[dtype_name]
    model, opt = build_state(nbytes, dtype, dev)
    start, finish, load, close, pinned = _saver(method, model, opt, d, dev)
    stall: list[float] = []
    total: list[float] = []

    def saves() -> None:
        for step in (1, 2) if "async" in method else (1,):
            if step > 1:  # one checkpoint on disk at a time: the largest size is bounded by the disk
                shutil.rmtree(_step_dir(d, step - 1))
                os.sync()
            t0 = time.perf_counter()
            handle = start(step)
            stall.append(time.perf_counter() - t0)
            finish(handle)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            total.append(time.perf_counter() - t0)

    res: dict[str, Any] = {}
    _, res["peak_extra"], res["device_peak_save"] = _peak(lambda: _device_peak(dev, saves))
    res.update(peak_extra_per_rank=[res["peak_extra"]], save_s=total[-1], staging_pinned=pinned())
    if "async" in method:
        res.update(stall_s=stall[-1], stall_first_s=stall[0], save_first_s=total[0])
    if load is not None:
        scramble(model, opt)
        cio.drop_cache(d)
        res["load_s"], res["host_peak_load"], res["device_peak_load"] = _peak(lambda: _device_peak(dev, load))
        res["verified"] = verify(model, opt, nbytes, dtype, dev)
    close()
    return res


def probe(device: str) -> dict[str, Any]:
    """The GPU, named, and its free memory (asked in a child process: the parent makes no context)."""
    if not device.startswith("cuda"):
        return {"device": device}
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        smi = []
    return {"device": device, "name": torch.cuda.get_device_name(dev), "memory_bytes": total, "free_bytes": free,
            "count": torch.cuda.device_count(), "cuda": torch.version.cuda, "driver": smi[0] if smi else None}


def _child(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], queue: Any) -> None:
    try:
        queue.put((fn(*args), None))
    except BaseException as e:  # the parent records it; the other methods still run
        queue.put((None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def in_child(fn: Callable[..., dict[str, Any]], *args: Any, timeout_s: float = 3600) -> dict[str, Any]:
    """fn(*args) in a fresh spawned process (CUDA-safe); {'error': ...} if it raised or died."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    deadline, out, err = time.monotonic() + timeout_s, None, None
    try:
        while out is None and err is None:
            try:
                out, err = queue.get(timeout=5)
            except Empty:
                if proc.exitcode is not None or time.monotonic() > deadline:
                    err = f"process exited with {proc.exitcode} (killed: out of memory?) or ran past {timeout_s} s"
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return {"error": err.splitlines()[0], "traceback": err} if err else out  # type: ignore[return-value]


# ---- driver -------------------------------------------------------------------------------------
def _largest(gpu: dict[str, Any], d: str) -> tuple[int, dict[str, int]]:
    avail = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                 if ln.startswith("MemAvailable:"))
    limits = {"host": int(0.4 * avail), "disk": int(0.8 * shutil.disk_usage(d).free)}
    if "free_bytes" in gpu:
        limits["gpu"] = int(0.7 * gpu["free_bytes"])
    unit = 2**30 if min(limits.values()) >= 2**30 else 64 << 20
    return min(limits.values()) // unit * unit, limits


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="where the state lives: cuda, cuda:N or cpu (smoke run)")
    ap.add_argument("--sizes", default="1G,4G,16G", help="state sizes (parameters + AdamW state), e.g. 1G,4G")
    ap.add_argument("--largest", action="store_true", help="add the biggest size that fits (GPU, host, disk)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds; medians and paired ratios")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--out", default=None, help="output path without extension (default: results/checkpoint_gpu; "
                    "results/checkpoint_gpu_cpu_smoke with --device cpu)")
    ap.add_argument("--append", action="store_true", help="keep the other sizes of --out's JSON (same GPU, dtype)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --device cpu for a smoke run")
    out = Path(args.out or RESULTS / ("checkpoint_gpu" if cuda else "checkpoint_gpu_cpu_smoke"))
    workdir = tempfile.mkdtemp(prefix="ckpt-gpu-", dir=args.dir)
    gpu = in_child(probe, args.device) if cuda else probe(args.device)
    if "error" in gpu:
        sys.exit(f"probing {args.device} failed: {gpu['traceback']}")
    sizes, limits = cio.parse_sizes(args.sizes), None
    if args.largest:
        biggest, limits = _largest(gpu, workdir)
        print(f"--largest: {size_label(biggest)} (limits: {limits})", flush=True)
        sizes = sorted(set(sizes) | {biggest})
    methods = ["dtrain", "dtrain-async", "dcp", "dcp-async"] + (["dcp-async-pinned"] if cuda else [])
    old = json.loads(out.with_suffix(".json").read_text()) if args.append and out.with_suffix(".json").exists() else {}
    same = (old.get("machine", {}).get("gpu", {}).get("name"), old.get("args", {}).get("dtype")) == (
        gpu.get("name"), args.dtype)
    try:
        machine = cio.machine_info(workdir)
    except OSError:  # no git or df on the GPU machine: the fields the table needs
        machine = {"cpu": "unknown", "cores": os.cpu_count(), "torch": torch.__version__, "disk": "unknown",
                   "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    report = {"benchmark": "checkpoint_gpu", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": dict(machine, gpu=gpu), "args": vars(args), "largest_limits": limits,
              "results": old.get("results", {}) if same else {}}
    try:
        for n in sizes:
            samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            for rep in range(args.repeats):
                order = list(methods)
                if rep:  # no fixed first method: a slow phase of the disk would always hit the same one
                    random.Random(rep).shuffle(order)
                for m in order:
                    d = tempfile.mkdtemp(prefix=f"{m}-", dir=workdir)
                    try:
                        r = in_child(measure, m, n, args.dtype, args.device, d)
                    finally:
                        shutil.rmtree(d, ignore_errors=True)
                        os.sync()  # the deletion's writeback happens now, not in the next measurement
                    samples[m].append(r)
                    print(f"{size_label(n):>8} {m:<17} #{rep} " + (f"ERROR {r['error']}" if "error" in r else " ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                        if k != "peak_extra_per_rank")), flush=True)
            report["results"][str(n)] = {m: aggregate(samples[m]) for m in methods}
            report["results"] = dict(sorted(report["results"].items(), key=lambda kv: int(kv[0])))
            report["machine"]["loadavg_end"] = os.getloadavg()
            write_outputs(report, out)  # after every size: a run cut short keeps what it measured
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
