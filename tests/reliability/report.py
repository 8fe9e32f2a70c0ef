"""The reliability report (`make chaos`): run the fault matrix, count what was injected, what
recovered, committed checkpoints lost and corrupt checkpoints accepted, and write
benchmarks/results/reliability.json. About 10 minutes on 2 cores; `--quick` for a short pass.

    python -m tests.reliability.report [--quick] [--out benchmarks/results/reliability.json]

Recovered means what a user needs after that fault: for a save the storage broke, the previous
committed checkpoint loads and verifies and the next save commits once the fault is gone; for a
killed process, the next attempt resumes from the newest committed checkpoint (and the job ends on
the uninterrupted run's weights); for a broken file, the resume refuses it and the report says why.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from dtrain.checkpoint import CheckpointManager, verify
from dtrain.checkpoint.format import parse_manifest
from dtrain.checkpoint.jsoncodec import loads
from dtrain.checkpoint.stfile import read_header
from dtrain.errors import CheckpointError
from tests.reliability import chaos, hostile
from tests.reliability.conftest import REPO, MotoServer, make_model, remount, s3_options, tmpfs, train_step
from tests.reliability.proxy import FaultPlan, FaultProxy


@dataclass
class Row:
    fault: str
    injected: int = 0
    recovered: int = 0
    committed_lost: int = 0
    corrupt_accepted: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _check(root: str, so: dict | None, newest: int, weights: dict[str, torch.Tensor], row: Row, width: int = 32) -> bool:
    """The newest committed checkpoint is `newest`, it verifies and holds `weights`; counts a loss
    or an accepted corruption on `row` otherwise."""
    mgr = CheckpointManager(root, storage_options=so, lease=False)
    latest = mgr.latest_committed()
    if latest is None or latest.step != newest:
        row.committed_lost += 1
        row.notes.append(f"newest committed is {latest and latest.step}, expected {newest}")
        return False
    problems = verify(latest.url, so)
    fresh, opt = make_model(width=width)
    mgr.load(latest, model=fresh, optimizer=opt)
    if problems or any(not torch.equal(fresh.state_dict()[k], v) for k, v in weights.items()):
        row.corrupt_accepted += 1
        row.notes.append(f"{latest.url}: {problems or 'wrong values loaded'}")
        return False
    return True


@contextlib.contextmanager
def _s3(work: Path) -> Iterator[tuple[MotoServer, FaultProxy]]:
    work.mkdir(parents=True, exist_ok=True)
    moto = MotoServer(work).start()
    proxy = FaultProxy(moto.port).start()
    try:
        yield moto, proxy
    finally:
        proxy.stop()
        moto.stop()


# ---- storage ---------------------------------------------------------------------------------------
def flaky_endpoint(work: Path, saves: int) -> Row:
    row = Row("S3 endpoint drops connections / answers 500, 503 (18% of requests, seeded)")
    with _s3(work) as (moto, proxy):
        proxy.seed, proxy.plan = 11, FaultPlan(reset=0.06, drop_response=0.04, error_500=0.03, error_503=0.05)
        root = f"s3://{moto.bucket()}/run"
        m, o = make_model()
        mgr = CheckpointManager(root, storage_options=s3_options(proxy.endpoint), keep_last_n=2)
        lost_faults = 0
        for i in range(1, saves + 1):
            train_step(m, o, i)
            before = proxy.injected
            try:
                mgr.save(i, model=m, optimizer=o)
            except CheckpointError as e:
                row.notes.append(f"save {i} failed: {e}")
                lost_faults += proxy.injected - before
        mgr.close()
        row.injected = proxy.injected
        row.recovered = row.injected - lost_faults
        _check(root, s3_options(moto.endpoint), saves, {k: v.clone() for k, v in m.state_dict().items()}, row)
        row.notes.append(f"{saves} saves, {proxy.counts['requests']} requests, faults {dict(proxy.counts)}; "
                         "recovered = faults absorbed by retries (all but those of a save that failed)")
    return row


def outage(work: Path, trials: int) -> Row:
    row = Row("S3 endpoint down for a whole save (default 5 attempts)")
    with _s3(work) as (moto, proxy):
        root = f"s3://{moto.bucket()}/run"
        m, o = make_model()
        mgr = CheckpointManager(root, storage_options=s3_options(proxy.endpoint))
        step = 1
        mgr.save(step, model=m, optimizer=o)
        saved = {k: v.clone() for k, v in m.state_dict().items()}
        spent = []
        for _ in range(trials):
            train_step(m, o, step + 1)
            proxy.down()
            row.injected += 1
            t = time.monotonic()
            try:
                mgr.save(step + 1, model=m, optimizer=o)
                row.notes.append("a save during an outage committed?")
            except CheckpointError:
                spent.append(time.monotonic() - t)
            proxy.up()
            if _check(root, s3_options(moto.endpoint), step, saved, row):
                step += 2
                train_step(m, o, step)
                mgr.save(step, model=m, optimizer=o)  # the job goes on once the endpoint is back
                saved = {k: v.clone() for k, v in m.state_dict().items()}
                row.recovered += _check(root, s3_options(moto.endpoint), step, saved, row)
        mgr.close()
        row.notes.append(f"each failed save gave up after {min(spent):.1f}-{max(spent):.1f} s with a CheckpointError naming the URL")
    return row


def s3_killed(work: Path, trials: int) -> Row:
    row = Row("moto (S3) SIGKILLed mid-save, restarted with its data")
    os.environ["DTRAIN_STORAGE_ATTEMPTS"] = "9"
    try:
        with _s3(work) as (moto, proxy):
            root = f"s3://{moto.bucket()}/run"
            m, o = make_model(width=64)
            mgr = CheckpointManager(root, storage_options=s3_options(proxy.endpoint))
            mgr.save(1, model=m, optimizer=o)
            rng = random.Random(5)
            for trial in range(trials):
                step = 2 + trial
                train_step(m, o, step)
                at = rng.randint(1, 5)  # a save PUTs 5 objects: 2 shards, state, rng, manifest
                puts: list[str] = []
                threads: list[threading.Thread] = []

                def hook(n: int, method: str, path: str, step: int = step, at: int = at,
                         puts: list[str] = puts, threads: list[threading.Thread] = threads) -> None:
                    if method == "PUT" and f"step-{step:09d}" in path:
                        puts.append(path)
                        if len(puts) == at:
                            proxy.down()
                            moto.kill()
                            threads.append(threading.Thread(target=lambda: (moto.start(replay=True), proxy.up())))
                            threads[0].start()

                proxy.on_request = hook
                try:
                    mgr.save(step, model=m, optimizer=o)
                except CheckpointError as e:
                    row.notes.append(f"save {step} failed: {e}")
                for t in threads:
                    t.join()
                proxy.on_request = None
                row.injected += bool(threads)
                row.recovered += bool(threads) and _check(root, s3_options(moto.endpoint), step,
                                                          {k: v.clone() for k, v in m.state_dict().items()}, row, 64)
            mgr.close()
    finally:
        os.environ.pop("DTRAIN_STORAGE_ATTEMPTS", None)
    row.notes.append("killed at a seeded PUT of the save; the save's retries span the restart")
    return row


def disk_full(work: Path, trials: int) -> Row:
    row = Row("local disk fills up during a save (tmpfs)")
    for trial in range(trials):
        with tmpfs(work / f"disk{trial}", "4m") as disk:
            root = str(disk / "ckpts")
            m, o = make_model(width=256)
            mgr = CheckpointManager(root, async_save=trial % 2 == 1)
            train_step(m, o, 1)
            mgr.save(1, model=m, optimizer=o)
            mgr.wait()
            saved = {k: v.clone() for k, v in m.state_dict().items()}
            st = os.statvfs(disk)
            room = random.Random(trial).randint(4, 56) * 1024  # a checkpoint is ~70 KiB: it runs out inside
            (disk / "ballast").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - room))
            train_step(m, o, 2)
            row.injected += 1
            try:
                mgr.save(2, model=m, optimizer=o)
                mgr.wait()
                row.notes.append(f"trial {trial}: save fit in {room} bytes")
                row.injected -= 1
                continue
            except CheckpointError as e:
                if "No space left" not in str(e):
                    row.notes.append(f"trial {trial}: unexpected error {e}")
            if _check(root, None, 1, saved, row, 256):
                (disk / "ballast").unlink()
                mgr.save(3, model=m, optimizer=o)
                mgr.close()
                row.recovered += _check(root, None, 3, {k: v.clone() for k, v in m.state_dict().items()}, row, 256)
    row.notes.append("free space left before the save: 4-56 KiB of a ~70 KiB checkpoint (seeded); sync and async "
                     "saves alternate")
    return row


def read_only(work: Path) -> Row:
    row = Row("checkpoint root becomes read-only / not writable")
    with tmpfs(work / "ro", "4m") as disk:
        root = str(disk / "ckpts")
        m, o = make_model()
        mgr = CheckpointManager(root)
        mgr.save(1, model=m, optimizer=o)
        saved = {k: v.clone() for k, v in m.state_dict().items()}
        remount(disk, "ro")
        row.injected += 1
        try:
            mgr.save(2, model=m, optimizer=o)
        except CheckpointError:
            pass
        ok = _check(root, None, 1, saved, row)
        remount(disk, "rw")
        train_step(m, o, 2)
        mgr.save(2, model=m, optimizer=o)
        mgr.close()
        row.recovered += ok and _check(root, None, 2, {k: v.clone() for k, v in m.state_dict().items()}, row)
    return row


# ---- processes, files, leases, parsers -------------------------------------------------------------
def process_kills(work: Path, seeds: list[int], attempts: int) -> Row:
    row = Row("SIGKILL of a random rank at a random save/load phase (2-rank DDP)")
    phases: dict[str, int] = {}
    for seed in seeds:
        r = chaos.run_chaos(work / f"seed{seed}", seed=seed, attempts=attempts, steps=60, save_every=2)
        row.injected += r.faults_fired
        row.recovered += r.recovered
        row.committed_lost += r.committed_lost
        row.corrupt_accepted += r.corrupt_accepted
        for p, n in r.faults_by_phase.items():
            phases[p] = phases.get(p, 0) + n
        if not r.weights_equal or r.wrong_resumes:
            row.notes.append(f"seed {seed}: weights equal {r.weights_equal}, wrong resumes {r.wrong_resumes}")
    row.notes.append(f"seeds {seeds}; kills by phase {dict(sorted(phases.items()))}; every job ended on the "
                     "uninterrupted run's weights" if not row.notes else "see notes")
    return row


def hostile_files(work: Path) -> Row:
    row = Row("broken or hostile checkpoint files (bit flips, truncation, planted pickles, bad headers/manifests, NaN)")
    template = work / "template"
    saved = hostile.build(template)
    for case in hostile.CASES:
        v = hostile.judge(template, work, case, saved)
        row.injected += 1
        row.corrupt_accepted += v.accepted
        row.recovered += not v.accepted and v.named
        if v.accepted or not v.named:
            row.notes.append(f"{case}: {v}")
    row.notes.append(f"{len(hostile.CASES)} kinds; recovered = refused on resume (previous loaded, or a clear "
                     "error) and reported by `verify` naming the file")
    return row


def leases(work: Path, trials: int) -> Row:
    from dtrain.checkpoint.lease import LEASE_FILE, Lease

    row = Row("second job on the same checkpoint root")
    for trial in range(trials):
        url = str(work / f"lease{trial}")
        a, b = Lease(url, job_id="job-a"), Lease(url, job_id="job-b")
        a.acquire()
        lease_file = Path(url) / LEASE_FILE  # as if job-a ran on another host (this process would be job-a)
        lease_file.write_text(lease_file.read_text().replace(socket.gethostname(), "other-host"))
        row.injected += 1
        try:
            b.acquire()
            row.notes.append("a second job took a live lease")
        except CheckpointError as e:
            row.recovered += "job 'job-a'" in str(e) and url in str(e)
        a.release()
        b.acquire()  # the root is free again once the first job is done
        b.release()
    row.notes.append("refused with the holder named; the two-process and crashed-holder cases are in test_lease.py")
    return row


def _parse(kind: int, data: bytes) -> Any:
    if kind == 0:
        return parse_manifest(data, "manifest.json")
    if kind == 1:
        return loads(data, "state.json")
    blob = len(data).to_bytes(8, "little") + data
    return read_header(lambda s, e: blob[s:e], len(blob), "x.safetensors")


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out += _paths(v, (*prefix, k))
    return out


def parser_fuzz(work: Path, n: int) -> Row:
    """Random bytes, and real manifest / state.json / header JSON with 1-3 nodes anywhere replaced."""
    row = Row("random bytes / mutated JSON fed to the manifest, state.json and safetensors-header parsers")
    hostile.build(work / "t")
    d = work / "t" / "step-000000002"
    raw = (d / hostile.MODEL_FILE).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    bases = [json.loads((d / "manifest.json").read_text()), json.loads((d / "state.json").read_text()), header]
    paths = [_paths(b) for b in bases]
    rng = random.Random(0)
    leaves: list[Any] = [None, True, -1, 0, 2**70, 10**400, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, "../x",
                         "s3://b/x", "F32", [-4, 0], {"__dtrain__": "tensor", "dtype": "F32", "shape": [9], "v": "AA=="}]
    escaped: dict[str, int] = {}
    for i in range(n):
        kind = i % 3
        if rng.random() < 0.2:
            data = rng.randbytes(rng.randint(0, 200))
        else:
            body = json.loads(json.dumps(bases[kind]))
            for _ in range(rng.randint(1, 3)):
                path = rng.choice(paths[kind][1:])
                node = body
                try:
                    for k in path[:-1]:
                        node = node[k]
                    node[path[-1]] = copy.deepcopy(rng.choice(leaves))
                except (KeyError, IndexError, TypeError):
                    pass  # an earlier mutation removed this path
            data = json.dumps(body).encode()
        try:
            _parse(kind, data)
        except CheckpointError:
            pass
        except Exception as e:  # noqa: BLE001 - what we count
            key = f"{['manifest', 'state.json', 'safetensors header'][kind]}: {type(e).__name__}"
            escaped[key] = escaped.get(key, 0) + 1
        row.injected += 1
    row.recovered = row.injected - sum(escaped.values())
    row.notes.append(f"{n} inputs; recovered = answered with a value or a CheckpointError"
                     + (f"; other exceptions: {escaped}" if escaped else ""))
    return row


def table(result: dict[str, Any]) -> str:
    """The README's markdown table of a reliability.json."""
    lines = ["| Fault | Injected | Recovered | Committed lost | Corrupt accepted |", "|---|---:|---:|---:|---:|"]
    for r in result["faults"]:
        lines.append(f"| {r['fault']} | {r['injected']} | {r['recovered']} | {r['committed_lost']} | "
                     f"{r['corrupt_accepted']} |")
    t = result["totals"]
    lines.append(f"| **all** | **{t['injected']}** | **{t['recovered']}** | **{t['committed_lost']}** | "
                 f"**{t['corrupt_accepted']}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials (about 3 minutes)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability.json"))
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    q = args.quick
    work = Path(tempfile.mkdtemp(prefix="dtrain-chaos-"))
    plan: list[tuple[str, Callable[[], Row]]] = [
        ("process", lambda: process_kills(work / "kills", [2] if q else [2, 3, 4, 5], 6 if q else 15)),
        ("flaky", lambda: flaky_endpoint(work / "flaky", 6 if q else 25)),
        ("outage", lambda: outage(work / "outage", 1 if q else 3)),
        ("s3kill", lambda: s3_killed(work / "s3kill", 2 if q else 5)),
        ("disk", lambda: disk_full(work / "disk", 2 if q else 8)),
        ("ro", lambda: read_only(work / "ro")),
        ("lease", lambda: leases(work / "lease", 3 if q else 10)),
        ("hostile", lambda: hostile_files(work / "hostile")),
        ("fuzz", lambda: parser_fuzz(work / "fuzz", 3000 if q else 30000)),
    ]
    rows, t0 = [], time.monotonic()
    try:
        for name, run in plan:
            t = time.monotonic()
            try:
                row = run()
            except pytest.skip.Exception as e:  # e.g. no tmpfs mounts allowed here
                row = Row(name, notes=[f"skipped: {e}"])
            row.seconds = round(time.monotonic() - t, 1)
            rows.append(row)
            print(f"{row.fault}: injected {row.injected}, recovered {row.recovered}, lost {row.committed_lost}, "
                  f"corrupt accepted {row.corrupt_accepted} ({row.seconds} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.node() or socket.gethostname()}: {os.cpu_count()} CPUs, {platform.platform()}",
        "python": sys.version.split()[0], "torch": torch.__version__, "quick": q,
        "seconds": round(time.monotonic() - t0, 1),
        "totals": {k: sum(getattr(r, k) for r in rows) for k in ("injected", "recovered", "committed_lost",
                                                                  "corrupt_accepted")},
        "faults": [asdict(r) for r in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out}: {result['totals']} in {result['seconds']} s")
    return 0 if result["totals"]["committed_lost"] == 0 and result["totals"]["corrupt_accepted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
