"""Credentials never leak into what amalgam writes, prints, serves or sends.

Fake but distinctive credentials are put in the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and a Ray token in ``RAY_AUTH_TOKEN`` with
``RAY_AUTH_MODE=token``), then the real code paths that write or say something run, and every
byte they produced is searched for the secrets (whole, URL-encoded, and their random parts):

* ``amalgam run --local`` of a tiny random-weight zoo: every file of the run directory
  (report.json/md, student.json, job.yaml, weights, plots), stdout/stderr, the ``amalgam_*``
  metrics exposition text, and what the driver pushed to a (fake) Pushgateway;
* the feature store: manifests, shards and side files a DatasetWriter commits to a local store
  and to S3 (moto on loopback), and ``amalgam store list|show|verify`` on both;
* S3 failures: a wrong access key, a wrong secret and a bad session token against moto with IAM
  authentication on (one line, fails fast, names neither the fake nor moto's real credentials),
  and credentials smuggled into a store URI, an endpoint URL or a job path
  (``$AWS_SECRET_ACCESS_KEY``), which are refused without being echoed;
* the Jobs API client (``amalgam submit``, ``amalgam job list|status|logs|stop``) against a
  fake Jobs API on loopback that records every request: the token goes only in the
  ``Authorization`` header, never in a body, a URL, the uploaded packages, the CLI's output or
  Ray's SDK logging (at DEBUG); a rejected token is one line without it; an explicit address
  without ``RAY_AUTH_MODE=token`` gets no token at all. (A fake server rather than a real head:
  tests/test_submit.py already runs the real one with token auth and checks its output; this
  one sees the wire.)
* what crosses into Ray and Tune (extraction specs, the job in ``train_loop_config``): URIs
  and S3 options, no key;
* ``k8s/create-secrets.sh`` with a fake ``kubectl``: the keys never reach a command line
  (visible to every user in ``ps``) nor the script's output.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
import yaml

from amalgam.cli import main
from amalgam.errors import AmalgamError
from tests.conftest import make_tiny_zoo

ROOT = Path(__file__).resolve().parents[2]

_RUN = secrets.token_hex(8).upper()
FAKE = {
    "AWS_ACCESS_KEY_ID": f"AKIA{('LEAK' + _RUN)[:16]}",
    "AWS_SECRET_ACCESS_KEY": f"leaktest/Secret+{secrets.token_hex(12)}",
    "AWS_SESSION_TOKEN": f"leaktest-session-{secrets.token_hex(16)}",
    "RAY_AUTH_TOKEN": f"leaktest-ray-token-{secrets.token_hex(16)}",
}


def _needles(values: dict[str, str]) -> dict[str, bytes]:
    """What would betray each secret: the value, its URL encoding, and its random part alone."""
    out = {}
    for name, v in values.items():
        out[name] = v.encode()
        out[f"{name} (url-encoded)"] = urllib.parse.quote(v, safe="").encode()
        tail = v.rsplit("-", 1)[-1].rsplit("+", 1)[-1]
        if len(tail) >= 16:
            out[f"{name} (its random part)"] = tail.encode()
    return out


NEEDLES = _needles(FAKE)


def leaks(data: str | bytes, needles: dict[str, bytes] = NEEDLES) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [name for name, n in needles.items() if n in raw]


def tree_leaks(root: Path, needles: dict[str, bytes] = NEEDLES) -> dict[str, list[str]]:
    """Every file under ``root`` (binary too: weights, plots, Parquet) that holds a secret."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and (hit := leaks(p.read_bytes(), needles)):
            found[str(p.relative_to(root))] = hit
    return found


@pytest.fixture
def fake_env(monkeypatch) -> dict[str, str]:
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AMALGAM_METRICS_PORT", "AMALGAM_PUSHGATEWAY"):
        monkeypatch.delenv(k, raising=False)
    return dict(FAKE)


# --- a recording HTTP server (fake Pushgateway, fake Jobs API) ------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    respond: Callable[[Request], tuple[int, object]]
    requests: list[Request] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def recording_server() -> Iterator[Callable[[Callable[[Request], tuple[int, object]]], Recorder]]:
    servers = []

    def start(respond):
        rec = Recorder(respond)

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Request(self.command, self.path, dict(self.headers.items()), body)
                rec.requests.append(req)
                status, payload = rec.respond(req)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args):  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        rec.url = f"http://127.0.0.1:{server.server_port}"
        return rec

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


# --- amalgam run --local: run directory, output, metrics ------------------------------------


def test_a_run_writes_no_credential_anywhere(fake_env, tmp_path, data_root, capfd, monkeypatch, recording_server):
    import torch

    from amalgam import metrics

    gateway = recording_server(lambda req: (200, b""))
    monkeypatch.setenv("AMALGAM_PUSHGATEWAY", gateway.url)
    zoo = make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                           ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = tmp_path / "tiny.yaml"
    job.write_text(yaml.safe_dump({
        "version": 1, "name": "tiny", "zoo": str(zoo),
        "pool": {"sources": [{"dataset": "mnist", "count": 300}]},
        "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 100}]}, "latency": False},
        "stages": {"epochs": 1}, "joint": {"epochs": 1}, "baselines": {"kd": True, "supervised": False},
        "store": {"uri": "s3://amalgam-leaktest/store", "s3": {"endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"}},
    }, sort_keys=False))
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["run", str(job), "--local", "--out", str(run_dir), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capfd.readouterr()

    written = sorted(p.name for p in run_dir.iterdir())
    assert {"report.json", "report.md", "student.json", "student.safetensors", "job.yaml"} <= set(written), written
    assert tree_leaks(run_dir) == {}
    assert leaks(out.out + out.err) == []
    server = metrics.serve(0)  # the /metrics endpoint a driver serves to Prometheus
    try:
        with urllib.request.urlopen(server.url, timeout=10) as r:
            exposition = r.read().decode()
    finally:
        server.close()
    assert "amalgam_student_accuracy" in exposition and leaks(exposition) == []
    [push] = [r for r in gateway.requests if r.method == "PUT"]
    assert push.path == "/metrics/job/tiny" and b"amalgam_job_duration_seconds" in push.body
    assert leaks(push.body) == [] and leaks(json.dumps(push.headers)) == []
    # The job travels into the run directory as written: its S3 settings, never a key.
    assert yaml.safe_load((run_dir / "job.yaml").read_text())["store"]["s3"] == {
        "endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"}


# --- the feature store -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from tests.test_store import _free_port, _moto

    port = _free_port()
    server = _moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _all_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="reader",
                      aws_secret_access_key="reader")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_store_manifests_and_cli_hold_no_credential(fake_env, tmp_path, moto_url, monkeypatch, capsys):
    import boto3

    from amalgam.store.location import open_store
    from tests.test_store import KEY, _arrays, _write

    bucket = f"leak-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)  # the store reaches moto with the fake credentials
    local, remote = str(tmp_path / "store"), f"s3://{bucket}/store"
    for uri in (local, remote):
        loc = open_store(uri)
        _write(loc, _arrays(40), 16)
        assert loc.exists(f"{KEY}/manifest.json")
        for args in (["store", "list", uri], ["store", "show", uri, KEY], ["store", "verify", uri]):
            assert main(args) == 0, args
            out = capsys.readouterr()
            assert leaks(out.out + out.err) == [], args
    assert tree_leaks(tmp_path / "store") == {}
    objects = _all_objects(moto_url, bucket)
    assert any(k.endswith("manifest.json") for k in objects)
    assert {k: leaks(v) for k, v in objects.items() if leaks(v)} == {}


@pytest.fixture
def moto_with_iam(moto_url) -> Iterator[dict[str, str]]:
    """moto with IAM authentication switched on: a user with S3 rights, its key, and a bucket."""
    import boto3
    import requests

    admin = dict(endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="admin",
                 aws_secret_access_key="admin")
    iam = boto3.client("iam", **admin)
    user = f"leak-{secrets.token_hex(4)}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = f"leak-{secrets.token_hex(6)}"
    boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    requests.post(f"{moto_url}/moto-api/reset-auth", data=b"0").raise_for_status()  # from now on: signed requests only
    try:
        yield {"bucket": bucket, "key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        requests.post(f"{moto_url}/moto-api/reset-auth", data=b"inf").raise_for_status()


def test_s3_refusals_are_one_line_without_the_credentials(fake_env, moto_url, moto_with_iam, monkeypatch, capsys):
    from amalgam.store.location import open_store

    uri = f"s3://{moto_with_iam['bucket']}/store"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    # The control: the right key and secret get in, so the refusals below are about the credentials.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_with_iam["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_with_iam["secret"])
    open_store(uri).write_bytes("probe", b"ok")

    real_key = {"moto's access key id": moto_with_iam["key_id"], "moto's secret": moto_with_iam["secret"]}
    right = {"AWS_ACCESS_KEY_ID": moto_with_iam["key_id"], "AWS_SECRET_ACCESS_KEY": moto_with_iam["secret"]}
    cases = {
        "unknown access key": ({**FAKE, "AWS_SESSION_TOKEN": ""}, "INVALID_ACCESS_KEY_ID"),
        "wrong secret": ({**FAKE, "AWS_ACCESS_KEY_ID": moto_with_iam["key_id"], "AWS_SESSION_TOKEN": ""},
                         "SIGNATURE_DOES_NOT_MATCH"),
        "bad session token": ({**right, "AWS_SESSION_TOKEN": FAKE["AWS_SESSION_TOKEN"]}, "InvalidToken"),
    }
    for what, (env, code) in cases.items():
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if env[k]:
                monkeypatch.setenv(k, env[k])
            else:
                monkeypatch.delenv(k, raising=False)
        with pytest.raises(AmalgamError) as exc:
            open_store(uri).write_bytes("x", b"1")
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(f"{uri}/x: ") and code in msg, (what, msg)
        assert "attempts" not in msg, (what, msg)  # permanent: failed at once, not retried
        assert leaks(msg) == [] and leaks(msg, _needles(real_key)) == [], (what, msg)
        assert main(["store", "list", uri]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("amalgam: error: ") and code in err, (what, err)
        assert leaks(err) == [] and leaks(err, _needles(real_key)) == [], (what, err)


def test_credentials_smuggled_into_uris_and_paths_are_refused_unechoed(fake_env, tmp_path, capsys, monkeypatch):
    from pydantic import ValidationError

    from amalgam.job import load_job
    from amalgam.store.location import S3Options, open_store

    key, secret = FAKE["AWS_ACCESS_KEY_ID"], FAKE["AWS_SECRET_ACCESS_KEY"]
    in_uri = f"s3://{key}:{urllib.parse.quote(secret, safe='')}@bucket/store"
    with pytest.raises(AmalgamError) as exc:
        open_store(in_uri)
    assert str(exc.value).startswith("s3://...@bucket/store: credentials in a URI are refused") and leaks(str(exc.value)) == []
    assert main(["store", "list", in_uri]) == 2  # one line, not pyarrow's traceback quoting the URI
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and leaks(err) == [], err
    with pytest.raises(ValidationError) as exc:
        S3Options(endpoint_url=f"https://{key}:{secret}@s3.example.com")
    assert "credentials in a URI are refused" in exc.value.errors()[0]["msg"]  # (a job file reports the msg alone)

    base = {"version": 1, "name": "j", "zoo": str(tmp_path / "zoo.yaml"), "pool": {"sources": [{"dataset": "mnist"}]}}
    bad = [
        ("store.uri", {**base, "store": {"uri": in_uri}}),
        ("store.s3.endpoint_url", {**base, "store": {"uri": "s3://b/p", "s3": {"endpoint_url": f"http://{key}:{secret}@h"}}}),
        ("zoo", {**base, "zoo": "/zoos/$AWS_SECRET_ACCESS_KEY/zoo.yaml"}),  # was: the secret in "zoo manifest not found"
        ("zoo", {**base, "zoo": "${RAY_AUTH_TOKEN}/zoo.yaml"}),
        ("store.uri", {**base, "store": {"uri": "$HOME/${AWS_SESSION_TOKEN}"}}),
    ]
    for field_name, raw in bad:
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(raw))
        with pytest.raises(AmalgamError) as exc:
            load_job(job)
        msg = str(exc.value)
        assert msg.startswith(f"{job}: field {field_name}: ") and leaks(msg) == [], msg
        assert main(["validate", str(job)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and leaks(err) == [], err
    # Other variables still expand, as documented.
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({**base, "zoo": "$AMALGAM_LEAKTEST_DIR/zoo.yaml"}))
    monkeypatch.setenv("AMALGAM_LEAKTEST_DIR", str(tmp_path / "zoos"))
    assert load_job(ok).zoo_path() == tmp_path / "zoos" / "zoo.yaml"


def test_what_ray_and_tune_serialise_holds_no_credential(fake_env, tmp_path):
    """Ray workers, Ray Train and Tune get store URIs and S3Options (endpoint, region), never an
    opened store: they reopen it from their own environment. (pyarrow's S3FileSystem pickles
    its keys; shipping a StoreLocation would put them in the object store and Tune's state.)"""
    import cloudpickle

    from amalgam.distributed.extract import PassSpec
    from amalgam.job import parse_job

    s3 = {"endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"}
    job = parse_job({"version": 1, "name": "j", "zoo": "/zoos/z/zoo.yaml", "pool": {"sources": [{"dataset": "mnist"}]},
                     "store": {"uri": "s3://bucket/store", "s3": s3}}, tmp_path / "job.yaml")
    spec = PassSpec(kind="codes", zoo_path=str(job.zoo_path()), store_uri=job.store_uri(), s3=job.store.s3.model_dump(),
                    key="codes/a/b", fingerprints={}, num_rows=10, shard_size=5, batch_size=5)
    for shipped in (job, spec, {"job": job}):  # extraction actors; train_loop_config; Tune's with_parameters
        assert leaks(cloudpickle.dumps(shipped)) == []


# --- the Jobs API client ---------------------------------------------------------------------


def _jobs_api(expected_token: str | None, submitted: dict) -> Callable[[Request], tuple[int, object]]:
    """A Jobs API that answers like Ray's dashboard (token middleware included)."""
    import ray

    details = {"type": "SUBMISSION", "submission_id": "raysubmit_leaktest", "entrypoint": "python -m amalgam.cli run x.yaml",
               "status": "FAILED", "message": "job failed", "metadata": {"amalgam_job": "tiny"}, "start_time": 1}

    def respond(req: Request) -> tuple[int, object]:
        auth = req.headers.get("Authorization")
        if expected_token is not None:
            if not auth:
                return 401, b"Unauthorized: Missing authentication token"
            if auth != f"Bearer {expected_token}":
                return 403, b"Forbidden: Invalid authentication token"
        path = req.path
        if path == "/api/version":
            return 200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "leaktest"}
        if path.startswith("/api/packages/"):
            if req.method == "PUT":
                submitted.setdefault("packages", []).append(req.body)
                return 200, {}
            return 404, b"not found"
        if path == "/api/jobs/" and req.method == "POST":
            submitted["job"] = json.loads(req.body)
            return 200, {"submission_id": "raysubmit_leaktest", "job_id": None}
        if path == "/api/jobs/":
            return 200, [details]
        if path == "/api/jobs/raysubmit_leaktest":
            return 200, details
        if path == "/api/jobs/raysubmit_leaktest/logs":
            return 200, {"logs": "amalgam: error: /zoos/z/zoo.yaml: zoo manifest not found\n"}
        if path == "/api/jobs/raysubmit_leaktest/stop":
            return 200, {"stopped": True}
        return 404, b"no such endpoint"

    return respond


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def debug_logs(monkeypatch) -> Iterator[_Records]:
    """Every log record of Ray's SDK, urllib3 and amalgam, down to DEBUG, captured here.

    ``connect()`` usually quiets Ray's SDK loggers; here they and ``ray`` (which does not
    propagate, and prints through its own stderr handler, set aside meanwhile) log everything.
    """
    importlib.import_module("ray.job_submission")  # its modules set their loggers' levels on import

    from amalgam import cluster_client as cc

    names = ("", "ray", "amalgam", "urllib3", *cc.QUIET_LOGGERS)
    monkeypatch.setattr(cc, "QUIET_LOGGERS", ())
    handler = _Records()
    saved = [(lg, lg.level, list(lg.handlers)) for lg in map(logging.getLogger, names)]
    for lg, _, handlers in saved:
        if lg.name == "ray":
            for h in handlers:
                lg.removeHandler(h)
        if lg.name in ("root", "ray"):
            lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level, handlers in saved:
        lg.removeHandler(handler)
        for h in handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.setLevel(level)


def test_jobs_client_sends_the_token_only_as_a_header(fake_env, tmp_path, recording_server, capfd, debug_logs):
    submitted: dict = {}
    api = recording_server(_jobs_api(FAKE["RAY_AUTH_TOKEN"], submitted))
    job = tmp_path / "tiny.yaml"
    job.write_text(yaml.safe_dump({"version": 1, "name": "tiny", "zoo": "/zoos/tiny/zoo.yaml",
                                   "pool": {"sources": [{"dataset": "mnist", "count": 10}]}}))
    outputs = []
    for args in (["submit", str(job), "--address", api.url],
                 ["job", "list", "--address", api.url],
                 ["job", "status", "raysubmit_leaktest", "--address", api.url],
                 ["job", "logs", "raysubmit_leaktest", "--address", api.url],
                 ["job", "stop", "raysubmit_leaktest", "--address", api.url]):
        assert main(args) == 0, args
        outputs.append(capfd.readouterr())
    assert outputs[0].out == "raysubmit_leaktest\n"
    assert outputs[2].out.splitlines()[1] == "error: amalgam: error: /zoos/z/zoo.yaml: zoo manifest not found"

    # On the wire: every request authenticated, the token in that header and nowhere else.
    assert api.requests and all(r.headers.get("Authorization") == f"Bearer {FAKE['RAY_AUTH_TOKEN']}" for r in api.requests)
    for r in api.requests:
        others = {k: v for k, v in r.headers.items() if k != "Authorization"}
        assert leaks(r.path) == [] and leaks(json.dumps(others)) == [] and leaks(r.body) == [], (r.method, r.path)
    # What the cluster receives: the job (entrypoint, runtime env, metadata) and two packages
    # (the job file; the amalgam package), none with a credential in it.
    assert submitted["job"]["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert len(submitted["packages"]) == 2
    for pkg in submitted["packages"]:
        with zipfile.ZipFile(BytesIO(pkg)) as z:
            assert {n: leaks(z.read(n)) for n in z.namelist() if leaks(z.read(n))} == {}
    # What the user and the logs see.
    for o in outputs:
        assert leaks(o.out + o.err) == []
    assert any("Sending request to" in line for line in debug_logs.lines)  # the SDK did log, at DEBUG
    assert leaks("\n".join(debug_logs.lines)) == []


def test_jobs_client_refusals_and_unasked_addresses_get_no_token(fake_env, tmp_path, recording_server, capfd,
                                                                  debug_logs, monkeypatch):
    # A cluster holding another token: 403, one line, the token not in it.
    api = recording_server(_jobs_api("the-clusters-own-token", {}))
    assert main(["job", "list", "--address", api.url]) == 2
    out = capfd.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "rejected the token (403)" in out.err
    assert leaks(out.err) == [] and leaks("\n".join(debug_logs.lines)) == []
    # RAY_AUTH_MODE unset and an explicit address: the token is not sent (a mistyped address
    # must not receive it); the cluster's 401 is one line.
    monkeypatch.delenv("RAY_AUTH_MODE")
    api2 = recording_server(_jobs_api(FAKE["RAY_AUTH_TOKEN"], {}))
    assert main(["job", "list", "--address", api2.url]) == 2
    out = capfd.readouterr()
    assert "requires a token (401)" in out.err and leaks(out.err) == []
    assert api2.requests and all("Authorization" not in r.headers for r in api2.requests)


# --- k8s/create-secrets.sh ------------------------------------------------------------------


def test_create_secrets_keeps_keys_off_command_lines_and_output(fake_env, tmp_path):
    if not shutil.which("bash") or not shutil.which("python3"):
        pytest.skip("bash and python3 are needed to run k8s/create-secrets.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "kubectl-calls"
    stdin_seen = tmp_path / "kubectl-stdin"
    (bin_dir / "kubectl").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {calls}
case "$*" in
  *"get secret"*) exit 1 ;;                                   # no Secret yet
  *"create secret generic"*) echo "kind: Secret # rendered" ;; # --dry-run=client -o yaml
  *"apply -f -"*) cat >> {stdin_seen} ;;
esac
exit 0
""")
    (bin_dir / "kubectl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "k8s" / "create-secrets.sh"), "prod", "leaktest"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "created or updated secret leaktest/amalgam-s3" in r.stdout
    argv = calls.read_text()
    assert "create secret generic amalgam-s3" in argv and "--from-file=" in argv  # the keys went by file
    assert leaks(argv) == [] and leaks(r.stdout + r.stderr) == []
    assert "kind: Secret" in stdin_seen.read_text()  # the rendered Secret went by a pipe


def test_the_leak_check_sees_a_leak(tmp_path):
    """The search finds a secret in plain, URL-encoded and truncated form, in text and binary."""
    (tmp_path / "a.json").write_text(json.dumps({"key": FAKE["AWS_SECRET_ACCESS_KEY"]}))
    (tmp_path / "b.bin").write_bytes(b"\x00\x01" + urllib.parse.quote(FAKE["RAY_AUTH_TOKEN"], safe="").encode())
    (tmp_path / "c.txt").write_text("..." + FAKE["AWS_SESSION_TOKEN"].rsplit("-", 1)[1])
    found = tree_leaks(tmp_path)
    assert "AWS_SECRET_ACCESS_KEY" in found["a.json"]
    assert "RAY_AUTH_TOKEN (url-encoded)" in found["b.bin"]
    assert found["c.txt"] == ["AWS_SESSION_TOKEN (its random part)"]
    assert leaks("leaktest-session-") == [] and tree_leaks(tmp_path / "nothing") == {}
