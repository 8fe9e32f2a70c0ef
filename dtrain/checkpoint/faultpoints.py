"""Fault points for tests: SIGKILL this process at a named phase of a save or load.

Off unless DTRAIN_CKPT_FAULT="phase:rank:nth[,...]" is set (the reliability suite's seeded kills use
it); when off, a fault point is one dictionary lookup. Kept apart from storage.py so the storage
code reads as what it does in production.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from dtrain.errors import CheckpointError

_FAULTS: dict[str, tuple[int, int]] | None = None  # phase -> (rank, nth), from DTRAIN_CKPT_FAULT
_fault_counts: dict[str, int] = {}


def _faults() -> dict[str, tuple[int, int]]:
    """The configured fault points, parsed once per process."""
    global _FAULTS
    if _FAULTS is None:
        faults = {}
        for item in filter(None, os.environ.get("DTRAIN_CKPT_FAULT", "").split(",")):
            name, who, count = (item.strip().split(":") + ["", ""])[:3]
            if not (who.isdigit() and count.isdigit()):
                raise CheckpointError(f"DTRAIN_CKPT_FAULT item {item!r} is not phase:rank:nth")
            faults[name] = (int(who), int(count))
        _FAULTS = faults
    return _FAULTS


def active() -> bool:
    """True when a test installed fault points (files are then wrapped to pass `file_write`)."""
    return bool(_faults())


def fault_point(phase: str, url: str = "") -> None:
    """Tests only (off unless DTRAIN_CKPT_FAULT="phase:rank:nth[,...]" is set): SIGKILL this
    process (RANK from the environment) the nth time it reaches `phase`. Phases: save_begin,
    prepared, staged, committed, saved, load_begin, loaded (manager.py); file_open, file_write,
    file_closed, manifest (before its rename), manifest_done, read, remove (storage.py)."""
    faults = _faults()
    if not faults:
        return
    if phase.startswith("atomic"):  # the manifest's atomic write (not the lease's, an export index's)
        if not url.endswith("manifest.json"):
            return
        phase = "manifest" if phase == "atomic_before_rename" else "manifest_done"
    if phase not in faults:
        return
    rank, nth = faults[phase]
    _fault_counts[phase] = _fault_counts.get(phase, 0) + 1
    if rank == int(os.environ.get("RANK", "0")) and _fault_counts[phase] == nth:
        os.write(2, f"dtrain fault: SIGKILL rank {rank} at {phase} #{nth}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


class Hooked:
    """A file whose writes pass a fault point (only while a test installed a hook)."""

    def __init__(self, f: Any, url: str) -> None:
        self.f, self.url = f, url

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        fault_point("file_write", self.url)
        return int(n or 0)
