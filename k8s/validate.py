#!/usr/bin/env python3
"""Validate the rendered ``k8s/`` manifests offline, as an API server would, but stricter.

* Core kinds (Namespace, ServiceAccount, Role, Deployment, NetworkPolicy, ...) against the
  Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, in strict mode (unknown
  fields are errors, as with ``kubectl apply --validate=strict``).
* KubeRay (RayCluster, RayJob, RayCronJob) and prometheus-operator (PodMonitor) kinds against
  the ``openAPIV3Schema`` of their real CRDs, vendored in ``k8s/schemas`` (see SOURCE.md). An
  API server prunes unknown fields of a custom resource silently; here they are errors too,
  so a misspelt field fails instead of being dropped. Their ``metadata`` is checked as
  Kubernetes ObjectMeta. Not checked: the CRDs' CEL rules (``x-kubernetes-validations``, 12
  in all, about immutable fields and ``managedBy``) and list-map key uniqueness.

Usage: ``python k8s/validate.py [KUSTOMIZATION_DIR ...]`` (default: every overlay); renders
each with ``kubectl kustomize`` and prints one line per problem; exit status 1 if any.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

K8S_DIR = Path(__file__).resolve().parent
SCHEMA_DIR = K8S_DIR / "schemas"
K8S_VERSION = "1.32"
"""Kubernetes version the core kinds are validated against (KubeRay 1.7 supports it)."""
CRDS: dict[tuple[str, str], str] = {
    ("ray.io/v1", "RayCluster"): "kuberay/ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "kuberay/ray.io_rayjobs.yaml",
    ("ray.io/v1", "RayCronJob"): "kuberay/ray.io_raycronjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
}


class RenderError(Exception):
    """``kubectl kustomize`` failed or is missing."""


def render(kustomization: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k DIR`` would send, in order."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise RenderError("kubectl not found: it renders the kustomizations (`kubectl kustomize`)")
    r = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RenderError(f"{kustomization}: kubectl kustomize failed: {r.stderr.strip().splitlines()[-1:]}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden wherever the CRD lists the known ones."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict_props(v) if k == "properties" else _strict(v)) for k, v in schema.items()}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _strict_props(props: dict[str, Any]) -> dict[str, Any]:
    # Keys here are field names, not schema keywords: recurse into each field's schema only.
    return {name: _strict(s) for name, s in props.items()}


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: these CRDs are megabytes
    crd = yaml.load((SCHEMA_DIR / CRDS[(api_version, kind)]).read_text(), Loader=loader)
    version = api_version.split("/")[1]
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_strict(entry["schema"]["openAPIV3Schema"]))


def _where(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def validate(doc: dict[str, Any]) -> list[str]:
    """Problems with one object, each a line ``Kind/name: field.path: message``."""
    import kubernetes_validate

    where = _where(doc)
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRDS:
        errors = sorted(crd_validator(*key).iter_errors(doc), key=lambda e: list(e.absolute_path))
        problems = [f"{where}: {_path(e.absolute_path)}: {e.message}" for e in errors]
        # Custom resources' metadata is plain `object` in the CRD: check it as ObjectMeta.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": copy.deepcopy(doc.get("metadata") or {})}
        try:
            kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}: {_path(e.path)}: {e.message}")
        return problems
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {_path(e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: no schema for {key[0]} {key[1]} (Kubernetes {K8S_VERSION}): {e.message}"]
    return []


def validate_all(docs: list[dict[str, Any]]) -> list[str]:
    return [p for d in docs for p in validate(d)]


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or sorted(
        p for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    bad = 0
    for d in dirs:
        try:
            docs = render(d)
        except RenderError as exc:
            print(f"ERROR {exc}")
            bad += 1
            continue
        problems = validate_all(docs)
        for p in problems:
            print(f"ERROR {d}: {p}")
        bad += len(problems)
        if not problems:
            print(f"ok {d}: {len(docs)} objects valid ({', '.join(sorted({x['kind'] for x in docs}))})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
