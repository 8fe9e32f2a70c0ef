"""The Indexed Job's container command, unmodified, as 2 local pods: preempted, recreated, resumed, done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.k8s_local import LocalPod, expand, find, pod_env, policy_action, start_pod, stop_pods
from tests.integration.kustomize import render
from tests.launch import read_jsonl, summary
from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 200

pytestmark = pytest.mark.multiprocess


def _base_env() -> dict[str, str]:
    """This machine's environment minus launcher variables that would leak into the 'pods'."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "PET_", "SLURM_", "DTRAIN_")) and k not in ("RANK", "WORLD_SIZE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return env


def _small_config(tmp: Path) -> Path:
    """configs/digits.yaml cut short; the ConfigMap's CONFIG points here, as a user's ConfigMap would."""
    cfg = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    cfg["train"].update(max_steps=MAX_STEPS, eval_every=20, log_every=5)
    cfg["early_stopping"]["enabled"] = False
    cfg["logging"] = {"progress": False}
    cfg["data"].update(batch_size=32, eval_batch_size=128)
    path = tmp / "digits-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_all(pods: list[LocalPod], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for pod in pods:
        codes.append(pod.proc.wait(max(1.0, deadline - time.monotonic())))
    return codes


@pytest.mark.timeout(300)
def test_indexed_job_pods_resume_after_preemption_and_finish(tmp_path: Path) -> None:
    resources = render(REPO / "k8s" / "base")
    find(resources, "ConfigMap", "dtrain-env")["data"]["CONFIG"] = str(_small_config(tmp_path))
    job = find(resources, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]["name"]
    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    run_dir = runs / "dtrain"
    pods: list[LocalPod] = []

    def start_all(attempt: int) -> list[LocalPod]:
        started = [start_pod(resources, job, i, repo=REPO, volumes={"runs": runs}, port=port,
                             log=tmp_path / f"pod-{i}-attempt-{attempt}.log", base_env=_base_env())
                   for i in range(job["spec"]["completions"])]
        pods.extend(started)
        return started

    def logs() -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in pods)

    try:
        first = start_all(0)
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or \
                not any(r.get("step", 0) >= 40 for r in read_jsonl(run_dir / "metrics.jsonl")):
            assert time.monotonic() < deadline, f"no training progress\n{logs()}"
            assert all(p.proc.poll() is None for p in first), f"a pod exited early\n{logs()}"
            time.sleep(0.5)

        # Preemption of pod 1: the kubelet sends SIGTERM to the container's PID 1 only.
        os.kill(first[1].proc.pid, signal.SIGTERM)
        codes = _wait_all(first, 120)
        assert codes == [75, 75], logs()
        preempted = summary(run_dir)
        assert preempted["stopped_by"] == "preempted" and 0 < preempted["last_step"] < MAX_STEPS
        # Both pods failed with 75, which the Job controller ignores: it recreates them, uncounted.
        assert [policy_action(job, c, container) for c in codes] == ["Ignore", "Ignore"]

        second = start_all(1)
        codes = _wait_all(second, 150)
        assert codes == [0, 0], logs()
    finally:
        stop_pods(pods)

    final = summary(run_dir)
    assert final["exit_code"] == 0 and final["last_step"] == MAX_STEPS and final["world_size"] == 2, final
    assert final["resumed_from"] and final["resumed_from"].endswith(f"step-{preempted['last_step']:09d}"), final
    resumes = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes == [preempted["last_step"]]
    # The rendezvous really went through the Service name of pod 0, mapped to this machine.
    assert f"--rdzv-endpoint 127.0.0.1:{port}" in second[1].output()


def _torchrun_argv(resources: list[dict], job: dict, index: int, tmp: Path) -> list[str]:
    """The torchrun command line pod `index`'s container would run, from a stand-in torchrun."""
    fake = tmp / "torchrun"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp}/argv-$JOB_COMPLETION_INDEX"\n')
    fake.chmod(0o755)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {**_base_env(), **pod_env(resources, job, index, "6f1c2d3e-uid"), "TORCHRUN": str(fake)}
    env["RUN_DIR"] = str(tmp / "runs")
    argv = [expand(a, env) for a in container["command"] + container["args"]]
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return (tmp / f"argv-{index}").read_text().splitlines()


@pytest.mark.timeout(60)
def test_indexed_job_pod_zero_hosts_the_rendezvous_store_without_dns(tmp_path: Path) -> None:
    # torchrun's own guess resolves the endpoint's name: pod 0's name under the Service may not be in
    # DNS yet when pod 0 starts (here it never is), and then no pod hosts the store.
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    assert not _matches_machine_hostname(f"{socket.gethostname()}.no-such-subdomain.invalid")

    resources = render(REPO / "k8s" / "base")
    job = find(resources, "Job")
    argvs = [_torchrun_argv(resources, job, i, tmp_path) for i in range(job["spec"]["completions"])]
    assert "--rdzv-conf" in argvs[0] and argvs[0][argvs[0].index("--rdzv-conf") + 1] == "is_host=1", argvs[0]
    assert "--rdzv-conf" not in argvs[1], argvs[1]  # the others connect to it
