"""`python -m tests.reliability.fill_at_end ARGS`: `dtrain ARGS`, whose run directory's disk fills up
just before the exit records are written (rank 0 writes a ballast file there that takes every free
byte, then all ranks go on): a disk that fills at the very end of a real run, with no race."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dtrain import dist, trainer
from dtrain.cli import main

real_write_summary = trainer.write_summary


def fill_then_write_summary(*args: Any, run_dir: Path, **kwargs: Any) -> None:
    if dist.rank() == 0:
        st = os.statvfs(run_dir)
        with open(run_dir / "ballast", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize))
    dist.barrier()
    real_write_summary(*args, run_dir=run_dir, **kwargs)


if __name__ == "__main__":
    trainer.write_summary = fill_then_write_summary  # type: ignore[assignment]
    sys.exit(main())  # this process's own command (sys.argv[1:])
