"""Run a rendered Indexed Job's pods as local processes, with the environment Kubernetes would give them.

What the kubelet and the Job controller do, and what we do instead:
- env: envFrom (ConfigMap/Secret data, in order), then `env` (wins); fieldRefs resolved as the API
  server would (job-completion-index annotation, controller-uid label, pod IP -> 127.0.0.1);
  JOB_COMPLETION_INDEX and HOSTNAME=<job>-<index> added, as the Job controller and kubelet do.
- `$(VAR)` in command/args expanded from that env (unknown names stay as written, `$$` is `$`).
- DNS: `<job>-<i>.<subdomain>` names resolve to 127.0.0.1; the rendezvous port is remapped to a free
  one (pods have their own network namespace, this machine does not).
- Volumes: each volumeMount's mountPath is mapped to a local directory; workingDir /app is the repo.
- podFailurePolicy: `policy_action` evaluates the rules like the Job controller does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Resource = dict[str, Any]


def find(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    hits = [r for r in resources if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    if len(hits) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(hits)}")
    return hits[0]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _field_ref(path: str, pod: dict[str, Any]) -> str:
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str(pod["metadata"][m.group(1)][m.group(2)])
    values = {"status.podIP": "127.0.0.1", "metadata.name": pod["metadata"]["name"],
              "metadata.namespace": "default", "spec.nodeName": "localhost"}
    if path not in values:
        raise KeyError(f"fieldRef {path} is not simulated")
    return values[path]


def pod_env(resources: list[Resource], job: Resource, index: int, uid: str) -> dict[str, str]:
    """The container environment of pod `index` of the Indexed Job `job`."""
    name = job["metadata"]["name"]
    pod = {"metadata": {
        "name": f"{name}-{index}-abcde",
        "labels": {**job["spec"]["template"]["metadata"].get("labels", {}),
                   "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                   "batch.kubernetes.io/job-completion-index": str(index)},
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
    }}
    container = job["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{name}-{index}"}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        elif "secretRef" in source:
            secret = find(resources, "Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            env[var["name"]] = _field_ref(var["valueFrom"]["fieldRef"]["fieldPath"], pod)
    return env


@dataclass
class LocalPod:
    index: int
    proc: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_pod(resources: list[Resource], job: Resource, index: int, *, repo: Path, volumes: dict[str, Path],
              port: int, log: Path, base_env: dict[str, str], uid: str = "6f1c2d3e-uid") -> LocalPod:
    """Start pod `index`'s container command, unmodified, as a local process (its own session)."""
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    subdomain = spec["subdomain"]
    env = pod_env(resources, job, index, uid)
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in volumes}

    def localize(value: str) -> str:
        value = re.sub(rf"\b[a-z0-9-]+\.{re.escape(subdomain)}(\.[a-z0-9.-]+)?:\d+", f"127.0.0.1:{port}", value)
        for mount_path, local in mounts.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(local) + value[len(mount_path):]
        return value

    env = {k: localize(v) for k, v in env.items()}
    argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
    workdir = container.get("workingDir", "/app")
    if workdir != "/app":
        raise ValueError(f"workingDir {workdir} is not the image's /app (where the repo is copied)")
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=repo, env={**base_env, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    return LocalPod(index, proc, log)


def policy_action(job: Resource, exit_code: int, container: str, conditions: tuple[str, ...] = ()) -> str:
    """The podFailurePolicy action for a failed pod: FailJob, FailIndex, Ignore, Count (the default)."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            if on_codes.get("containerName", container) != container or exit_code == 0:
                continue
            inside = exit_code in on_codes["values"]
            if inside == (on_codes["operator"] == "In"):
                return str(rule["action"])
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond.get("status", "True") == "True":
                return str(rule["action"])
    return "Count"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_pods(pods: list[LocalPod]) -> None:
    """SIGKILL what is left of each pod: torchrun.sh, torchrun and the workers (in their own sessions)."""
    for pod in pods:
        for pid in [pod.proc.pid, *_descendants(pod.proc.pid)] if pod.proc.poll() is None else []:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            pod.proc.wait(10)
