"""The training loop end to end, as users run it: real processes, real torchrun, gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtrain import dist
from dtrain.errors import DtrainError
from dtrain.evaluation import evaluate
from dtrain.models import digits
from tests.launch import FAST, dtrain, losses, rank_summaries, read_jsonl, summary
from tests.multiproc import run_ranks

pytestmark = pytest.mark.multiprocess


def _ok(proc) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.mark.timeout(240)
def test_ddp_and_fsdp_follow_the_single_process_loss_curve(tmp_path: Path) -> None:
    """Same global batch => the same trajectory for 1 process, 2-rank DDP and 2-rank FSDP2."""
    common = ["train", *FAST, "train.max_steps=30", "train.eval_every=15", "early_stopping.enabled=false",
              "checkpoint.on_eval=false"]
    runs = {"single": (1, "none"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}
    curves = {}
    for name, (nproc, strategy) in runs.items():
        run_dir = tmp_path / name
        _ok(dtrain([*common, f"run_dir={run_dir}", f"parallel.strategy={strategy}"], nproc=nproc))
        curves[name] = losses(run_dir)
        assert summary(run_dir)["last_step"] == 30
    assert sorted(curves["single"]) == list(range(5, 31, 5))
    for name in ("ddp", "fsdp"):
        assert curves[name].keys() == curves["single"].keys()
        for step, value in curves["single"].items():
            # float reduction order differs (2 partial sums vs 1): stated tolerance 1e-4 relative
            assert curves[name][step] == pytest.approx(value, rel=1e-4), (name, step)
    # and the curve actually descends: the test would catch a model that never trains
    assert curves["single"][30] < 0.7 * curves["single"][5]


def _eval_on_ranks(rank: int, world: int) -> dict[str, float]:
    dist.init(timeout_s=30)
    torch.manual_seed(0)
    model = digits.build_model(digits.DigitsModelConfig())
    _, val = digits.build_datasets(digits.DigitsDataConfig(), seed=0)
    # odd batch size so the shards are uneven and padding is exercised
    out = evaluate(model, val, digits.eval_per_sample, batch_size=37, device=torch.device("cpu"))
    dist.shutdown()
    return out


@pytest.mark.timeout(90)
def test_evaluation_metrics_are_identical_on_every_rank_and_match_one_process() -> None:
    two = run_ranks(_eval_on_ranks, 2)
    assert two[0] == two[1]  # bitwise: every rank acts on the same value
    one = _eval_on_ranks(0, 1)
    assert set(one) == {"val/loss", "val/acc"}
    for k in one:
        assert two[0][k] == pytest.approx(one[k], rel=1e-9)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reduce", [lambda v: v.mean(), lambda v: v.mean().unsqueeze(0)], ids=["mean", "mean-of-shape-1"])
def test_eval_per_sample_must_return_one_value_per_sample(reduce) -> None:  # type: ignore[no-untyped-def]
    """A batch mean, the habit from Lightning's validation_step, failed with an IndexError; a mean
    of shape [1] was summed as if it were one sample's loss and the metric came out ~batch times too
    small. Both are an error that says what to return."""
    dist.init(timeout_s=30)
    try:
        torch.manual_seed(0)
        model = digits.build_model(digits.DigitsModelConfig())
        _, val = digits.build_datasets(digits.DigitsDataConfig(), seed=0)

        def per_sample(m: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
            return {k: reduce(v) for k, v in digits.eval_per_sample(m, batch).items()}

        with pytest.raises(DtrainError, match=r"eval_per_sample returned 'loss' of shape .* for a batch of 64"):
            evaluate(model, val, per_sample, batch_size=64, device=torch.device("cpu"))
    finally:
        dist.shutdown()


@pytest.mark.timeout(180)
def test_nan_metric_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    proc = dtrain(["train", *FAST, f"run_dir={run_dir}", "train.max_steps=200", "train.eval_every=10",
                   "early_stopping.enabled=true", "early_stopping.patience=100",
                   "faults.nan_rank=1", "faults.nan_step=30"], nproc=2)
    _ok(proc)
    ranks = rank_summaries(run_dir)
    assert [r["last_step"] for r in ranks] == [30, 30]
    assert ranks[1]["stopped_by"] == "early_stopping:non_finite"
    assert ranks[0]["stopped_by"].startswith("early_stopping:")
    # strict JSON (jq, JavaScript): the NaN that stopped rank 1 is written as null, not as NaN
    record = (run_dir / "ranks" / "rank-00001.json").read_text()
    assert json.loads(record, parse_constant=lambda c: pytest.fail(f"{c} in {record}"))["final_metrics"]["val/loss"] is None


@pytest.mark.timeout(180)
def test_ranks_fed_different_metrics_still_stop_together(tmp_path: Path) -> None:
    """Rank 1 sees a metric that never improves after its first value (a huge offset that grows is
    not needed: min_delta makes rank 1's own patience run out first); both stop at one step."""
    run_dir = tmp_path / "skew"
    proc = dtrain(["train", *FAST, f"run_dir={run_dir}", "train.max_steps=300", "train.eval_every=10",
                   "early_stopping.enabled=true", "early_stopping.patience=2", "early_stopping.min_delta=0.05",
                   "faults.metric_rank=1", "faults.metric_offset=0.5", "logging.tensorboard=true"], nproc=2)
    _ok(proc)
    ranks = rank_summaries(run_dir)
    assert len(ranks) == 2 and ranks[0]["last_step"] == ranks[1]["last_step"] < 300
    # rank 0 also wrote TensorBoard events (optional output, switched on here)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["parallel.strategy=zero"], "parallel.strategy='zero' is not allowed; choose one of: none, ddp, fsdp"),
        (["optim.lr_typo=1"], "unknown config key 'optim.lr_typo'"),
        (["model.depth=3"], "depth"),
        (["task=nosuch"], "nosuch"),
        # was exit 1, which launchers restart
        pytest.param(["dist.backend=nccl"], "dist.backend='nccl' needs CUDA", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ],
)
def test_bad_input_gives_one_clear_message(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = dtrain(["train", "--config", "configs/digits.yaml", f"run_dir={tmp_path}", *args])
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_missing_config_file(tmp_path: Path) -> None:
    proc = dtrain(["train", "--config", str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(90)
def test_batch_not_divisible_by_world_size_fails_before_the_process_group(tmp_path: Path) -> None:
    proc = dtrain(["train", *FAST, f"run_dir={tmp_path}", "data.batch_size=33"], nproc=2)
    assert proc.returncode != 0
    assert "data.batch_size=33 is not divisible by world size 2" in proc.stderr


@pytest.mark.timeout(180)
def test_large_model_config_runs_small_on_cpu(tmp_path: Path) -> None:
    """configs/gpt-1b-small.yaml: the 1B job's features (FSDP2, activation checkpointing,
    accumulation, async save) end to end on 2 CPU ranks."""
    run_dir = tmp_path / "g1"
    proc = dtrain(["train", "--config", "configs/gpt-1b-small.yaml", f"run_dir={run_dir}",
                   "logging.progress=false"], nproc=2)
    _ok(proc)
    s = summary(run_dir)
    assert s["last_step"] == 6 and s["strategy"] == "fsdp"
    assert (run_dir / "checkpoints" / "step-000000006" / "manifest.json").exists()
    curve = losses(run_dir)
    assert curve[6] < curve[1]


@pytest.mark.timeout(120)
def test_checkpoint_lease_keys_decide_who_may_use_a_root(tmp_path: Path) -> None:
    """checkpoint.job_id / lease / lease_ttl_s reach the trainer: another job's live lease makes a
    run refuse at start, naming that job; the same job id (a restart) or lease=false goes on."""
    from dtrain.checkpoint.lease import Lease

    root = tmp_path / "ckpt"
    held = Lease(str(root), job_id="other-job", ttl_s=300)
    held.acquire()
    base = ["train", *FAST, f"run_dir={tmp_path / 'run'}", f"checkpoint.root={root}", "train.max_steps=4",
            "train.eval_every=4"]
    try:
        refused = dtrain([*base, "checkpoint.job_id=my-job", "checkpoint.lease_ttl_s=5"])
        assert refused.returncode != 0 and "other-job" in refused.stderr, refused.stderr[-2000:]
        assert not list(root.glob("step-*")), "a refused run must not write checkpoints"
        same = dtrain([*base, "checkpoint.job_id=other-job"])
        assert same.returncode == 0, same.stderr[-2000:]
        off = dtrain([*base, "run_dir=" + str(tmp_path / "run2"), "checkpoint.job_id=my-job", "checkpoint.lease=false"])
        assert off.returncode == 0, off.stderr[-2000:]
    finally:
        held.release()
    bad = dtrain([*base, "checkpoint.lease_ttl_s=0"])
    assert bad.returncode == 2 and "checkpoint.lease_ttl_s=0" in bad.stderr


@pytest.mark.timeout(240)
def test_init_from_starts_a_fresh_run_from_another_runs_weights_and_restarts_resume_its_own(tmp_path: Path) -> None:
    """checkpoint.init_from (fine-tuning): a 2-rank run starts from the weights a 1-process run
    saved (with lr=0 they stay bitwise those), at step 0 with a fresh optimizer; a restart of it
    resumes from its own checkpoints, not from init_from; a bad init_from fails naming the key."""
    from safetensors.torch import load_file

    from dtrain.checkpoint import export

    pre = tmp_path / "pretrain"
    job = ["train", *FAST, "train.eval_every=10", "early_stopping.enabled=false"]
    _ok(dtrain([*job, f"run_dir={pre}", "train.max_steps=20"]))
    tune = tmp_path / "tune"
    tuned = [*job, f"run_dir={tune}", f"checkpoint.init_from={pre / 'checkpoints'}", "optim.lr=0"]
    _ok(dtrain([*tuned, "train.max_steps=10"], nproc=2))
    s = summary(tune)
    assert s["initialised_from"] == str(pre / "checkpoints" / "step-000000020") and s["resumed_from"] is None
    assert s["last_step"] == 10 and s["world_size"] == 2
    weights = {}
    for name, step_dir in (("pre", pre / "checkpoints" / "step-000000020"), ("tune", tune / "checkpoints" / "step-000000010")):
        export(str(step_dir), str(tmp_path / f"{name}.safetensors"))
        weights[name] = load_file(str(tmp_path / f"{name}.safetensors"))
    assert weights["pre"].keys() == weights["tune"].keys()
    assert all(torch.equal(weights["pre"][k], weights["tune"][k]) for k in weights["pre"])
    _ok(dtrain([*tuned, "train.max_steps=20"], nproc=2))
    s = summary(tune)
    assert s["resumed_from"] == str(tune / "checkpoints" / "step-000000010") and s["initialised_from"] is None
    bad = dtrain([*job, f"run_dir={tmp_path / 'bad'}", f"checkpoint.init_from={tmp_path / 'nowhere'}", "train.max_steps=5"])
    assert bad.returncode != 0 and "checkpoint.init_from=" in bad.stderr and "nowhere" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.timeout(120)
def test_init_from_a_checkpoint_of_another_model_config_is_a_config_error(tmp_path: Path) -> None:
    """A checkpoint that does not fit the model config exits 2, as on resume: it exited 1, which
    asks a launcher (torchrun --max-restarts) to restart into the same error."""
    job = ["train", *FAST, "train.eval_every=10", "early_stopping.enabled=false"]
    _ok(dtrain([*job, f"run_dir={tmp_path / 'pre'}", "train.max_steps=2"]))
    bad = dtrain([*job, f"run_dir={tmp_path / 'tune'}", f"checkpoint.init_from={tmp_path / 'pre' / 'checkpoints'}",
                  "model.hidden=64", "train.max_steps=1"])
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "checkpoint.init_from=" in bad.stderr and "fc1.bias" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(120)
def test_early_stopping_turned_on_for_a_running_job_resumes_and_starts_fresh(tmp_path: Path) -> None:
    """Checkpoints saved without early stopping: a restart with it enabled resumes (its state
    starts fresh, with a warning) instead of refusing the checkpoint. The restart also warns of
    every config change, and says which ones the resumed optimizer overrides."""
    job = ["train", *FAST, f"run_dir={tmp_path / 'run'}", "train.eval_every=5"]
    _ok(dtrain([*job, "train.max_steps=10", "early_stopping.enabled=false", "optim.lr=1e-3"]))
    proc = dtrain([*job, "train.max_steps=20", "early_stopping.enabled=true", "optim.lr=1e-4"])
    _ok(proc)
    assert "no state for component 'early_stopping'" in proc.stderr
    assert "early_stopping.enabled: False -> True\n" in proc.stderr
    assert "optim.lr: 0.001 -> 0.0001 (not applied: the optimizer resumes with the checkpoint's value)" in proc.stderr
    assert "train.max_steps: 10 -> 20" in proc.stderr and "run_dir" not in proc.stderr.split("config differs")[1]
    lrs = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "lr" in r}
    assert lrs[20] == lrs[10]  # the resumed optimizer's learning rate, as the warning says
    s = summary(tmp_path / "run")
    assert s["resumed_from"].endswith("step-000000010") and s["last_step"] == 20 and s["best_step"] in (15, 20)


@pytest.mark.timeout(120)
def test_nan_loss_on_one_rank_at_an_evaluation_step_stops_every_rank(tmp_path: Path) -> None:
    """A rank whose loss is not finite used to skip the evaluation of that step while the others ran
    it: their collectives no longer matched, and the job hung until dist.timeout_s, then crashed
    without a record. Every rank evaluates; the agreed NON_FINITE flag stops all of them."""
    run_dir = tmp_path / "nanloss"
    proc = dtrain(["train", *FAST, f"run_dir={run_dir}", "train.max_steps=40", "train.eval_every=10",
                   "dist.timeout_s=30", "faults.nan_loss_rank=1", "faults.nan_loss_step=10"], nproc=2, timeout=100)
    assert proc.returncode != 0
    ranks = rank_summaries(run_dir)
    assert [(r["last_step"], r["stopped_by"], r["exit_code"]) for r in ranks] == [(10, "non_finite_loss", 1)] * 2, \
        proc.stderr[-4000:]
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*/manifest.json"))
    assert committed == [], "nothing is saved after a non-finite loss"


@pytest.mark.timeout(120)
def test_a_monitor_the_evaluation_never_produces_fails_before_the_first_step(tmp_path: Path) -> None:
    """The sanity check runs a validation batch at start-up: a typo in early_stopping.monitor is a
    config error there (exit 2, the metrics that exist listed), not after eval_every steps of work."""
    run_dir = tmp_path / "typo"
    job = ["train", *FAST, f"run_dir={run_dir}", "train.max_steps=30", "train.eval_every=30",
           "early_stopping.enabled=true", "early_stopping.monitor=val/los"]
    proc = dtrain(job)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "early_stopping.monitor='val/los'" in proc.stderr and "val/loss" in proc.stderr

    def started(d: Path) -> list[int]:  # the step of the start-up record, written after the first step
        log = d / "metrics.jsonl"
        return [r["step"] for r in read_jsonl(log) if r.get("event") == "startup"] if log.exists() else []

    assert started(run_dir) == [], "no step may run before the monitor is known to exist"
    off = dtrain([*job, f"run_dir={tmp_path / 'off'}", "train.sanity_eval_batches=0", "train.max_steps=5",
                  "train.eval_every=5"])
    assert off.returncode == 2 and "sanity check" not in off.stderr  # off: found at the first evaluation
    assert started(tmp_path / "off") == [1]
    # early stopping off, but checkpoint.keep_best_k ranks by the same monitor: it never counted a best
    best = dtrain([*job[:-2], f"run_dir={tmp_path / 'best'}", "early_stopping.enabled=false",
                   "early_stopping.monitor=val/los", "checkpoint.keep_best_k=1"])
    assert best.returncode == 2, best.stderr[-3000:]
    assert "early_stopping.monitor='val/los' (which checkpoint.keep_best_k ranks by) is not a metric" in best.stderr
    assert started(tmp_path / "best") == []
