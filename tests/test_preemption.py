from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain import exitcodes
from dtrain.errors import ConfigError
from dtrain.faults import FaultInjector
from dtrain.preemption import PreemptionHandler
from tests.launch import FAST, REPO, summary


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_only_sets_the_flag(sig: signal.Signals) -> None:
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), sig)
        assert handler.requested and handler.signal_name == sig.name


def test_second_sigint_exits_at_once() -> None:
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_nothing_installed_at_import_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGTERM) != before
    handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_fault_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="kill_rnak"):
        FaultInjector.from_config({"kill_rnak": 1}, rank=0)
    monkeypatch.setenv("DTRAIN_FAULTS", "{not json")
    with pytest.raises(ConfigError, match="DTRAIN_FAULTS"):
        FaultInjector.from_config({}, rank=0)
    monkeypatch.setenv("DTRAIN_FAULTS", '{"kill_rank": 1, "kill_step": 5, "only_attempt": 1}')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert FaultInjector.from_config({}, rank=1).kill_step is None  # other attempt: off
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert FaultInjector.from_config({}, rank=1).kill_step == 5


@pytest.mark.timeout(90)
def test_a_signal_to_the_whole_process_group_reaches_loader_workers_and_still_saves(tmp_path: Path) -> None:
    """Slurm and Ctrl-C signal every process of the job, DataLoader workers included. A worker
    ended by SIGTERM made the loader fail the run (exit 1, no checkpoint); the workers now ignore
    the stop signals and the training process saves and exits 75."""
    run_dir = tmp_path / "group"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "dtrain", "train", *FAST, f"run_dir={run_dir}", "train.max_steps=100000",
           "train.eval_every=100000", "data.num_workers=2", "early_stopping.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while not (metrics.exists() and "train/loss" in metrics.read_text()):  # training, workers running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == exitcodes.PREEMPTED, err[-3000:]
    s = summary(run_dir)
    assert s["stopped_by"] == "preempted"
    assert (run_dir / "checkpoints" / f"step-{s['last_step']:09d}" / "manifest.json").exists()


def test_min_nodes_reads_torchruns_nnodes_option_or_its_environment() -> None:
    from dtrain.preemption import min_nodes

    assert min_nodes([b"python", b"torchrun", b"--nnodes", b"2", b"-m", b"dtrain"]) == 2
    assert min_nodes([b"torchrun", b"--nnodes=1:4", b"-m", b"dtrain"]) == 1
    assert min_nodes([b"torchrun", b"--standalone", b"-m", b"dtrain"]) == 1
    assert min_nodes([b"torchrun", b"-m", b"dtrain"], pet_nnodes="3:8") == 3
