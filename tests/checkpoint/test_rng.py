from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dtrain.checkpoint import rng
from dtrain.errors import CheckpointError


def _draw() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_restore_replays_python_numpy_and_torch_draws() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = json.loads(json.dumps(rng.capture()))  # what goes through the checkpoint's JSON file
    assert set(state) == {"python", "numpy", "torch"}
    first = _draw()
    _draw()
    rng.restore(state, "rng.json")
    assert _draw() == first


def test_numpy_state_only_when_the_process_has_loaded_numpy_random() -> None:
    """numpy.random is imported lazily (9-13 ms): a process that never loaded it saves no NumPy
    state and capture does not load it; a checkpoint that holds NumPy state still restores it."""
    code = textwrap.dedent("""
        import json, sys
        from dtrain.checkpoint import rng
        state = rng.capture()
        print(json.dumps({"keys": sorted(state), "loaded": "numpy.random" in sys.modules}))
        rng.restore(json.loads(sys.argv[1]), "rng.json")
        import numpy as np
        print(json.dumps(np.random.rand(2).tolist()))
    """)
    np.random.seed(7)
    saved = rng.capture()
    expected = np.random.rand(2).tolist()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(saved)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert json.loads(out[0]) == {"keys": ["python", "torch"], "loaded": False}
    assert json.loads(out[1]) == expected


@pytest.mark.parametrize("damage", [lambda s: s.pop("python"), lambda s: s["numpy"].update(keys="x"),
                                    lambda s: s.update(torch="not base64!")])
def test_malformed_state_is_a_clear_error(damage) -> None:  # noqa: ANN001
    np.random.seed(0)
    state = rng.capture()
    damage(state)
    with pytest.raises(CheckpointError, match="rng.json: RNG state is malformed"):
        rng.restore(state, "rng.json")
