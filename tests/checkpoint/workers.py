"""Rank functions for the multi-process checkpoint tests (module level: they are spawned)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from dtrain import dist
from dtrain.checkpoint import CheckpointManager, writer
from dtrain.errors import CheckpointError


def save_error(mgr: CheckpointManager, step: int, **components: Any) -> str:
    """Save (and wait for an async save): the CheckpointError's message, or "no error"."""
    try:
        mgr.save(step, **components)
        mgr.wait()
    except CheckpointError as e:
        return str(e)
    return "no error"


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def make_optim(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, seed: int) -> None:
    """One step on this rank's slice of a fixed global batch (same global data for any world)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g)
    per = 8 // world
    model(x[rank * per:(rank + 1) * per]).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def full_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Unsharded model and optimizer state (FQN keys) on every rank, for comparisons."""
    opts = StateDictOptions(full_state_dict=True)
    msd, osd = get_state_dict(model, [opt] if opt else [], options=opts)
    optim = osd.get("state", {}) if opt else {}
    # numpy, not tensors: tensors sent through a multiprocessing queue live in shared memory that
    # vanishes when the worker exits
    return {"model": {k: v.detach().numpy().copy() for k, v in msd.items()},
            "optim": {f: {n: v.detach().numpy().copy() for n, v in st.items()} for f, st in optim.items()}}


def wrap(model: nn.Module, strategy: str, world: int) -> nn.Module:
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return model


def train_and_save(model: nn.Module, rank: int, world: int, root: str, tag: str) -> dict[str, Any]:
    """Train 2 steps, save at step 2, then train one more step (the reference continuation)."""
    opt = make_optim(model)
    for s in (1, 2):
        step(model, opt, rank, world, seed=s)
    mgr = CheckpointManager(root)
    torch.manual_seed(1000 + rank)  # a different RNG stream on each rank
    rng = torch.get_rng_state().numpy().copy()
    mgr.save(2, model=model, optimizer=opt, extra={"tag": tag})
    saved = full_state(model, opt)
    step(model, opt, rank, world, seed=3)
    after = full_state(model, opt)
    mgr.close()
    return {"saved": saved, "after": after, "rng": rng}


def load_and_continue(model: nn.Module, rank: int, world: int, root: str) -> dict[str, Any]:
    opt = make_optim(model)
    info, extra = CheckpointManager(root).restore_latest(model=model, optimizer=opt)
    rng = torch.get_rng_state().numpy().copy()
    loaded = full_state(model, opt)
    step(model, opt, rank, world, seed=3)
    return {"step": info.step, "extra": extra, "loaded": loaded, "after": full_state(model, opt), "rng": rng}


def fresh_fsdp_save_and_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    """FSDP2 + AdamW saved before its first step: the save leaves the optimizer untouched, and a
    stepped job loading it is reset to "never stepped" and then follows the reference exactly."""
    model = wrap(make_mlp(seed=5), "fsdp", world)
    opt = make_optim(model)
    CheckpointManager(root).save(0, model=model, optimizer=opt)
    untouched = not opt.state
    step(model, opt, rank, world, seed=7)
    other = wrap(make_mlp(seed=77), "fsdp", world)
    other_opt = make_optim(other)
    step(other, other_opt, rank, world, seed=8)
    CheckpointManager(root).restore_latest(model=other, optimizer=other_opt)
    reset = not other_opt.state
    step(other, other_opt, rank, world, seed=7)
    return {"untouched": untouched, "reset": reset, "reference": full_state(model, opt),
            "resumed": full_state(other, other_opt)}


class Tied(nn.Module):
    """A GPT-style output head tied to its input embedding."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(6, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight  # one Parameter under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(x)))


def tied_ddp_save(rank: int, world: int, root: str) -> dict[str, Any]:
    model = nn.parallel.DistributedDataParallel(Tied())
    opt = make_optim(model)
    g = torch.Generator().manual_seed(rank)
    model(torch.randint(0, 6, (4,), generator=g)).pow(2).mean().backward()
    opt.step()
    CheckpointManager(root).save(1, model=model, optimizer=opt)
    return full_state(model, opt)


def reshard_scenarios(rank: int, world: int, roots: dict[str, str]) -> dict[str, Any]:
    """In one 2-rank job (process start-up dominates the cost): load a 1-process checkpoint into
    FSDP2; save from FSDP2 and load that into DDP; save from DDP (the parent loads it in 1 process)."""
    dist.init(timeout_s=60, backend="gloo")
    out = {
        "single_to_fsdp": load_and_continue(wrap(make_mlp(seed=99), "fsdp", world), rank, world, roots["single"]),
        "fsdp_save": train_and_save(wrap(make_mlp(), "fsdp", world), rank, world, roots["fsdp"], "fsdp"),
        "fsdp_to_ddp": load_and_continue(wrap(make_mlp(seed=98), "ddp", world), rank, world, roots["fsdp"]),
        "ddp_save": train_and_save(wrap(make_mlp(), "ddp", world), rank, world, roots["ddp"], "ddp"),
        "fresh_fsdp": fresh_fsdp_save_and_resume(rank, world, roots["fresh"]),
        "tied_ddp": tied_ddp_save(rank, world, roots["tied"]),
    }
    dist.shutdown()
    return out


def make_narrow(seed: int = 0) -> nn.Sequential:
    """Layers with fewer rows than 4 ranks have: FSDP2 leaves some ranks empty shards of them
    (3 rows on 4 ranks: 1, 1, 1, 0), as a norm of 768 elements does on 1024 ranks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 4))


def narrow_fsdp_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train 2 steps of FSDP2 over `world` ranks, save; the state saved and this rank's shard rows."""
    dist.init(timeout_s=60, backend="gloo")
    model = wrap(make_narrow(), "fsdp", world)
    opt = make_optim(model)
    for s in (1, 2):
        step(model, opt, rank, world, seed=s)
    CheckpointManager(root).save(2, model=model, optimizer=opt)
    rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    out = {"saved": full_state(model, opt), "rows": rows}
    dist.shutdown()
    return out


def narrow_fsdp_load(rank: int, world: int, root: str) -> dict[str, Any]:
    dist.init(timeout_s=60, backend="gloo")
    model = wrap(make_narrow(seed=9), "fsdp", world)
    opt = make_optim(model)
    CheckpointManager(root).restore_latest(model=model, optimizer=opt)
    out = full_state(model, opt)
    dist.shutdown()
    return out


def failing_rank_save(rank: int, world: int, roots: list[str]) -> list[str]:
    """Rank 1 cannot write (sync, then async save); every rank must raise, no manifest may appear."""
    dist.init(timeout_s=60, backend="gloo")
    model = wrap(make_mlp(), "ddp", world)
    opt = make_optim(model)
    real = writer.write_tensor_file

    def broken(*a: Any, **k: Any) -> Any:
        raise OSError("no space left on device")

    if rank == 1:
        writer.write_tensor_file = broken  # type: ignore[assignment]
    messages = []
    for root, async_save in zip(roots, (False, True), strict=True):
        mgr = CheckpointManager(root, async_save=async_save)
        messages.append(save_error(mgr, 1, model=model, optimizer=opt))
        mgr.close()
    writer.write_tensor_file = real  # type: ignore[assignment]
    dist.shutdown()
    return messages


def overlapped_async_saves(rank: int, world: int, roots: dict[str, str]) -> dict[str, Any]:
    """DDP and FSDP2 saved as the trainer saves (async, overlap_staging): the state at the call
    is what gets committed, although the next step runs while the save is in flight (DDP's state
    is walked in the background, FSDP2's at the call)."""
    dist.init(timeout_s=60, backend="gloo")
    out = {}
    for strategy, root in roots.items():
        model = wrap(make_mlp(seed=3), strategy, world)
        opt = make_optim(model)
        for s in (1, 2):
            step(model, opt, rank, world, seed=s)
        mgr = CheckpointManager(root, async_save=True, overlap_staging=True)
        mgr.save(2, model=model, optimizer=opt)
        saved = full_state(model, opt)
        step(model, opt, rank, world, seed=3)  # its optimizer.step() waits for the background copy
        mgr.close()
        out[strategy] = saved
    dist.shutdown()
    return out


class Value:
    """A `stateful` component holding one value."""

    def __init__(self, v: Any) -> None:
        self.v = v

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v = state["v"]


def save_agreement(rank: int, world: int, roots: dict[str, str]) -> dict[str, Any]:
    """How ranks agree on a save: the object collectives a DDP and an FSDP2 save make, and the
    error every rank raises when only one rank knows why the save cannot go on (its state walk
    failed; another job holds the root's lease; its tensors differ from the other rank's); and the
    warnings this rank logs about `stateful` components that differ between ranks."""
    import logging
    from collections import Counter

    from dtrain.checkpoint import comm, snapshot

    dist.init(timeout_s=60, backend="gloo")
    said: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logging.getLogger("dtrain.checkpoint.snapshot").addHandler(Said())
    calls: Counter[str] = Counter()

    def counting(name: str) -> Any:
        real = getattr(comm, name)

        def counted(*a: Any, **k: Any) -> Any:
            calls[name] += 1
            return real(*a, **k)
        return counted

    for name in ("all_gather_object", "gather_object", "broadcast_object"):
        setattr(comm, name, counting(name))

    def attempt(mgr: CheckpointManager, model: nn.Module, opt: torch.optim.Optimizer | None,
                stateful: dict[str, Any] | None = None, steps: tuple[int, ...] = (1,)) -> str:
        try:
            for s in steps:
                mgr.save(s, model=model, optimizer=opt, stateful=stateful)
            mgr.wait()
        except CheckpointError as e:
            return str(e)
        finally:
            mgr.close()
        return "saved"

    out: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp"):
        model = wrap(make_mlp(), strategy, world)
        calls.clear()
        out[strategy] = attempt(CheckpointManager(roots[strategy]), model, make_optim(model), {"same": Value(3)})
        out[f"{strategy}_calls"] = dict(calls)
    out["said_when_the_same"] = list(said)
    model = wrap(make_mlp(), "ddp", world)
    if rank == 1:
        real = snapshot.get_states

        def broken(*a: Any, **k: Any) -> Any:
            raise RuntimeError("state dict walk failed")

        snapshot.get_states = broken  # type: ignore[assignment]
    out["walk"] = attempt(CheckpointManager(roots["walk"]), model, make_optim(model))
    if rank == 1:
        snapshot.get_states = real  # type: ignore[assignment]
    out["leased"] = attempt(CheckpointManager(roots["leased"]), model, make_optim(model))
    out["leased_overlapped"] = attempt(CheckpointManager(roots["leased"], async_save=True, overlap_staging=True),
                                       model, make_optim(model))
    plain = make_mlp().double() if rank == 1 else make_mlp()
    out["dtypes"] = attempt(CheckpointManager(roots["dtypes"]), plain, None)
    del said[:]
    out["per_rank"] = attempt(CheckpointManager(roots["per_rank"]), model, None,
                              {"same": Value([1, 2.5]), "mine": Value(rank)}, steps=(1, 2))
    out["said_per_rank"] = list(said)
    dist.shutdown()
    return out


def _loaded_bytes(mgr: CheckpointManager, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float, bool]:
    """Load the newest checkpoint; (MiB read from the files, MiB copied from the other rank) as
    the load logs them, and whether its reads were marked as shared with the other rank."""
    import logging

    seen: list[tuple[Any, ...]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("loaded "):
                seen.append(record.args)  # type: ignore[arg-type]

    from dtrain.checkpoint import comm, restore

    real = restore.ChunkReader
    shared: list[bool] = []

    def reader(*a: Any, **k: Any) -> Any:
        shared.append(not k["direct"])
        return real(*a, **k)

    restore.ChunkReader = reader  # type: ignore[assignment,misc]
    real_words = comm.start_agree_words
    words: list[int] = []

    def counted(w: list[int], group: Any) -> Any:
        words.append(len(w))
        return real_words(w, group)

    comm.start_agree_words = counted  # type: ignore[assignment]
    log = logging.getLogger("dtrain.checkpoint.restore")
    grab, level = Grab(), log.level
    log.addHandler(grab)
    log.setLevel(logging.INFO)
    try:
        mgr.load(mgr.latest_committed(), model=model, optimizer=opt)  # type: ignore[arg-type]
    finally:
        restore.ChunkReader = real  # type: ignore[misc]
        comm.start_agree_words = real_words  # type: ignore[assignment]
        log.removeHandler(grab)
        log.setLevel(level)
    *_, read, copied = seen[-1]
    assert max(words) <= 4, words  # every collective of the load: a few words per rank, whatever the key count
    return read, copied, shared[-1]


def peer_loads(rank: int, world: int, root: str) -> dict[str, Any]:
    """DDP ranks of one host loading the same state: split between them and copied from each
    other; with the copy turned off; with the copy refused on rank 0; below peers.MIN_BYTES; with
    a model that does not match on rank 1 (above and below peers.MIN_BYTES); and with a damaged
    byte in the share rank 1 reads (every rank must raise)."""
    import os

    from dtrain.checkpoint import directio, peers
    from dtrain.checkpoint.format import CheckpointDamagedError

    dist.init(timeout_s=60, backend="gloo")
    peers.MIN_BYTES = directio.MIN_LOAD = 0  # this small state is split, and its shares read directly

    def big(seed: int) -> nn.Module:  # ~12 MiB with AdamW's state: files big enough for O_DIRECT
        torch.manual_seed(seed)
        return wrap(nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512), nn.Linear(512, 256)), "ddp", world)

    model = big(0)
    opt = make_optim(model)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    mgr = CheckpointManager(root)
    mgr.save(1, model=model, optimizer=opt)
    out: dict[str, Any] = {"saved": full_state(model, opt)}
    for case in ("split", "off", "refused", "small"):
        fresh = big(1)
        fresh_opt = make_optim(fresh)
        real = peers._readv
        if case == "off":
            os.environ["DTRAIN_PEER_COPY"] = "0"
        if case == "small":
            peers.MIN_BYTES = 128 << 20
        if case == "refused" and rank == 0:
            def refused(pid: int, copies: Any) -> None:
                raise PermissionError(1, "Operation not permitted")
            peers._readv = refused  # type: ignore[assignment]
        try:
            out[case] = {"bytes": _loaded_bytes(mgr, fresh, fresh_opt), "state": full_state(fresh, fresh_opt)}
        finally:
            os.environ.pop("DTRAIN_PEER_COPY", None)
            peers._readv = real  # type: ignore[assignment]
            peers.MIN_BYTES = 0
    info = mgr.latest_committed()
    assert info is not None
    for case, least in (("mismatch", 0), ("mismatch_small", 128 << 20)):
        # rank 1's model does not match: it fails before the split, and every rank must say so;
        # below peers.MIN_BYTES each rank reads while the plan's all-reduce is under way
        peers.MIN_BYTES = least
        try:
            torch.manual_seed(2)
            layers = [nn.Linear(512, 1024), nn.Linear(1024, 512), nn.Linear(512, 256 if rank == 0 else 128)]
            odd = nn.Sequential(*layers)  # not DDP, which would refuse the mismatch itself
            mgr.load(info, model=odd, optimizer=make_optim(odd))
            out[case] = "loaded"
        except CheckpointError as e:
            out[case] = str(e)
        finally:
            peers.MIN_BYTES = 0
    if rank == 0:  # a byte in the middle of the biggest tensor rank 1 reads
        from dtrain.checkpoint.reader import read_manifest

        manifest = read_manifest(info.url)
        sizes = peers._sizes(sorted(manifest.tensors), manifest)
        split = peers.shares(list(sizes.values()), world)
        theirs = [k for k, o in zip(sizes, split, strict=True) if o == 1]
        chunk = max((manifest.tensors[k].chunks[0] for k in theirs), key=lambda c: c.data_offsets[1] - c.data_offsets[0])
        with open(os.path.join(info.url, chunk.file), "r+b") as f:
            f.seek(sum(chunk.data_offsets) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        fresh = big(1)
        mgr.load(info, model=fresh, optimizer=make_optim(fresh))
        out["damaged"] = "loaded"
    except CheckpointDamagedError as e:
        out["damaged"] = str(e)
    mgr.close()
    dist.shutdown()
    return out


def damaged_fallback_warnings(rank: int, world: int, root: str) -> dict[str, Any]:
    """Resume (restore_latest) from a root whose newest checkpoint is damaged: in a model file that
    every rank reads ("same"), in rank 1's own RNG file ("own"), and that again while rank 0 cannot
    load at all, its model being another ("mixed"). For each: what the resume gave, and the
    fallback warnings this rank logged."""
    import logging
    import os

    dist.init(timeout_s=30, backend="gloo")
    model = wrap(make_mlp(), "ddp", world)
    opt = make_optim(model)
    mgr = CheckpointManager(root)
    for s in (1, 2):
        step(model, opt, rank, world, seed=s)
        mgr.save(s, model=model, optimizer=opt)
    newest = mgr.latest_committed()
    assert newest is not None and newest.step == 2
    said: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "falling back" in record.getMessage():
                said.append(record.getMessage())

    logging.getLogger("dtrain.checkpoint.manager").addHandler(Said())
    out: dict[str, Any] = {}
    sound: dict[str, bytes] = {}
    for case, name in (("same", "model-00000-of-00002.safetensors"), ("own", "rng-00001-of-00002.json"),
                       ("mixed", "rng-00001-of-00002.json")):
        if rank == 0:  # the earlier case's damage repaired, this one's made
            for path, data in sound.items():
                open(path, "wb").write(data)
            path = os.path.join(newest.url, name)
            sound[path] = open(path, "rb").read()
            open(path, "wb").write(sound[path][:-3] + bytes([sound[path][-3] ^ 0xFF]) + sound[path][-2:])
        dist.barrier()
        del said[:]
        # "mixed": plain modules, as DDP would refuse the other model itself
        fresh = wrap(make_mlp(seed=1), "ddp", world) if case != "mixed" else make_mlp(1) if rank else make_narrow()
        try:
            info = mgr.restore_latest(model=fresh, optimizer=make_optim(fresh))
            out[case] = {"loaded": info[0].step if info else None, "said": list(said)}
        except CheckpointError as e:
            out[case] = {"error": f"{type(e).__name__}: {e}", "said": list(said)}
    mgr.close()
    dist.shutdown()
    return out
