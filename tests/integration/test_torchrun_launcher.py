"""launch/torchrun.sh: config errors exit 2, a stop signal exits 75, the rerun resumes; two nodes
(two torchruns on loopback) restart in place after a worker crash and resume together."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.launch import FAST, rank_summaries, read_jsonl, summary

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "torchrun.sh"


def _env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PET_", "SLURM_", "DTRAIN_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               CONFIG="configs/digits.yaml", RUN_DIR=str(run_dir), NPROC_PER_NODE="2")
    return env


def test_config_error_exits_2_before_torchrun_starts(tmp_path: Path) -> None:
    done = subprocess.run([str(SCRIPT), "train.max_stepz=10"], cwd=REPO, env=_env(tmp_path / "run"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "max_stepz" in done.stderr and "torchrun --nproc-per-node" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,value", [("NPROC_PER_NODE", "0"), ("NPROC_PER_NODE", "two"), ("NNODES", "2:x"),
                                        ("MAX_RESTARTS", "x"), ("SHUTDOWN_TIMEOUT", "2m")])
def test_bad_launcher_setting_exits_2_naming_it(tmp_path: Path, name: str, value: str) -> None:
    """torchrun used to reject these with a traceback and exit 1 (which Slurm and a Job retry), or
    not at all: SHUTDOWN_TIMEOUT=2m broke the script's own arithmetic after the run."""
    done = subprocess.run([str(SCRIPT), "train.max_steps=1"], cwd=REPO, env={**_env(tmp_path / "run"), name: value},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{name}={value} is not valid" in done.stderr and "torchrun --nproc-per-node" not in done.stderr
    assert not (tmp_path / "run").exists()


def _wait_for_step(run_dir: Path, step: int, timeout: float, alive: Callable[[], bool], logs: Callable[[], str],
                   poll: float = 0.2) -> None:
    """Until metrics.jsonl shows `step` (training is under way), failing with `logs()` when the
    launch dies or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").exists() or \
            not any(r.get("step", 0) >= step for r in read_jsonl(run_dir / "metrics.jsonl")):
        assert time.monotonic() < deadline and alive(), logs()
        time.sleep(poll)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_ctrl_c_checkpoints_exits_75_and_the_same_command_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [str(SCRIPT), "train.max_steps=200", "train.eval_every=20", "early_stopping.enabled=false", *FAST]
    with open(tmp_path / "first.log", "w") as log:
        # SIGINT as a terminal delivers it: a test run started in the background of a shell (`cmd &`)
        # inherits SIGINT ignored, and bash cannot trap a signal ignored on entry
        proc = subprocess.Popen(argv, cwd=REPO, env=_env(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_step(run_dir, 40, 120, lambda: proc.poll() is None, lambda: (tmp_path / "first.log").read_text(),
                       poll=0.5)
        proc.send_signal(signal.SIGINT)  # to the script only, as `kill -INT` would
        assert proc.wait(120) == 75, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stopped = summary(run_dir)
    assert stopped["stopped_by"] == "preempted" and 0 < stopped["last_step"] < 200

    again = subprocess.run(argv, cwd=REPO, env=_env(run_dir), capture_output=True, text=True, timeout=150)
    assert again.returncode == 0, again.stderr[-3000:]
    final = summary(run_dir)
    assert final["last_step"] == 200 and final["resumed_from"].endswith(f"step-{stopped['last_step']:09d}")
    # a checkpoint that does not fit the config: torchrun says 1 after its restarts, the script says 2
    other = subprocess.run([*argv, "model.hidden=64"], cwd=REPO, env={**_env(run_dir), "MAX_RESTARTS": "1"},
                           capture_output=True, text=True, timeout=150)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "model/fc1.bias" in other.stderr


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_run_dir_argument_is_where_the_exit_codes_are_read(tmp_path: Path) -> None:
    """`run_dir=...` on the command line wins over RUN_DIR for dtrain; the script read the ranks' exit
    codes from RUN_DIR and so exited 1 for a preempted run that had committed its checkpoint."""
    env = {**_env(tmp_path / "env-run"), "MAX_RESTARTS": "0", "DTRAIN_FAULTS": '{"signal_rank": 0, "signal_step": 4}'}
    done = subprocess.run([str(SCRIPT), f"run_dir={tmp_path / 'arg-run'}", "train.max_steps=20", *FAST], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=80)
    assert done.returncode == 75, done.stderr[-3000:]
    assert summary(tmp_path / "arg-run")["stopped_by"] == "preempted"
    assert not (tmp_path / "env-run").exists()


def _slow_start(tmp_path: Path, name: str, seconds: float) -> tuple[Path, Path]:
    """An executable that stands for `name` (torchrun, python) still starting: it touches a marker,
    sleeps, then becomes the real program; a SIGTERM meanwhile kills it, as it would the real one."""
    marker, wrapper = tmp_path / f"{name}.started", tmp_path / f"slow-{name}"
    real = str(Path(sys.executable).parent / name) if name == "torchrun" else sys.executable
    wrapper.write_text(f"#!{sys.executable}\nimport os, sys, time\nopen({str(marker)!r}, 'w').close()\n"
                       f"time.sleep({seconds})\nos.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    return wrapper, marker


@pytest.mark.timeout(60)
@pytest.mark.parametrize("starting", ["PYTHON", "TORCHRUN"])
def test_stop_before_the_workers_can_save_exits_75(tmp_path: Path, starting: str) -> None:
    """A stop during the config check (PYTHON) or while torchrun itself starts (TORCHRUN): nothing
    was trained, so the launcher should run it again. The script died of the signal (143), or said
    torchrun's 143, which a Job counts as a failure and Slurm does not requeue without a warning."""
    wrapper, marker = _slow_start(tmp_path, starting.lower(), 3 if starting == "PYTHON" else 30)
    run_dir = tmp_path / "run"
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen([str(SCRIPT), "train.max_steps=5", *FAST], cwd=REPO,
                                env={**_env(run_dir), starting: str(wrapper)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)  # PYTHON: the trap runs once the check is done (bash waits for it)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (tmp_path / "out.log").read_text()
    assert code == 75, out[-3000:]
    assert "nothing was trained" in out and not (run_dir / "summary.json").exists(), out[-3000:]


def _workers(launcher_pid: int) -> list[int]:
    """Pids of the `python -m dtrain train` workers under this torchrun.sh (not torchrun itself)."""
    from tests.integration.k8s_local import _descendants

    out = []
    for pid in _descendants(launcher_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dtrain" in argv and b"train" in argv and not any(a.endswith(b"torchrun") for a in argv):
            out.append(pid)
    return out


def _catches(pid: int, sig: signal.Signals) -> bool:
    try:
        caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (sig - 1) & 1)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_stop_during_start_up_checkpoints_after_the_first_step_and_exits_75(tmp_path: Path) -> None:
    """SIGTERM while the workers still import torch and form the group (no train.log yet). It used to
    kill them (no handler until the loop started): torchrun.sh exited 1, which a Job counts as a
    failure, instead of 75 with a checkpoint."""
    run_dir = tmp_path / "run"
    argv = [str(SCRIPT), "train.max_steps=20", "train.eval_every=10", "early_stopping.enabled=false", *FAST]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=_env(run_dir), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            workers = _workers(proc.pid)
            if len(workers) == 2 and all(_catches(w, signal.SIGTERM) for w in workers):
                break
            assert not (run_dir / "train.log").exists() and proc.poll() is None and time.monotonic() < deadline, \
                "the workers did not catch SIGTERM before their start-up ended\n" + (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 75, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stopped = summary(run_dir)
    assert stopped["stopped_by"] == "preempted" and 0 < stopped["last_step"] < 20, stopped
    assert (run_dir / "checkpoints" / f"step-{stopped['last_step']:09d}" / "manifest.json").exists()

    again = subprocess.run(argv, cwd=REPO, env=_env(run_dir), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(run_dir)["resumed_from"].endswith(f"step-{stopped['last_step']:09d}")


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_two_nodes_restart_in_place_after_a_worker_crash(tmp_path: Path) -> None:
    """Rank 1 (one node) is killed at step 8; both torchruns restart their workers and resume from
    step 5. Before TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the healthy node restarted under another
    attempt number and the group timed out in 3 of 4 trials."""
    from tests.multiproc import free_port

    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    argv = [str(SCRIPT), "train.max_steps=20", "train.eval_every=10", "checkpoint.every_steps=5",
            "dist.timeout_s=30", *FAST]
    procs = []
    for node in range(2):
        env = _env(run_dir)
        env.update(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, RDZV_ID="two-nodes", LOCAL_ADDR="127.0.0.1",
                   MAX_RESTARTS="2", OMP_NUM_THREADS="1",
                   DTRAIN_FAULTS='{"kill_rank": 1, "kill_step": 8, "only_attempt": 0}')
        with open(tmp_path / f"node{node}.log", "w") as log:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    final = summary(run_dir)
    assert final["last_step"] == 20 and final["resumed_from"].endswith("step-000000005"), logs


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_the_other_node_exits_75_too_instead_of_restarting_in_place(tmp_path: Path) -> None:
    """One node of two is preempted (its torchrun.sh gets SIGTERM); with MAX_RESTARTS > 0 the other
    node's torchrun restarted its workers (they exited 75 by agreement) and they waited in the
    rendezvous for the preempted node, 15 min by default, instead of exiting 75 to be requeued."""
    from tests.integration.k8s_local import _descendants
    from tests.multiproc import free_port

    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    argv = [str(SCRIPT), "train.max_steps=400", "train.eval_every=50", "dist.timeout_s=30", *FAST]
    procs = []
    for node in range(2):
        env = {**_env(run_dir), "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": endpoint, "RDZV_ID": "pre",
               "LOCAL_ADDR": "127.0.0.1", "MAX_RESTARTS": "2", "OMP_NUM_THREADS": "1"}
        with open(tmp_path / f"node{node}.log", "w") as log:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    logs = lambda: "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2))  # noqa: E731
    try:
        _wait_for_step(run_dir, 10, 90, lambda: all(p.poll() is None for p in procs), logs)
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(40) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                for pid in [*_descendants(p.pid), p.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                p.wait(10)
    assert codes == [75, 75], logs()
    stopped = summary(run_dir)
    assert stopped["stopped_by"] == "preempted" and 10 <= stopped["last_step"] < 400, stopped


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_stop_cut_short_by_shutdown_timeout_says_so(tmp_path: Path) -> None:
    """torchrun SIGKILLs the workers SHUTDOWN_TIMEOUT s after the stop; the script only said "the
    workers exited 1", not that the emergency checkpoint was cut short or which setting to raise."""
    run_dir = tmp_path / "run"
    argv = [str(SCRIPT), "train.max_steps=400", "early_stopping.enabled=false", *FAST]
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env={**_env(run_dir), "SHUTDOWN_TIMEOUT": "0"}, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for_step(run_dir, 10, 60, lambda: proc.poll() is None, lambda: (tmp_path / "out.log").read_text())
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (tmp_path / "out.log").read_text()
    assert code not in (0, 75), out[-3000:]
    assert "no rank recorded an exit code" in out and "Raise SHUTDOWN_TIMEOUT" in out, out[-3000:]


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_a_crash_after_an_in_place_restart_is_not_reported_as_the_earlier_preemption(tmp_path: Path) -> None:
    """Attempt 0 is preempted (rank 0 signals itself: every rank records 75, and torchrun restarts
    them in place); attempt 1 resumes and rank 1 is killed, with no restarts left. The script read
    attempt 0's records and exited 75, "checkpoint committed, requeue me", for a crash."""
    run_dir = tmp_path / "run"
    env = {**_env(run_dir), "MAX_RESTARTS": "1",
           "DTRAIN_FAULTS": '{"signal_rank": 0, "signal_step": 3, "kill_rank": 1, "kill_step": 12}'}
    done = subprocess.run([str(SCRIPT), "train.max_steps=30", "train.eval_every=100", "early_stopping.enabled=false",
                           *FAST], cwd=REPO, env=env, capture_output=True, text=True, timeout=140)
    assert done.returncode == 1, done.stderr[-3000:]
    # attempt 1 rewrote summary.json "running" when it started: attempt 0's 75 no longer speaks for it
    assert summary(run_dir) == {"stopped_by": "running", "exit_code": None, "attempt": 1, "world_size": 2}
    resumed = [e["from"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "resume"]
    assert len(resumed) == 1 and (Path(resumed[0]) / "manifest.json").exists(), done.stderr[-3000:]
    # every rank of attempt 1 rewrote its record when it started; rank 1 died with it saying "running"
    assert [(r["attempt"], r["exit_code"]) for r in rank_summaries(run_dir)][1] == (1, None)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.parametrize("override", ["model.depth=3", "data.batch_size=33", "parallel.strategy=none"])
def test_config_errors_the_workers_check_before_the_group_exit_2_before_torchrun(tmp_path: Path, override: str) -> None:
    """Task options, the batch split over the ranks and a one-process strategy on two ranks were only
    checked by the workers: torchrun restarted them MAX_RESTARTS times, then the script said 1."""
    done = subprocess.run([str(SCRIPT), "train.max_steps=5", *FAST, override], cwd=REPO,
                          env={**_env(tmp_path / "run"), "MAX_RESTARTS": "2"}, capture_output=True, text=True,
                          timeout=80)
    assert done.returncode == 2, done.stderr[-3000:]
    assert override.split("=")[0] in done.stderr and "torchrun --nproc-per-node" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_config_error_any_rank_finds_exits_2_without_restarts_but_a_crash_is_restarted(tmp_path: Path) -> None:
    """Attempt 0: rank 1 is killed (a crash: torchrun restarts both workers). Attempt 1: rank 1 alone,
    local rank 1 after the group formed, finds a config error. Only local rank 0 used to stop torchrun,
    so torchrun restarted them MAX_RESTARTS times to fail the same way and the script said 1 (rank 0
    died with the group, recording nothing); torchrun's SignalException traceback came last."""
    faults = {"config_error_rank": 1, "config_error_step": 3, "chaos_seed": 0, "chaos_kills": 1, "chaos_max_gap": 1}
    done = subprocess.run([str(SCRIPT), "train.max_steps=20", *FAST], cwd=REPO,
                          env={**_env(tmp_path / "run"), "MAX_RESTARTS": "2", "DTRAIN_FAULTS": json.dumps(faults)},
                          capture_output=True, text=True, timeout=80)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "chaos: SIGKILL rank 1 before step 2 (attempt 0)" in done.stderr, done.stderr[-3000:]
    assert [(r["attempt"], r["exit_code"]) for r in rank_summaries(tmp_path / "run")] == [(1, None), (1, 2)]
    last = done.stderr.strip().splitlines()[-1]  # after torchrun's traceback: the real error, explained
    assert "rank 1 of its last attempt (restart 1) found a config error: fault: config error on rank 1" in last, last
    assert "SignalException traceback of torchrun above is a rank stopping it" in last and last.endswith("(exit 2)"), last


@pytest.mark.timeout(60)
def test_an_elastic_range_checks_the_batch_split_for_every_world_size_it_allows(tmp_path: Path) -> None:
    """NNODES=1:4 with 2 processes per node may form its group with 2, 4, 6 or 8 ranks. The check
    before torchrun skipped ranges, so digits.yaml's batch of 64 started, and the job failed as a
    config error whenever a rendezvous formed with 3 nodes (after a preemption, say).
    The check runs without torch: importing it made every start 2-3 s slower (a torch that cannot
    be imported stands in for that here)."""
    fake = tmp_path / "torchrun"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / "no-torch" / "torch").mkdir(parents=True)
    (tmp_path / "no-torch" / "torch" / "__init__.py").write_text(
        "raise ImportError('the check before torchrun imported torch')\n")
    env = {**_env(tmp_path / "run"), "NNODES": "1:4", "RDZV_ENDPOINT": "127.0.0.1:29400", "TORCHRUN": str(fake)}
    env["PYTHONPATH"] = f"{tmp_path / 'no-torch'}{os.pathsep}{env['PYTHONPATH']}"
    done = subprocess.run([str(SCRIPT), "train.max_steps=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "NNODES=1:4 x NPROC_PER_NODE=2 lets the group form with any of [2, 4, 6, 8] ranks; on 6" in done.stderr
    assert "a multiple of 24 splits over all of them" in done.stderr and not (tmp_path / "run").exists()
    done = subprocess.run([str(SCRIPT), "train.max_steps=1", "data.batch_size=48"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.timeout(60)
def test_the_operators_nproc_per_node_auto_reaches_torchrun(tmp_path: Path) -> None:
    """The Kubeflow training operator sets PET_NPROC_PER_NODE=auto; the script ran 1 process."""
    fake = tmp_path / "torchrun"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\n')
    fake.chmod(0o755)
    env = {**_env(tmp_path / "run"), "PET_NPROC_PER_NODE": "auto", "TORCHRUN": str(fake)}
    del env["NPROC_PER_NODE"]
    done = subprocess.run([str(SCRIPT), "train.max_steps=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stderr[-3000:]
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index("--nproc-per-node") + 1] == "auto", argv


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_second_ctrl_c_stops_at_once_without_waiting_for_the_checkpoint(tmp_path: Path) -> None:
    """A second SIGINT while the workers save: plain `dtrain train` exits at once, but the script
    said "already saving" and waited up to SHUTDOWN_TIMEOUT. Rank 1 is stopped (SIGSTOP), so the
    emergency checkpoint cannot finish until the timeout here."""
    run_dir = tmp_path / "run"
    argv = [str(SCRIPT), "train.max_steps=400", "early_stopping.enabled=false", *FAST]
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env={**_env(run_dir), "SHUTDOWN_TIMEOUT": "300"}, stdout=log,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers: list[int] = []
    try:
        _wait_for_step(run_dir, 10, 60, lambda: proc.poll() is None, lambda: (tmp_path / "out.log").read_text())
        workers = sorted(_workers(proc.pid))
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):  # saving, as long as rank 1 is stopped
            proc.wait(3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            for pid in [*_workers(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    out = (tmp_path / "out.log").read_text()
    assert code == 130 and took < 10, out[-3000:]
    assert "got SIGINT again: killing torchrun" in out, out[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], out[-3000:]


def _alive(pid: int) -> bool:
    """Running, or stopped; not gone and not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
