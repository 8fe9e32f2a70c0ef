"""k8s/ manifests, checked offline: rendered overlays, schemas, and the invariants preemption relies on."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.integration.k8s_local import find, policy_action
from tests.integration.kustomize import render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the API version the built-in kinds are validated against
CRD_SCHEMA = Path(__file__).parent / "schemas" / "pytorchjob-kubeflow-v1.json"
JOB_OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]
PYTORCHJOB_OVERLAYS = ["pytorchjob", "overlays/pytorchjob-cpu", "overlays/pytorchjob-gpu"]
ALL = JOB_OVERLAYS + PYTORCHJOB_OVERLAYS


def _container_env(container: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, str]:
    """Plain env values a container gets (envFrom ConfigMaps, then env); fieldRefs as 'fieldRef:<path>'."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value") or f"fieldRef:{var['valueFrom']['fieldRef']['fieldPath']}"
    return env


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Job":
        return workload["spec"]["template"]["spec"]
    return workload["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def _workload(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in resources if r["kind"] in ("Job", "PyTorchJob"))


@pytest.mark.parametrize("overlay", ALL)
def test_python_renderer_matches_kubectl_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the Python renderer alone is used")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=lambda r: (r["kind"], r["metadata"]["name"]))
    ours = sorted(render(K8S / overlay), key=lambda r: (r["kind"], r["metadata"]["name"]))
    assert ours == theirs


@pytest.mark.parametrize("overlay", ALL)
def test_builtin_kinds_validate_against_the_kubernetes_schema(overlay: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in the dev extras)")
    builtin = [r for r in render(K8S / overlay) if r["kind"] != "PyTorchJob"]
    assert builtin
    for resource in builtin:
        kv.validate(resource, KUBERNETES_VERSION, strict=True)  # strict: unknown fields are errors


def _strict(schema: Any) -> Any:
    """A CRD schema where unknown fields are errors, as `kubectl apply` (strict field validation) makes them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _pytorchjob_validator() -> jsonschema.Draft7Validator:
    schema = _strict(json.loads(CRD_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("overlay", PYTORCHJOB_OVERLAYS)
def test_pytorchjob_validates_against_its_crd_schema(overlay: str) -> None:
    job = find(render(K8S / overlay), "PyTorchJob")
    errors = sorted(_pytorchjob_validator().iter_errors(job), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_crd_schema_rejects_misspelled_and_mistyped_fields() -> None:
    job = find(render(K8S / "pytorchjob"), "PyTorchJob")
    validator = _pytorchjob_validator()
    typo = copy.deepcopy(job)
    typo["spec"]["elasticPolicy"]["rdzvbackend"] = typo["spec"]["elasticPolicy"].pop("rdzvBackend")
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["elasticPolicy"]["maxRestarts"] = "ten"
    for bad in (typo, wrong_type):
        assert list(validator.iter_errors(bad))


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_indexed_job_rendezvous_reaches_pod_zero_through_the_headless_service(overlay: str) -> None:
    resources = render(K8S / overlay)
    job, service = find(resources, "Job"), find(resources, "Service")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = _container_env(container, resources)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"])
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    host, port = env["RDZV_ENDPOINT"].split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert env["RDZV_ID"] == "fieldRef:metadata.labels['batch.kubernetes.io/controller-uid']"
    assert env["DTRAIN_JOB_ID"] == env["RDZV_ID"]  # the lease's job id: the same for every pod of the Job
    assert env["LOCAL_ADDR"] == "fieldRef:status.podIP"


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_indexed_job_does_not_count_preemption_against_backoff_limit(overlay: str) -> None:
    job = find(render(K8S / overlay), "Job")
    pod = job["spec"]["template"]["spec"]
    name = pod["containers"][0]["name"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert policy_action(job, 75, name) == "Ignore"
    assert policy_action(job, 137, name, ("DisruptionTarget",)) == "Ignore"
    assert policy_action(job, 2, name) == "FailJob"
    assert policy_action(job, 1, name) == "Count"
    assert job["spec"]["backoffLimit"] >= 1


@pytest.mark.parametrize("overlay", ALL)
def test_grace_period_covers_the_emergency_checkpoint(overlay: str) -> None:
    resources = render(K8S / overlay)
    workload = _workload(resources)
    pod = _pod_spec(workload)
    env = _container_env(pod["containers"][0], resources)
    assert pod["terminationGracePeriodSeconds"] >= int(env["SHUTDOWN_TIMEOUT"]) + 30
    assert pod["containers"][0]["command"] == ["launch/torchrun.sh"]
    assert pod["containers"][0]["workingDir"] == "/app"


@pytest.mark.parametrize("overlay", ALL)
def test_every_reference_resolves_to_a_rendered_resource(overlay: str) -> None:
    resources = render(K8S / overlay)
    pod = _pod_spec(_workload(resources))
    container = pod["containers"][0]
    for source in container.get("envFrom", []):
        kind, ref = ("ConfigMap", "configMapRef") if "configMapRef" in source else ("Secret", "secretRef")
        find(resources, kind, source[ref]["name"])
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            find(resources, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    env = _container_env(container, resources)
    for arg in container["args"]:
        for var in re.findall(r"\$\(([A-Z_]+)\)", arg):
            assert env.get(var), f"{arg} refers to ${var}, which is empty or undefined"


@pytest.mark.parametrize("overlay", PYTORCHJOB_OVERLAYS)
def test_pytorchjob_is_elastic_and_restarts_on_exit_75(overlay: str) -> None:
    resources = render(K8S / overlay)
    job = find(resources, "PyTorchJob")
    elastic, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"  # the operator looks for this container and its port
    assert {"name": "pytorchjob-port", "containerPort": elastic["rdzvPort"]} in container["ports"]
    assert elastic["rdzvBackend"] == "c10d"
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    # ExitCode would treat 75 (1-127) as permanent; OnFailure restarts the container.
    assert worker["restartPolicy"] == "OnFailure"
    env = _container_env(container, resources)
    assert env["MAX_RESTARTS"] == str(elastic["maxRestarts"])
    assert env["DTRAIN_JOB_ID"] == "fieldRef:metadata.labels['training.kubeflow.org/job-name']"
    assert "Master" not in job["spec"]["pytorchReplicaSpecs"]


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/pytorchjob-gpu"])
def test_gpu_overlays_start_one_process_per_requested_gpu(overlay: str) -> None:
    resources = render(K8S / overlay)
    pod = _pod_spec(_workload(resources))
    container = pod["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert _container_env(container, resources)["NPROC_PER_NODE"] == gpus
    assert container["image"].endswith("-cu128")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/pytorchjob-cpu"])
def test_cpu_overlays_give_each_process_a_core(overlay: str) -> None:
    resources = render(K8S / overlay)
    container = _pod_spec(_workload(resources))["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert int(container["resources"]["requests"]["cpu"]) >= int(_container_env(container, resources)["NPROC_PER_NODE"])
    assert container["image"].endswith("-cpu")


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i)?", quantity)
    assert m, f"quantity {quantity!r} not understood by this test"
    return int(m[1]) * _UNITS.get(m[2] or "", 1)


@pytest.mark.parametrize("overlay", ALL)
def test_shared_memory_leaves_the_workers_most_of_the_memory_limit(overlay: str) -> None:
    """A memory-backed emptyDir's pages count against the container's memory limit, so /dev/shm
    may take at most a quarter of it, or the kernel OOM-kills the workers that fill it."""
    pod = _pod_spec(_workload(render(K8S / overlay)))
    (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    limit = pod["containers"][0].get("resources", {}).get("limits", {}).get("memory")
    if limit is not None:  # the base leaves resources to the components
        assert _bytes(shm["emptyDir"]["sizeLimit"]) <= _bytes(limit) // 4, (shm, limit)


def test_s3_component_takes_credentials_from_a_secret_and_an_endpoint_from_config() -> None:
    resources = render(K8S / "overlays/pytorchjob-gpu")
    container = _pod_spec(_workload(resources))["containers"][0]
    secret_names = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    secret = find(resources, "Secret", secret_names[0])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    env = _container_env(container, resources)
    assert env["CHECKPOINT_ROOT"].startswith("s3://")
    assert env["AWS_ENDPOINT_URL_S3"].startswith("https://")
    # Without the component, checkpoints stay on the PVC and no Secret is needed.
    plain = render(K8S / "overlays/cpu")
    assert not [r for r in plain if r["kind"] == "Secret"]
    assert find(plain, "ConfigMap")["data"]["CHECKPOINT_ROOT"].startswith("/runs/")


def test_dockerfile_pins_torch_like_the_makefile_and_installs_it_first() -> None:
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11")
    torch_pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert torch_pin, "Makefile has no TORCH ?= torch==X pin"
    assert f"ARG TORCH_VERSION={torch_pin.group(1)}" in instructions
    torch_install = next(i for i, ln in enumerate(instructions) if '"torch==${TORCH_VERSION}"' in ln)
    project_install = next(i for i, ln in enumerate(instructions) if 'pip install ".' in ln)
    assert torch_install < project_install
    assert "WORKDIR /app" in instructions  # the manifests' workingDir
    assert "COPY launch ./launch" in instructions and "COPY configs ./configs" in instructions
    assert (REPO / "launch" / "torchrun.sh").stat().st_mode & 0o111


def _kubernetes_part() -> str:
    readme = (REPO / "launch" / "README.md").read_text()
    return readme[readme.index("## Kubernetes"):readme.index("\n## ", readme.index("## Kubernetes") + 1)]


def test_readme_builds_the_image_tag_each_component_runs() -> None:
    built = set(re.findall(r"docker build -t \S+?:(\S+)", _kubernetes_part()))
    for component in ("cpu", "gpu"):
        k = yaml.safe_load((K8S / "components" / component / "kustomization.yaml").read_text())
        assert {image["newTag"] for image in k["images"]} <= built, (component, built)


def test_readme_grace_period_numbers_are_the_manifests() -> None:
    text = _kubernetes_part()
    grace = {int(n) for n in re.findall(r"`terminationGracePeriodSeconds` \((\d+)", text)}
    timeout = {int(n) for n in re.findall(r"`SHUTDOWN_TIMEOUT` \((\d+)", text)}
    for overlay in ("base", "pytorchjob"):
        resources = render(K8S / overlay)
        pod = _pod_spec(_workload(resources))
        assert grace == {pod["terminationGracePeriodSeconds"]}
        assert timeout == {int(_container_env(pod["containers"][0], resources)["SHUTDOWN_TIMEOUT"])}
    assert "plus one step" not in text  # the step is inside SHUTDOWN_TIMEOUT: both clocks start at SIGTERM
