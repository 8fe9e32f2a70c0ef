"""This rank's random number generator states as JSON, so a resumed run draws the same numbers.

Covers Python's `random`, NumPy's legacy global generator (when the process uses it), torch CPU
and every CUDA device. Torch states are uint8 tensors, stored as base64; everything else is plain
JSON lists and numbers.

NumPy imports `numpy.random` lazily, on first use, and that import takes 9-13 ms here: paid inside
the first save (a 1 MiB save: 29 ms, the next one 9) or the first load of a process that never
drew from it. A process that has not imported `numpy.random` has drawn nothing from its global
generator, so there is nothing of it to save; its state is saved when the module is loaded, and
restored whenever a checkpoint holds it.
"""

from __future__ import annotations

import base64
import random
import sys
from typing import Any

import torch

from dtrain.errors import CheckpointError


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    raw = bytearray(base64.b64decode(s, validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


def capture() -> dict[str, Any]:
    """The RNG states of this process, JSON-able (floats are finite by construction)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "torch": _b64(torch.get_rng_state()),
    }
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:  # not imported: never drawn from (module docstring)
        name, keys, pos, has_gauss, cached = np_random.get_state(legacy=True)
        state["numpy"] = {"name": name, "keys": [int(k) for k in keys], "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any], where: str) -> None:
    """Set this process's RNGs from a `capture()` result read from `where`."""
    try:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]),
                         None if py["gauss_next"] is None else float(py["gauss_next"])))
        n = state.get("numpy")
        if n is not None:
            import numpy as np

            np.random.set_state((str(n["name"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                                 int(n["has_gauss"]), float(n["cached_gaussian"])))
        torch.set_rng_state(_unb64(state["torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: RNG state is malformed ({e!r}); the checkpoint is damaged") from None
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
        else:
            torch.cuda.set_rng_state(_unb64(cuda[0]))
