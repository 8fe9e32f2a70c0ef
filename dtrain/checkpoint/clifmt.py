"""Argument types and text formatting for `dtrain ckpt` (dtrain.checkpoint.cli): sizes, storage
options, byte counts, times, metrics, tables. Pure functions, no storage access.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from dtrain.checkpoint.tools import TensorInfo

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


# ---- argument types -----------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536870912, '1000' -> 1000 (decimal and binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500MB, 2GB or 1GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:  # '0.5' would be 0 bytes: every tensor a shard of its own
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1 byte; give a size such as 500MB, 2GB or 1GiB")
    return size


@dataclass(frozen=True)
class Size:
    """A size argument: its bytes, and the text given, which messages echo: 3KB is 3000 bytes, which
    binary units alone would print as 2.9 KiB, a limit the user never typed."""

    nbytes: int
    text: str

    def __str__(self) -> str:
        """'3KB (2.9 KiB)': the text, and beside it the size as our other sizes print, unless they read the same."""
        human = human_bytes(self.nbytes)
        same = _plain(human) == _plain(self.text)  # '2MiB' is '2.0 MiB', '300B' is '300 B'
        return self.text if same else f"{self.text} ({human})"


def _plain(size: str) -> str:
    return re.sub(r"\.0+(?![0-9])", "", re.sub(r"\s", "", size)).lower()


def parse_size_arg(text: str) -> Size:
    """parse_size, keeping the text for messages (an argparse type)."""
    return Size(parse_size(text), text.strip())


def parse_storage_option(text: str) -> tuple[str, Any]:
    """'key=value'; the value is read as JSON when it is true/false/null, a number, {...} or [...]."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value (e.g. endpoint_url=http://127.0.0.1:9000)")
    word = raw.lower() if raw.lower() in ("true", "false", "null") else None
    if not (word or re.fullmatch(r"-?\d+", raw) or raw[:1] in ("{", "[")):
        return key.strip(), raw
    try:
        return key.strip(), json.loads(word or raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"storage option {key}: {raw!r} is not valid JSON ({e})") from None


def storage_options_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """--storage-option pairs as fsspec options; a dotted key nests as in the training config
    (`client_kwargs.endpoint_url=URL`), which fsspec otherwise got as one unknown keyword argument."""
    options: dict[str, Any] = {}
    for key, value in pairs:
        *parents, last = key.split(".")
        into = options
        for i, part in enumerate(parents):
            into = into.setdefault(part, {})
            if not isinstance(into, dict):
                raise argparse.ArgumentTypeError(f"storage option {key}: {'.'.join(parents[:i + 1])} is already "
                                                 f"set to a value, not a group of options")
        if isinstance(value, dict) and isinstance(into.get(last), dict):
            into[last].update(value)
        else:
            into[last] = value
    return options


# ---- formatting ---------------------------------------------------------------------------------
def human_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB'; None (size unknown) -> '-'."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def utc(t: float | None) -> str:
    """A Unix time as 'YYYY-MM-DD HH:MM:SS' in UTC; '-' for None and for anything that is not a time
    since 1970 (a damaged manifest must not crash a listing)."""
    try:
        if t is not None and math.isfinite(t) and t >= 0:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    except (OverflowError, OSError, ValueError, TypeError):
        pass
    return "-"


def format_metrics(m: dict[str, float | None]) -> str:
    """'val/acc=0.91 val/loss=0.3' (sorted; None, a non-finite value in the manifest, prints nan)."""
    return " ".join(f"{k}={'nan' if v is None else f'{v:.6g}'}" for k, v in sorted(m.items())) or "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, trailing spaces trimmed."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


LAYOUT_PIECES = 2  # a tensor in more pieces shows the count, the first and the last: no wider than two


def tensor_layout(t: TensorInfo) -> str:
    """Where a tensor lives: its file, or its file[start:stop, ...] boxes when it is sharded. Past
    LAYOUT_PIECES boxes (a checkpoint saved by more ranks) only the count, the first and the last,
    so a row stays about as wide at 64 ranks as at 2; `inspect --json` lists every box."""
    if len(t.chunks) == 1 and t.chunks[0].lengths == t.shape:
        return t.chunks[0].file
    boxes = [f"{c.file}[{', '.join(f'{o}:{o + n}' for o, n in zip(c.offsets, c.lengths, strict=True))}]"
             for c in sorted(t.chunks, key=lambda c: c.offsets)]
    if len(boxes) <= LAYOUT_PIECES:
        return "; ".join(boxes)
    return f"{len(boxes)} pieces: {boxes[0]}; ... {len(boxes) - 2} more; {boxes[-1]}"
