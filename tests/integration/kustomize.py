"""The subset of kustomize that k8s/ uses, in Python, so the overlays render without a kustomize binary.

Supported: `resources` (YAML files and kustomization dirs), `components`, `images`, and `patches`
given as JSON 6902 operations (inline or from a file) with a kind/name `target`. Anything else in a
kustomization raises, so a manifest that starts using more of kustomize fails here loudly instead of
rendering wrong. When `kubectl` is installed the tests compare this renderer with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches", "images"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot (or must not) render."""


def _load_kustomization(directory: Path, kind: str) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.exists():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    if k.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{path}: expected kind {kind}, found {k.get('kind')}")
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: fields {sorted(unknown)} are not supported by tests/integration/kustomize.py")
    return k


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        try:
            doc = doc[int(part)] if isinstance(doc, list) else doc[part]
        except (KeyError, IndexError, ValueError) as e:
            raise KustomizeError(f"patch path {path!r}: {part!r} not found") from e
    return doc


def apply_json6902(doc: Resource, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        parts = _pointer(op["path"])
        parent = _walk(doc, parts[:-1], op["path"])
        last = parts[-1]
        if op["op"] == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), value)
            else:
                parent[last] = value
        elif op["op"] == "replace":
            _walk(parent, [last], op["path"])  # must exist
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            _walk(parent, [last], op["path"])
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise KustomizeError(f"JSON patch op {op['op']!r} is not supported")


def _matches(resource: Resource, target: dict[str, Any]) -> bool:
    for key in target:
        if key not in ("kind", "name"):
            raise KustomizeError(f"patch target field {key!r} is not supported")
    return (target.get("kind") in (None, resource["kind"])
            and target.get("name") in (None, resource["metadata"]["name"]))


def _patch(resources: list[Resource], patches: list[dict[str, Any]], base: Path) -> None:
    for p in patches:
        text = (base / p["path"]).read_text() if "path" in p else p["patch"]
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise KustomizeError(f"{base}: only JSON 6902 patches (a list of operations) are supported")
        for r in resources:
            if _matches(r, p.get("target", {})):
                apply_json6902(r, ops)


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """Rewrite `image:` of every container (kustomize does this in any resource kind)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    _retag(c, images)
            _set_images(value, images)
    elif isinstance(node, list):
        for value in node:
            _set_images(value, images)


def _retag(container: dict[str, Any], images: list[dict[str, str]]) -> None:
    image = container.get("image", "")
    name, _, tag = image.partition(":")
    for rule in images:
        if rule["name"] == name:
            new = rule.get("newName", name)
            new_tag = rule.get("newTag", tag)
            container["image"] = f"{new}:{new_tag}" if new_tag else new


def _load_resources(entry: str, base: Path) -> list[Resource]:
    path = (base / entry).resolve()
    if path.is_dir():
        return render(path)
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _apply(k: dict[str, Any], directory: Path, resources: list[Resource]) -> None:
    for entry in k.get("resources", []):
        resources.extend(_load_resources(entry, directory))
    for comp in k.get("components", []):
        comp_dir = (directory / comp).resolve()
        _apply(_load_kustomization(comp_dir, "Component"), comp_dir, resources)
    _patch(resources, k.get("patches", []), directory)
    if k.get("images"):
        for r in resources:
            _set_images(r, k["images"])


def render(directory: Path) -> list[Resource]:
    """The resources `kustomize build DIRECTORY` would print, as dicts."""
    resources: list[Resource] = []
    _apply(_load_kustomization(directory, "Kustomization"), directory, resources)
    seen: set[tuple[str, str]] = set()
    for r in resources:
        key = (r["kind"], r["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{directory}: {key[0]}/{key[1]} is defined twice")
        seen.add(key)
    return resources
