"""Concurrency (issue 10, part 5): two jobs extract the same teachers into one store at once.

Same zoo, same pool: the same dataset keys, so the jobs race for every shard and every
commit. What must hold: no corruption (the committed dataset verifies, and a job still
running can never change it), one winner (one manifest per key, written once; the loser
reuses the winner's dataset or accepts it at its own commit), and both jobs succeed.

The unit tests drive two :class:`DatasetWriter` at once, deterministically, with bytes
that differ between the jobs (as they do between batch sizes, GPUs or BLAS builds). The
slow test runs two real ``amalgam extract JOB`` processes, submitted together to one Ray
cluster; their jobs differ only in ``extraction.batch_size``, which is not part of any
key but changes the bytes of the statistics side files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from amalgam.cli import main
from amalgam.data.pool import PoolSpec, build_pool
from amalgam.errors import AmalgamError
from amalgam.store.catalog import scan
from amalgam.store.dataset import MANIFEST, Dataset, DatasetWriter, shard_file, side_file
from amalgam.store.location import S3Options, open_store
from tests.conftest import make_tiny_zoo
from tests.test_store import KEY, _arrays, _bucket, _free_port, _moto, _one_line, _s3_env, _table

# ---------------------------------------------------------------- two writers, deterministically

ROWS, SIZE = 64, 16
SIDE = ["stats.bin"]


@pytest.fixture(scope="module")
def moto_url():
    port = _free_port()
    server = _moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    url = request.getfixturevalue("moto_url")
    _s3_env(monkeypatch, None)
    return open_store(f"s3://{_bucket(url)}/store", S3Options(endpoint_url=url))


def _job_data(job: str) -> dict[str, np.ndarray]:
    """The same rows as two jobs compute them: equal up to the last bit of the float columns."""
    a = _arrays(ROWS)
    if job == "b":
        a["logits"] = np.nextafter(a["logits"], np.float32(np.inf))
    return a


def _writer(loc, fingerprints: dict | None = None) -> DatasetWriter:
    return DatasetWriter(loc, KEY, "outputs", fingerprints or {"pool": "p" * 64}, ROWS, SIZE)


def _write_all(w: DatasetWriter, job: str) -> None:
    a = _job_data(job)
    for i in range(w.num_shards):
        w.write_shard(i, _table(a, w.shard_rows(i)), {"stats.bin": f"job {job} stats of shard {i}".encode()})


def _stored(loc) -> dict[str, bytes]:
    names = [f for i in range(ROWS // SIZE) for f in (shard_file(i), side_file(i, "stats.bin"))]
    return {f: loc.read_bytes(f"{KEY}/{f}") for f in names}


def test_a_job_still_running_cannot_change_a_committed_dataset(store):
    """Job A commits; job B, started at the same time (nothing stored then), writes its own shards afterwards.

    Before the fix B's writes replaced A's files under A's manifest: A's committed dataset
    failed verification ("checksum mismatch") until B committed over it, and for good if B
    died first.
    """
    a, b = _writer(store), _writer(store)
    assert a.done_shards(SIDE) == b.done_shards(SIDE) == set()
    _write_all(a, "a")
    m_a = a.commit(SIDE)
    assert a.won_commit is True
    files = _stored(store)
    _write_all(b, "b")  # every file is already there: kept
    assert _stored(store) == files
    ds = Dataset.open(store, KEY)
    assert ds.verify() == ROWS
    np.testing.assert_array_equal(ds.read_all(["logits"])["logits"], _job_data("a")["logits"])
    m_b = b.commit(SIDE)  # B accepts A's dataset: the same shards
    assert b.won_commit is False and m_b == m_a
    assert Dataset.open(store, KEY).manifest == m_a and Dataset.open(store, KEY).verify() == ROWS


def test_interleaved_writers_commit_one_consistent_dataset(store):
    """Shards of both jobs interleaved (each shard from whichever job was first): one consistent dataset."""
    a, b = _writer(store), _writer(store)
    da, db = _job_data("a"), _job_data("b")
    for i in range(a.num_shards):
        first, second, data = (a, b, (da, db)) if i % 2 == 0 else (b, a, (db, da))
        first.write_shard(i, _table(data[0], first.shard_rows(i)), {"stats.bin": f"first {i}".encode()})
        second.write_shard(i, _table(data[1], second.shard_rows(i)), {"stats.bin": f"second {i}".encode()})
    m_b = b.commit(SIDE)
    m_a = a.commit(SIDE)
    assert (b.won_commit, a.won_commit) == (True, False) and m_a == m_b
    ds = Dataset.open(store, KEY)
    assert ds.verify() == ROWS
    got = ds.read_all(["logits"])["logits"]
    for i in range(a.num_shards):  # each shard is its first writer's
        rows = slice(i * SIZE, (i + 1) * SIZE)
        np.testing.assert_array_equal(got[rows], (da if i % 2 == 0 else db)["logits"][rows])
        assert ds.read_side(ds.manifest.shards[i], "stats.bin") == f"first {i}".encode()


def test_a_commit_that_differs_from_the_committed_one_is_refused_in_one_line(store):
    a = _writer(store)
    _write_all(a, "a")
    m_a = a.commit(SIDE)
    other = _writer(store, {"pool": "q" * 64})  # not the same dataset, though under the same key
    with pytest.raises(AmalgamError) as exc:
        other.commit(SIDE)
    assert re.fullmatch(rf"{store.uri}/{KEY}/{MANIFEST}: committed meanwhile by another job \(.* pid {os.getpid()}, "
                        r"[0-9TZ:-]+\) with other content; kept as it is", _one_line(exc)), _one_line(exc)
    assert Dataset.open(store, KEY).manifest == m_a


def test_simultaneous_commits_have_exactly_one_winner(tmp_path):
    """Eight commits of one dataset released at once (a local store: the link is exclusive)."""
    loc = open_store(str(tmp_path / "store"))
    _write_all(_writer(loc), "a")
    writers = [_writer(loc) for _ in range(8)]
    start = threading.Barrier(len(writers))

    def commit(w: DatasetWriter):
        start.wait()
        return w.commit(SIDE)

    with ThreadPoolExecutor(len(writers)) as pool:
        manifests = list(pool.map(commit, writers))
    assert sorted(w.won_commit for w in writers) == [False] * 7 + [True]
    stored = Dataset.open(loc, KEY).manifest
    assert all(m == stored for m in manifests)
    assert [p.name for p in (tmp_path / "store" / KEY).iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------- two real jobs

POOL = 512
SHARD = 128
TIMEOUT_S = 300


def _job(d: Path, name: str, zoo: Path, store: Path, batch_size: int) -> Path:
    raw = {
        "version": 1, "name": name, "zoo": str(zoo),
        "pool": {"sources": [{"dataset": "mnist", "count": POOL}]},
        "amalgamation": {"widths": {"default": 0.5}},
        "store": {"uri": str(store)},
        "extraction": {"actors": 1, "batch_size": batch_size, "shard_size": SHARD},
    }
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _start(job: Path, log: Path, address: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "amalgam.cli", "extract", str(job), "--address", address],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_two_jobs_extracting_the_same_teachers_into_one_store(tmp_path, data_root):
    """Two drivers submitted together to one Ray cluster (this process's, 2 CPUs: one actor each).

    One cluster rather than two embedded ones: the drivers then start within a second of
    each other (an embedded Ray's start-up varies by seconds here), so both passes race.
    """
    import ray

    from amalgam.distributed.extract import ensure_ray

    if ray.is_initialized():  # another module's, perhaps with other settings
        ray.shutdown()
    ensure_ray(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    try:
        _two_jobs(tmp_path, address)
    finally:
        ray.shutdown()


def _two_jobs(tmp_path: Path, address: str) -> None:
    from tests.test_extract import _kill_session

    zoo = make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                           ("b", ["mnist/3", "mnist/4"], [6, 8])])
    store = tmp_path / "store"
    jobs = [_job(tmp_path, "job-a", zoo, store, 64), _job(tmp_path, "job-b", zoo, store, 50)]
    logs = [tmp_path / f"{p.stem}.log" for p in jobs]
    procs = [_start(j, log, address) for j, log in zip(jobs, logs)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_session(p)
    texts = [log.read_text(errors="replace") for log in logs]
    tails = "\n\n".join(f"--- {j.stem} (exit {c}):\n{t[-3000:]}" for j, c, t in zip(jobs, codes, texts))
    assert codes == [0, 0], tails

    loc = open_store(str(store))
    entries = {e.key: e for e in scan(loc)}
    datasets = {k.split("/")[0]: k for k in entries if k.startswith(("outputs/", "codes/"))}
    assert sorted(datasets) == ["codes", "outputs"] and len(entries) == 3, entries  # + one codecs entry
    assert all(e.committed for e in entries.values()), entries
    assert main(["store", "verify", str(store)]) == 0
    pool = build_pool(PoolSpec.model_validate({"sources": [{"dataset": "mnist", "count": POOL}]}))
    for kind, key in datasets.items():
        ds = Dataset.open(loc, key)
        assert ds.manifest.num_rows == POOL and ds.verify() == POOL
        ids = list(ds.read_all(["sample_id"])["sample_id"])
        assert ids == pool.ids and len(set(ids)) == POOL  # the pool in order: none missing, none twice
        # One winner: one job committed it, the other reused it (found committed at its start, or
        # committed meanwhile, at its own commit); the manifest is the winner's.
        won = [i for i, t in enumerate(texts) if f"[extract] {kind}: committed {POOL} rows" in t]
        reused = re.compile(rf"\[extract\] {kind}: (reusing |\S+ was committed meanwhile)")
        lost = [i for i, t in enumerate(texts) if reused.search(t)]
        assert len(won) == 1 and lost == [1 - won[0]], tails
        assert ds.manifest.created_by["pid"] == str(procs[won[0]].pid)
