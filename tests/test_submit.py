"""`amalgam submit` and `amalgam job ...` against a real Ray head started by `cluster/up.sh`.

The cluster is a `ray start --head` plus one worker on loopback, with token authentication on
and its own token file, ports and temp dir, so it neither sees nor disturbs an embedded Ray
of another test. `cluster/down.sh` stops exactly its processes (not `ray stop`, which would
stop every Ray on the machine). The jobs are small on purpose: `amalgam validate` on the
cluster, a whole tiny `amalgam run` on the cluster's Ray (200 images, one epoch per stage), and
an `amalgam run --local` whose zoo does not exist there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from amalgam import __version__
from amalgam import cluster_client as cc
from amalgam.errors import AmalgamError
from tests.conftest import make_tiny_zoo

ROOT = Path(__file__).resolve().parent.parent
JOB_ID = re.compile(r"^raysubmit_\w+$")
TINY_JOB = {
    "version": 1,
    "name": "tiny",
    "zoo": "REPLACED",
    "pool": {"sources": [{"dataset": "mnist", "count": 100}]},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 50}]}, "latency": False},
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_root):
    """A head + 1 worker (1 CPU each), token auth on; yields (dashboard URL, token, env for clients)."""
    tmp = tmp_path_factory.mktemp("raycluster")
    token = secrets.token_hex(24)
    token_file = tmp / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    state = tmp / "state"
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
                     AMALGAM_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    up = subprocess.run([str(ROOT / "cluster" / "up.sh"), "--workers", "1", "--state-dir", str(state)],
                        env=env, capture_output=True, text=True, timeout=180)
    recorded: dict = {"nodes": []}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert token not in up.stdout + up.stderr
        recorded = json.loads((state / "cluster.json").read_text())
        yield recorded["dashboard"], token, env, tmp
    finally:
        down = subprocess.run([str(ROOT / "cluster" / "down.sh"), "--state-dir", str(state)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        print(down.stdout)
        assert not (state / "cluster.json").exists()
        for node in recorded["nodes"]:
            with pytest.raises(ProcessLookupError):  # every process of every node is gone
                os.killpg(node["pgid"], 0)


def amalgam(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amalgam.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _job_file(path: Path, zoo: Path) -> Path:
    path.write_text(yaml.safe_dump({**TINY_JOB, "zoo": str(zoo)}, sort_keys=False))
    return path


@pytest.mark.slow
def test_submit_then_follow_logs_to_success(cluster):
    address, token, env, tmp = cluster
    zoo = make_tiny_zoo(tmp / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = _job_file(tmp / "tiny.yaml", zoo)

    sub = amalgam(env, "submit", str(job), "--validate-only", "--address", address)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert JOB_ID.match(job_id), sub.stdout  # stdout is the id alone: `id=$(amalgam submit ...)`

    logs = amalgam(env, "job", "logs", job_id, "--follow", "--address", address)
    assert logs.returncode == 0, logs.stderr
    # The entrypoint ran the shipped package on the cluster, on the shipped job file alone.
    assert f"Running entrypoint for job {job_id}: python -m amalgam.cli validate tiny.yaml" in logs.stdout
    assert "tiny.yaml: ok (job tiny; zoo tiny: 2 teachers, 5 classes; amalgamation pca/dfa)" in logs.stdout
    assert f"job {job_id}: SUCCEEDED" in logs.stderr

    status = amalgam(env, "job", "status", job_id, "--address", address)
    assert status.returncode == 0 and status.stdout.strip() == f"{job_id}: SUCCEEDED"
    for out in (sub, logs, status):
        assert token not in out.stdout + out.stderr


@pytest.mark.slow
def test_submit_a_real_run_follows_its_logs_to_success_and_writes_its_report(cluster):
    """A whole `amalgam run` on the cluster's Ray: extraction actors, Ray Train stages, DDP joint stage.

    The driver runs on this machine, so the run directory and the store (absolute paths under
    the test's temp dir, as a shared volume would be on a real cluster) are readable here.
    """
    address, token, env, tmp = cluster
    zoo = make_tiny_zoo(tmp / "run-zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                          ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = tmp / "real.yaml"
    job.write_text(yaml.safe_dump({
        **TINY_JOB, "name": "tiny-real", "zoo": str(zoo),
        "pool": {"sources": [{"dataset": "mnist", "count": 200}]},
        "stages": {"epochs": 1, "workers": 1},
        "joint": {"epochs": 1, "workers": 1},
        "baselines": {"kd": False, "supervised": False},
        "store": {"uri": str(tmp / "store")},
        "extraction": {"actors": 1, "shard_size": 128},
    }, sort_keys=False))
    out = tmp / "runs" / "real"

    t0 = time.monotonic()
    sub = amalgam(env, "submit", str(job), "--out", str(out), "--address", address)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert JOB_ID.match(job_id), sub.stdout
    logs = amalgam(env, "job", "logs", job_id, "--follow", "--address", address, timeout=300)
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr
    assert f"job {job_id}: SUCCEEDED" in logs.stderr
    assert f"Running entrypoint for job {job_id}: python -m amalgam.cli run real.yaml --out {out}" in logs.stdout
    assert "[stages] Ray Train: 1 workers" in logs.stdout and "[joint] Ray Train DDP: 1 workers" in logs.stdout
    assert "[run] done in" in logs.stdout and f"run directory {out}" in logs.stdout
    print(f"real run on the cluster: submit to SUCCEEDED in {time.monotonic() - t0:.0f}s")

    report = json.loads((out / "report.json").read_text())  # where the job wrote it
    assert report["extra"]["feature_source"] == "store (Ray extraction)"
    assert report["extra"]["pool_size"] == 200 and report["extra"]["test_size"] == 50
    assert report["extra"]["teacher_forwards"] == 2 * 200 * 2  # statistics + codes passes, two teachers
    assert any((tmp / "store").rglob("*.parquet"))  # the store the job named, filled on the cluster
    main = next(m for m in report["methods"] if m["name"] == report["main"])
    assert 0.0 <= main["metrics"]["comprehensive"] <= 1.0
    for name in ("report.md", "student.safetensors", "student.json", "job.yaml"):
        assert (out / name).is_file(), name
    status = amalgam(env, "job", "status", job_id, "--address", address)
    assert status.returncode == 0 and status.stdout.strip() == f"{job_id}: SUCCEEDED"
    for r in (sub, logs, status):
        assert token not in r.stdout + r.stderr


@pytest.mark.slow
def test_failing_job_is_failed_with_its_error_line(cluster):
    address, token, env, tmp = cluster
    job = _job_file(tmp / "bad.yaml", tmp / "nowhere" / "zoo.yaml")

    sub = amalgam(env, "submit", str(job), "--local", "--follow", "--address", address)
    assert sub.returncode == 2
    job_id = sub.stdout.strip().splitlines()[0]
    assert JOB_ID.match(job_id)
    err = sub.stderr.strip().splitlines()
    assert err == [f"amalgam: error: job {job_id} FAILED: "
                   f"amalgam: error: {tmp / 'nowhere' / 'zoo.yaml'}: zoo manifest not found"], sub.stderr
    assert "python -m amalgam.cli run bad.yaml --local" in sub.stdout  # the followed logs

    status = amalgam(env, "job", "status", job_id, "--address", address)
    assert status.returncode == 0
    assert status.stdout.splitlines() == [
        f"{job_id}: FAILED", f"error: amalgam: error: {tmp / 'nowhere' / 'zoo.yaml'}: zoo manifest not found"]

    listed = amalgam(env, "job", "list", "--address", address)
    assert listed.returncode == 0
    row = next(ln for ln in listed.stdout.splitlines() if ln.startswith(job_id))
    assert " FAILED " in row and " tiny " in row
    assert token not in sub.stdout + sub.stderr + status.stdout + listed.stdout


@pytest.mark.slow
def test_worker_joined_and_stop_stops_a_running_job(cluster):
    """The scripts' cluster really is two nodes; `amalgam job stop` ends a running job."""
    address, token, env, _ = cluster
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    count = client.submit_job(entrypoint="python -c \"import ray; ray.init(); "
                                         "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))\"")
    sleeper = client.submit_job(entrypoint="python -c \"import time; print('sleeping', flush=True); time.sleep(120)\"")
    deadline = time.monotonic() + 120
    while str(client.get_job_status(count)) not in cc.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(count)) == "SUCCEEDED", client.get_job_logs(count)
    assert "alive nodes: 2" in client.get_job_logs(count)

    while "sleeping" not in client.get_job_logs(sleeper) and time.monotonic() < deadline:
        time.sleep(0.5)
    stop = amalgam(env, "job", "stop", sleeper, "--address", address)
    assert stop.returncode == 0 and stop.stdout.strip() == f"job {sleeper}: stop requested"
    while str(client.get_job_status(sleeper)) not in cc.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(sleeper)) == "STOPPED"


@pytest.mark.slow
def test_a_client_without_the_token_is_refused(cluster, tmp_path):
    address, token, _, _ = cluster
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    cases = [
        (_clean_env(HOME=str(empty_home)), "requires a token (401)"),  # no token anywhere
        (_clean_env(HOME=str(empty_home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-" + token), "rejected the token (403)"),
        (_clean_env(HOME=str(empty_home), RAY_AUTH_MODE="token"), "RAY_AUTH_MODE=token but no token found"),
    ]
    for env, expected in cases:
        r = amalgam(env, "job", "list", "--address", address)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("amalgam: error: ") and expected in r.stderr, r.stderr
        assert token not in r.stderr
    # RAY_ADDRESS is the default address, as for `ray job`; the token comes from RAY_AUTH_TOKEN here.
    ok = amalgam(_clean_env(HOME=str(empty_home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=address),
                 "job", "list")
    assert ok.returncode == 0 and ok.stdout.startswith("SUBMISSION ID") and token not in ok.stdout + ok.stderr


# --- no cluster needed ------------------------------------------------------------------


def test_submission_ships_the_job_file_and_this_package(tmp_path):
    job = _job_file(tmp_path / "exp.yaml", Path("/abs/zoo.yaml"))
    work = tmp_path / "work"
    work.mkdir()
    sub = cc.build_submission(job, work, local=True, out="/runs/x", threads=2)
    assert sub.entrypoint == "python -m amalgam.cli run exp.yaml --local --out /runs/x --threads 2"
    assert [p.name for p in work.iterdir()] == ["exp.yaml"] and (work / "exp.yaml").read_text() == job.read_text()
    assert sub.runtime_env["working_dir"] == str(work)
    assert sub.runtime_env["py_modules"] == [str(ROOT / "amalgam")]
    assert sub.metadata == {"amalgam_job": "tiny", "amalgam_version": __version__, "amalgam_command": "run"}
    assert cc.build_submission(job, work, command="validate").entrypoint == "python -m amalgam.cli validate exp.yaml"


def test_submission_refuses_bad_or_unshippable_job_files(tmp_path):
    rel = _job_file(tmp_path / "rel.yaml", Path("zoo/zoo.yaml"))
    with pytest.raises(AmalgamError, match=r"rel\.yaml: field zoo: relative path 'zoo/zoo.yaml' cannot be found"):
        cc.build_submission(rel, tmp_path)
    home = tmp_path / "home.yaml"
    home.write_text(yaml.safe_dump({**TINY_JOB, "zoo": "$AMALGAM_HOME/zoos/z/zoo.yaml"}))
    assert cc.build_submission(home, tmp_path).entrypoint.endswith("run home.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**TINY_JOB, "zoo": "/z.yaml", "stages": {"epochs": "many"}}))
    with pytest.raises(AmalgamError, match=r"typo\.yaml: field stages\.epochs"):
        cc.build_submission(typo, tmp_path)


def test_address_and_token_follow_rays_rules(tmp_path, monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cc.resolve_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://a:8265")
    assert cc.resolve_address(None) == "http://a:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://b:8265")
    assert cc.resolve_address(None) == "http://b:8265"
    assert cc.resolve_address("http://c:8265") == "http://c:8265"  # the flag wins

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("file-token\n")
    assert cc.auth_token(explicit_address=False) == "file-token"  # a cluster found on this machine
    assert cc.auth_token(explicit_address=True) is None  # an explicit address gets it only when asked
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert cc.auth_token(explicit_address=True) == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(AmalgamError, match=r"RAY_AUTH_TOKEN_PATH=.*missing: cannot read the token file"):
        cc.auth_token(explicit_address=True)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert cc.auth_token(explicit_address=True) == "env-token"  # RAY_AUTH_TOKEN first, as in Ray
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cc.auth_token(explicit_address=False) is None
