"""Extraction on a real local Ray (2 CPUs): values, statistics, reuse, a killed run resumed, S3 end to end.

A tiny random-weight zoo (two teachers) on 384 real MNIST images, 24 shards of 16 rows,
so every pass has many shards for the actors to share and a killed run has something to
resume. S3 is moto's standalone server on loopback; the Ray workers get the (fake)
credentials the way a real deployment gives them, from their environment when Ray
starts, and the endpoint from the job's ``store.s3`` section.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amalgam.cli import main
from amalgam.data.datasets import to_float
from amalgam.data.pool import Pool, PoolSpec, build_pool
from amalgam.distributed.extract import ensure_ray, outputs_key, sum_stats
from amalgam.distributed.store_source import StoreSource
from amalgam.engine.capture import capture_teachers
from amalgam.engine.run_local import statistics_pass
from amalgam.job import Job, load_job
from amalgam.store.catalog import scan
from amalgam.store.codecs import load_codecs
from amalgam.store.fingerprint import zoo_fingerprint
from amalgam.store.location import S3Options, open_store
from amalgam.store.reader import iter_aligned, ray_dataset
from amalgam.zoo.manifest import load_zoo
from tests.conftest import make_tiny_zoo
from tests.test_store import _bucket, _free_port, _moto

pytestmark = pytest.mark.slow

POOL = 384
SHARD = 16


@dataclass
class Env:
    dir: Path
    zoo: Path
    endpoint: str
    bucket: str
    pool: Pool
    teachers: list


def _job(env: Env, name: str, store: str, actors: int = 2, s3: dict | None = None) -> Path:
    raw = {
        "version": 1, "name": name, "zoo": str(env.zoo),
        "pool": {"sources": [{"dataset": "mnist", "count": POOL}]},
        "amalgamation": {"widths": {"default": 0.5}},
        "store": {"uri": store, **({"s3": s3} if s3 else {})},
        "extraction": {"actors": actors, "batch_size": 32, "shard_size": SHARD},
    }
    path = env.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_root):
    import ray

    d = tmp_path_factory.mktemp("extract")
    mp = pytest.MonkeyPatch()
    port = _free_port()
    server = _moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    # Set before Ray starts: the embedded Ray's workers inherit the driver's environment then.
    mp.setenv("AWS_ACCESS_KEY_ID", "amalgam-test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "amalgam-test-secret")
    mp.setenv("AWS_REGION", "us-east-1")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
        mp.delenv(var, raising=False)
    if ray.is_initialized():  # started by another module without these variables
        ray.shutdown()
    ensure_ray(num_cpus=2)
    zoo = make_tiny_zoo(d / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                    ("b", ["mnist/3", "mnist/4"], [6, 8])])
    _, teachers = load_zoo(zoo)
    pool = build_pool(PoolSpec.model_validate({"sources": [{"dataset": "mnist", "count": POOL}]}))
    yield Env(d, zoo, endpoint, _bucket(endpoint), pool, teachers)
    ray.shutdown()
    server.stop()
    mp.undo()


def _extract(env: Env, job: Job) -> tuple[StoreSource, list[str]]:
    """What `amalgam extract` does, in this process (on the module's Ray)."""
    logs: list[str] = []
    src = StoreSource(job, env.teachers, env.pool, log=logs.append)
    tp = src.teacher_pass()
    src.fit(tp.stats)
    return src, logs


@pytest.fixture(scope="module")
def extracted(env) -> tuple[StoreSource, list[str]]:
    return _extract(env, load_job(_job(env, "main", str(env.dir / "store"))))


def _direct(env: Env, codecs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher forwards in this process, no Ray, no store: logits and float16 codes of the whole pool."""
    logits, codes = [], {t: [] for t in codecs}
    with torch.no_grad():
        for s in range(0, len(env.pool), 100):
            out, feats = capture_teachers(env.teachers, to_float(env.pool.images[s : s + 100]))
            logits.append(torch.cat(out, 1))
            for tap, c in codecs.items():
                codes[tap].append(c.encode(torch.cat([f[tap] for f in feats], 1)).half())
    return torch.cat(logits), {t: torch.cat(v) for t, v in codes.items()}


def test_values_read_back_equal_a_direct_teacher_forward(env, extracted):
    src, _ = extracted
    stored_codecs, _ = load_codecs(src.loc, f"codecs/{src.codes.key.split('/')[1]}")
    taps = list(stored_codecs)
    assert taps == ["conv1", "conv2", "fc1"]
    logits, codes = _direct(env, stored_codecs)
    batches = list(iter_aligned(src.codes, taps, 100))
    got_ids = [i for b in batches for i in b["sample_id"]]
    assert got_ids == env.pool.ids  # the pool, in order: none missing, none twice
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(POOL))
    torch.testing.assert_close(torch.cat([b["logits"] for b in batches]), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([b["image"] for b in batches]), env.pool.images)
    for tap in taps:
        got = torch.cat([b["codes"][tap] for b in batches])
        assert got.shape == codes[tap].shape and got.shape[1] == stored_codecs[tap].width
        # Stored as float16: equal to the direct forward's float16 code within one float16 step.
        torch.testing.assert_close(got, codes[tap].float(), rtol=2e-3, atol=2e-3)
    # The outputs pass's logits are the same forward's too.
    out = next(iter(iter_aligned(src.outputs, [], POOL)))
    assert "image" not in out and out["sample_id"] == env.pool.ids
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)


def test_statistics_from_ray_equal_one_process(env, extracted):
    src, _ = extracted
    ray_stats = sum_stats(src.outputs)
    ref = statistics_pass(env.teachers, env.pool, 32, log=lambda _m: None).stats
    assert list(ray_stats) == list(ref) == ["conv1", "conv2", "fc1"]
    for tap, s in ref.items():
        r = ray_stats[tap]
        assert (r.blocks, r.kind, r.count) == (s.blocks, s.kind, s.count)
        torch.testing.assert_close(r.sum, s.sum, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(r.gram, s.gram, rtol=1e-6, atol=1e-9)
    assert ref["conv1"].count == POOL * 28 * 28  # per position for conv taps


def test_plan_is_printed_and_matches_what_was_written(extracted):
    src, logs = extracted
    plans = [line for line in logs if line.startswith("[extract] plan: ")]
    assert len(plans) == 2 and plans[0].startswith(f"[extract] plan: outputs: {POOL} samples in {POOL // SHARD} shards")
    sizes = {e.key: e.bytes for e in scan(src.loc)}
    for line, ds in zip(plans, (src.outputs, src.codes)):
        planned = float(re.search(r"~([0-9.]+) MB", line).group(1)) * 1e6
        written = sizes[ds.key] - len(src.loc.read_bytes(f"{ds.key}/manifest.json"))
        assert abs(planned - written) / written < 0.15, (line, written)
    assert src.teacher_forwards == 2 * POOL * 2  # two passes, two teachers
    # The actors report each shard's stored bytes; the driver counts them (manifests excluded).
    from amalgam import metrics

    counted = metrics.METRICS.registry.get_sample_value("amalgam_store_written_bytes_total", {"backend": "local"})
    stored = sum(sizes[ds.key] - len(src.loc.read_bytes(f"{ds.key}/manifest.json")) for ds in (src.outputs, src.codes))
    assert counted is not None and counted >= stored


def test_second_extraction_runs_no_teacher_forward(env, extracted):
    from amalgam import metrics

    first, _ = extracted
    names = [t.name for t in env.teachers]
    reg = metrics.METRICS.registry
    before = [reg.get_sample_value("amalgam_samples_extracted_total", {"teacher": n}) for n in names]
    assert all(b is not None and b >= 2 * POOL for b in before)  # the driver counted both passes
    src, logs = _extract(env, load_job(_job(env, "again", str(env.dir / "store"))))
    assert src.teacher_forwards == 0
    assert [reg.get_sample_value("amalgam_samples_extracted_total", {"teacher": n}) for n in names] == before
    assert [line.split(": reusing")[0] for line in logs if ": reusing " in line] == [
        "[extract] outputs", "[extract] codes"]
    assert not any("plan:" in line for line in logs)
    assert (src.outputs.key, src.codes.key) == (first.outputs.key, first.codes.key)


def _same_data(a, b) -> None:
    x, y = a.read_all(), b.read_all()
    assert list(x) == list(y)
    for name in x:
        if x[name].dtype == object:
            assert list(x[name]) == list(y[name]), name
        else:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_killed_extraction_resumes_to_the_exact_dataset(env, extracted, backend, monkeypatch):
    """`amalgam extract JOB --address` killed (SIGKILL) after some shards; the rerun fills in the rest.

    The same test on a local store and on moto's S3 on loopback (issue 5: the S3 server runs
    the same tests as local disk). The killed driver runs on this module's Ray cluster (as
    against a real cluster), so Ray itself must clean up the dead driver's actors before the
    rerun can get CPUs.
    """
    import ray

    first, _ = extracted
    s3 = {"endpoint_url": env.endpoint} if backend == "s3" else None
    uri = f"s3://{env.bucket}/killed" if s3 else str(env.dir / "store_killed")
    job_path = _job(env, f"killed-{backend}", uri, actors=1, s3=s3)
    loc = open_store(uri, S3Options(**(s3 or {})))
    key = outputs_key(zoo_fingerprint([t.entry for t in env.teachers]), env.pool.fingerprint())

    def shards_stored() -> int:
        return sum(1 for f in loc.list_dir(f"{key}/shards") if re.fullmatch(r"shard-\d+\.parquet", f.base_name))

    log_path = env.dir / f"killed-{backend}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "amalgam.cli", "extract", str(job_path),
                                 "--address", ray.get_runtime_context().gcs_address], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if shards_stored() >= 3:
                break
            time.sleep(0.02 if not s3 else 0.1)
        assert proc.poll() is None, log_path.read_text()[-2000:]
    finally:
        _kill_session(proc)
    done_at_kill = shards_stored()
    assert 3 <= done_at_kill < POOL // SHARD and not loc.exists(f"{key}/manifest.json")

    src, logs = _extract(env, load_job(job_path))
    resumed = [line for line in logs if "resuming" in line]
    assert len(resumed) == 1 and resumed[0].startswith("[extract] outputs: resuming, ")
    kept = int(re.search(r"resuming, (\d+)/24", resumed[0]).group(1))
    assert done_at_kill <= kept < POOL // SHARD
    assert src.teacher_forwards == (POOL - kept * SHARD) * 2 + POOL * 2  # only the missing shards, then codes
    ids = src.codes.read_all(["sample_id"])["sample_id"]
    assert list(ids) == env.pool.ids and len(set(ids)) == POOL
    # Identical to the uninterrupted run, bit for bit: same statistics, so same codecs, so the same key.
    assert (src.outputs.key, src.codes.key) == (first.outputs.key, first.codes.key)
    _same_data(src.outputs, first.outputs)
    _same_data(src.codes, first.codes)
    if s3:
        monkeypatch.setenv("AWS_ENDPOINT_URL", env.endpoint)  # the CLI takes S3 settings from the environment
    assert main(["store", "verify", uri]) == 0


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started, and anything left in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    # A child that left the group (setpgid) is still in the session we created: end it too.
    for _ in range(50):
        left = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def test_ray_data_reads_the_same_uri(extracted):
    src, _ = extracted
    cols = ["index", "logits", "code.conv1", "code.fc1", "image"]
    rows = src.codes.read_all(cols)
    batches = list(ray_dataset(src.loc.uri, src.codes.key, cols, verify=True).iter_torch_batches(batch_size=100))
    got = {c: torch.cat([b[c] for b in batches]) for c in cols}
    order = torch.argsort(got["index"])  # Ray Data need not keep file order
    for c in cols:
        assert torch.equal(got[c][order], torch.from_numpy(np.array(rows[c]))), c
    assert got["code.conv1"].dtype == torch.float16 and tuple(got["code.conv1"].shape[1:]) == (5, 28, 28)


def test_s3_end_to_end(env, extracted, monkeypatch):
    """The same extraction into s3:// on moto: same keys and bytes as the local store; Ray Data reads it back."""
    first, _ = extracted
    uri = f"s3://{env.bucket}/e2e"
    src, logs = _extract(env, load_job(_job(env, "s3", uri, s3={"endpoint_url": env.endpoint})))
    assert src.loc.is_s3 and src.teacher_forwards == 2 * POOL * 2
    assert any(line.startswith("[extract] codes: committed 384 rows in 24 shards") and uri in line for line in logs)
    assert (src.outputs.key, src.codes.key) == (first.outputs.key, first.codes.key)
    _same_data(src.outputs, first.outputs)
    _same_data(src.codes, first.codes)
    batches = list(ray_dataset(uri, src.codes.key, ["index", "code.fc1"], S3Options(endpoint_url=env.endpoint))
                   .iter_torch_batches(batch_size=128))
    idx = torch.cat([b["index"] for b in batches])
    assert sorted(idx.tolist()) == list(range(POOL))
    fc1 = torch.cat([b["code.fc1"] for b in batches])[torch.argsort(idx)]
    assert torch.equal(fc1, torch.from_numpy(np.array(first.codes.read_all(["code.fc1"])["code.fc1"])))
    monkeypatch.setenv("AWS_ENDPOINT_URL", env.endpoint)  # the CLI takes S3 settings from the environment
    assert main(["store", "verify", uri]) == 0
    # A second run against S3 reuses everything there.
    again, _ = _extract(env, load_job(_job(env, "s3-again", uri, s3={"endpoint_url": env.endpoint})))
    assert again.teacher_forwards == 0
