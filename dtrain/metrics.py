"""What a run reports: rank-prefixed logging, a rank-0 progress bar, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the O_APPEND file `fd` whole, or raise OSError and leave the file as it was:
    a half-written line on a full disk would break every reader of the file."""
    before = os.fstat(fd).st_size
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
        raise


class RunLogHandler(logging.Handler):
    """<run_dir>/train.log. A line that cannot be written (a full disk) is dropped whole: logging's
    own FileHandler printed a traceback to stderr for every record once the disk was full, burying
    the error that mattered. Here the first failure is reported once, on stderr, naming the file and
    the error; lines then go to stderr only, and the file gets a note of how many it missed once it
    can be written again."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lost = 0  # lines not written since the last one that was

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # a bad format string is a bug in the caller: logging's usual report
            self.handleError(record)
            return
        if self._lost:  # the gap is marked in the file, in the same write as the line after it
            note = logging.makeLogRecord({"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                                          "msg": f"{self._lost} log line(s) before this one could not be written "
                                                 f"here (they went to stderr)"})
            line = (self.format(note) + "\n").encode("utf-8") + line
        try:
            append_whole(self._fd, line)
        except OSError as e:
            if not self._lost:
                _say(f"dtrain: cannot write the log file {self.path} ({type(e).__name__}: {e}); log lines go to "
                     f"stderr only until it can be written again")
            self._lost += 1
            return
        if self._lost:
            _say(f"dtrain: the log file {self.path} is written again; {self._lost} line(s) are missing from it")
            self._lost = 0

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()


def _say(message: str) -> None:
    """A line on stderr from inside a log handler, which must not raise (stderr may be on the full disk)."""
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def setup_logging(rank: int, level: str = "INFO", log_file: Path | None = None) -> None:
    """Every line carries the rank; rank 0 also appends to <run_dir>/train.log."""
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dtrain", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RunLogHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h._dtrain = True  # type: ignore[attr-defined]
        root.addHandler(h)
    # Non-zero ranks only warn: user-facing progress is rank 0's job.
    root.setLevel(getattr(logging, level) if rank == 0 else max(logging.WARNING, getattr(logging, level)))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no such numbers
    return value


class MetricsLogger:
    """Writes metrics on rank 0 only; every other rank holds a silent instance."""

    def __init__(self, run_dir: Path, *, enabled: bool, progress: bool, tensorboard: bool,
                 max_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644) if enabled else None
        self._lost = 0  # records not written since the last one that was
        self._bar = (
            tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                 file=sys.stderr, disable=not (enabled and progress))
        )
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._t0 = time.time()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3)}
        record.update({k: _json_safe(v) for k, v in values.items()})
        self._append((json.dumps(record) + "\n").encode("utf-8"))
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("epoch",):
                    self._tb.add_scalar(k, v, step)

    def _append(self, line: bytes) -> None:
        """One record, whole or not at all. A full disk (the run directory holds the checkpoints by
        default) must neither stop rank 0 alone, which left the other ranks failing in their next
        collective, nor leave half a line that breaks every reader of the file: the record is
        dropped with a warning (as train.log's lines are, through logging), and a checkpoint save
        on that disk then stops every rank together."""
        assert self._fd is not None
        try:
            append_whole(self._fd, line)
        except OSError as e:
            if not self._lost:
                log.warning("cannot write %s (%s); metric records are dropped until it can be written again",
                            self.path, e)
            self._lost += 1
            return
        if self._lost:
            log.warning("%s is written again; %d record(s) were dropped", self.path, self._lost)
            self._lost = 0

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._bar.n = step
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def write(self, message: str) -> None:
        """A user-facing line that does not break the progress bar."""
        if self.enabled:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
