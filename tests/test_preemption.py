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


def test_a_signal_kept_at_start_reaches_the_handler_which_then_restores_the_originals() -> None:
    from dtrain import early_signals

    before = {sig: signal.getsignal(sig) for sig in early_signals.STOP_SIGNALS}
    early_signals.keep_stop_signals()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # before dtrain's imports: kept, not the default death
        with PreemptionHandler() as handler:
            assert handler.requested and handler.signal_name == "SIGUSR1"
        assert {sig: signal.getsignal(sig) for sig in before} == before  # not the keeper
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("command", ["python -m dtrain", "dtrain"])
def test_a_stop_signal_while_dtrain_still_imports_is_kept_and_saves_after_the_first_step(
        command: str, tmp_path: Path) -> None:
    """SIGUSR1 (Slurm's --signal) while `python -m dtrain train` (as torchrun runs it) or the `dtrain`
    command still imports its modules (argparse is made slow here, as imports are on a busy node or a
    network file system). The handler came after those imports, so the signal killed the process
    (exit -10, a failure to every launcher); now it is kept from the start and the run saves after
    its first step, exits 75."""
    slow, marker = tmp_path / "slow", tmp_path / "importing"
    slow.mkdir()
    (slow / "argparse.py").write_text(
        "import importlib.util, os, sys, sysconfig, time\n"
        f"open({str(marker)!r}, 'w').close()\ntime.sleep(2)\n"
        "spec = importlib.util.spec_from_file_location('argparse', os.path.join(sysconfig.get_paths()['stdlib'], "
        "'argparse.py'))\nsys.modules['argparse'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n")
    run_dir = tmp_path / "run"
    path = os.pathsep.join(p for p in (str(slow), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    start = [sys.executable, "-m", "dtrain"] if command.startswith("python") else [str(Path(sys.executable).with_name("dtrain"))]
    cmd = [*start, "train", *FAST, f"run_dir={run_dir}", "train.max_steps=50",
           "early_stopping.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == exitcodes.PREEMPTED, err[-3000:]
    s = summary(run_dir)
    assert (s["stopped_by"], s["last_step"]) == ("preempted", 1), s
    assert (run_dir / "checkpoints" / "step-000000001" / "manifest.json").exists()
