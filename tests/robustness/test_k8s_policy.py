"""A policy check of the rendered k8s/ manifests: what a cluster's admission policy would ask of them.

Every overlay is rendered as ``kubectl apply -k`` would send it (``k8s/validate.py``'s
``render``, i.e. ``kubectl kustomize``). Pod templates are found by walking every object for a
pod spec (a mapping with a ``containers`` list), so a template added anywhere (a new worker
group, a Deployment, a CronJob) is checked without touching this file. Checked:

* pods: non-root (pod or every container), no host namespaces, no hostPath, no privileged
  container, no privilege escalation, capabilities ``drop: [ALL]`` and none added, a
  read-only root filesystem with a bounded emptyDir at ``/tmp`` for what must be written
  (:data:`WRITABLE_ROOT` lists the exceptions and why: none today), no API token mounted
  except in the autoscaling head;
* the containers KubeRay adds by itself: the autoscaler (``autoscalerOptions``: same
  hardening, and the head pod's ``/tmp`` and ``/tmp/ray``) and the workers' ``wait-gcs-ready``
  init container (KubeRay copies the Ray container's securityContext and mounts into it);
* secrets: no Secret object, an env var named like a credential only from a ``secretKeyRef``,
  nothing that looks like a key, token or password in any value, ConfigMap or command line;
* network: token authentication on every Ray cluster, no NodePort/LoadBalancer/Ingress, and
  NetworkPolicies evaluated (a small evaluator below) for who reaches the head's dashboard/Jobs
  API (8265), GCS (6379) and Ray Client (10001) ports: amalgam's own Ray pods, plus, for 8265
  only, the namespace's RayJob submitters and the KubeRay operator; nobody else.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
NAMESPACE = "amalgam"

_spec = importlib.util.spec_from_file_location("k8s_validate_policy", K8S / "validate.py")
kv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)

# (object, container) -> why its root filesystem must stay writable. Empty: every container
# runs read-only; Ray's writes go to emptyDirs at /tmp and /tmp/ray, amalgam's to $AMALGAM_HOME.
# An entry needs a reason a reviewer can check, e.g. "image X writes its config to /etc/x at start".
WRITABLE_ROOT: dict[tuple[str, str], str] = {}

CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)
# Shapes of real secrets, for any string anywhere in the manifests.
SECRET_SHAPES = [
    re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # credentials inside a URL
    re.compile(r"(?i)\b(?:aws_secret_access_key|auth_token|password)\s*[:=]\s*\S{6,}"),
]
# A long run of key-like characters: suspicious in an env value or a config literal.
_KEYLIKE = re.compile(r"[A-Za-z0-9+=_-]{32,}")


def key_like(s: str) -> bool:
    """A run of 32+ key characters mixing letters and digits (hex or base64 keys, tokens)."""
    return any(re.search(r"\d", m) and re.search(r"[A-Za-z]", m) for m in _KEYLIKE.findall(s))


RAY_HEAD_PORTS = {"dashboard": 8265, "gcs": 6379, "client": 10001}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kv.render(K8S / "overlays" / name) for name in OVERLAYS}


def test_every_overlay_is_covered():
    assert {"local", "prod"} <= set(OVERLAYS)


# --- finding pod templates ----------------------------------------------------------------


@dataclass
class PodTemplate:
    where: str  # "Kind/name path.to.spec"
    doc: dict
    spec: dict
    labels: dict[str, str] = field(default_factory=dict)


def _walk(node: Any, path: tuple) -> Iterator[tuple[tuple, dict]]:
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list) and all(isinstance(c, dict) and "image" in c for c in node["containers"]):
            yield path, node
            return
        for k, v in node.items():
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def _get(doc: dict, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def pod_templates(docs: list[dict]) -> list[PodTemplate]:
    out = []
    for doc in docs:
        for path, spec in _walk(doc.get("spec", {}), ("spec",)):
            meta = _get(doc, path[:-1]).get("metadata", {}) if path[-1] == "spec" else {}
            out.append(PodTemplate(f"{doc['kind']}/{doc['metadata']['name']} {'.'.join(map(str, path))}", doc, spec,
                                   dict(meta.get("labels") or {})))
    return out


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def ray_cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] == "RayCluster":
        yield name, doc["spec"]
    if doc["kind"] in ("RayJob", "RayCronJob"):
        job = doc["spec"].get("jobTemplate", doc["spec"])
        if "rayClusterSpec" in job:
            yield f"{name} rayClusterSpec", job["rayClusterSpec"]


def test_the_walk_finds_every_pod_template(rendered):
    """Head, every worker group, the submitters, and the local overlay's MinIO and bucket Job."""
    found = {o: {t.where for t in pod_templates(docs)} for o, docs in rendered.items()}
    expected = {
        "RayCluster/amalgam spec.headGroupSpec.template.spec",
        "RayCluster/amalgam spec.workerGroupSpecs.0.template.spec",
        "RayJob/amalgam-mnist-fashion-4 spec.submitterPodTemplate.spec",
        "RayCronJob/amalgam-retrain spec.jobTemplate.submitterPodTemplate.spec",
        "RayCronJob/amalgam-retrain spec.jobTemplate.rayClusterSpec.headGroupSpec.template.spec",
        "RayCronJob/amalgam-retrain spec.jobTemplate.rayClusterSpec.workerGroupSpecs.0.template.spec",
    }
    assert found["local"] == expected | {"Deployment/amalgam-s3 spec.template.spec", "Job/amalgam-s3-bucket spec.template.spec"}
    assert found["prod"] == expected | {"RayCluster/amalgam spec.workerGroupSpecs.1.template.spec"}  # the GPU group


# --- pods ---------------------------------------------------------------------------------


def _sc(pod: dict, c: dict, key: str) -> Any:
    """A security setting as Kubernetes resolves it: the container's, else the pod's."""
    return (c.get("securityContext") or {}).get(key, (pod.get("securityContext") or {}).get(key))


def _hardened(sc: dict | None) -> list[str]:
    sc = sc or {}
    problems = []
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append("privileged")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        problems.append("capabilities do not drop ALL")
    if caps.get("add"):
        problems.append(f"capabilities added: {caps['add']}")
    return problems


def _volumes(pod: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def _writable_tmp(pod: dict, c: dict) -> str | None:
    """Why ``c`` has no usable /tmp, or None: an emptyDir with a size limit, mounted read-write."""
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"), None)
    if mount is None:
        return "no volume at /tmp"
    vol = _volumes(pod).get(mount["name"])
    if vol is None or "emptyDir" not in vol:
        return f"/tmp is {mount['name']!r}, not an emptyDir of the pod"
    if mount.get("readOnly"):
        return "/tmp is mounted read-only"
    if not (vol["emptyDir"] or {}).get("sizeLimit"):
        return "/tmp's emptyDir has no sizeLimit (a full /tmp would fill the node's disk)"
    return None


def pod_problems(docs: list[dict]) -> tuple[list[str], set[tuple[str, str]]]:
    """Every breach of the pod rules in ``docs``, and the WRITABLE_ROOT exceptions that were needed."""
    problems: list[str] = []
    exceptions_used: set[tuple[str, str]] = set()
    for t in pod_templates(docs):
        pod = t.spec
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{t.where}: {flag}")
        for v in pod.get("volumes", []):
            if "hostPath" in v:
                problems.append(f"{t.where}: hostPath volume {v['name']}")
        if (pod.get("securityContext") or {}).get("seccompProfile") != {"type": "RuntimeDefault"}:
            problems.append(f"{t.where}: seccompProfile is not RuntimeDefault")
        for c in containers(pod):
            where = f"{t.where} container {c['name']}"
            if _sc(pod, c, "runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if _sc(pod, c, "runAsUser") == 0:
                problems.append(f"{where}: runAsUser 0")
            problems += [f"{where}: {p}" for p in _hardened(c.get("securityContext"))]
            key = (f"{t.doc['kind']}/{t.doc['metadata']['name']}", c["name"])
            if _sc(pod, c, "readOnlyRootFilesystem") is not True:
                if key in WRITABLE_ROOT:
                    exceptions_used.add(key)
                else:
                    problems.append(f"{where}: readOnlyRootFilesystem is not true (or list it in WRITABLE_ROOT, with why)")
            elif (why := _writable_tmp(pod, c)) is not None:
                problems.append(f"{where}: read-only root but {why}")
    return problems, exceptions_used


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_unprivileged_and_read_only(rendered, overlay):
    problems, _ = pod_problems(rendered[overlay])
    assert problems == []


def test_no_stale_writable_root_exception(rendered):
    """An exception no container needs any more is a hole waiting to be reused."""
    used = set().union(*(pod_problems(docs)[1] for docs in rendered.values()))
    assert set(WRITABLE_ROOT) == used


def test_the_pod_checks_catch_a_weakened_container(rendered):
    import copy

    docs = copy.deepcopy(rendered["prod"])
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    sc = head["containers"][0]["securityContext"]
    sc.update(readOnlyRootFilesystem=False, allowPrivilegeEscalation=True)
    sc["capabilities"] = {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["securityContext"]["runAsNonRoot"] = False
    del worker["containers"][0]["securityContext"]["runAsNonRoot"]
    worker["volumes"] = [v for v in worker["volumes"] if v["name"] != "tmp"]
    problems, _ = pod_problems(docs)
    head_c = "RayCluster/amalgam spec.headGroupSpec.template.spec container ray-head"
    worker_c = "RayCluster/amalgam spec.workerGroupSpecs.0.template.spec container ray-worker"
    assert f"{head_c}: allowPrivilegeEscalation is not false" in problems
    assert f"{head_c}: capabilities added: ['NET_ADMIN']" in problems
    assert any(p.startswith(f"{head_c}: readOnlyRootFilesystem is not true") for p in problems)
    assert f"{worker_c}: runAsNonRoot is not true" in problems
    assert f"{worker_c}: read-only root but /tmp is 'tmp', not an emptyDir of the pod" in problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_containers_write_only_to_their_volumes(rendered, overlay):
    """Ray's session dir is its own bounded emptyDir at /tmp/ray, mounted after /tmp (parent first)."""
    n = 0
    for t in pod_templates(rendered[overlay]):
        for c in t.spec["containers"]:
            if not c["name"].startswith("ray-") or c["name"] == "ray-job-submitter":
                continue
            paths = [m["mountPath"] for m in c["volumeMounts"]]
            assert "/tmp/ray" in paths and paths.index("/tmp") < paths.index("/tmp/ray"), (t.where, paths)
            ray_tmp = _volumes(t.spec)[c["volumeMounts"][paths.index("/tmp/ray")]["name"]]
            assert ray_tmp["emptyDir"]["sizeLimit"], t.where
            n += 1
    assert n >= 4


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_kuberay_adds_are_hardened_too(rendered, overlay):
    """The autoscaler sidecar gets autoscalerOptions.securityContext and volumeMounts (KubeRay
    copies them in as given); ``wait-gcs-ready`` copies the worker's Ray container, checked above."""
    seen = 0
    for doc in rendered[overlay]:
        for where, spec in ray_cluster_specs(doc):
            if not spec.get("enableInTreeAutoscaling"):
                continue
            opts = spec["autoscalerOptions"]
            sc = opts["securityContext"]
            assert _hardened(sc) == [] and sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, where
            head = spec["headGroupSpec"]["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in opts.get("volumeMounts", [])}
            ray_mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
            # The same volumes as the head's Ray container: the autoscaler's logs land where the head reads them.
            assert mounts == {p: ray_mounts[p] for p in ("/tmp", "/tmp/ray")}, where
            seen += 1
    assert seen == 1  # the long-running cluster autoscales; the cron job's cluster is fixed-size


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_autoscaling_head_gets_an_api_token(rendered, overlay):
    docs = rendered[overlay]
    automount = {sa["metadata"]["name"]: sa.get("automountServiceAccountToken", True)
                 for sa in docs if sa["kind"] == "ServiceAccount"}
    for t in pod_templates(docs):
        sa = t.spec.get("serviceAccountName", "default")
        mounted = t.spec.get("automountServiceAccountToken", automount.get(sa, True))
        if mounted:
            assert sa == "amalgam-ray-head" and t.doc["kind"] == "RayCluster" and "headGroupSpec" in t.where, t.where


# --- secrets ------------------------------------------------------------------------------


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}.{i}")
    elif isinstance(node, str):
        yield path, node


def secret_problems(docs: list[dict]) -> list[str]:
    """Every credential the rendered objects would carry inline."""
    # Secrets are created out of band (k8s/create-secrets.sh), never rendered from git.
    problems = [f"Secret/{d['metadata']['name']}: a Secret in the manifests" for d in docs if d["kind"] == "Secret"]
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for path, s in _strings(doc):
            for shape in SECRET_SHAPES:
                if shape.search(s):
                    problems.append(f"{name} {path}: looks like a credential ({shape.pattern})")
    for t in pod_templates(docs):
        for c in containers(t.spec):
            for e in c.get("env", []):
                where = f"{t.where} {c['name']} env {e['name']}"
                if CREDENTIAL_NAME.search(e["name"]):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if "value" in e or not ref:
                        problems.append(f"{where}: a credential must come from a secretKeyRef")
                elif "value" in e and key_like(str(e["value"])):
                    problems.append(f"{where}: value looks like a key")
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ef["configMapRef"]["name"])
                    for key, value in (cm.get("data") or {}).items():
                        if CREDENTIAL_NAME.search(key):
                            problems.append(f"{t.where}: ConfigMap {cm['metadata']['name']} has credential-like key {key}")
                        if key_like(value):
                            problems.append(f"{t.where}: ConfigMap {cm['metadata']['name']} {key} looks like a key")
            for arg in c.get("command", []) + c.get("args", []):
                if key_like(arg) or ("=" in arg and CREDENTIAL_NAME.search(arg.split("=")[0])):
                    problems.append(f"{t.where} {c['name']}: command line carries {arg[:40]!r}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_inline(rendered, overlay):
    assert secret_problems(rendered[overlay]) == []


def test_the_secret_checks_catch_inline_credentials(rendered):
    """The checks above fail on the mistakes they exist for."""
    import copy

    docs = copy.deepcopy(rendered["prod"])
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"][1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
    head["env"].append({"name": "S3_URL", "value": "s3://AKIAIOSFODNN7EXAMPLE:x@bucket"})
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "oops"}, "data": {"k": "dg=="}})
    problems = secret_problems(docs)
    env = "RayCluster/amalgam spec.headGroupSpec.template.spec ray-head env"
    assert "Secret/oops: a Secret in the manifests" in problems
    assert f"{env} AWS_SECRET_ACCESS_KEY: a credential must come from a secretKeyRef" in problems
    assert any(p.startswith("RayCluster/amalgam spec.headGroupSpec.template.spec.containers.0.env.2.value: looks like "
                            "a credential") for p in problems), problems
    assert len(problems) == 4  # the URL matches two shapes (an AWS key id, credentials in a URL)


# --- network ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_token_auth_and_no_public_endpoint(rendered, overlay):
    docs = rendered[overlay]
    specs = [s for d in docs for s in ray_cluster_specs(d)]
    assert specs and all(s["authOptions"]["mode"] == "token" for _, s in specs)
    for d in docs:
        assert d["kind"] != "Ingress", d["metadata"]["name"]
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    for _, s in specs:
        assert s["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


@dataclass(frozen=True)
class Peer:
    """A pod somewhere in the cluster: its namespace's labels and its own."""

    namespace: str
    labels: tuple[tuple[str, str], ...]

    @property
    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def _matches(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    assert not selector.get("matchExpressions"), "the evaluator knows matchLabels only: extend it"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_admitted(entry: dict, src: Peer, policy_ns: str) -> bool:
    assert "ipBlock" not in entry, "ipBlock peers are not expected here"
    ns_sel, pod_sel = entry.get("namespaceSelector"), entry.get("podSelector")
    ns_ok = _matches(ns_sel, src.ns_labels) if ns_sel is not None else src.namespace == policy_ns
    pod_ok = _matches(pod_sel, dict(src.labels)) if pod_sel is not None else True
    return ns_ok and pod_ok


def _port_admitted(rule: dict, port: int, named: dict[str, int]) -> bool:
    ports = rule.get("ports") or []
    if not ports:
        return True
    for p in ports:
        assert p.get("protocol", "TCP") == "TCP"
        want = named.get(p["port"]) if isinstance(p["port"], str) else p["port"]
        if want == port:
            return True
    return False


def ingress_allowed(policies: list[dict], target_labels: dict[str, str], named_ports: dict[str, int],
                    src: Peer, port: int) -> bool:
    """NetworkPolicy semantics (ingress, TCP): isolated if any policy selects the pod; then
    allowed if any rule of any selecting policy admits the source on the port."""
    selecting = [p for p in policies if p["metadata"].get("namespace") == NAMESPACE
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _matches(p["spec"]["podSelector"], target_labels)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress") or []:
            sources = rule.get("from") or []
            if (not sources or any(_peer_admitted(e, src, NAMESPACE) for e in sources)) \
                    and _port_admitted(rule, port, named_ports):
                return True
    return False


def _kuberay_labels(doc: dict, where: str, labels: dict[str, str]) -> dict[str, str]:
    """The labels KubeRay puts on the pods it creates from a Ray template (on top of the template's)."""
    if "headGroupSpec" in where:
        return {**labels, "ray.io/node-type": "head", "ray.io/is-ray-node": "yes", "ray.io/cluster": doc["metadata"]["name"]}
    if "workerGroupSpecs" in where:
        return {**labels, "ray.io/node-type": "worker", "ray.io/is-ray-node": "yes", "ray.io/cluster": doc["metadata"]["name"]}
    return labels


def _pods(docs: list[dict]) -> list[tuple[str, dict[str, str], dict[str, int]]]:
    out = []
    for t in pod_templates(docs):
        named = {p["name"]: p["containerPort"] for c in t.spec["containers"] for p in c.get("ports", []) if "name" in p}
        out.append((t.where, _kuberay_labels(t.doc, t.where, t.labels), named))
    return out


def _peer(namespace: str, **labels: str) -> Peer:
    return Peer(namespace, tuple(sorted(labels.items())))


def head_problems(docs: list[dict]) -> list[str]:
    """Who reaches the Ray heads' ports but should not, or should but cannot."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = _pods(docs)
    heads = [p for p in pods if "headGroupSpec" in p[0]]
    assert len(heads) == 2  # the long-running cluster's, and the cron job's own cluster's
    worker = next(labels for where, labels, _ in pods if "workerGroupSpecs" in where)
    submitter = next(labels for where, labels, _ in pods if "submitterPodTemplate" in where)
    allowed = {
        "a Ray worker of this namespace": (_peer(NAMESPACE, **worker), {"dashboard", "gcs", "client"}),
        "a RayJob submitter of this namespace": (_peer(NAMESPACE, **submitter), {"dashboard"}),
        "the KubeRay operator": (_peer("ray-system", **{"app.kubernetes.io/name": "kuberay-operator"}), {"dashboard"}),
    }
    denied = {
        "another pod of this namespace": _peer(NAMESPACE, app="notebook"),
        "a pod of another namespace": _peer("default", app="anything"),
        "a pod of another namespace labelled like a submitter": _peer("default", **submitter),
        "a pod of another namespace labelled like a Ray worker": _peer("other", **worker),
        "Prometheus": _peer("monitoring", **{"app.kubernetes.io/name": "prometheus"}),
    }
    problems = []
    for where, labels, named in heads:
        for who, (src, ports) in allowed.items():
            for name, port in RAY_HEAD_PORTS.items():
                if ingress_allowed(policies, labels, named, src, port) != (name in ports):
                    problems.append(f"{where}: {who} {'denied' if name in ports else 'admitted'} on {name} ({port})")
        for who, src in denied.items():
            for name, port in RAY_HEAD_PORTS.items():
                if ingress_allowed(policies, labels, named, src, port):
                    problems.append(f"{where}: {who} admitted on {name} ({port})")
        # Prometheus scrapes metrics, nothing else.
        prom = denied["Prometheus"]
        if not ingress_allowed(policies, labels, named, prom, 8080):
            problems.append(f"{where}: Prometheus cannot scrape Ray's metrics (8080)")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_confines_the_ray_head(rendered, overlay):
    assert head_problems(rendered[overlay]) == []


def test_the_network_checks_catch_an_open_head(rendered):
    import copy

    docs = copy.deepcopy(rendered["prod"])
    [head] = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "amalgam-ray-head"]
    [jobs_api] = [r for r in head["spec"]["ingress"] if {"port": 8265, "protocol": "TCP"} in r.get("ports", [])]
    jobs_api["from"][0]["namespaceSelector"] = {}  # "submitters of any namespace"
    head["spec"]["ingress"][0]["ports"] = [{"protocol": "TCP", "port": 8265}]  # Ray's own pods: dashboard only
    problems = head_problems(docs)
    where = "RayCluster/amalgam spec.headGroupSpec.template.spec"
    assert f"{where}: a pod of another namespace labelled like a submitter admitted on dashboard (8265)" in problems
    assert f"{where}: a Ray worker of this namespace denied on gcs (6379)" in problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_closed_to_strangers(rendered, overlay):
    """A default-deny policy covers every pod: a pod of another namespace reaches none of them on
    any port (Prometheus' metrics ports aside), and nor does a stray pod of this namespace."""
    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), "no default deny"
    strangers = [_peer("default", app="anything"), _peer(NAMESPACE, app="notebook")]
    some_ports = [22, 80, 443, 6379, 8000, 8265, 9000, 10001, 52365]
    problems = [f"{where}: {src} reaches port {port}"
                for where, labels, named in _pods(docs) for src in strangers for port in some_ports
                if ingress_allowed(policies, labels, named, src, port)]
    assert problems == []
