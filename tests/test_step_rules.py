"""The loop's per-step rules without processes: what a rank flags after a step, and what the agreed
flags mean for saving and stopping (a non-finite loss never overwrites the last good checkpoint)."""

from __future__ import annotations

import pytest

from dtrain import exitcodes
from dtrain.agreement import Flag
from dtrain.config import load_config
from dtrain.preemption import PreemptionHandler
from dtrain.step_rules import StepRules


def rules(*overrides: str) -> StepRules:
    return StepRules(load_config(None, ["train.max_steps=20", "train.eval_every=5", *overrides]), None,
                     PreemptionHandler())


def test_eval_and_save_steps() -> None:
    r = rules("checkpoint.every_steps=4")
    assert [s for s in range(1, 21) if r.eval_due(s)] == [5, 10, 15, 20]
    assert [s for s in range(1, 21) if r.save_due(s)] == [4, 8, 12, 16, 20]
    assert not any(rules("checkpoint.every_steps=0").save_due(s) for s in range(1, 21))


def test_local_flags_from_loss_preemption_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    r = rules("train.max_time=10")
    assert r.local_flags(1.0, 1) == Flag.NONE
    assert r.local_flags(float("nan"), 1) == Flag.NON_FINITE
    assert r.local_flags(float("inf"), 1) == Flag.NON_FINITE
    r.preemption.request("test")
    assert r.local_flags(1.0, 1) == Flag.PREEMPT
    r.t_start -= 11  # eleven seconds into a ten-second budget
    assert r.local_flags(1.0, 1) == Flag.PREEMPT | Flag.TIME_BUDGET


def test_every_minutes_raises_save_now_until_a_save() -> None:
    r = rules("checkpoint.every_minutes=1")
    assert not r.local_flags(1.0, 1) & Flag.SAVE_NOW
    r.t_last_save -= 61
    assert r.local_flags(1.0, 1) & Flag.SAVE_NOW
    r.saved()
    assert not r.local_flags(1.0, 1) & Flag.SAVE_NOW


def test_save_reason_precedence() -> None:
    r = rules("checkpoint.on_eval=true")
    assert r.save_reason(Flag.NON_FINITE | Flag.PREEMPT, evaluated=True, save_due=True) is None
    assert r.save_reason(Flag.PREEMPT | Flag.EARLY_STOP, evaluated=True, save_due=False) == "preempted"
    assert r.save_reason(Flag.TIME_BUDGET, evaluated=False, save_due=False) == "stop"
    # what `dtrain ckpt ls` shows as REASON: every evaluation's save said "periodic"
    assert r.save_reason(Flag.SAVE_NOW, evaluated=True, save_due=True) == "eval"
    assert r.save_reason(Flag.SAVE_NOW, evaluated=False, save_due=True) == "every_steps"
    assert r.save_reason(Flag.SAVE_NOW, evaluated=False, save_due=False) == "every_minutes"
    assert r.save_reason(Flag.NONE, evaluated=False, save_due=False) is None
    assert rules("checkpoint.on_eval=false").save_reason(Flag.NONE, evaluated=True, save_due=False) is None


def test_stop_reason_and_exit_code() -> None:
    r = rules()
    assert r.stop(Flag.NON_FINITE | Flag.PREEMPT) == ("non_finite_loss", exitcodes.FAILURE)
    assert r.stop(Flag.PREEMPT | Flag.TIME_BUDGET) == ("preempted", exitcodes.PREEMPTED)
    assert r.stop(Flag.TIME_BUDGET) == ("max_time", exitcodes.OK)


def test_time_budget_counts_the_earlier_starts_of_the_run() -> None:
    """A restart of a run that trained 8 s of a 10 s budget has 2 s left, as Lightning's Timer."""
    r = StepRules(load_config(None, ["train.max_time=10"]), None, PreemptionHandler(), elapsed_before=8.0)
    assert 8.0 <= r.elapsed() < 9.0 and not r.local_flags(1.0, 1) & Flag.TIME_BUDGET
    r.t_start -= 2.5
    assert r.local_flags(1.0, 2) & Flag.TIME_BUDGET
