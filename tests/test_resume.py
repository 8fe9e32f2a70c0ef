"""Preemption, crashes and resume fidelity, with real torchrun, real signals and SIGKILL.

The reference is one uninterrupted run; every interrupted-and-resumed run must end with bitwise
identical weights and log identical losses after its resume point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtrain import exitcodes
from dtrain.checkpoint import export, list_checkpoints, verify
from dtrain.config import SchedulerConfig
from dtrain.optim import lr_factor
from tests.launch import FAST, dtrain, losses, rank_summaries, read_jsonl, summary
from tests.recording_task import take_records

pytestmark = pytest.mark.multiprocess

MAX_STEPS = 40
JOB = ["train", *FAST, f"train.max_steps={MAX_STEPS}", "train.eval_every=10", "checkpoint.every_steps=5",
       "checkpoint.keep_last_n=0", "checkpoint.keep_best_k=0", "early_stopping.enabled=false", "optim.lr=3e-3"]


def _ok(proc, code: int = 0, run_dir: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    """torchrun turns any non-zero worker exit into its own exit 1, so for a preempted multi-rank
    run the per-rank records say what each worker returned."""
    detail = f"exit {proc.returncode}, wanted {code}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-8000:]}"
    if code == 0 or run_dir is None:
        assert proc.returncode == code, detail
        return
    assert proc.returncode != 0, detail
    ranks = rank_summaries(run_dir)
    assert len(ranks) == 2 and all(r["exit_code"] == code for r in ranks), (ranks, detail)


def final_weights(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{run_dir.name}-final.safetensors"
    export(str(run_dir / "checkpoints" / f"step-{MAX_STEPS:09d}"), str(out))
    return load_file(str(out))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The uninterrupted 2-rank run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "ref"
    _ok(dtrain([*JOB, f"run_dir={run_dir}"], nproc=2, timeout=150))
    return run_dir, final_weights(run_dir, tmp)


@pytest.mark.timeout(300)
def test_sigterm_gives_emergency_checkpoint_exit_75_and_exact_resume(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    ref_dir, ref_weights = reference
    run_dir = tmp_path / "pre"
    # rank 1 receives SIGTERM just before step 17 (not a checkpoint step): all ranks agree, save, exit 75
    proc = dtrain([*JOB, f"run_dir={run_dir}", "faults.signal_rank=1", "faults.signal_step=17"], nproc=2)
    _ok(proc, exitcodes.PREEMPTED, run_dir)
    s = summary(run_dir)
    assert s["stopped_by"] == "preempted" and s["exit_code"] == exitcodes.PREEMPTED
    stopped = s["last_step"]
    assert 17 <= stopped <= 18  # the flag of step 17 is agreed at step 17 or (pipelined) 18
    assert (run_dir / "checkpoints" / f"step-{stopped:09d}" / "manifest.json").exists(), "nothing lost"

    proc = dtrain([*JOB, f"run_dir={run_dir}"], nproc=2)
    _ok(proc)
    assert "resumed from" in proc.stderr and f"at step {stopped}" in proc.stderr
    assert summary(run_dir)["resumed_from"].endswith(f"step-{stopped:09d}")
    assert_same_weights(final_weights(run_dir, tmp_path), ref_weights)
    ref_losses, got = losses(ref_dir), losses(run_dir)
    after = [st for st in ref_losses if st > stopped]
    assert after
    # The window straddling the resume point was averaged over ranks at save time: equal up to
    # float rounding. Every later line is bitwise equal.
    assert got[after[0]] == pytest.approx(ref_losses[after[0]], rel=1e-12)
    assert all(got[st] == ref_losses[st] for st in after[1:]), "logged losses after the resume point"


@pytest.mark.timeout(300)
def test_sigkill_under_torchrun_restarts_and_resumes_bitwise(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    _, ref_weights = reference
    run_dir = tmp_path / "kill"
    faults = json.dumps({"kill_rank": 0, "kill_step": 23, "only_attempt": 0})
    proc = dtrain([*JOB, f"run_dir={run_dir}"], nproc=2, max_restarts=2, env={"DTRAIN_FAULTS": faults}, timeout=240)
    _ok(proc)
    s = summary(run_dir)
    assert s["resumed_from"].endswith("step-000000020") and s["last_step"] == MAX_STEPS
    assert_same_weights(final_weights(run_dir, tmp_path), ref_weights)
    for info in list_checkpoints(str(run_dir / "checkpoints")):
        if info.committed:
            assert verify(info.url) == [], f"committed {info.url} does not verify"


@pytest.mark.timeout(300)
def test_kill_during_async_save_loses_only_that_checkpoint(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    _, ref_weights = reference
    run_dir = tmp_path / "async"
    faults = json.dumps({"kill_rank": 1, "kill_during_save_step": 25, "only_attempt": 0})
    proc = dtrain([*JOB, f"run_dir={run_dir}", "checkpoint.async_save=true"], nproc=2, max_restarts=2,
                  env={"DTRAIN_FAULTS": faults}, timeout=240)
    _ok(proc)
    resumed = summary(run_dir)["resumed_from"]
    assert resumed.endswith("step-000000020") or resumed.endswith("step-000000025")
    assert_same_weights(final_weights(run_dir, tmp_path), ref_weights)


def global_batches(records: dict[int, list[dict]], grad_accum: int) -> list[list[int]]:
    """The global batch of each optimizer step, from every rank's recorded micro-batches."""
    world = len(records)
    steps = len(records[0]) // grad_accum
    assert all(len(r) == steps * grad_accum and {x["world"] for x in r} == {world} for r in records.values())
    return [[i for k in range(grad_accum) for r in range(world) for i in records[r][s * grad_accum + k]["idx"]]
            for s in range(steps)]


@pytest.mark.timeout(300)
def test_elastic_resumes_keep_the_sample_order_schedule_and_weights(tmp_path: Path) -> None:
    """World size and strategy change across restarts: 2 DDP ranks preempted mid-epoch, 1 process
    with data.grad_accum=2 (killed), 2 FSDP ranks. Every step trains the global batch an uninterrupted
    run trains (each sample once per epoch, across epoch ends), the lr follows the schedule, and
    2 ranks -> 1 process with grad_accum=2 (the same micro-batches) stays on the uninterrupted weights
    bitwise. After a change of world size the random streams are new: they replayed the run's first
    ones. A changed data.batch_size is said to change the trajectory (the note said "the global
    sample order continues exactly")."""
    job = [*JOB, "task=tests.recording_task:TASK", "train.max_steps=30", "checkpoint.every_steps=10",
           "scheduler.warmup_steps=4", "scheduler.decay=cosine"]
    rec = tmp_path / "records"
    rec.mkdir()
    env = {"DTRAIN_TEST_RECORD": str(rec)}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "elastic"
    _ok(dtrain([*job, f"run_dir={ref_dir}"], nproc=2, env=env))
    ref_batches = global_batches(take_records(rec), 1)

    proc = dtrain([*job, f"run_dir={run_dir}", "faults.signal_rank=1", "faults.signal_step=7"], nproc=2, env=env)
    _ok(proc, exitcodes.PREEMPTED, run_dir)
    first = take_records(rec)
    batches = global_batches(first, 1)
    stopped = summary(run_dir)["last_step"]
    assert len(batches) == stopped
    kill = {"DTRAIN_FAULTS": json.dumps({"kill_rank": 0, "kill_step": 21})}
    proc = dtrain([*job, f"run_dir={run_dir}", "parallel.strategy=none", "data.grad_accum=2"], env={**env, **kill})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "saved by 2 ranks, resharded onto 1" in proc.stderr and "continues exactly" in proc.stderr
    one = take_records(rec)
    # ranks/ tells how this start's ranks ended: rank 1's record of the 2-rank start is gone
    assert sorted(p.name for p in (run_dir / "ranks").glob("*.json")) == ["rank-00000.json"]
    batches += global_batches(one, 2)
    step20 = [tmp_path / f"{d.name}-20.safetensors" for d in (ref_dir, run_dir)]
    for d, out in zip((ref_dir, run_dir), step20, strict=True):
        export(str(d / "checkpoints" / "step-000000020"), str(out))
    assert_same_weights(load_file(str(step20[0])), load_file(str(step20[1])))

    proc = dtrain([*job, f"run_dir={run_dir}", "parallel.strategy=fsdp"], nproc=2, env=env)
    _ok(proc)
    assert "saved by 1 ranks, resharded onto 2" in proc.stderr
    last = take_records(rec)
    batches += global_batches(last, 1)
    assert batches == ref_batches and len(batches) == 30  # 11 steps per epoch: two epoch ends
    assert all(len(set(b)) == len(b) == 32 for b in batches)
    # new streams, not the first start's again (rank 0 of the 1-process start; both FSDP ranks)
    assert one[0][0]["rand"] != first[0][0]["rand"]
    assert all(last[r][0]["rand"] != first[r][0]["rand"] for r in (0, 1))

    s = summary(run_dir)
    assert s["last_step"] == 30 and s["resumed_from"].endswith("step-000000020") and s["final_metrics"]["val/acc"] > 0.8
    cfg = SchedulerConfig(warmup_steps=4, decay="cosine")
    lrs = losses(run_dir, "lr")
    assert sorted(lrs) == sorted({5, 10, 15, 20, 25, 30, stopped})
    assert all(lr == pytest.approx(3e-3 * lr_factor(st, 30, cfg), rel=1e-12) for st, lr in lrs.items())

    proc = dtrain([*job, f"run_dir={run_dir}", "train.max_steps=32", "data.batch_size=64", "parallel.strategy=none"],
                  env=env)
    _ok(proc)
    assert "the global batch changed from 32 to 64" in proc.stderr and "continues exactly" not in proc.stderr
    take_records(rec)


@pytest.mark.timeout(300)
def test_patience_survives_a_kill(tmp_path: Path) -> None:
    """Killed after evaluations without improvement, the resumed run stops after the remaining
    patience, exactly where an uninterrupted run stops."""
    es = ["early_stopping.enabled=true", "early_stopping.patience=3", "train.max_steps=400",
          "checkpoint.every_steps=0", "train.eval_every=20", "optim.lr=1e-2", "data.options.train_fraction=0.1"]
    ref_dir = tmp_path / "es-ref"
    _ok(dtrain([*JOB, f"run_dir={ref_dir}", *es], nproc=1))
    ref = summary(ref_dir)
    assert ref["stopped_by"] == "early_stopping:patience" and ref["last_step"] < 400
    stop, best = ref["last_step"], ref["best_step"]
    assert stop == best + 3 * 20
    kill_at = best + 2 * 20 + 1  # after two evaluations without improvement
    run_dir = tmp_path / "es-kill"
    faults = json.dumps({"kill_rank": 0, "kill_step": kill_at})
    proc = dtrain([*JOB, f"run_dir={run_dir}", *es], nproc=1, env={"DTRAIN_FAULTS": faults})
    assert proc.returncode == -9
    state = read_jsonl(run_dir / "metrics.jsonl")
    assert max(r["step"] for r in state) == kill_at - 1
    _ok(dtrain([*JOB, f"run_dir={run_dir}", *es], nproc=1))
    got = summary(run_dir)
    assert got["resumed_from"].endswith(f"step-{kill_at - 1:09d}")
    assert (got["last_step"], got["best_step"], got["stopped_by"]) == (stop, best, "early_stopping:patience")


@pytest.mark.timeout(300)
def test_hung_peer_times_out_then_the_restart_resumes(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """A silent rank must become an error within dist.timeout_s (not an endless hang), then a restart."""
    _, ref_weights = reference
    run_dir = tmp_path / "hang"
    faults = json.dumps({"hang_rank": 1, "hang_step": 12, "only_attempt": 0})
    proc = dtrain([*JOB, f"run_dir={run_dir}", "dist.timeout_s=8"], nproc=2, max_restarts=1,
                  env={"DTRAIN_FAULTS": faults}, timeout=200)
    _ok(proc)
    assert summary(run_dir)["resumed_from"].endswith("step-000000010")
    assert_same_weights(final_weights(run_dir, tmp_path), ref_weights)


@pytest.mark.timeout(420)
def test_chaos_random_kills_end_on_the_uninterrupted_weights(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """Seeded chaos: three attempts in a row each lose a random rank at a random step; torchrun
    restarts the group each time. Final weights are bitwise the reference's, and every committed
    checkpoint still verifies."""
    _, ref_weights = reference
    run_dir = tmp_path / "chaos"
    faults = json.dumps({"chaos_seed": 11, "chaos_kills": 3, "chaos_max_gap": 9})
    proc = dtrain([*JOB, f"run_dir={run_dir}"], nproc=2, max_restarts=4, env={"DTRAIN_FAULTS": faults}, timeout=400)
    _ok(proc)
    assert proc.stderr.count("chaos: SIGKILL") == 3, proc.stderr[-4000:]
    assert_same_weights(final_weights(run_dir, tmp_path), ref_weights)
    committed = [i for i in list_checkpoints(str(run_dir / "checkpoints")) if i.committed]
    assert [i.step for i in committed] == list(range(5, MAX_STEPS + 1, 5)), "a committed checkpoint was lost"
    for info in committed:
        assert verify(info.url) == [], info.url


@pytest.mark.timeout(180)
def test_changed_model_shapes_are_a_clear_error_and_lose_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "shapes"
    _ok(dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=5"]))
    proc = dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=10", "model.hidden=64"])
    assert proc.returncode == exitcodes.CONFIG_ERROR, proc.stderr[-3000:]  # a restart cannot fix it
    assert "model/fc1.bias" in proc.stderr and "another run_dir" in proc.stderr
    assert "model.hidden: (absent) -> 64" in proc.stderr  # what changed since the checkpoint was saved
    assert f"checkpoint.init_from={run_dir / 'checkpoints' / 'step-000000005'} " in proc.stderr  # keep the weights
    assert "Traceback" not in proc.stderr
    committed = [i for i in list_checkpoints(str(run_dir / "checkpoints")) if i.committed]
    assert [i.step for i in committed] == [5] and verify(committed[0].url) == []
    # another optimizer: the library's hint (strict=False) means nothing to a `dtrain train` user
    sgd = dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=10", "optim.name=sgd"])
    assert sgd.returncode == exitcodes.CONFIG_ERROR, sgd.stderr[-3000:]
    assert "optim/" in sgd.stderr and "optim.name: 'adamw' -> 'sgd'" in sgd.stderr, sgd.stderr[-3000:]
    assert "strict=False" not in sgd.stderr and "checkpoint.init_from=" in sgd.stderr
    # resume=<another run's root>: its newest committed checkpoint; a wrong URL is no mismatch
    other = tmp_path / "other"
    start = [*JOB, f"run_dir={other}", f"resume={run_dir / 'checkpoints'}"]
    _ok(dtrain([*start, "train.max_steps=10"]))
    assert summary(other)["resumed_from"] == str(run_dir / "checkpoints" / "step-000000005")
    # the same command again (a requeue) continues the run's own checkpoints, not step 5 again
    _ok(dtrain([*start, "train.max_steps=15"]))
    assert summary(other)["resumed_from"] == str(other / "checkpoints" / "step-000000010")
    assert summary(other)["last_step"] == 15
    bad = dtrain([*JOB, f"run_dir={tmp_path / 'bad'}", f"resume={tmp_path / 'nowhere'}"])
    assert bad.returncode == exitcodes.CONFIG_ERROR and "nowhere" in bad.stderr and "init_from" not in bad.stderr


@pytest.mark.timeout(180)
def test_a_start_that_would_mix_two_runs_in_one_root_is_refused(tmp_path: Path) -> None:
    """resume=never on a root with checkpoints, and resume=<an older checkpoint of it>, would save
    a second trajectory among the first one's (retention and "best" would mix them, equal steps
    would not be saved): both refuse with exit 2 and leave every checkpoint as it was."""
    run_dir = tmp_path / "run"
    _ok(dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=15"]))
    root = run_dir / "checkpoints"
    before = sorted(p.name for p in root.glob("step-*"))
    never = dtrain([*JOB, f"run_dir={run_dir}", "resume=never"])
    assert never.returncode == exitcodes.CONFIG_ERROR, never.stderr[-3000:]
    assert "resume=never" in never.stderr and "step 15" in never.stderr
    back = dtrain([*JOB, f"run_dir={run_dir}", f"resume={root / 'step-000000005'}"])
    assert back.returncode == exitcodes.CONFIG_ERROR, back.stderr[-3000:]
    assert "remove its newer checkpoints" in back.stderr
    assert sorted(p.name for p in root.glob("step-*")) == before
    assert all(verify(str(root / name)) == [] for name in before)
    # a restart under a lower keep_last_n prunes at start-up, before any save needs the space
    _ok(dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=15", "checkpoint.keep_last_n=1"]))
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000015"]


@pytest.mark.timeout(180)
def test_checkpoints_between_evaluations_do_not_take_over_the_best(tmp_path: Path) -> None:
    """Saves between evaluations (every_steps, preemption) carry no metrics: with the last
    evaluation's, the save 5 steps after the best one tied with it, won "best" as the newer, and
    keep_best_k=1 deleted the real best, which restore_best then did not load."""
    run_dir = tmp_path / "best"
    _ok(dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=200", "early_stopping.enabled=true",
                "early_stopping.patience=2", "checkpoint.keep_best_k=1", "checkpoint.keep_last_n=1"]))
    s = summary(run_dir)
    assert s["stopped_by"] == "early_stopping:patience" and s["best_step"] % 10 == 0
    assert s["best_checkpoint"] == str(run_dir / "checkpoints" / f"step-{s['best_step']:09d}")
    infos = {i.step: i for i in list_checkpoints(str(run_dir / "checkpoints")) if i.committed}
    assert s["best_step"] in infos and s["last_step"] in infos
    assert infos[s["best_step"]].metrics["val/loss"] == pytest.approx(s["best_metric"])
    evals = {e["step"]: e for e in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in e}
    assert s["final_metrics"]["val/loss"] == evals[s["last_step"]]["val/loss"]
    # a rerun has nothing left to train and keeps the final metrics in summary.json
    _ok(dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=200", "early_stopping.enabled=true",
                "early_stopping.patience=2", "checkpoint.keep_best_k=1", "checkpoint.keep_last_n=1"]))
    again = summary(run_dir)
    assert again["final_metrics"] == s["final_metrics"] and again["best_checkpoint"] == s["best_checkpoint"]
    # with a larger patience the stopped run goes on (the config decides patience on resume)
    _ok(dtrain([*JOB, f"run_dir={run_dir}", "train.max_steps=200", "early_stopping.enabled=true",
                "early_stopping.patience=4", "checkpoint.keep_best_k=1", "checkpoint.keep_last_n=1"]))
    assert summary(run_dir)["last_step"] > s["last_step"]


@pytest.mark.timeout(120)
def test_dropout_run_resumes_bitwise(tmp_path: Path) -> None:
    """Dropout draws from each rank's global RNG, which checkpoints carry. The train loader drew its
    workers' base seed from that same generator when the loop started, after a resume had restored
    it, so every resumed run's dropout masks were one number off and the weights drifted apart."""
    job = [*JOB, "train.max_steps=15", "model.dropout=0.3", "data.grad_accum=2", "scheduler.warmup_steps=3",
           "scheduler.decay=cosine"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "kill"
    _ok(dtrain([*job, f"run_dir={ref_dir}"]))
    killed = dtrain([*job, f"run_dir={run_dir}"], env={"DTRAIN_FAULTS": json.dumps({"kill_rank": 0, "kill_step": 8})})
    assert killed.returncode == -9, killed.stderr[-3000:]
    _ok(dtrain([*job, f"run_dir={run_dir}"]))
    assert summary(run_dir)["resumed_from"].endswith("step-000000005")
    weights = []
    for d in (ref_dir, run_dir):
        export(str(d / "checkpoints" / "step-000000015"), str(tmp_path / f"{d.name}.safetensors"))
        weights.append(load_file(str(tmp_path / f"{d.name}.safetensors")))
    assert_same_weights(*weights)
    assert losses(run_dir) == losses(ref_dir)
