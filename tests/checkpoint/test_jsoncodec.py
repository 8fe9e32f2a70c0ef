from __future__ import annotations

import math

import pytest
import torch

from dtrain.checkpoint.jsoncodec import dumps, loads
from dtrain.errors import CheckpointError


def test_round_trip_of_values_json_cannot_say() -> None:
    value = {"best": float("inf"), "worst": -math.inf, "betas": (0.9, 0.999), "by_int": {3: "x", 7: [1, 2]},
             "lr": torch.tensor(0.5, dtype=torch.float64), "raw": b"\x00\x01", "none": None, "ok": [1, "a", True],
             "__dtrain__": "a user key that looks like our tag"}
    back = loads(dumps(value), "state.json")
    assert back["best"] == math.inf and back["worst"] == -math.inf
    assert back["betas"] == (0.9, 0.999) and isinstance(back["betas"], tuple)
    assert back["by_int"] == {3: "x", 7: [1, 2]}
    assert torch.equal(back["lr"], value["lr"]) and back["lr"].dtype == torch.float64
    assert back["raw"] == b"\x00\x01" and back["none"] is None and back["ok"] == [1, "a", True]
    assert back["__dtrain__"] == value["__dtrain__"]
    assert math.isnan(loads(dumps({"x": float("nan")}), "s")["x"])


def test_no_bare_nan_in_output_or_input() -> None:
    assert b"NaN" not in dumps({"x": float("nan")})
    with pytest.raises(CheckpointError, match="state.json"):
        loads(b'{"x": NaN}', "state.json")


def test_unsupported_value_names_its_path() -> None:
    with pytest.raises(CheckpointError, match=r"\$\.sampler\.gen"):
        dumps({"sampler": {"gen": object()}})


def test_malformed_tag_deep_in_lists_names_its_path() -> None:
    data = b'{"sampler": {"seen": [1, 2, [3, {"__dtrain__": "float", "v": "1.5"}]]}}'
    with pytest.raises(CheckpointError, match=r"\$\.sampler\.seen\[2\]\[1\]: malformed 'float'"):
        loads(data, "state.json")
    assert loads(b'{"big": [' + b",".join(b"%d" % i for i in range(625)) + b"]}", "s")["big"] == list(range(625))
