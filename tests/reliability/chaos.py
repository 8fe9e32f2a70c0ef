"""Process faults across the save/load lifecycle: a small 2-rank DDP job is SIGKILLed again and again
at seeded points of its saves and loads (faultpoints.fault_point phases), and resumed each time.

    python -m tests.reliability.chaos worker ROOT STEPS SAVE_EVERY ASYNC OUT   (one rank; env:// vars)

`run_chaos` drives it: a reference run without faults, then `attempts` runs that each carry one
DTRAIN_CKPT_FAULT, then one clean run to the end. After every attempt it checks that each committed
checkpoint verifies and that no committed checkpoint retention should have kept is gone; at the end,
that the weights equal the reference bit for bit. Every process it starts is stopped by PID.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
KEEP_LAST = 2
# phase -> who reaches it: ranks that write files, or rank 0 only (manifest, retention)
SAVE_PHASES = {"save_begin": "any", "prepared": "any", "staged": "any", "file_open": "any",
               "file_write": "any", "file_closed": "any", "manifest": "0", "manifest_done": "0",
               "committed": "any", "remove": "0", "saved": "any"}
LOAD_PHASES = {"load_begin": "any", "read": "any", "loaded": "any"}


# ---- the worker: one rank of the job ---------------------------------------------------------------
def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 1000 + rank))


def worker(root: str, steps: int, save_every: int, async_save: bool, out: str, overlap: bool = False) -> int:
    from dtrain import dist
    from dtrain.checkpoint import CheckpointManager

    env = dist.init(timeout_s=30)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)))
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        # overlap: as the trainer saves (state walk and host copy behind the next forward)
        mgr = CheckpointManager(root, async_save=async_save, keep_last_n=KEEP_LAST, lease_ttl_s=30,
                                overlap_staging=overlap)
        found = mgr.restore_latest(model=model, optimizer=opt)
        start = found[0].step if found else 0
        print(f"rank {env.rank} resumed from step {start}", flush=True)
        for step in range(start + 1, steps + 1):
            model(_batch(step, env.rank)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step % save_every == 0:
                mgr.save(step, model=model, optimizer=opt)
        mgr.close()
        if env.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().clone() for k, v in model.module.state_dict().items()}, out)
        return 0
    finally:
        dist.shutdown()


# ---- the driver ------------------------------------------------------------------------------------
@dataclass
class ChaosResult:
    attempts: int = 0
    faults_fired: int = 0
    faults_by_phase: dict[str, int] = field(default_factory=dict)
    recovered: int = 0  # kills after which a later attempt resumed from the newest committed checkpoint
    wrong_resumes: int = 0  # a resume that did not start from the newest committed checkpoint
    committed_lost: int = 0
    corrupt_accepted: int = 0
    checkpoints_committed: int = 0
    weights_equal: bool = False
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def _launch(root: Path, steps: int, save_every: int, async_save: bool, out: Path, fault: str | None,
            logdir: Path, tag: str, timeout: float = 90, overlap: bool = False) -> tuple[list[int | None], str]:
    """Both ranks; once one dies abnormally the other is killed, as torchrun does. (exit codes, stderr)."""
    from tests.multiproc import free_port

    port = free_port()
    procs, files = [], []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO), "DTRAIN_JOB_ID": "chaos-job"}
        for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
            env.pop(k, None)
        if fault:
            env["DTRAIN_CKPT_FAULT"] = fault
        f = open(logdir / f"{tag}-rank{rank}.log", "w+")
        files.append(f)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.reliability.chaos", "worker", str(root),
                                       str(steps), str(save_every), str(int(async_save)), str(out), str(int(overlap))],
                                      cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.05)  # polling child processes
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    text = ""
    for f in files:
        f.seek(0)
        text += f.read()
        f.close()
    return [p.returncode for p in procs], text


def _committed(root: Path) -> list[int]:
    from dtrain.checkpoint import list_checkpoints

    return [i.step for i in list_checkpoints(str(root)) if i.committed]


def draw_fault(rng: random.Random, step: int, steps: int, async_save: bool) -> str:
    """One seeded fault that this attempt reaches: load phases once something is committed (only
    those once the job is done), staging only for async saves; a rank that gets there; an early
    occurrence, so each attempt dies soon after its resume."""
    phases = dict(LOAD_PHASES) if step >= steps else {**SAVE_PHASES, **(LOAD_PHASES if step else {})}
    if not async_save:
        phases.pop("staged", None)
    phase = rng.choice(sorted(phases))
    rank = 0 if phases[phase] == "0" else rng.randrange(2)
    top = {"file_write": 12, "read": 8, "load_begin": 1, "loaded": 1}.get(phase, 3)
    return f"{phase}:{rank}:{rng.randint(1, top)}"


def run_chaos(workdir: Path, *, seed: int, attempts: int, steps: int = 40, save_every: int = 2) -> ChaosResult:
    from safetensors.torch import load_file

    from dtrain.checkpoint import verify

    res, t0 = ChaosResult(), time.monotonic()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    codes, text = _launch(workdir / "ref", steps, save_every, False, workdir / "ref.safetensors", None, logs, "ref")
    if codes != [0, 0]:
        raise AssertionError(f"the reference run failed ({codes}):\n{text[-3000:]}")
    root, rng = workdir / "chaos", random.Random(seed)
    seen: set[int] = set()
    pending = 0  # kills not yet followed by a correct resume
    for attempt in range(attempts + 1):
        before = _committed(root)
        async_save = rng.random() < 0.5
        overlap = async_save and attempt % 2 == 1  # no draw of its own: the seeds keep their faults
        fault = draw_fault(rng, before[-1] if before else 0, steps, async_save) if attempt < attempts else None
        t = time.monotonic()
        codes, text = _launch(root, steps, save_every, async_save, workdir / "final.safetensors", fault, logs,
                              f"attempt{attempt:02d}", overlap=overlap)
        res.attempts += 1
        fired = "dtrain fault: SIGKILL" in text
        after = _committed(root)
        seen.update(after)
        should_keep = sorted(set(before) | set(after))[-KEEP_LAST:]
        lost = [s for s in should_keep if s not in after]
        bad = [f"step {s}: {p}" for s in after for p in verify(str(root / f"step-{s:09d}"))]
        res.committed_lost += len(lost)
        res.corrupt_accepted += len(bad)
        res.log.append(f"attempt {attempt} ({time.monotonic() - t:.1f} s): fault={fault} async={async_save} overlap={overlap} "
                       f"fired={fired} exit={codes} "
                       f"committed {before} -> {after}" + (f" LOST {lost}" if lost else "") + (f" BAD {bad}" if bad else ""))
        if fired:
            res.faults_fired += 1
            phase = (fault or "?").split(":")[0]
            res.faults_by_phase[phase] = res.faults_by_phase.get(phase, 0) + 1
        elif codes != [0, 0]:
            raise AssertionError(f"attempt {attempt} failed without an injected fault ({codes}):\n{text[-4000:]}")
        resumed = {int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if " resumed from step " in line}
        if resumed:
            if resumed == {before[-1] if before else 0}:
                res.recovered, pending = res.recovered + pending, 0
            else:
                res.wrong_resumes += 1
        pending += fired
    if codes != [0, 0]:
        raise AssertionError(f"the last, fault-free attempt failed ({codes}):\n{text[-4000:]}")
    ref, final = load_file(str(workdir / "ref.safetensors")), load_file(str(workdir / "final.safetensors"))
    res.weights_equal = ref.keys() == final.keys() and all(torch.equal(ref[k], final[k]) for k in ref)
    res.checkpoints_committed = len(seen)
    res.seconds = time.monotonic() - t0
    return res


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    import gc

    # the imports' objects out of the cyclic GC, as `python -m dtrain` does (dtrain/cli.py): it walked
    # them while they loaded, at every full collection and at exit (each attempt starts two of us)
    gc.disable()
    import dtrain.checkpoint
    import dtrain.dist  # noqa: F401

    gc.freeze()
    gc.enable()
    root_, steps_, every_, async_, out_, overlap_ = sys.argv[2:8]
    sys.exit(worker(root_, int(steps_), int(every_), async_ == "1", out_, overlap=overlap_ == "1"))
