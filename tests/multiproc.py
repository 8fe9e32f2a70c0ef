"""Run a function on N real gloo ranks (torch.multiprocessing spawn, env:// style, free port)."""

from __future__ import annotations

import gc
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, queue: Any, args: tuple) -> None:
    # fn's module (torch and the rest) is imported by now: its objects out of the cyclic GC, as
    # `python -m dtrain` does (dtrain/cli.py); the GC walked them at every full collection and at exit
    gc.freeze()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        os.environ.pop(k, None)
    try:
        queue.put((rank, fn(rank, world, *args), None))
    except BaseException:  # report the failure to the parent instead of a bare non-zero exit
        queue.put((rank, None, traceback.format_exc()))
        raise


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on `world` processes; returns their results in rank order.

    `fn` must be importable (module level) because the workers are spawned.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, fn, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results: dict[int, Any] = {}
        for _ in range(world):
            rank, value, err = queue.get()
            if err:
                raise AssertionError(f"rank {rank} failed:\n{err}")
            results[rank] = value
        for p in procs:
            p.join(30)
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
