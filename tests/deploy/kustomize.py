"""A small renderer for the Kustomize features deploy/kubernetes/ uses, so the tests run
where no `kubectl` is installed: `resources` (files and directories), `components`,
`images` (newName / newTag) and inline JSON 6902 `patches` with a kind/name target.
test_kubernetes.py checks it against `kubectl kustomize` wherever kubectl exists, and it
refuses any other kustomization field rather than render it wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "images", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    return _build(directory, [])


def _build(directory: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this renderer does not handle: {sorted(unknown)}")
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects = _build(path, objects)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in spec.get("components", []):
        objects = _build((directory / entry).resolve(), objects)
    for image in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    for patch in spec.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        hits = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if not hits:
            raise ValueError(f"{directory}: patch target {target} matches nothing")
        objects = [jsonpatch.apply_patch(o, ops) if o in hits else o for o in objects]
    return objects


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])
