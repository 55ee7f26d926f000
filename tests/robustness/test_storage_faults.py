"""Storage faults (issue 10, part 3): the S3 endpoint fails during a write and during a read.

moto's standalone server keeps its buckets in memory, so an outage is not made by
restarting it: a :class:`~tests.robustness.faultproxy.FaultProxy` on loopback sits between
pyarrow's S3 filesystem and moto and, when told to, resets every connection (``refuse``)
or cuts each one after a few bytes, in the middle of a request or a response
(``cut_after``). What must hold:

* a failing write or read is retried a bounded number of times, with backoff, then
  reported as one line naming the object (no hang, no traceback);
* no dataset ever appears committed without all its shards, however the writes failed;
* once the endpoint is back, a resumed writer completes the dataset, and it is the same,
  byte for byte, as an uninterrupted write;
* a short outage during a read is invisible to the reader.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from amalgam.errors import AmalgamError
from amalgam.store.dataset import MANIFEST, Dataset, DatasetWriter, shard_file
from amalgam.store.location import S3Options, open_store
from tests.robustness.faultproxy import FaultProxy
from tests.test_store import KEY, _arrays, _bucket, _free_port, _moto, _one_line, _s3_env, _table, _write

ROWS, SHARD = 200, 32  # 7 shards of ~5 KB: a cut after 2.5 KB lands inside a shard's upload
SIDE = ["stats.bin"]
# pyarrow's own retries inside each of StoreLocation.retry's attempts
# (AwsStandardS3RetryStrategy(max_attempts=3) in amalgam/store/location.py).
SDK_ATTEMPTS = 3
# A shard's object write is up to four requests (a HEAD: shards are never replaced; then
# pyarrow's multipart upload: create, part, complete), each tried SDK_ATTEMPTS times, on
# connections that a cut may end at any of them.
REQUESTS_PER_WRITE = 4
# Two attempts (retries=1) of three SDK tries each take 2-5 s here; a hang would be the
# request timeout (30 s) per try. The bound leaves room for a loaded machine.
FAIL_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def moto_url():
    port = _free_port()
    server = _moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def proxy(moto_url):
    p = FaultProxy(int(moto_url.rsplit(":", 1)[1])).start()
    yield p
    p.stop()


@pytest.fixture
def bucket(moto_url, monkeypatch) -> str:
    _s3_env(monkeypatch, None)  # credentials only: each store names its endpoint (moto, or the proxy)
    return _bucket(moto_url)


def _failure(proxy: FaultProxy, fn) -> tuple[str, int, float]:
    """Run ``fn``, which must fail: (its one-line message, connections it made, seconds it took)."""
    proxy.reset_counters()
    t0 = time.perf_counter()
    with pytest.raises(AmalgamError) as exc:
        fn()
    return _one_line(exc), proxy.accepted, time.perf_counter() - t0


def _switch_later(seconds: float, action) -> threading.Timer:
    t = threading.Timer(seconds, action)
    t.start()
    return t


def test_write_outage_fails_in_one_line_commits_nothing_and_resumes_to_the_same_bytes(moto_url, proxy, bucket):
    a = _arrays(ROWS)
    ref_loc = open_store(f"s3://{bucket}/ref", S3Options(endpoint_url=moto_url))  # straight to moto, no fault
    ref = _write(ref_loc, a, SHARD)
    ref_bytes = {i: ref_loc.read_bytes(f"{KEY}/{shard_file(i)}") for i in range(ref.num_shards)}
    ref_manifest = Dataset.open(ref_loc, KEY).manifest

    uri = f"s3://{bucket}/faulty"
    loc = open_store(uri, S3Options(endpoint_url=proxy.url))
    loc.retries, loc.backoff_s = 1, 0.05  # two attempts: keeps each deliberate failure to a few seconds
    w = DatasetWriter(loc, KEY, "codes", {"pool": "p" * 64}, ROWS, SHARD)

    def shard(writer: DatasetWriter, i: int) -> None:
        writer.write_shard(i, _table(a, writer.shard_rows(i)), {"stats.bin": f"side {i}".encode()})

    shard(w, 0)
    shard(w, 1)
    assert proxy.accepted >= 1 and proxy.resets == 0  # really through the proxy, untouched

    # The endpoint refuses: the first object of shard 2 (its side file) fails, bounded, in one line.
    proxy.refuse()
    msg, conns, secs = _failure(proxy, lambda: shard(w, 2))
    assert re.fullmatch(rf"{uri}/{KEY}/shards/shard-00002\.stats\.bin: failed after 2 attempts: .*"
                        r"NETWORK_CONNECTION.*", msg), msg
    assert 2 <= conns <= 2 * SDK_ATTEMPTS, conns  # retried, but not without end
    assert secs < FAIL_WITHIN_S, secs

    # The endpoint cuts every connection after 2.5 KB: the side file of shard 3 lands, its
    # Parquet is cut mid-upload, every time.
    proxy.cut_after(2500)
    msg, conns, secs = _failure(proxy, lambda: shard(w, 3))
    assert re.fullmatch(rf"{uri}/{KEY}/shards/shard-00003\.parquet: failed after 2 attempts: .*"
                        r"NETWORK_CONNECTION.*", msg), msg
    assert proxy.resets >= 2 * SDK_ATTEMPTS, proxy.resets  # every try of the shard's upload was cut
    assert conns <= 2 * REQUESTS_PER_WRITE * SDK_ATTEMPTS and secs < FAIL_WITHIN_S, (conns, secs)

    # Nothing is committed, whatever failed: no manifest, and a commit refuses the gap.
    proxy.passthrough()
    with pytest.raises(AmalgamError) as exc:
        Dataset.open(loc, KEY)
    assert _one_line(exc) == f"{uri}/{KEY}: no manifest, the dataset was never committed"
    assert not loc.exists(f"{KEY}/shards/shard-00003.parquet")  # no partial object from the cut upload
    assert loc.exists(f"{KEY}/shards/shard-00003.stats.bin")
    assert w.done_shards(SIDE) == {0, 1}  # a side file without its shard is not a done shard
    with pytest.raises(AmalgamError) as exc:
        w.commit(SIDE)
    assert _one_line(exc) == f"{uri}/{KEY}: cannot commit, shard 2 is missing"

    # A commit that fails half-way (all shards there, the endpoint goes down) commits nothing either.
    for i in range(2, w.num_shards):
        shard(w, i)
    proxy.refuse()
    msg, _, secs = _failure(proxy, lambda: w.commit(SIDE))
    assert msg.startswith(f"{uri}/{KEY}") and "failed after 2 attempts" in msg and secs < FAIL_WITHIN_S, msg
    proxy.passthrough()
    assert not loc.exists(f"{KEY}/{MANIFEST}")
    for i in range(2, w.num_shards):  # throw the late shards away again: the resume below must write them
        loc.fs.delete_file(loc.path(f"{KEY}/{shard_file(i)}"))

    # Recovery: a new writer (as a restarted job) resumes from the shards that are whole, through
    # one more short outage (0.3 s, inside the default retry budget: invisible), and commits.
    loc2 = open_store(uri, S3Options(endpoint_url=proxy.url))
    w2 = DatasetWriter(loc2, KEY, "codes", {"pool": "p" * 64}, ROWS, SHARD)
    todo = sorted(set(range(w2.num_shards)) - w2.done_shards(SIDE))
    assert todo == [2, 3, 4, 5, 6]
    proxy.refuse()
    timer = _switch_later(0.3, proxy.passthrough)
    try:
        shard(w2, todo[0])  # fails while refused, then succeeds
    finally:
        timer.join()
    assert proxy.resets >= 1
    for i in todo[1:]:
        shard(w2, i)
    w2.commit(SIDE)

    ds = Dataset.open(loc2, KEY)
    assert ds.verify() == ROWS
    assert {i: loc2.read_bytes(f"{KEY}/{shard_file(i)}") for i in range(w2.num_shards)} == ref_bytes
    assert [s.model_dump() for s in ds.manifest.shards] == [s.model_dump() for s in ref_manifest.shards]
    got = ds.read_all(["index", "code.fc1"])
    np.testing.assert_array_equal(got["index"], a["index"])
    np.testing.assert_array_equal(got["code.fc1"], a["code.fc1"])


def test_read_outage_is_retried_transparently_then_reported_in_one_line(proxy, bucket):
    a = _arrays(ROWS)
    uri = f"s3://{bucket}/read"
    loc = open_store(uri, S3Options(endpoint_url=proxy.url))
    _write(loc, a, SHARD)
    loc.retries, loc.backoff_s = 6, 0.1  # ~6 s of backoff: a 0.5 s outage is well inside it

    # Connections cut after 1.5 KB (mid-manifest, mid-shard) for 0.5 s, then refused for 0.5 s:
    # the reader sees neither.
    for fault in (lambda: proxy.cut_after(1500), proxy.refuse):
        fault()
        proxy.reset_counters()
        timer = _switch_later(0.5, proxy.passthrough)
        try:
            ds = Dataset.open(loc, KEY)
            assert ds.verify() == ROWS
            got = ds.read_all()
        finally:
            timer.join()
        assert proxy.resets >= 1  # the fault really hit a request
        for name in ("index", "logits", "image", "code.conv1", "code.fc1"):
            np.testing.assert_array_equal(got[name], a[name])
        assert list(got["sample_id"]) == list(a["sample_id"])

    # Down for good: bounded retries, then one line naming the shard.
    loc.retries, loc.backoff_s = 1, 0.05
    proxy.refuse()
    msg, conns, secs = _failure(proxy, lambda: ds.read_shard(ds.manifest.shards[2]))
    assert re.fullmatch(rf"{uri}/{KEY}/shards/shard-00002\.parquet: failed after 2 attempts: .*"
                        r"NETWORK_CONNECTION.*", msg), msg
    assert 2 <= conns <= 2 * SDK_ATTEMPTS and secs < FAIL_WITHIN_S, (conns, secs)
    proxy.passthrough()
    assert ds.read_shard(ds.manifest.shards[2]).num_rows == SHARD  # and back once the endpoint is


# ---------------------------------------------------------------- a real extraction (Ray actors write the shards)

@pytest.fixture
def ray_with_s3_env(monkeypatch):
    """An embedded Ray whose workers have the (fake) S3 credentials: they inherit the driver's environment at start."""
    import ray

    from amalgam.distributed.extract import ensure_ray

    _s3_env(monkeypatch, None)
    for var in ("AWS_ENDPOINT_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    if ray.is_initialized():  # another module's, started without these variables
        ray.shutdown()
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_extraction_on_ray_rides_out_an_outage_and_fails_in_one_line_when_it_cannot(tmp_path, moto_url, proxy,
                                                                                   ray_with_s3_env, monkeypatch):
    """`run_pass` into S3 through the proxy, where Ray actors write the shards.

    1. The endpoint refuses connections as the actors start, and comes back 0.5 s after
       the first refused one: the actors' retries ride it out, the pass commits, and the
       dataset verifies and holds the teachers' outputs.
    2. The bucket goes away as the actors start (an error no retry fixes: no backoff, so
       this stays quick; a network outage that outlasts the retries ends the same way,
       ~30 s later): the pass fails with the actor's one-line error, and nothing is
       committed. Before the fix the driver got Ray's multi-line
       RayTaskError(UserCodeException), which is not an AmalgamError: `amalgam extract`
       ended in a traceback.
    """
    import boto3
    import torch

    from amalgam.distributed import extract
    from amalgam.distributed.extract import STATS_SIDE, PassSpec, compute_rows, run_pass
    from amalgam.job import parse_job
    from amalgam.zoo.manifest import load_zoo
    from tests.conftest import make_tiny_zoo
    from tests.robustness.faultproxy import wait_for
    from tests.test_store import _random_pool

    zoo = make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                           ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = parse_job({"version": 1, "name": "outage", "zoo": str(zoo), "pool": {"sources": [{"dataset": "mnist"}]},
                     "extraction": {"actors": 1, "batch_size": 32, "shard_size": 32}}, tmp_path / "job.yaml")
    _, teachers = load_zoo(zoo)
    pool = _random_pool(128)
    key = "outputs/t/p"

    def spec(uri: str) -> PassSpec:
        return PassSpec(kind="outputs", zoo_path=str(zoo), store_uri=uri, s3={"endpoint_url": proxy.url}, key=key,
                        fingerprints={}, num_rows=len(pool), shard_size=32, batch_size=32)

    check = extract._check_worker_s3_env
    as_actors_start = []  # what to do right after the driver's last step before the actors start

    def hook(u: str) -> None:
        check(u)
        as_actors_start.pop(0)()

    monkeypatch.setattr(extract, "_check_worker_s3_env", hook)

    # 1. A short outage: ridden out.
    uri = f"s3://{_bucket(moto_url)}/ray"

    def outage() -> None:
        proxy.refuse()
        proxy.reset_counters()
        back = threading.Thread(target=lambda: (wait_for(lambda: proxy.resets >= 1, 600), time.sleep(0.5),
                                                proxy.passthrough()), daemon=True)
        back.start()

    as_actors_start.append(outage)
    logs: list[str] = []
    res = run_pass(spec(uri), job, pool, [STATS_SIDE], log=logs.append, teachers=teachers)
    assert proxy.resets >= 1 and proxy.mode == "pass"  # the actors' first writes were refused
    assert any(line.startswith(f"[extract] outputs: committed {len(pool)} rows in 4 shards") for line in logs), logs
    ds = Dataset.open(open_store(uri, S3Options(endpoint_url=moto_url)), key)  # straight from moto
    assert ds.verify() == len(pool) and ds.manifest == res.dataset.manifest
    got = ds.read_all(["sample_id", "logits"])
    assert list(got["sample_id"]) == pool.ids
    taps = [i.name for i in teachers[0].taps()][:-1]
    want = compute_rows("outputs", teachers, {}, taps, pool.images, 32).logits
    torch.testing.assert_close(torch.from_numpy(np.array(got["logits"])), want, rtol=1e-5, atol=1e-5)

    # 2. A failure no retry fixes, in an actor: one line, nothing committed.
    bucket = _bucket(moto_url)
    uri = f"s3://{bucket}/ray"
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    as_actors_start.append(lambda: s3.delete_bucket(Bucket=bucket))  # empty: the driver has only read so far
    with pytest.raises(AmalgamError) as exc:
        run_pass(spec(uri), job, pool, [STATS_SIDE], log=logs.append, teachers=teachers)
    assert re.fullmatch(rf"{uri}/{key}/shards/shard-0000[0-3]\.{re.escape(STATS_SIDE)}: .*NO_SUCH_BUCKET.*",
                        _one_line(exc)), _one_line(exc)
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(AmalgamError, match="no manifest, the dataset was never committed"):
        Dataset.open(open_store(uri, S3Options(endpoint_url=moto_url)), key)
