"""Checkpoint I/O: dtrain against a raw write/read, torch.save/load, safetensors and DCP, on one disk.

For each state size, every method saves and loads the same bytes (a model-like dict of float32
tensors) in a fresh process: the save is timed to durability (fsync), the peak extra host memory
of the save is read from /proc (VmHWM after resetting it, minus VmRSS before), and every load is
cold (files fsynced and dropped from the page cache with posix_fadvise DONTNEED) and checked for
equality. Every timed cold read starts `QUIET_S` after its files were dropped: this VM reports
freed memory to its host (virtio-balloon free page reporting), and a cold read started right
after dropping gigabytes of cache ran up to 3x slower (2 GiB read six times back to back: 1.4-1.6
s and 2.3-3.9 s alternating; with 3 s between reads: 1.0-1.8 s every time). After the quiet, an
old file of the run (`WARMUP`) is read cold, untimed. One-rank and two-rank dtrain also time a
plain read of their own files by every rank (same bytes, same blocks): another method's file sits
elsewhere on the disk, and where a file sits moves cold reads here (2 ranks at 64 MiB: dtrain's
load 0.75x raw-2r's read of raw-2r's files in one 5-round run, 0.94x a read of its own files in 8
rounds). Cold reads of a freshly written file also get slower with the time since it was written:
1 GiB written once and read twice, each read after the drop, the quiet and the warm-up read, took
0.85-1.02 s the first time and 1.03-1.30 s the second (slower in 6 of 6 rounds; reading first 12 s
after the write: 0.91-2.99 s, then 1.11-1.76 s, slower in 5 of 6). So dtrain's load and that raw
read run A B B A (which side starts alternates by round), and the own-files ratio is of the two
sums, which cancels a steady drift. dtrain runs on 1 and 2 ranks (gloo, replicated state: each
rank writes half), sync and async (stall = time until save() returns). S3 compares dtrain with a
plain s3fs streaming put/get against a moto server started here. Writes
benchmarks/results/checkpoint_io.{json,md,png}.

    python benchmarks/checkpoint_io.py [--sizes 64M,256M,1G,2G] [--s3-sizes 64M,256M] [--repeats 1]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.checkpoint_report import LOCAL, REMOTE, size_label, with_ratios, write_outputs  # noqa: E402
from tests.moto import start_moto as start_moto_server  # noqa: E402
from tests.moto import stop_process  # noqa: E402
from tests.multiproc import free_port as _free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# weights of 16 MiB, each followed by a 16 KiB bias: a transformer-ish mix; --tensor-bytes (through the
# environment, so the measuring processes see it) makes many small tensors instead
TENSOR = int(os.environ.get("CKPT_BENCH_TENSOR_BYTES", 16 << 20))
QUIET_S = 3.0  # see the module docstring
WARMUP = "warmup.bin"  # an old file of the run's directory, read cold before every timed cold read
WARMUP_BYTES = 32 << 20
DIRECT_REQUEST = 16 << 20  # raw-direct's requests
S3_OPTIONS = {"key": "testing", "secret": "testing"}


# ---- the state and the measurements (run inside a fresh process) --------------------------------
def make_state(nbytes: int) -> dict[str, torch.Tensor]:
    """The same float32 bytes in every process: a seeded 16 MiB block tiled into each tensor."""
    block = torch.randn(TENSOR // 4, generator=torch.Generator().manual_seed(0))
    state: dict[str, torch.Tensor] = {}
    left, i = nbytes, 0
    while left > 0:
        w = min(TENSOR, left)
        t = torch.empty(w // 4)
        t.copy_(block[: w // 4])
        t.add_(i)  # distinct tensors, same bytes in every run
        state[f"layers.{i}.weight"] = t.view(-1, 1024) if t.numel() % 1024 == 0 else t
        left -= w
        if left >= 16 << 10:
            state[f"layers.{i}.bias"] = torch.full((4096,), float(i))
            left -= 16 << 10
        i += 1
    return state


class Blob(nn.Module):
    """A module whose parameters are the state (what CheckpointManager and DCP save)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(state)
        for k, t in state.items():
            self.register_parameter(k.replace(".", "_"), nn.Parameter(t, requires_grad=False))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """(seconds, peak RSS above the RSS before, result) of fn(), in this process."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, max(0, _status("VmHWM") - base), out


def drop_cache(path: str) -> None:
    """Make the next read cold: fsync every file, then ask the kernel to drop its cached pages."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _aligned(n: int) -> memoryview:
    """`n` bytes at a 4096-aligned address, as O_DIRECT needs."""
    raw = torch.zeros(n + 4096, dtype=torch.uint8)
    skip = -raw.data_ptr() % 4096
    return _bytes(raw[skip:skip + n])


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte per page: mmap-backed tensors (safetensors load_file) are loaded only then."""
    for t in tensors.values():
        t.reshape(-1).view(torch.uint8)[::4096].sum()


def save_fn(method: str, state: dict[str, torch.Tensor], d: str, ctx: dict[str, Any]) -> Callable[[], Any]:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    if method == "raw":
        def raw() -> None:
            with open(os.path.join(d, "raw.bin"), "wb", buffering=0) as f:
                for t in state.values():
                    f.write(_bytes(t))
                os.fsync(f.fileno())
        return raw
    if method == "raw-direct":  # past the page cache, as dtrain writes big files (directio.py)
        def raw_direct() -> None:
            buf, fill, off = _aligned(DIRECT_REQUEST), 0, 0
            fd = os.open(os.path.join(d, "raw-direct.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
            try:
                for t in state.values():
                    mv = _bytes(t)
                    while len(mv):
                        take = min(len(mv), len(buf) - fill)
                        buf[fill:fill + take], mv, fill = mv[:take], mv[take:], fill + take
                        if fill == len(buf):
                            off, fill = off + os.pwrite(fd, buf, off), 0
                whole = fill - fill % 4096
                off += os.pwrite(fd, buf[:whole], off) if whole else 0
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                os.pwrite(fd, buf[whole:fill], off)  # O_DIRECT writes whole blocks only
                os.fsync(fd)
            finally:
                os.close(fd)
        return raw_direct
    if method == "raw-2r":  # the floor for a replicated state: each rank writes every world-th tensor
        def raw_share() -> None:
            with open(os.path.join(d, f"raw-{ctx['rank']}.bin"), "wb", buffering=0) as f:
                for t in list(state.values())[ctx["rank"]::ctx["world"]]:
                    f.write(_bytes(t))
                os.fsync(f.fileno())
        return raw_share
    if method in ("torch", "safetensors"):
        def library() -> None:
            path = os.path.join(d, "state.pt" if method == "torch" else "state.safetensors")
            if method == "torch":
                torch.save(state, path)
            else:
                save_file(state, path)
            _fsync(path)
        return library
    if method.startswith("dcp"):
        return lambda: dcp.save(state, checkpoint_id=d)
    if method == "s3fs":
        def put() -> None:
            with ctx["fs"].open(ctx["url"] + "/raw.bin", "wb") as f:
                for t in state.values():
                    f.write(_bytes(t))
        return put
    return lambda: ctx["mgr"].save(1, model=ctx["model"])


def load_fn(method: str, dest: dict[str, torch.Tensor], d: str, ctx: dict[str, Any]
            ) -> Callable[[], dict[str, torch.Tensor]]:
    """Loaders return the loaded tensors; raw, DCP and dtrain fill preallocated `dest` in place."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    def readinto(f: Any, tensors: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        for t in dest.values() if tensors is None else tensors:
            mv, got = _bytes(t), 0
            while got < len(mv):
                n = f.readinto(mv[got:])
                if not n:
                    raise EOFError("short read")
                got += n
        return dest

    if method == "raw":
        def raw() -> dict[str, torch.Tensor]:
            with open(os.path.join(d, "raw.bin"), "rb", buffering=0) as f:
                return readinto(f)
        return raw
    if method == "raw-direct":  # O_DIRECT reads of 16 MiB into an aligned buffer, copied into place
        def raw_direct() -> dict[str, torch.Tensor]:
            buf, fd = _aligned(DIRECT_REQUEST), os.open(os.path.join(d, "raw-direct.bin"), os.O_RDONLY | os.O_DIRECT)
            try:
                off, have, pos = 0, 0, 0  # file offset of buf, bytes in buf, next byte of buf to copy
                for t in dest.values():
                    mv = _bytes(t)
                    while len(mv):
                        if pos == have:
                            off, pos = off + have, 0
                            have = os.preadv(fd, [buf], off)
                            if not have:
                                raise EOFError("short read")
                        take = min(len(mv), have - pos)
                        mv[:take], mv, pos = buf[pos:pos + take], mv[take:], pos + take
            finally:
                os.close(fd)
            return dest
        return raw_direct
    if method == "raw-2r":  # ... and each rank reads all of it back (every rank needs the whole state)
        def raw_all() -> dict[str, torch.Tensor]:
            tensors = list(dest.values())
            for r in range(ctx["world"]):
                with open(os.path.join(d, f"raw-{r}.bin"), "rb", buffering=0) as f:
                    readinto(f, tensors[r::ctx["world"]])
            return dest
        return raw_all
    if method == "torch":
        return lambda: torch.load(os.path.join(d, "state.pt"), weights_only=True, map_location="cpu")
    if method == "safetensors":
        def st() -> dict[str, torch.Tensor]:
            out = load_file(os.path.join(d, "state.safetensors"))
            _touch(out)
            return out
        return st
    if method.startswith("dcp"):
        return lambda: (dcp.load(dest, checkpoint_id=d), dest)[1]
    if method == "s3fs":
        def get() -> dict[str, torch.Tensor]:
            with ctx["fs"].open(ctx["url"] + "/raw.bin", "rb", block_size=64 << 20, cache_type="none") as f:
                return readinto(f)
        return get

    def dtrain_load() -> dict[str, torch.Tensor]:
        model = Blob(dest)
        ctx["mgr"].load(ctx["mgr"].latest_committed(), model=model)
        return dest
    return dtrain_load


def read_files_raw(d: str) -> Callable[[], None]:
    """A plain sequential read of every file under `d` in 16 MiB reads, into touched memory the
    size of the largest file: the floor for loading those very files, on the very blocks."""
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(d) for f in files)
    mv = _bytes(torch.zeros(max(os.path.getsize(p) for p in paths), dtype=torch.uint8))

    def read() -> None:
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                got = 0
                while n := f.readinto(mv[got:got + (16 << 20)]):
                    got += n
    return read


def drop_and_wait(d: str) -> None:
    """Drop the files from the page cache, then let the freed memory's reporting to the host end
    (module docstring) before a timed read, then read the run's warm-up file cold, untimed."""
    drop_cache(d)
    time.sleep(QUIET_S)
    warm = os.path.join(os.path.dirname(d), WARMUP)
    if os.path.exists(warm):
        drop_cache(warm)
        with open(warm, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def measure(method: str, nbytes: int, d: str, rank: int, world: int, endpoint: str | None,
            rep: int = 0) -> dict[str, Any]:
    """Save then cold-load one state with one method, in this (fresh) process. Local sync dtrain
    (1 and 2 ranks) also times a raw read of its own files by every rank (cold too; which goes
    first alternates by `rep`)."""
    import torch.distributed as tdist

    from dtrain.checkpoint import CheckpointManager

    state = make_state(nbytes)
    ctx: dict[str, Any] = {"rank": rank, "world": world}
    so = dict(S3_OPTIONS, endpoint_url=endpoint) if endpoint else None
    if method in ("s3fs", "dtrain-s3"):
        import s3fs

        ctx["fs"] = s3fs.S3FileSystem(**so)  # type: ignore[arg-type]
        ctx["url"] = f"bench/{method}-{nbytes}"
    if method.startswith("dtrain"):
        root = f"s3://bench/{method}-{nbytes}" if method == "dtrain-s3" else d
        # async as the trainer runs it: staging overlapped with the next forward/backward, held by
        # an optimizer step pre-hook (the optimizer here is a stateless SGD over the same tensors)
        ctx["mgr"] = CheckpointManager(root, async_save="async" in method, storage_options=so,
                                       overlap_staging="async" in method)
        ctx["model"] = Blob(state)
        ctx["opt"] = torch.optim.SGD(ctx["model"].parameters(), lr=0.0)
        ctx["mgr"].acquire_lease()  # as the trainer does at start-up, before its first step
    sync = (lambda: tdist.barrier()) if world > 1 else (lambda: None)
    sync()
    res: dict[str, Any] = {}
    if "async" in method:
        stall: list[float] = []
        totals: list[float] = []

        def save_async() -> None:
            """Two saves: the first allocates the staging buffers, the second (steady state, as in
            training from the second checkpoint on) reuses them; memory counts both."""
            for step in (1, 2):
                t0 = time.perf_counter()
                ctx["mgr"].save(step, model=ctx["model"], optimizer=ctx["opt"])
                stall.append(time.perf_counter() - t0)
                ctx["mgr"].wait()
                sync()
                totals.append(time.perf_counter() - t0)
        _, res["peak_extra"], _ = peak_extra(save_async)
        res["stall_first_s"], res["stall_s"] = stall
        res["save_first_s"], res["save_s"] = totals
    else:
        fn = save_fn(method, state, d, ctx)
        res["save_s"], res["peak_extra"], _ = peak_extra(lambda: (fn(), sync()))
    if "async" in method:
        return res
    dest = {k: torch.zeros_like(t) for k, t in state.items()}  # every allocation before any timed read
    load = load_fn(method, dest, d, ctx)

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        """fn() on every rank from a cold cache (rank 0 drops: the page cache is shared)."""
        if method not in REMOTE and rank == 0:
            drop_and_wait(d)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    if method not in ("dtrain", "dtrain-2r"):
        res["load_s"], loaded = timed(load)
    else:  # A B B A: cold reads of fresh files slow down with the time since the save (module
        # docstring), so each side gets one early and one late read; which side starts alternates
        same_files = read_files_raw(d)
        first, second = (same_files, load) if rep % 2 else (load, same_files)
        times: dict[Any, list[float]] = {load: [], same_files: []}
        for fn in (first, second, second, first):
            t, out = timed(fn)
            times[fn].append(t)
            if fn is load:
                loaded = out
        # against the other methods, dtrain's first load counts (first or second after the save)
        res["load_s"] = times[load][0]
        res["raw_same_files_load_s"] = times[same_files][0]
        res["abba_load_s"], res["abba_raw_same_files_s"] = sum(times[load]), sum(times[same_files])
    res["verified"] = all(torch.equal(loaded[k], state[k]) for k in state)
    return res


def _rank_entry(rank: int, world: int, port: int, method: str, nbytes: int, d: str,
                endpoint: str | None, queue: Any, rep: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process
    try:
        if world > 1:
            from dtrain import dist

            dist.init(timeout_s=600)
        queue.put((rank, measure(method, nbytes, d, rank, world, endpoint, rep), None))
    except BaseException as e:  # the parent reports it; the other methods still run
        import traceback

        queue.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if world > 1:
            from dtrain import dist

            dist.shutdown()


def run_one(method: str, nbytes: int, workdir: str, endpoint: str | None, rep: int = 0) -> dict[str, Any]:
    """One measurement on fresh processes (1 or 2 ranks); max time and memory over ranks."""
    world = 2 if method.endswith("-2r") else 1
    d = tempfile.mkdtemp(prefix=f"{method}-", dir=workdir)
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, method, nbytes, d, endpoint, queue, rep))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        per_rank: list[tuple[int, Any, str | None]] = []
        deadline = time.monotonic() + 1800
        while len(per_rank) < world:
            try:
                per_rank.append(queue.get(timeout=5))
            except Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    per_rank.append((-1, None, f"a rank died (exit codes {dead}) or timed out"))
                    break
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(d, ignore_errors=True)
        os.sync()  # the deletion's writeback happens now, not during the next measurement
    errors = [e for _, _, e in per_rank if e]
    if errors:
        return {"error": errors[0].splitlines()[0], "traceback": errors[0]}
    rs = [r for _, r, _ in sorted(per_rank, key=lambda x: x[0])]  # type: ignore[misc]
    out = {k: max(r[k] for r in rs) for k in rs[0] if k != "verified"}
    if "verified" in rs[0]:
        out["verified"] = all(r["verified"] for r in rs)
    out["peak_extra_per_rank"] = [r["peak_extra"] for r in rs]
    return out


# ---- S3 server ----------------------------------------------------------------------------------
def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    proc, endpoint = start_moto_server()
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, **S3_OPTIONS).mkdir("bench")
    return proc, endpoint


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc)


def _clear_bucket(endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, **S3_OPTIONS)
    for path in fs.ls("bench", refresh=True):
        fs.rm(path, recursive=True)


# ---- driver -------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    out = []
    for part in filter(None, (p.strip().upper().removesuffix("IB").removesuffix("B") for p in text.split(","))):
        out.append(int(float(part[:-1]) * units[part[-1]]) if part[-1] in units else int(part))
    return out


def machine_info(workdir: str) -> dict[str, Any]:
    import safetensors

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    dev = subprocess.run(["df", "--output=source,fstype", workdir], capture_output=True, text=True).stdout.split()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "torch": torch.__version__, "safetensors": safetensors.__version__, "platform": platform.platform(),
            "disk": " ".join(dev[-2:]), "workdir": workdir, "gpu": None, "loadavg_start": os.getloadavg(),
            "git": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1]).stdout.strip()}


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each timing over the repeats, the largest peak memory; every sample is kept."""
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return dict(samples[0], samples=samples)
    out: dict[str, Any] = {k: statistics.median(s[k] for s in ok) for k in ok[0] if k.endswith("_s")}
    out["peak_extra"] = max(s["peak_extra"] for s in ok)
    out["peak_extra_per_rank"] = max((s["peak_extra_per_rank"] for s in ok), key=max)
    if "verified" in ok[0]:
        out["verified"] = all(s["verified"] for s in ok)
    out["repeats_ok"] = len(ok)
    out["samples"] = samples
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64M,256M,1G,2G", help="state sizes, e.g. 64M,256M,1G")
    ap.add_argument("--s3-sizes", default="64M,256M", help="sizes for the S3 comparison ('' to skip)")
    ap.add_argument("--methods", default=",".join(LOCAL), help="subset of " + ",".join(LOCAL))
    ap.add_argument("--repeats", type=int, default=1, help="measure each point N times (round-robin); report medians")
    ap.add_argument("--dir", default=None, help="where files are written (default: a temp dir on /tmp)")
    ap.add_argument("--out", default=str(RESULTS / "checkpoint_io"), help="output path without extension")
    ap.add_argument("--tensor-bytes", default=None, help="bytes per weight tensor (default 16M; e.g. 16K for "
                    "a state of many small tensors, where per-tensor costs dominate)")
    ap.add_argument("--replot", metavar="JSON", help="only redo ratios, targets, table and plot from a results JSON")
    args = ap.parse_args()
    if args.tensor_bytes:
        os.environ["CKPT_BENCH_TENSOR_BYTES"] = str(parse_sizes(args.tensor_bytes)[0])
        global TENSOR
        TENSOR = int(os.environ["CKPT_BENCH_TENSOR_BYTES"])
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        report["results"] = with_ratios(report["results"])
        write_outputs(report, Path(args.out))
        return
    # each measurement runs in a fresh process forked from a server that imported everything once
    # (no threads there, unlike this process once s3fs has run), so no import time is paid per point
    mp.set_forkserver_preload(["__main__", "dtrain.checkpoint", "torch.distributed.checkpoint",
                               "safetensors.torch", "s3fs"])
    workdir = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    with open(os.path.join(workdir, WARMUP), "wb") as f:
        f.write(os.urandom(WARMUP_BYTES))
        os.fsync(f.fileno())
    sizes, methods = parse_sizes(args.sizes), [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(LOCAL)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {','.join(LOCAL)}")
    s3_sizes = parse_sizes(args.s3_sizes)
    results: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    machine = machine_info(args.dir or tempfile.gettempdir())
    moto = None
    try:
        # repeats go round-robin over the methods, so a noisy phase of the machine hits all of them
        for n in sizes:
            samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            for rep in range(args.repeats):
                order = list(methods)
                if rep:  # the first measurement after a pause is often slow here: no fixed first method
                    random.Random(rep).shuffle(order)
                for m in order:
                    samples[m].append(run_one(m, n, workdir, None, rep))
                    print(f"{size_label(n):>8} {m:<16} #{rep} {_brief(samples[m][-1])}", flush=True)
            results[str(n)] = {m: aggregate(samples[m]) for m in methods}
        if s3_sizes:
            moto, endpoint = start_moto()
            for n in s3_sizes:
                samples = {m: [] for m in REMOTE}
                for rep in range(args.repeats):
                    for m in REMOTE:
                        samples[m].append(run_one(m, n, workdir, endpoint))
                        _clear_bucket(endpoint)
                        print(f"{size_label(n):>8} {m:<16} #{rep} {_brief(samples[m][-1])}", flush=True)
                results.setdefault(str(n), {}).update({m: aggregate(samples[m]) for m in REMOTE})
    finally:
        if moto is not None:
            stop(moto)
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"benchmark": "checkpoint_io", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(time.monotonic() - t_start, 1), "machine": machine,
              "args": vars(args), "units": "GB/s = 1e9 bytes per second; sizes in bytes; *_vs_raw of S3 rows is vs s3fs, "
              "*_vs_dcp of -2r rows is vs dcp-2r",
              "results": with_ratios(results)}
    report["machine"]["loadavg_end"] = os.getloadavg()
    write_outputs(report, Path(args.out))


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                    if k not in ("samples", "peak_extra_per_rank"))


if __name__ == "__main__":
    main()
