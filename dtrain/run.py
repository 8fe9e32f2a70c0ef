"""One training process, start to end: check the config, join the process group, build the
Trainer, fit, and tear the group down on every path.

    run(cfg) -> exit code      what `dtrain train` and torchrun workers call
    train(cfg) -> exit code    the same, as `dtrain.train(cfg)` from Python
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from dtrain import __version__, dist, exitcodes
from dtrain.checkpoint.localfs import out_of_space, storage_full, write_atomic
from dtrain.checks import check_before_start
from dtrain.config import JobConfig, to_yaml
from dtrain.errors import ConfigError, RunDirError
from dtrain.metrics import setup_logging
from dtrain.preemption import PreemptionHandler, keep_torchrun_from_restarting, stop_torchrun_restarts
from dtrain.summary import write_config_error, write_start_record
from dtrain.trainer import Trainer

log = logging.getLogger(__name__)


def process_start_time() -> float:
    """Wall-clock time this process started (from /proc, to ~10 ms; now where there is no /proc)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def run(cfg: JobConfig, preemption: PreemptionHandler | None = None) -> int:
    """Train under whatever launcher started us; the process group is torn down on every path.

    The stop-signal handler is installed first (`dtrain train` installs it even before the imports):
    a SIGTERM while the group forms, the model builds or a checkpoint loads only sets its flag, and
    the first step boundary turns it into the emergency checkpoint and exit 75, which launchers
    requeue (a worker killed by the signal would report a failure instead)."""
    preemption = preemption or PreemptionHandler()
    with preemption.held():
        return _run(cfg, preemption)


def _run(cfg: JobConfig, preemption: PreemptionHandler) -> int:
    startup = {"process_start": process_start_time()}
    _, rank, world_size, _ = dist.detect_launcher()
    run_dir = Path(cfg.run_dir)
    write_start_record(run_dir, rank, world_size)
    try:
        check_before_start(cfg, world_size)
        env = dist.init(cfg.dist.timeout_s, cfg.dist.backend)
    except ConfigError as e:
        _record_config_error(run_dir, rank, e, preemption)
        raise
    startup["init_done"] = time.time()
    try:
        prepare_run_dir(run_dir, cfg, env)
        log.info("dtrain %s: %d rank(s), %s, strategy=%s, device=%s, backend=%s", __version__, env.world_size,
                 env.launcher, cfg.parallel.strategy, env.device, env.backend)
        try:
            trainer = Trainer(cfg, env, preemption)
            trainer.startup = {**startup, "built": time.time()}
            code = trainer.fit()
        except ConfigError as e:
            _record_config_error(run_dir, env.rank, e, preemption)
            raise
        # Nobody leaves before rank 0 has written the summary: torchrun tears down the other
        # workers as soon as one exits with a non-zero code (75 included).
        dist.barrier()
        if code == exitcodes.PREEMPTED:
            keep_torchrun_from_restarting(preemption)
        return code
    finally:
        dist.shutdown()


def prepare_run_dir(run_dir: Path, cfg: JobConfig, env: dist.DistEnv) -> None:
    """Collective: create run_dir, open train.log (rank 0) and write config.yaml (rank 0, atomically).
    A failure (a full disk) is a RunDirError naming the path, on every rank at once: rank 0 failing
    alone left the others to crash in their next collective, and the user with an OSError traceback."""
    error, path = None, run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "train.log"
        setup_logging(env.rank, cfg.logging.level, path)
        if env.is_main:
            path = run_dir / "config.yaml"
            write_atomic(str(path), str(path), to_yaml(cfg).encode("utf-8"))
    except OSError as e:
        hint = (f". {storage_full(str(run_dir))}: free space there, or use a run_dir on a disk with room; then "
                f"run the same command again") if out_of_space(e) else ""
        error = f"cannot write {path} (run_dir): {type(e).__name__}: {e}{hint}"
    if dist.agree_any(error is not None):
        raise RunDirError(error or f"another rank cannot write the run directory {run_dir}; its error says why")


def _record_config_error(run_dir: Path, rank: int, error: ConfigError, preemption: PreemptionHandler) -> None:
    """This rank's exit record (as summary.py writes at the end) for a config error, then torchrun
    stopped before it restarts the workers: torchrun reports any failed worker as exit 1, and
    launch/torchrun.sh reads these records to exit 2, which a launcher does not retry, also when only
    this rank found the error (the others then die with the group)."""
    write_config_error(run_dir, rank, str(error))
    stop_torchrun_restarts("config error", preemption)


def train(cfg: JobConfig) -> int:
    """Python entry point: `dtrain.train(dtrain.load_config("configs/digits.yaml", ["optim.lr=3e-4"]))`."""
    return run(cfg)
