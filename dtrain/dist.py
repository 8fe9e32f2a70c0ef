"""Process-group setup from whatever launched us (torchrun, Slurm, nothing), and the few collectives
the rest of dtrain agrees with.

Init is idempotent and happens once, in one place. With world size 1 no process group is created and
every helper is a local no-op, so the same code runs in a plain `python` process.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from dtrain.checks import check_backend
from dtrain.errors import DistributedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun" | "slurm" | "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None
_CKPT_GROUP: object | None = None
_TIMEOUT: datetime.timedelta | None = None  # init's timeout_s, for the checkpoint group too


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as e:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from e


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.fullmatch(r"([^\[]+)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def detect_launcher() -> tuple[str, int, int, int]:
    """(launcher, rank, world_size, local_rank) from the environment; torchrun wins over Slurm
    because torchrun inside an srun step sets its own RANK/WORLD_SIZE."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env"
        return launcher, _int_env("RANK"), _int_env("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        local = int(os.environ.get("SLURM_LOCALID", "0"))
        if world > 1:
            os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
            os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000))
        return "slurm", rank, world, local
    return "none", 0, 1, 0


def _make_store(rank: int, world_size: int, timeout: datetime.timedelta) -> torch_dist.Store:
    """The rendezvous store of this process group, with a key space private to this attempt.

    Under torchrun the agent of node 0 hosts one TCPStore for the whole job (the default since
    torch 2.4): its keys outlive a restart, and reusing them made restarted workers fail to
    connect in 7 of 8 trials here (shared/notes), so each restart gets its own prefix. The prefix
    is the restart count, which every worker of one node shares. Across nodes it is not shared:
    a node restarted for another node's failure does not count a restart, so multi-node jobs must
    run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/torchrun.sh sets it): then rank
    0 hosts a fresh store each attempt and no prefix is needed.
    """
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = torch_dist.TCPStore(
        addr, port, world_size, is_master=(not agent_store and rank == 0), timeout=timeout, wait_for_workers=False
    )
    if not agent_store:
        return torch_dist.PrefixStore("dtrain", store)
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and rank == 0:
        log.warning("torchrun runs %d nodes with in-place restarts over its shared store: after one node fails, "
                    "the others restart under another attempt number and the group cannot form again; set "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (launch/torchrun.sh does)", nodes)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"dtrain/attempt-{attempt}", store)


def _store_within(rank: int, world_size: int, timeout: datetime.timedelta) -> torch_dist.Store:
    """`_make_store`, given up after `timeout` even where TCPStore itself would wait on: a client
    whose MASTER_PORT is held by another program (it accepts, never answers) waited for minutes.

    A client's connect loop gives up after about twice its timeout, so it gets half of ours and
    fails by itself in time (a thread still inside TCPStore when Python exits can abort the
    process); the full timeout is set back for the store's later waits. Only a client facing a
    silent stranger stays blocked: its daemon thread never returns, and the process still exits."""
    box: dict[str, object] = {}
    client = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" or rank != 0

    def make() -> None:
        try:
            store = _make_store(rank, world_size, timeout / 2 if client else timeout)
            store.underlying_store.set_timeout(timeout)  # type: ignore[attr-defined]
            box["store"] = store
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=make, name="dtrain-store-setup", daemon=True)
    thread.start()
    thread.join(timeout.total_seconds() + 2.0)  # a little longer than its own failure takes
    if thread.is_alive():
        raise RuntimeError("no rendezvous store answered (is rank 0 running, and is MASTER_PORT free for "
                           "it, not held by another program?)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["store"]  # type: ignore[return-value]


def ranks_on_this_node() -> int:
    """How many ranks of the job run on this machine, from the launcher's environment: torchrun's
    LOCAL_WORLD_SIZE, else Slurm's tasks per node (`SLURM_STEP_TASKS_PER_NODE` inside a step, like
    "4(x2),3": four on each of the first two nodes, three on the third) at this node's
    `SLURM_NODEID`; 1 when neither says."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return max(1, _int_env("LOCAL_WORLD_SIZE"))
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not tasks or "SLURM_PROCID" not in os.environ:
        return 1
    counts: list[int] = []
    for part in tasks.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            log.debug("cannot read SLURM tasks per node %r; assuming one rank on this node", tasks)
            return 1
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = os.environ.get("SLURM_NODEID", "0")
    return max(1, counts[int(node)]) if node.isdigit() and int(node) < len(counts) else 1


def fast_pinned_memory() -> None:
    """Pin host memory with cudaHostRegister on several threads instead of cudaHostAlloc, unless
    the user set a pinned_* allocator option. An async save's first staging allocates pinned host
    buffers as big as the state: on an H200, 8 GiB took 2.95 s by default and 0.83 s with 8
    threads (benchmarks/results/pinned_alloc.md). Must run before CUDA is first used."""
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    if any("pinned_" in os.environ.get(n, "") for n in names):
        return
    local = ranks_on_this_node()
    threads = 1 << max(0, min(3, ((os.cpu_count() or 1) // max(local, 1)).bit_length() - 1))  # power of 2, <= 8
    if threads < 2:
        return
    name = next((n for n in names if os.environ.get(n)), "PYTORCH_CUDA_ALLOC_CONF")
    ours = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    os.environ[name] = f"{os.environ[name]},{ours}" if os.environ.get(name) else ours


def init(timeout_s: float = 300.0, backend: str = "auto") -> DistEnv:
    """Initialise the default process group once from the launcher's environment."""
    global _ENV, _TIMEOUT
    if _ENV is not None:
        return _ENV
    launcher, rank, world_size, local_rank = detect_launcher()
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    chosen = "nccl" if use_cuda else "gloo"
    if backend not in ("auto", "nccl", "gloo"):
        raise DistributedError(f"dist.backend={backend!r} is not one of auto, nccl, gloo")
    check_backend(backend)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        fast_pinned_memory()
        torch.cuda.set_device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        timeout = _TIMEOUT = datetime.timedelta(seconds=timeout_s)
        try:
            store = _store_within(rank, world_size, timeout)
            torch_dist.init_process_group(
                chosen, store=store, rank=rank, world_size=world_size, timeout=timeout,
                device_id=device if use_cuda else None,
            )
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {rank}/{world_size}: could not join the process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout_s:.0f} s: {e} "
                f"(every one of the {world_size} ranks must start and reach that address; dist.timeout_s sets the wait)"
            ) from e
    _ENV = DistEnv(rank, world_size, local_rank, device, chosen if world_size > 1 else "none", launcher)
    log.debug("initialised %s", _ENV)
    return _ENV


def env() -> DistEnv:
    """The current environment; a single-process one if `init` was never called."""
    if _ENV is not None:
        return _ENV
    return DistEnv(0, 1, 0, torch.device("cpu"), "none", "none")


def shutdown() -> None:
    """Destroy the process group (safe to call on every exit path, more than once). A checkpoint
    save still in flight (async_save, no wait() or close() yet) is finished first, since the group
    would be destroyed under it; its error is raised after the teardown, or only logged when an
    exception is already on its way (the body of `distributed()` raised)."""
    global _ENV, _CKPT_GROUP, _TIMEOUT
    saves = sys.modules.get("dtrain.checkpoint.background")  # imported by any async save
    error = saves.finish_all() if saves is not None else None
    if torch_dist.is_available() and torch_dist.is_initialized():
        try:
            torch_dist.destroy_process_group()
        except Exception as e:  # teardown after a failed collective must not mask the real error
            log.warning("destroy_process_group failed: %s", e)
    _ENV = _CKPT_GROUP = _TIMEOUT = None
    if error is not None and sys.exc_info()[1] is None:
        raise error


@contextmanager
def distributed(timeout_s: float = 300.0, backend: str = "auto") -> Iterator[DistEnv]:
    """`with distributed() as env:` initialises and always tears down, errors included."""
    try:
        yield init(timeout_s, backend)
    finally:
        shutdown()


def _active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if _active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        torch_dist.barrier()


def checkpoint_group() -> torch_dist.ProcessGroup | None:
    """A separate gloo group, so checkpoint collectives (also from a background thread) never
    interleave with training collectives on the default group. It waits for a peer as long as
    `init`'s timeout_s says (torch's default for a new group is 30 min, whatever the default
    group's: a rank that hung or never called save() held the others that long)."""
    global _CKPT_GROUP
    if not _active():
        return None
    if _CKPT_GROUP is None:
        _CKPT_GROUP = torch_dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return _CKPT_GROUP  # type: ignore[return-value]


def _collective_device() -> torch.device:
    return env().device if env().backend == "nccl" else torch.device("cpu")


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks."""
    if _active():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_reduce_mean(value: float) -> float:
    """Mean of one float over ranks (identical result on every rank)."""
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return float(t.item()) / world_size()


def agree_flags(flags: int) -> int:
    """Bitwise OR of per-rank flag words: one MAX all-reduce of a small int vector (one slot per bit)."""
    if not _active():
        return flags
    bits = torch.tensor([(flags >> i) & 1 for i in range(16)], dtype=torch.int32, device=_collective_device())
    torch_dist.all_reduce(bits, op=torch_dist.ReduceOp.MAX)
    return sum(int(b) << i for i, b in enumerate(bits.tolist()))


def agree_any(flag: bool) -> bool:
    """True on every rank if any rank passed True."""
    return bool(agree_flags(int(bool(flag))))
