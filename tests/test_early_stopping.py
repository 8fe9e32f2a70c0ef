"""EarlyStopping against metric sequences whose outcome follows from the Keras/Lightning definitions.

Every expectation below was worked out by hand from the documented meaning of each option (and the
choices written in EarlyStopping's docstring), not by running our code. Values are dyadic fractions
where min_delta matters, so that float rounding cannot decide a case.
Evaluation i happens at step i unless a case gives its steps.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dtrain.early_stopping import EarlyStopping
from dtrain.errors import CheckpointError, ConfigError

NAN, INF = float("nan"), float("inf")

# id, options, values, stop index (None: never), reason, best value, best index
CASES: list[tuple[str, dict[str, Any], list[float], int | None, str | None, float | None, int | None]] = [
    # patience: Lightning's default of 3; evaluations 2,3,4 do not beat 0.9 -> wait reaches 3 at index 4.
    ("patience3", {}, [1.0, 0.9, 0.95, 0.92, 0.91, 0.5], 4, "patience", 0.9, 1),
    # Keras' docstring example: a loss that only grows with patience=3 runs 4 epochs (stop at index 3).
    ("keras_doc_example", {"patience": 3}, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, "patience", 1.0, 0),
    # patience=0: the first evaluation without improvement stops; an equal value is no improvement.
    ("patience0_equal_is_not_better", {"patience": 0}, [1.0, 0.9, 0.9], 2, "patience", 0.9, 1),
    ("patience1", {"patience": 1}, [3.0, 2.0, 1.0, 1.5], 3, "patience", 1.0, 2),
    ("never_stops_while_improving", {"patience": 1}, [3.0, 2.0, 1.0], None, None, 1.0, 2),
    # an improvement resets wait: two separate non-improving stretches of 2 do not add up to 3.
    ("wait_resets", {"patience": 3}, [1.0, 1.5, 1.5, 0.5, 0.75, 0.75, 0.75], 6, "patience", 0.5, 3),
    # min_delta: 0.75 + 0.25 is not < 1.0 (a change of exactly min_delta is not an improvement).
    ("min_delta_exact_change", {"patience": 1, "min_delta": 0.25}, [1.0, 0.75], 1, "patience", 1.0, 0),
    ("min_delta", {"patience": 2, "min_delta": 0.25},
     [1.0, 0.875, 0.625, 0.5, 0.4375], 4, "patience", 0.625, 2),
    # mode max
    ("max_patience2", {"mode": "max", "patience": 2}, [0.5, 0.625, 0.625, 0.5], 3, "patience", 0.625, 1),
    ("max_min_delta", {"mode": "max", "patience": 2, "min_delta": 0.25},
     [0.0, 0.25, 0.5, 0.5, 0.75], 4, "patience", 0.5, 2),
    # baseline (Keras): nothing beats 1.0 within patience=2 evaluations -> stop although values improve.
    ("baseline_never_beaten", {"baseline": 1.0, "patience": 2}, [1.5, 1.4, 1.3], 1, "baseline", 1.4, 1),
    ("baseline_patience1_first_eval", {"baseline": 1.0, "patience": 1}, [1.5], 0, "baseline", 1.5, 0),
    # once the baseline is beaten the run behaves as without it.
    ("baseline_beaten_then_patience", {"baseline": 1.0, "patience": 2},
     [1.5, 0.9, 0.95, 0.96], 3, "patience", 0.9, 1),
    ("baseline_max", {"mode": "max", "baseline": 0.8, "patience": 3},
     [0.5, 0.7, 0.85, 0.84, 0.83, 0.82], 5, "patience", 0.85, 2),
    # baseline compared with min_delta: 0.75 + 0.25 is not < 1.0, so 0.75 does not beat baseline 1.0.
    ("baseline_with_min_delta", {"baseline": 1.0, "patience": 2, "min_delta": 0.25},
     [1.25, 0.75], 1, "baseline", 0.75, 1),
    # stopping_threshold (Lightning, strict): 0.5 is not < 0.5; 0.4 is -> stop, and 0.4 is recorded as best.
    ("stopping_threshold_min", {"stopping_threshold": 0.5}, [1.0, 0.7, 0.5, 0.4, 0.3],
     3, "stopping_threshold", 0.4, 3),
    ("stopping_threshold_max", {"mode": "max", "stopping_threshold": 0.9}, [0.5, 0.95], 1,
     "stopping_threshold", 0.95, 1),
    # divergence_threshold (Lightning, strict): 10 is not > 10; 10.5 is. A diverged value is never best.
    ("divergence_min", {"divergence_threshold": 10.0, "patience": 5}, [5.0, 10.0, 10.5, 1.0],
     2, "divergence_threshold", 5.0, 0),
    ("divergence_max", {"mode": "max", "divergence_threshold": 0.1}, [0.5, 0.2, 0.05],
     2, "divergence_threshold", 0.5, 0),
    ("divergence_first_eval", {"divergence_threshold": 10.0}, [11.0], 0, "divergence_threshold", None, None),
    # check_finite (Lightning): NaN or +-inf stops at once, before any improvement test.
    ("nan", {}, [1.0, NAN], 1, "non_finite", 1.0, 0),
    ("inf", {}, [1.0, INF], 1, "non_finite", 1.0, 0),
    ("minus_inf_min_mode", {}, [1.0, -INF], 1, "non_finite", 1.0, 0),
    ("inf_max_mode", {"mode": "max"}, [1.0, INF], 1, "non_finite", 1.0, 0),
    # check_finite=False: NaN compares false, so it is never an improvement and uses up patience.
    ("nan_unchecked", {"check_finite": False, "patience": 3}, [1.0, NAN, NAN, NAN], 3, "patience", 1.0, 0),
    ("minus_inf_unchecked", {"check_finite": False, "patience": 1}, [1.0, -INF, 0.5],
     2, "patience", -INF, 1),
]


def _run(es: EarlyStopping, values: list[float], steps: list[int] | None = None) -> int | None:
    for i, value in enumerate(values):
        if es.update(value, steps[i] if steps else i):
            return i
    return None


@pytest.mark.parametrize(("options", "values", "stop", "reason", "best", "best_index"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sequence(options: dict[str, Any], values: list[float], stop: int | None, reason: str | None,
                  best: float | None, best_index: int | None) -> None:
    es = EarlyStopping(**options)
    assert _run(es, values) == stop
    assert es.stop_reason == reason
    assert es.stopped_step == stop
    assert es.best == best
    assert es.best_step == best_index
    assert (es.stop_message is not None) == (stop is not None)


def test_start_from_step_ignores_early_evaluations() -> None:
    # Without start_from_step, 0.2 after 0.1 would stop at index 1 with patience=1.
    values, steps = [0.1, 0.2, 0.9, 1.0, 0.5], [10, 20, 30, 40, 50]
    assert _run(EarlyStopping(patience=1), values, steps) == 1
    es = EarlyStopping(patience=1, start_from_step=30)
    assert _run(es, values, steps) == 3
    assert (es.best, es.best_step, es.stopped_step) == (0.9, 30, 40)


def test_start_from_step_ignores_non_finite_in_warmup() -> None:
    # Keras returns before looking at anything during its warm-up.
    es = EarlyStopping(start_from_step=1)
    assert _run(es, [NAN, 1.0]) is None
    assert (es.best, es.best_step, es.wait) == (1.0, 1, 0)


def test_max_time() -> None:
    es = EarlyStopping(max_time=10.0)
    assert not es.time_exceeded(9.99, step=7)
    assert es.stop_reason is None
    assert es.time_exceeded(10.0, step=8)  # Lightning's Timer: elapsed >= duration
    assert (es.stop_reason, es.stopped_step) == ("max_time", 8)
    assert "max_time" in (es.stop_message or "")
    assert not EarlyStopping().time_exceeded(1e9)


def test_an_evaluation_after_the_time_budget_keeps_the_max_time_stop() -> None:
    """The trainer asks the clock before it evaluates. An evaluation at the step the budget ran out
    used to clear the max_time stop: summary.json said the run stopped by train.max_time, the saved
    state had no stop, and every restart trained one more step."""
    es = EarlyStopping(max_time=10.0, patience=5)
    assert es.time_exceeded(10.5, step=8)
    assert es.update(0.5, 8)  # an improvement, still counted
    assert (es.best, es.best_step, es.stop_reason, es.stopped_step) == (0.5, 8, "max_time", 8)
    resumed = EarlyStopping(max_time=10.0, patience=5)
    resumed.load_state_dict(json.loads(json.dumps(es.state_dict())))
    assert resumed.still_stopped(10.5)
    # a stop of the evaluation's own wins
    es = EarlyStopping(max_time=10.0, stopping_threshold=1.0)
    assert es.time_exceeded(10.5, step=8) and es.update(0.5, 8)
    assert es.stop_reason == "stopping_threshold"


def test_is_improvement_has_no_side_effects() -> None:
    es = EarlyStopping(min_delta=0.25)
    assert es.is_improvement(5.0)  # anything finite beats the initial +inf
    es.update(1.0, 0)
    assert es.is_improvement(0.5) and not es.is_improvement(0.75) and not es.is_improvement(NAN)
    assert (es.best, es.wait) == (1.0, 0)


def test_resume_keeps_counting_patience() -> None:
    """Killed after two evaluations without improvement, a resumed run stops after patience-2 more."""
    first = EarlyStopping(patience=4)
    assert _run(first, [1.0, 1.1, 1.2]) is None
    assert first.wait == 2
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))

    resumed = EarlyStopping(patience=4)
    resumed.load_state_dict(saved)
    assert (resumed.best, resumed.best_step, resumed.wait) == (1.0, 0, 2)
    assert not resumed.update(1.3, 3)
    assert resumed.update(1.4, 4)
    assert resumed.stop_reason == "patience"
    # A run that forgot its state would treat 1.3 as a first best and keep going.
    fresh = EarlyStopping(patience=4)
    assert _run(fresh, [1.3, 1.4]) is None


def test_a_stopped_run_resumed_under_a_looser_config_goes_on() -> None:
    """The config decides on resume: a raised patience, a removed threshold or a longer time budget
    lift a restored stop; the same config, or a non-finite value, keep it."""
    def stopped(reason_values: list[float], **options: Any) -> dict[str, Any]:
        es = EarlyStopping(**options)
        assert _run(es, reason_values) is not None
        return json.loads(json.dumps(es.state_dict(), allow_nan=False))

    by_patience = stopped([1.0, 1.1, 1.2], patience=2)
    for patience, holds in ((2, True), (3, False)):
        es = EarlyStopping(patience=patience)
        es.load_state_dict(by_patience)
        assert es.still_stopped(0.0) is holds and es.should_stop is holds
    by_goal = stopped([1.0, 0.4], stopping_threshold=0.5)
    for threshold, holds in ((0.5, True), (0.3, False), (None, False)):
        es = EarlyStopping(stopping_threshold=threshold)
        es.load_state_dict(by_goal)
        assert es.still_stopped(0.0) is holds
    es = EarlyStopping(max_time=10.0)
    es.time_exceeded(11.0, step=5)
    by_time = es.state_dict()
    for max_time, holds in ((10.0, True), (20.0, False), (None, False)):
        es = EarlyStopping(max_time=max_time)
        es.load_state_dict(by_time)
        assert es.still_stopped(11.0) is holds
    es = EarlyStopping(patience=100)
    es.load_state_dict(stopped([2.0, NAN]))
    assert es.still_stopped(0.0)


def test_state_dict_is_strict_json_with_non_finite_best() -> None:
    es = EarlyStopping(check_finite=False, patience=1)
    _run(es, [1.0, -INF, 0.5])
    text = json.dumps(es.state_dict(), allow_nan=False)  # would raise on a bare float inf
    back = EarlyStopping(check_finite=False, patience=1)
    back.load_state_dict(json.loads(text))
    assert back.best == -INF and back.stop_reason == "patience" and back.stopped_step == 2
    assert back.state_dict() == es.state_dict()


def test_state_dict_of_a_nan_stop_round_trips() -> None:
    es = EarlyStopping()
    _run(es, [2.0, NAN])
    back = EarlyStopping()
    back.load_state_dict(json.loads(json.dumps(es.state_dict(), allow_nan=False)))
    assert (back.best, back.stop_reason, back.stopped_step, back.should_stop) == (2.0, "non_finite", 1, True)


def test_load_rejects_other_monitor_and_broken_state() -> None:
    state = EarlyStopping(monitor="val/loss").state_dict()
    with pytest.raises(ConfigError, match="val/acc"):
        EarlyStopping(monitor="val/acc", mode="max").load_state_dict(state)
    with pytest.raises(CheckpointError, match="wait"):
        EarlyStopping().load_state_dict({**state, "wait": -1})
    with pytest.raises(CheckpointError, match="best"):
        EarlyStopping().load_state_dict({k: v for k, v in state.items() if k != "best"})


@pytest.mark.parametrize(("options", "named"), [
    ({"mode": "auto"}, "'auto'"),
    ({"mode": "minimum"}, "'minimum'"),
    ({"patience": -1}, "-1"),
    ({"min_delta": -0.1}, "-0.1"),
    ({"min_delta": NAN}, "nan"),
    ({"start_from_step": -5}, "-5"),
    ({"max_time": 0.0}, "max_time"),
    ({"baseline": NAN}, "baseline"),
])
def test_config_errors_name_the_value(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        EarlyStopping(**options)
    assert named in str(err.value)
    assert isinstance(err.value, ValueError)


def test_check_metrics_lists_what_exists() -> None:
    es = EarlyStopping(monitor="val/los")
    with pytest.raises(ConfigError) as err:
        es.check_metrics(["val/loss", "val/acc"])
    assert "val/los" in str(err.value) and "val/loss" in str(err.value) and "val/acc" in str(err.value)
    EarlyStopping(monitor="val/acc").check_metrics({"val/loss", "val/acc"})  # no error


def test_from_config_reads_the_same_field_names() -> None:
    class Cfg:
        enabled = True
        monitor, mode, min_delta, patience = "val/acc", "max", 0.5, 7
        baseline, start_from_step, check_finite = None, 3, False
        stopping_threshold, divergence_threshold, max_time, restore_best = 0.99, None, 60.0, False

    es = EarlyStopping.from_config(Cfg())
    assert (es.monitor, es.mode, es.min_delta, es.patience, es.start_from_step) == ("val/acc", "max", 0.5, 7, 3)
    assert (es.check_finite, es.stopping_threshold, es.max_time, es.restore_best) == (False, 0.99, 60.0, False)
    assert math.isclose(es.min_delta, 0.5)
