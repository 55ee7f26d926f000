"""k8s/: every overlay renders (`kubectl kustomize`) and validates against its schema offline.

Core kinds against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict), KubeRay and
prometheus-operator kinds against their real CRDs (vendored in k8s/schemas). Broken copies
(a misspelt field, a missing required field) must fail. The rest checks the properties the
schemas cannot: versions that agree with pyproject.toml, hardened pods, secrets by reference
only, token authentication on, a NetworkPolicy that keeps the Jobs API closed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_cluster_image import base_image, pinned

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SHARED = ROOT.parent / "shared"
OVERLAYS = ("local", "prod")

_spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
kv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kv.render(K8S / "overlays" / name) for name in OVERLAYS}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def ray_cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] == "RayCluster":
        yield name, doc["spec"]
    job = doc["spec"].get("jobTemplate", doc["spec"]) if doc["kind"] in ("RayJob", "RayCronJob") else None
    if job and "rayClusterSpec" in job:
        yield f"{name} rayClusterSpec", job["rayClusterSpec"]


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every pod template an object will create pods from."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield name, doc["spec"]["template"]["spec"]
    if doc["kind"] in ("RayJob", "RayCronJob"):
        job = doc["spec"].get("jobTemplate", doc["spec"])
        if "submitterPodTemplate" in job:
            yield f"{name} submitter", job["submitterPodTemplate"]["spec"]
    for where, spec in ray_cluster_specs(doc):
        yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
        for g in spec.get("workerGroupSpecs", []):
            yield f"{where} {g['groupName']}", g["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


# --- schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_its_schema(rendered, overlay):
    docs = rendered[overlay]
    assert kv.validate_all(docs) == []
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "PodMonitor", "NetworkPolicy", "ServiceAccount", "Role",
            "RoleBinding", "ConfigMap"} <= kinds


REQUIRED = {  # a field each kind's schema requires, to delete in the broken copy
    "RayCluster": ("spec", "workerGroupSpecs", 0, "groupName"),
    "RayJob": ("spec", "submitterPodTemplate", "spec", "containers"),
    "RayCronJob": ("spec", "schedule"),
    "PodMonitor": ("spec", "selector"),
    "Role": ("rules", 0, "verbs"),
    "RoleBinding": ("roleRef",),
    "NetworkPolicy": ("spec", "podSelector"),
    "Deployment": ("spec", "selector"),
    "Job": ("spec", "template", "spec", "containers"),
    "Service": ("spec", "ports", 0, "port"),
}


def _delete(doc: dict, path: tuple) -> None:
    node = doc
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


def test_broken_copies_fail_validation(rendered):
    """A wrong field and a missing required field fail, for every object of every kind."""
    seen_missing = set()
    for doc in rendered["local"] + rendered["prod"]:
        wrong = copy.deepcopy(doc)
        (wrong["spec"] if "spec" in wrong else wrong)["replicaz"] = 1
        problems = kv.validate(wrong)
        assert problems and "'replicaz' was unexpected" in problems[0], (doc["kind"], problems)

        if doc["kind"] in REQUIRED:
            path = REQUIRED[doc["kind"]]
            missing = copy.deepcopy(doc)
            _delete(missing, path)
            problems = kv.validate(missing)
            assert problems, f"{doc['kind']} without {'.'.join(map(str, path))} passed"
            assert any(f"'{path[-1]}' is a required property" in p or "is not valid" in p or "too short" in p
                       for p in problems), problems
            seen_missing.add(doc["kind"])
    assert {"RayCluster", "RayJob", "RayCronJob", "PodMonitor", "NetworkPolicy", "Deployment"} <= seen_missing


def test_a_broken_source_file_fails_end_to_end(tmp_path):
    """Misspell a field in k8s/base: the overlay still renders, and validation names the spot."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root, ignore=shutil.ignore_patterns("schemas"))
    rc = copy_root / "base" / "raycluster.yaml"
    rc.write_text(rc.read_text().replace("    - groupName: cpu", "    - groupNam: cpu", 1))
    problems = kv.validate_all(kv.render(copy_root / "overlays" / "local"))
    assert "RayCluster/amalgam: spec.workerGroupSpecs.0: 'groupName' is a required property" in problems
    assert any("'groupNam' was unexpected" in p for p in problems)


def test_vendored_crds_are_the_shared_ones_with_licence_and_source():
    source = (K8S / "schemas" / "SOURCE.md").read_text()
    for sub, shared in (("kuberay", "kuberay-crds"), ("prometheus-operator", "prometheus-operator-crds")):
        assert (K8S / "schemas" / sub / "LICENSE").read_text().lstrip().startswith("Apache License")
        for f in (K8S / "schemas" / sub).glob("*.yaml"):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            assert f"`{digest}`" in source, f"{f.name}: sha256 not in SOURCE.md"
            if (SHARED / shared).is_dir():
                assert f.read_bytes() == (SHARED / shared / f.name).read_bytes(), f"{f.name} differs from ../shared"


# --- what the schemas cannot say ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_version_and_image_tags_agree_with_the_package(rendered, overlay):
    version, ray, _ = pinned()
    py = "py" + re.search(r"-py(\d+)$", base_image()).group(1)
    tag = re.compile(rf"^(?:[\w.-]+/)*amalgam:{re.escape(version)}-ray{re.escape(ray)}-{py}(-gpu)?$")
    images = []
    for doc in rendered[overlay]:
        for where, spec in ray_cluster_specs(doc):
            assert spec["rayVersion"] == ray, where
        for where, pod in pod_specs(doc):
            images += [(where, c["image"]) for c in containers(pod) if "amalgam" in c["image"].split("/")[-1]]
    assert images and all(tag.match(img) for _, img in images), [i for i in images if not tag.match(i[1])]
    if overlay == "prod":
        assert any(img.endswith("-gpu") for _, img in images)  # the optional GPU group


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_unprivileged_and_sized_requests_equal_limits(rendered, overlay):
    n = 0
    for doc in rendered[overlay]:
        for where, pod in pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for c in containers(pod):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
                res = c["resources"]
                assert res["requests"] == res["limits"] and {"cpu", "memory"} <= set(res["limits"]), (where, c["name"])
                n += 1
        for where, spec in ray_cluster_specs(doc):
            if spec.get("enableInTreeAutoscaling"):
                res = spec["autoscalerOptions"]["resources"]
                assert res["requests"] == res["limits"], f"{where} autoscaler"
                assert spec["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    assert n >= 6


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_secrets(rendered, overlay):
    docs = rendered[overlay]
    assert by_kind(docs, "Secret") == []  # created out of band (k8s/create-secrets.sh), never in git
    refs = set()
    for doc in docs:
        for where, pod in pod_specs(doc):
            for c in containers(pod):
                for e in c.get("env", []):
                    if SECRET_NAME.search(e["name"]):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], (where, e["name"])
                        refs.add((e["name"], e["valueFrom"]["secretKeyRef"]["name"]))
    for cm in by_kind(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not SECRET_NAME.search(key) or key == "AMALGAM_METRICS_PORT", f"{cm['metadata']['name']}: {key}"
    assert {("AWS_ACCESS_KEY_ID", "amalgam-s3"), ("AWS_SECRET_ACCESS_KEY", "amalgam-s3")} <= refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_token_authentication_is_on(rendered, overlay):
    docs = rendered[overlay]
    specs = [s for d in docs for s in ray_cluster_specs(d)]
    assert len(specs) == 2 and all(s["authOptions"]["mode"] == "token" for _, s in specs)
    [cluster] = by_kind(docs, "RayCluster")
    assert cluster["spec"]["authOptions"]["secretName"] == "amalgam-ray-token"
    [job] = by_kind(docs, "RayJob")  # runs on that cluster: its submitter carries the token
    env = {e["name"]: e for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "amalgam-ray-token", "key": "auth_token"}


def test_network_policy_keeps_the_jobs_api_to_submitters_and_the_operator(rendered):
    [head] = [p for p in by_kind(rendered["prod"], "NetworkPolicy") if p["metadata"]["name"] == "amalgam-ray-head"]
    assert head["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert head["spec"]["policyTypes"] == ["Ingress"]
    for rule in head["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod of the cluster"
        ports = {p["port"] for p in rule.get("ports", [])}
        if not ports:  # all ports: only amalgam's own Ray pods
            assert rule["from"] == [{"podSelector": {"matchLabels": {
                "app.kubernetes.io/part-of": "amalgam", "ray.io/is-ray-node": "yes"}}}]
        if 8265 in ports:
            assert ports == {8265}
            selectors = [f["podSelector"]["matchLabels"] for f in rule["from"]]
            assert selectors == [{"amalgam.dev/jobs-client": "true"}, {"app.kubernetes.io/name": "kuberay-operator"}]
    # RayJob submitters carry the label the policy admits.
    for doc in by_kind(rendered["prod"], "RayJob") + by_kind(rendered["prod"], "RayCronJob"):
        job = doc["spec"].get("jobTemplate", doc["spec"])
        assert job["submitterPodTemplate"]["metadata"]["labels"]["amalgam.dev/jobs-client"] == "true"


def test_rbac_is_least_privilege(rendered):
    docs = rendered["prod"]
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    [role] = by_kind(docs, "Role")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert not {"create", "delete", "update"} & set(rule["verbs"])
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "amalgam-ray-head", "namespace": "amalgam"}]
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(docs, "ServiceAccount")}
    assert accounts["amalgam-ray-worker"]["automountServiceAccountToken"] is False
    assert accounts["amalgam-job-submitter"]["automountServiceAccountToken"] is False
    for doc in docs:  # only the autoscaling head runs as the account with API rights
        for where, pod in pod_specs(doc):
            if pod.get("serviceAccountName") == "amalgam-ray-head":
                assert doc["kind"] == "RayCluster" and where.endswith("head"), where


def test_podmonitor_scrapes_ports_the_pods_declare(rendered):
    docs = rendered["prod"]
    [monitor] = by_kind(docs, "PodMonitor")
    [cluster] = by_kind(docs, "RayCluster")
    head_ports = {p["name"]: p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "amalgam-metrics"}
    [config] = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "amalgam-config"]
    assert head_ports["amalgam-metrics"] == int(config["data"]["AMALGAM_METRICS_PORT"])
    assert config["data"]["AMALGAM_METRICS_ADDR"] == "0.0.0.0" and config["data"]["AMALGAM_PUSHGATEWAY"].startswith("http")


def test_jobs_run_the_shipped_job_file_from_a_configmap(rendered):
    from amalgam.job import load_job

    assert (K8S / "base" / "job.yaml").read_bytes() == (ROOT / "jobs" / "mnist-fashion-4.yaml").read_bytes()
    docs = rendered["prod"]
    [cm] = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "amalgam-job"]
    assert cm["data"]["job.yaml"] == (ROOT / "jobs" / "mnist-fashion-4.yaml").read_text()
    assert load_job(K8S / "base" / "job.yaml").name == "mnist-fashion-4"
    [cluster] = by_kind(docs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "job", "configMap": {"name": "amalgam-job"}} in head["volumes"]
    assert {"name": "job", "mountPath": "/etc/amalgam/jobs", "readOnly": True} in head["containers"][0]["volumeMounts"]
    for doc in by_kind(docs, "RayJob"):
        assert doc["spec"]["entrypoint"].startswith("python -m amalgam.cli run /etc/amalgam/jobs/job.yaml")
    [cron] = by_kind(docs, "RayCronJob")
    # Scheduled retraining: `amalgam retrain` (exits 0 with nothing to do when the zoo is unchanged).
    assert cron["spec"]["jobTemplate"]["entrypoint"].startswith("python -m amalgam.cli retrain /etc/amalgam/jobs/job.yaml")
    assert cron["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] is True
    assert by_kind(rendered["local"], "RayCronJob")[0]["spec"]["suspend"] is True  # no surprise runs on a laptop


def test_local_has_an_in_cluster_s3_and_prod_an_external_one(rendered):
    def config(docs):
        return next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "amalgam-config")["data"]

    local, prod = config(rendered["local"]), config(rendered["prod"])
    [minio] = by_kind(rendered["local"], "Deployment")
    [svc] = by_kind(rendered["local"], "Service")
    assert local["AWS_ENDPOINT_URL_S3"] == f"http://{svc['metadata']['name']}:9000"
    assert svc["spec"]["selector"].items() <= minio["spec"]["template"]["metadata"]["labels"].items()
    assert "AWS_ENDPOINT_URL_S3" not in prod and prod["AMALGAM_STORE_URI"].startswith("s3://")
    assert by_kind(rendered["prod"], "Deployment") == []


def test_grafana_dashboard_ships_as_a_configmap_and_shows_every_metric(rendered):
    from amalgam.metrics import AmalgamMetrics

    [cm] = [c for c in by_kind(rendered["prod"], "ConfigMap") if c["metadata"]["name"] == "amalgam-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["amalgam-dashboard.json"])
    assert dashboard == json.loads((K8S / "base" / "grafana" / "amalgam-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"\bamalgam_[a-z_]+", exprs))
    exposed = set()
    for family in AmalgamMetrics().registry.collect():
        exposed |= {s.name for s in family.samples} | {family.name, f"{family.name}_total"}
    assert used and used <= exposed, used - exposed
    families = {f.name for f in AmalgamMetrics().registry.collect()}
    shown = {f for f in families if any(u == f or u == f"{f}_total" for u in used)}
    assert shown == families, families - shown
