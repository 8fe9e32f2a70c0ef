"""Strict JSON for non-tensor state (state.json): no pickle, no NaN literals.

Plain JSON covers most state dicts. The few values JSON cannot say exactly are written as tagged
objects with one reserved key: non-finite floats, tuples, dicts with non-string keys, bytes, and
small tensors (an optimizer's tensor learning rate, say) and NumPy arrays (the state a user's own
component keeps, `np.random.RandomState.get_state()` say). Anything else is an error naming its path,
so a component that returns an unsupported object is found at save time, not at resume.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from typing import Any

import torch

from dtrain.checkpoint.stfile import DTYPES, dtype_name
from dtrain.errors import CheckpointError

_TAG = "__dtrain__"
_MAX_TENSOR_BYTES = 1 << 20  # bigger tensors belong in safetensors, not JSON


def encode(obj: Any, path: str = "$") -> Any:
    """A JSON-able copy of `obj`; raises CheckpointError naming `path` for unsupported values."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_TAG: "float", "v": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [encode(x, f"{path}[{i}]") for i, x in enumerate(obj)]
        return items if isinstance(obj, list) else {_TAG: "tuple", "v": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _TAG not in obj:
            return {k: encode(v, f"{path}.{k}") for k, v in obj.items()}
        return {_TAG: "dict", "v": [[encode(k, f"{path}<key>"), encode(v, f"{path}[{k!r}]")]
                                     for k, v in obj.items()]}
    if isinstance(obj, bytes):
        return {_TAG: "bytes", "v": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.Tensor):
        return _encode_tensor(obj, path)
    np = sys.modules.get("numpy")  # an array comes from code that imported NumPy already
    if np is not None and isinstance(obj, np.ndarray) and obj.ndim > 0:
        return _encode_ndarray(obj, path)
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars and 0-d arrays
        return encode(obj.item(), path)
    raise CheckpointError(f"state value at {path} has type {type(obj).__name__}, which cannot be "
                          f"stored as JSON; return plain numbers, strings, lists and dicts from state_dict()")


def _encode_tensor(t: torch.Tensor, path: str) -> dict[str, Any]:
    t = t.detach().to("cpu").contiguous()
    if t.numel() * t.element_size() > _MAX_TENSOR_BYTES:
        raise CheckpointError(f"state value at {path} is a tensor of {t.numel() * t.element_size()} "
                              f"bytes; tensors this big must be in the model or optimizer state")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {_TAG: "tensor", "dtype": dtype_name(t.dtype, what=path), "shape": list(t.shape),
            "v": base64.b64encode(raw).decode("ascii")}


def _encode_ndarray(a: Any, path: str) -> dict[str, Any]:
    if a.dtype.kind not in "biufc":
        raise CheckpointError(f"state value at {path} is a NumPy array of dtype {a.dtype}, which cannot be stored "
                              f"as JSON; use numbers (bool, int, float, complex) or convert it to a list")
    if a.nbytes > _MAX_TENSOR_BYTES:
        raise CheckpointError(f"state value at {path} is a NumPy array of {a.nbytes} bytes; arrays this big "
                              f"belong in the model or optimizer state (as tensors)")
    return {_TAG: "ndarray", "dtype": a.dtype.str, "shape": list(a.shape),
            "v": base64.b64encode(a.tobytes(order="C")).decode("ascii")}


def decode(obj: Any, path: str = "$") -> Any:
    """Inverse of `encode`; rejects malformed tags instead of guessing. Scalars are returned as they
    are, without building their path (an RNG state is a list of 625 ints: 0.52 -> 0.28 ms a load)."""
    if isinstance(obj, list):
        return [decode(x, f"{path}[{i}]") if isinstance(x, (list, dict)) else x for i, x in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if _TAG not in obj:
        return {k: decode(v, f"{path}.{k}") if isinstance(v, (list, dict)) else v for k, v in obj.items()}
    tag = obj.get(_TAG)
    v: Any = obj.get("v")
    try:
        if tag == "float":
            if v not in ("inf", "-inf", "nan"):
                raise ValueError(f"bad float {v!r}")
            return float(v)
        if tag == "tuple":
            return tuple(decode(x, path) for x in v)
        if tag == "dict":
            return {_hashable(decode(k, path)): decode(x, f"{path}[{k!r}]") for k, x in v}
        if tag == "bytes":
            return base64.b64decode(v, validate=True)
        if tag == "tensor":
            dt = DTYPES[obj["dtype"]]
            raw = bytearray(base64.b64decode(v, validate=True))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dt).reshape([int(d) for d in obj["shape"]]).clone()
        if tag == "ndarray":
            import numpy as np

            dtype = np.dtype(str(obj["dtype"]))
            if dtype.kind not in "biufc":
                raise ValueError(f"dtype {dtype} is not numeric")
            return np.frombuffer(base64.b64decode(v, validate=True), dtype=dtype).reshape([int(d) for d in obj["shape"]]).copy()
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"state value at {path}: malformed {tag!r} entry ({e})") from None
    raise CheckpointError(f"state value at {path}: unknown tag {tag!r}")


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def dumps(obj: Any) -> bytes:
    """Encode and serialise; NaN can never reach the file as a bare literal."""
    return json.dumps(encode(obj), allow_nan=False, separators=(",", ":")).encode("utf-8")


def loads(data: bytes, where: str) -> Any:
    """Parse JSON written by `dumps`; bare NaN/Infinity literals are rejected."""
    def _no_constants(name: str) -> Any:
        raise ValueError(f"bare {name} is not allowed")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        return decode(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e}); the checkpoint is damaged") from None
    except RecursionError:  # a hostile file nested thousands deep
        raise CheckpointError(f"{where}: JSON nested too deeply; the checkpoint is damaged") from None
