"""Cost of the per-step stop agreement, relative to the step time of the example tasks (2 ranks, CPU).

Runs the real DDP training step of each example with (a) no agreement, (b) a synchronous MAX
all-reduce of the flags every step, (c) the pipelined agreement (async all-reduce, read at the next
step; what FSDP and own loops without a DDP model get), (d) the agreement carried in DDP's last
gradient bucket (what dtrain's trainer uses with DDP), interleaved in rounds so machine noise hits
all variants alike. Each variant has its own DDP model with identical weights. Writes
benchmarks/results/agreement_overhead.{json,png}.

    python benchmarks/agreement_overhead.py [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain import dist  # noqa: E402
from dtrain.agreement import Flag, StepAgreement  # noqa: E402
from dtrain.config import ParallelConfig  # noqa: E402
from dtrain.data import ResumableDistributedSampler  # noqa: E402
from dtrain.parallel import wrap_model  # noqa: E402
from dtrain.tasks import get_task, make_options  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {"digits": ({}, {}, 64), "gpt": ({"n_layer": 2, "n_embd": 64, "block_size": 64}, {"max_chars": 200_000}, 16)}


def _worker(rank: int, world: int, port: int, steps: int, rounds: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    env = dist.init(timeout_s=120)
    results: dict[str, dict[str, list[float]]] = {}
    for name, (model_opts, data_opts, batch) in TASKS.items():
        task = get_task(name)
        torch.manual_seed(0)
        train_ds, _ = task.build_datasets(make_options(task.data_config, data_opts, "data"), 0)
        models, opts = {}, {}
        for variant in ("none", "sync", "pipelined", "carried"):
            torch.manual_seed(0)
            models[variant] = wrap_model(task.build_model(make_options(task.model_config, model_opts, "model")),
                                         ParallelConfig(strategy="ddp"), env, task.fsdp_blocks)
            opts[variant] = torch.optim.AdamW(models[variant].parameters(), lr=1e-3)
        agreements = {"sync": StepAgreement(), "pipelined": StepAgreement(),
                      "carried": StepAgreement(ddp=models["carried"])}  # type: ignore[arg-type]
        sampler = ResumableDistributedSampler(len(train_ds), batch, 1, rank, world, 0)  # type: ignore[arg-type]
        loader = iter(torch.utils.data.DataLoader(train_ds, batch_sampler=sampler))
        times: dict[str, list[float]] = {"none": [], "sync": [], "pipelined": [], "carried": []}
        batches = [next(loader) for _ in range(16)]

        def step(variant: str, i: int, task=task, models=models, opts=opts, batches=batches) -> None:  # type: ignore[no-untyped-def]
            loss = task.train_loss(models[variant], batches[i % len(batches)])
            loss.backward()
            opts[variant].step()
            opts[variant].zero_grad(set_to_none=True)

        for variant in times:
            for i in range(5):
                step(variant, i)
                if variant in agreements:
                    agreements[variant].step(Flag.NONE, sync=True)
        for _ in range(rounds):
            for variant in times:
                agreement = agreements.get(variant)
                dist.barrier()
                t0 = time.perf_counter()
                for i in range(steps):
                    step(variant, i)
                    if agreement is not None:
                        agreement.step(Flag.NONE, sync=(variant == "sync"))
                if agreement is not None:
                    agreement.drain()
                times[variant].append((time.perf_counter() - t0) / steps * 1e3)
        results[name] = times
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from tests.multiproc import free_port

    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / "agreement_overhead.raw.json"
    mp.spawn(_worker, args=(2, free_port(), args.steps, args.rounds, str(raw)), nprocs=2, join=True)
    data = json.loads(raw.read_text())
    raw.unlink()
    report: dict[str, object] = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}",
                                 "ranks": 2, "steps_per_round": args.steps, "rounds": args.rounds, "tasks": {}}
    for name, times in data.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        report["tasks"][name] = {  # type: ignore[index]
            "step_ms_median": med,
            "overhead_sync_pct": 100 * (med["sync"] - med["none"]) / med["none"],
            "overhead_pipelined_pct": 100 * (med["pipelined"] - med["none"]) / med["none"],
            "overhead_carried_pct": 100 * (med["carried"] - med["none"]) / med["none"],
            "rounds_ms": times,
        }
    (RESULTS / "agreement_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report)
    for name, r in report["tasks"].items():  # type: ignore[attr-defined]
        print(f"{name}: step {r['step_ms_median']['none']:.2f} ms; agreement overhead sync "
              f"{r['overhead_sync_pct']:+.2f}%, pipelined {r['overhead_pipelined_pct']:+.2f}%, "
              f"carried in DDP gradients {r['overhead_carried_pct']:+.2f}%")


def _plot(report: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(report["tasks"])
    for i, variant in enumerate(("sync", "pipelined", "carried")):
        vals = [report["tasks"][n][f"overhead_{variant}_pct"] for n in names]
        ax.bar([j + 0.25 * i for j in range(len(names))], vals, width=0.25, label=variant)
    ax.axhline(0.5, color="red", linestyle="--", label="target 0.5%")
    ax.set_xticks([j + 0.25 for j in range(len(names))], names)
    ax.set_ylabel("step time overhead (%)")
    ax.set_title("per-step stop agreement, 2 gloo ranks on CPU")
    ax.legend()
    fig.savefig(RESULTS / "agreement_overhead.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
