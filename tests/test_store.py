"""The feature store without Ray: commit protocol, refusals, resume, the aligned reader, the CLI.

Every behaviour runs twice, on a local directory and on S3 (moto's standalone server on
loopback, reached through pyarrow's S3 filesystem exactly as a real bucket would be).
Capacity planning runs the real shard work of a tiny random-weight zoo in-process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from amalgam.cli import main
from amalgam.errors import AmalgamError
from amalgam.store.catalog import gc_candidates, scan
from amalgam.store.dataset import MANIFEST, Dataset, DatasetWriter, shard_file, side_file, tensor_column
from amalgam.store.location import S3Options, StoreLocation, open_store
from amalgam.store.reader import iter_aligned, open_dataset
from tests.conftest import make_tiny_zoo

KEY = "codes/abc/def"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto(port: int):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="module")
def moto_endpoint():
    port = _free_port()
    server = _moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_env(monkeypatch, endpoint: str | None) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "amalgam-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "amalgam-test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def _bucket(endpoint: str) -> str:
    import boto3

    name = f"amalgam-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch) -> str:
    """A fresh, empty store: a local directory, or a prefix in a fresh bucket on moto."""
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    _s3_env(monkeypatch, endpoint)
    return f"s3://{_bucket(endpoint)}/store"


def _arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "index": np.arange(n, dtype=np.int64),
        "sample_id": np.array([f"mnist:train:{3 * i + 1}" for i in range(n)], dtype=object),
        "logits": rng.normal(size=(n, 5)).astype(np.float32),
        "image": rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8),
        "code.conv1": rng.normal(size=(n, 6, 2, 2)).astype(np.float16),
        "code.fc1": rng.normal(size=(n, 8)).astype(np.float16),
    }


def _table(a: dict[str, np.ndarray], rows: range) -> pa.Table:
    cols = {}
    for name, x in a.items():
        part = x[rows.start : rows.stop]
        cols[name] = pa.array(list(part)) if name == "sample_id" else tensor_column(part)
    return pa.table(cols)


def _write(loc: StoreLocation, a: dict[str, np.ndarray], shard_size: int, key: str = KEY, commit: bool = True,
           shards: list[int] | None = None, side: bool = True) -> DatasetWriter:
    n = len(a["index"])
    w = DatasetWriter(loc, key, key.split("/")[0], {"pool": "p" * 64}, n, shard_size)
    for i in range(w.num_shards) if shards is None else shards:
        w.write_shard(i, _table(a, w.shard_rows(i)), {"stats.bin": f"side {i}".encode()} if side else None)
    if commit:
        w.commit(["stats.bin"] if side else [])
    return w


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- commit protocol

def test_commit_protocol_and_round_trip(store_uri):
    loc = open_store(store_uri)
    a = _arrays(50)
    w = _write(loc, a, 16, commit=False)
    # Every shard is there, but without the manifest nobody may read the dataset.
    assert w.done_shards(["stats.bin"]) == {0, 1, 2, 3}
    with pytest.raises(AmalgamError) as exc:
        Dataset.open(loc, KEY)
    assert _one_line(exc) == f"{store_uri}/{KEY}: no manifest, the dataset was never committed"
    m = w.commit(["stats.bin"])
    assert (m.num_rows, m.shard_size, [s.rows for s in m.shards]) == (50, 16, [16, 16, 16, 2])
    for s in m.shards:  # checksums are of the bytes as stored
        assert s.sha256 == hashlib.sha256(loc.read_bytes(f"{KEY}/{s.file}")).hexdigest()
        assert s.side_files["stats.bin"] == hashlib.sha256(f"side {s.index}".encode()).hexdigest()
    assert {c.name: (c.shape, c.dtype) for c in m.columns}["code.conv1"] == ([6, 2, 2], "halffloat")
    ds = open_dataset(store_uri, KEY)
    got = ds.read_all()
    for name in ("index", "logits", "image", "code.conv1", "code.fc1"):
        np.testing.assert_array_equal(got[name], a[name])
    assert list(got["sample_id"]) == list(a["sample_id"])
    assert ds.verify() == 50
    assert ds.read_side(m.shards[3], "stats.bin") == b"side 3"


def test_reads_feed_amalgam_store_read_bytes(store_uri):
    """Every byte the store reads back is counted in this process's amalgam_store_read_bytes_total."""
    from amalgam import metrics

    loc = open_store(store_uri)
    _write(loc, _arrays(20), 8)
    ds = open_dataset(store_uri, KEY)
    backend = "s3" if store_uri.startswith("s3://") else "local"

    def counted() -> float:
        return metrics.METRICS.registry.get_sample_value("amalgam_store_read_bytes_total", {"backend": backend}) or 0.0

    before = counted()
    ds.read_all()
    shard_bytes = sum(len(loc.read_bytes(f"{KEY}/{s.file}")) for s in ds.manifest.shards)
    # read_all read every shard once; the line above read them once more
    assert counted() - before == 2 * shard_bytes


def test_float_tensors_are_stored_byte_stream_split(tmp_path):
    """The encoding that makes codes small and fast to decode is really applied (pyarrow ignores unknown paths)."""
    loc = open_store(str(tmp_path / "store"))
    _write(loc, _arrays(20), 16)
    md = pq.ParquetFile(io.BytesIO(loc.read_bytes(f"{KEY}/{shard_file(0)}"))).metadata
    enc = {md.row_group(0).column(c).path_in_schema: md.row_group(0).column(c).encodings for c in range(md.num_columns)}
    for col in ("code.conv1", "code.fc1", "logits"):
        assert "BYTE_STREAM_SPLIT" in enc[f"{col}.list.element"], enc
    assert all("PLAIN_DICTIONARY" not in e and "RLE_DICTIONARY" not in e for e in enc.values())


def test_missing_manifest_refused_in_one_line(store_uri):
    loc = open_store(store_uri)
    _write(loc, _arrays(20), 8)
    loc.fs.delete_file(loc.path(f"{KEY}/{MANIFEST}"))
    with pytest.raises(AmalgamError) as exc:
        open_dataset(store_uri, KEY)
    assert _one_line(exc) == f"{store_uri}/{KEY}: no manifest, the dataset was never committed"


def _corrupt(loc: StoreLocation, rel: str) -> None:
    data = bytearray(loc.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    loc.write_bytes(rel, bytes(data))


def test_corrupted_shard_refused_naming_the_shard(store_uri):
    loc = open_store(store_uri)
    _write(loc, _arrays(40), 16)
    _corrupt(loc, f"{KEY}/{shard_file(1)}")
    ds = open_dataset(store_uri, KEY)
    batches = iter_aligned(ds, ["fc1"], 8)
    assert len(next(batches)["index"]) == 8  # shard 0 is fine
    with pytest.raises(AmalgamError) as exc:
        list(batches)
    assert _one_line(exc) == f"{store_uri}/{KEY}/shards/shard-00001.parquet: checksum mismatch (shard 1 is corrupt)"
    with pytest.raises(AmalgamError, match="shard-00001.parquet: checksum mismatch"):
        ds.verify()


def test_corrupted_side_file_refused(store_uri):
    loc = open_store(store_uri)
    _write(loc, _arrays(20), 16)
    _corrupt(loc, f"{KEY}/{side_file(1, 'stats.bin')}")
    ds = open_dataset(store_uri, KEY)
    with pytest.raises(AmalgamError) as exc:
        ds.read_side(ds.manifest.shards[1], "stats.bin")
    assert _one_line(exc).endswith("shard-00001.stats.bin: checksum mismatch (side file stats.bin of shard 1 is corrupt)")


@pytest.mark.parametrize("target", ["../../other/shard.parquet", "/etc/passwd", "s3://elsewhere/x.parquet"])
def test_manifest_pointing_outside_its_dataset_refused(store_uri, target):
    loc = open_store(store_uri)
    _write(loc, _arrays(20), 16)
    raw = json.loads(loc.read_bytes(f"{KEY}/{MANIFEST}"))
    raw["shards"][1]["file"] = target
    loc.write_bytes(f"{KEY}/{MANIFEST}", json.dumps(raw).encode())
    with pytest.raises(AmalgamError) as exc:
        open_dataset(store_uri, KEY)
    assert _one_line(exc) == f"{store_uri}/{KEY}/{MANIFEST}: shard 1 points outside its dataset ({target})"


def test_unknown_format_version_refused(store_uri):
    loc = open_store(store_uri)
    _write(loc, _arrays(10), 16)
    raw = json.loads(loc.read_bytes(f"{KEY}/{MANIFEST}"))
    raw["version"] = 99
    loc.write_bytes(f"{KEY}/{MANIFEST}", json.dumps(raw).encode())
    with pytest.raises(AmalgamError, match="format version 99, this amalgam reads 1"):
        open_dataset(store_uri, KEY)


def test_resume_keeps_done_shards_and_commit_needs_all(store_uri):
    loc = open_store(store_uri)
    a = _arrays(64)
    w = _write(loc, a, 16, commit=False, shards=[0, 2])
    # A shard whose side file landed but whose Parquet did not (killed in between) is not done.
    loc.write_bytes(f"{KEY}/{side_file(1, 'stats.bin')}", b"side 1")
    # Nor is a local temporary left by a write killed before its rename.
    loc.write_bytes(f"{KEY}/shards/.shard-00003.parquet.0badf00d.tmp", b"partial")
    assert w.done_shards(["stats.bin"]) == {0, 2}
    before = {i: loc.read_bytes(f"{KEY}/{shard_file(i)}") for i in (0, 2)}
    with pytest.raises(AmalgamError) as exc:
        w.commit(["stats.bin"])
    assert _one_line(exc) == f"{store_uri}/{KEY}: cannot commit, shard 1 is missing"
    w2 = DatasetWriter(loc, KEY, "codes", {"pool": "p" * 64}, 64, 16)  # a new process resuming
    for i in sorted(set(range(w2.num_shards)) - w2.done_shards(["stats.bin"])):
        w2.write_shard(i, _table(a, w2.shard_rows(i)), {"stats.bin": f"side {i}".encode()})
    w2.commit(["stats.bin"])
    assert all(loc.read_bytes(f"{KEY}/{shard_file(i)}") == before[i] for i in (0, 2))  # kept, not rewritten
    got = open_dataset(store_uri, KEY).read_all(["index"])
    np.testing.assert_array_equal(got["index"], np.arange(64))


def test_commit_refuses_a_shard_holding_other_rows(store_uri):
    loc = open_store(store_uri)
    a = _arrays(32)
    w = DatasetWriter(loc, KEY, "codes", {}, 32, 16)
    w.write_shard(0, _table(a, range(0, 16)))
    w.write_shard(1, _table(a, range(0, 16)))  # right row count, wrong rows
    with pytest.raises(AmalgamError) as exc:
        w.commit()
    assert _one_line(exc) == f"{store_uri}/{KEY}/shards/shard-00001.parquet: rows are not pool rows 16..31 in order"


def test_commit_refuses_a_shard_with_other_columns(tmp_path):
    loc = open_store(str(tmp_path / "store"))
    a = _arrays(32)
    w = DatasetWriter(loc, KEY, "codes", {}, 32, 16)
    w.write_shard(0, _table(a, range(0, 16)))
    w.write_shard(1, _table(a, range(16, 32)).drop_columns(["code.fc1"]))
    with pytest.raises(AmalgamError) as exc:
        w.commit()
    assert _one_line(exc) == f"{loc.uri}/{KEY}/shards/shard-00001.parquet: columns differ from shard 0's"


# ---------------------------------------------------------------- the aligned reader

def test_aligned_batches_cross_shards_and_keep_rows_together(store_uri):
    loc = open_store(store_uri)
    a = _arrays(70)
    _write(loc, a, 16)
    ds = open_dataset(store_uri, KEY)
    batches = list(iter_aligned(ds, ["conv1", "fc1"], 12, widths={"conv1": 4}))
    assert [len(b["sample_id"]) for b in batches] == [12] * 5 + [10]
    b = batches[1]  # rows 12..23: spans shards 0 and 1
    assert b["index"].dtype == torch.int64 and b["index"].tolist() == list(range(12, 24))
    assert b["sample_id"] == list(a["sample_id"][12:24])
    assert b["codes"]["conv1"].dtype == torch.float32 and tuple(b["codes"]["conv1"].shape) == (12, 4, 2, 2)
    np.testing.assert_array_equal(b["codes"]["conv1"].numpy(), a["code.conv1"][12:24, :4].astype(np.float32))
    np.testing.assert_array_equal(b["codes"]["fc1"].numpy(), a["code.fc1"][12:24].astype(np.float32))
    np.testing.assert_array_equal(b["logits"].numpy(), a["logits"][12:24])
    assert b["image"].dtype == torch.uint8
    np.testing.assert_array_equal(b["image"].numpy(), a["image"][12:24])
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(70))


def test_aligned_shuffle_is_a_seeded_permutation_with_rows_intact(store_uri):
    loc = open_store(store_uri)
    a = _arrays(70)
    _write(loc, a, 16)
    ds = open_dataset(store_uri, KEY)
    one = list(iter_aligned(ds, ["fc1"], 32, shuffle_seed=3, with_image=False))
    again = list(iter_aligned(ds, [], 32, shuffle_seed=3, with_image=False))  # other columns, same order
    other = list(iter_aligned(ds, ["fc1"], 32, shuffle_seed=4, with_image=False))
    order = torch.cat([b["index"] for b in one])
    assert sorted(order.tolist()) == list(range(70))  # every sample exactly once
    assert order.tolist() != list(range(70)) and order.tolist() != torch.cat([b["index"] for b in other]).tolist()
    assert order.tolist() == torch.cat([b["index"] for b in again]).tolist()
    assert "image" not in one[0] and [len(b["index"]) for b in one] == [32, 32, 6]
    for b in one:  # each row's id, logits and codes are the same sample's
        idx = b["index"].numpy()
        assert b["sample_id"] == list(a["sample_id"][idx])
        np.testing.assert_array_equal(b["logits"].numpy(), a["logits"][idx])
        np.testing.assert_array_equal(b["codes"]["fc1"].numpy(), a["code.fc1"][idx].astype(np.float32))


def test_aligned_reader_refusals(tmp_path):
    loc = open_store(str(tmp_path / "store"))
    _write(loc, _arrays(20), 16)
    ds = open_dataset(loc.uri, KEY)
    with pytest.raises(AmalgamError) as exc:
        iter_aligned(ds, ["conv9"], 4)
    assert _one_line(exc) == f"{loc.uri}/{KEY}: no codes for tap conv9 (stored: conv1, fc1)"
    with pytest.raises(AmalgamError, match="tap fc1 is stored at width 8, cannot read width 9"):
        iter_aligned(ds, ["fc1"], 4, widths={"fc1": 9})


# ---------------------------------------------------------------- the CLI

def test_cli_list_show_verify(store_uri, capsys):
    loc = open_store(store_uri)
    _write(loc, _arrays(40), 16)
    _write(loc, _arrays(10), 16, key="outputs/zz/yy", side=False)
    loc.write_bytes("codecs/abc/codecs.safetensors", b"weights")
    loc.write_bytes("codecs/abc/codecs.json", json.dumps({"taps": {"fc1": {"kind": "fc", "width": 8,
                                                                            "in_channels": 20}}}).encode())
    assert main(["store", "list", store_uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{store_uri}: 3 committed"
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert rows[KEY][1:4] == ["codes", "40", "3"] and rows["outputs/zz/yy"][1:4] == ["outputs", "10", "1"]
    assert rows["codecs/abc"][1] == "codecs"
    assert main(["store", "show", store_uri, KEY]) == 0
    shown = capsys.readouterr().out
    assert "rows: 40 in 3 shards of 16" in shown and "column code.conv1: halffloat[6,2,2]" in shown
    assert "side files per shard: stats.bin" in shown
    assert main(["store", "verify", store_uri]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"ok   {KEY}: 40 rows, 3 shards", "ok   outputs/zz/yy: 10 rows, 1 shards", f"{store_uri}: 2 datasets verified"]


def test_cli_verify_names_the_corrupt_shard_and_fails(store_uri, capsys):
    loc = open_store(store_uri)
    _write(loc, _arrays(40), 16)
    _write(loc, _arrays(10), 16, key="outputs/zz/yy", side=False)
    _corrupt(loc, f"{KEY}/{shard_file(2)}")
    assert main(["store", "verify", store_uri]) == 2
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [
        f"FAIL {KEY}: {store_uri}/{KEY}/shards/shard-00002.parquet: checksum mismatch (shard 2 is corrupt)",
        "ok   outputs/zz/yy: 10 rows, 1 shards"]
    assert cap.err == (f"amalgam: error: {store_uri}: 1 of 2 datasets failed verification; first: "
                       f"{store_uri}/{KEY}/shards/shard-00002.parquet: checksum mismatch (shard 2 is corrupt)\n")
    loc.fs.delete_file(loc.path(f"outputs/zz/yy/{MANIFEST}"))  # an uncommitted dataset named explicitly
    assert main(["store", "verify", store_uri, "outputs/zz/yy"]) == 2
    assert capsys.readouterr().out == f"FAIL outputs/zz/yy: {store_uri}/outputs/zz/yy: no manifest, the dataset was never committed\n"


def test_cli_gc_deletes_only_uncommitted_and_only_with_yes(store_uri, capsys):
    loc = open_store(store_uri)
    _write(loc, _arrays(40), 16)  # committed: kept
    _write(loc, _arrays(40), 16, key="codes/abc/partial", commit=False, shards=[0])  # interrupted: garbage
    loc.write_bytes("codecs/half/codecs.safetensors", b"weights")  # codecs.json never written: garbage
    loc.write_bytes("codecs/done/codecs.safetensors", b"weights")
    loc.write_bytes("codecs/done/codecs.json", b"{}")  # committed codecs: kept
    loc.write_bytes("registry/other.json", b"{}")  # not the store's layout: never touched
    assert main(["store", "gc", store_uri, "--older-than", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out[:-1]] == ["would delete codecs/half", "would delete codes/abc/partial"]
    assert out[0] == "would delete codecs/half (codecs, uncommitted, 7 B)"
    assert out[-1].startswith(f"{store_uri}: 2 uncommitted entries (") and out[-1].endswith("run again with --yes to delete them")
    assert {e.key for e in scan(loc)} == {"codecs/done", "codecs/half", KEY, "codes/abc/partial"}  # nothing deleted
    # Recently written leftovers may belong to a running extraction: spared by default.
    assert main(["store", "gc", store_uri, "--yes"]) == 0
    assert capsys.readouterr().out == f"{store_uri}: nothing to collect\n"
    assert main(["store", "gc", store_uri, "--yes", "--older-than", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out[:-1]] == ["delete codecs/half", "delete codes/abc/partial"]
    assert out[-1].startswith(f"{store_uri}: deleted 2 uncommitted entries (")
    assert {e.key for e in scan(loc) if e.files} == {"codecs/done", KEY}
    assert loc.read_bytes("registry/other.json") == b"{}"
    assert open_dataset(store_uri, KEY).verify() == 40
    assert gc_candidates(loc, 0.0) == []


# ---------------------------------------------------------------- S3 specifics

def test_s3_without_credentials_is_one_line(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(AmalgamError) as exc:
        open_store("s3://bucket/prefix")
    assert _one_line(exc) == "s3://bucket/prefix: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    assert main(["store", "list", "s3://bucket/prefix"]) == 2


def test_s3_missing_bucket_fails_fast_without_retrying(moto_endpoint, monkeypatch):
    _s3_env(monkeypatch, None)
    loc = open_store("s3://no-such-bucket-here/p", S3Options(endpoint_url=moto_endpoint))
    t0 = time.perf_counter()
    with pytest.raises(AmalgamError) as exc:
        loc.write_bytes("x", b"1")
    msg = _one_line(exc)
    assert msg.startswith("s3://no-such-bucket-here/p/x: ") and "NO_SUCH_BUCKET" in msg and "Request ID" not in msg
    assert "attempts" not in msg and time.perf_counter() - t0 < loc.backoff_s  # no backoff slept


def test_s3_transient_outage_is_retried_then_succeeds(monkeypatch):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    _s3_env(monkeypatch, endpoint)
    server = _moto(port)
    bucket = _bucket(endpoint)
    server.stop()  # the server goes away (moto keeps its buckets in-process)
    loc = open_store(f"s3://{bucket}/p")
    loc.retries, loc.backoff_s = 6, 0.2
    restarted = []
    timer = threading.Timer(0.5, lambda: restarted.append(_moto(port)))
    timer.start()
    try:
        t0 = time.perf_counter()
        loc.write_bytes("obj", b"payload")  # fails while the server is down, then succeeds
        assert time.perf_counter() - t0 >= 0.5
        assert loc.read_bytes("obj") == b"payload"
    finally:
        timer.join()
        for s in restarted:
            s.stop()
    # Down for good: bounded retries, then one line naming the object and the cause.
    loc.retries, loc.backoff_s = 1, 0.05
    with pytest.raises(AmalgamError) as exc:
        loc.exists("obj")
    msg = _one_line(exc)
    assert msg.startswith(f"s3://{bucket}/p/obj: failed after 2 attempts: ") and "NETWORK_CONNECTION" in msg


# ---------------------------------------------------------------- capacity planning

def test_check_capacity_is_one_line():
    from amalgam.distributed.extract import check_capacity

    check_capacity("/data/store/x", 10_000_000, 10_000_001)
    check_capacity("s3://b/p/x", 10**15, None)  # S3: no bound, no check
    with pytest.raises(AmalgamError) as exc:
        check_capacity("/data/store/outputs/a/b", 123_400_000, 5_600_000)
    assert _one_line(exc) == "/data/store/outputs/a/b: needs ~123.4 MB, only 5.6 MB free"


def test_actor_image_conversion_is_the_engines():
    """extract.py keeps torchvision out of Ray actors with its own copy of to_float: they must agree."""
    import subprocess
    import sys

    from amalgam.data.datasets import to_float
    from amalgam.distributed.extract import to_unit

    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(to_unit(x), to_float(x))
    code = "import sys, amalgam.distributed.extract; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def _tiny_job(tmp_path: Path, store: str, shard_size: int):
    from amalgam.job import parse_job

    zoo = make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                           ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = parse_job({"version": 1, "name": "plan", "zoo": str(zoo), "pool": {"sources": [{"dataset": "mnist"}]},
                     "store": {"uri": store}, "extraction": {"actors": 2, "batch_size": 32,
                                                               "shard_size": shard_size}}, tmp_path / "job.yaml")
    return job


def _random_pool(n: int):
    from amalgam.data.pool import Pool

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    return Pool([f"rand:{i}" for i in range(n)], images, torch.zeros(n, dtype=torch.int64), ["x"])


def test_plan_predicts_the_bytes_written_and_refusal_writes_nothing(tmp_path):
    """The plan's bytes come within 10 % of what the same work writes; a store too small is refused up front."""
    from amalgam.distributed.extract import (STATS_SIDE, PassSpec, compute_rows, measure_plan, run_pass,
                                             shard_table)
    from amalgam.zoo.manifest import load_zoo

    job = _tiny_job(tmp_path, str(tmp_path / "store"), 64)
    pool = _random_pool(300)
    _, teachers = load_zoo(job.zoo_path())
    taps = [i.name for i in teachers[0].taps()][:-1]
    loc = open_store(job.store_uri())
    spec = PassSpec(kind="outputs", zoo_path=str(job.zoo_path()), store_uri=job.store_uri(), s3={},
                    key="outputs/t/p", fingerprints={}, num_rows=len(pool), shard_size=64, batch_size=32)
    writer = DatasetWriter(loc, spec.key, "outputs", {}, len(pool), 64)
    todo = list(range(writer.num_shards))

    logs: list[str] = []
    with pytest.raises(AmalgamError) as exc:
        run_pass(spec, job, pool, [STATS_SIDE], log=logs.append, teachers=teachers, free_bytes=50_000)
    plan = measure_plan(spec, teachers, {}, taps, pool, writer, todo, parallel=2)
    assert _one_line(exc) == f"{loc.uri}/outputs/t/p: needs ~{plan.bytes / 1e6:.1f} MB, only 0.1 MB free"
    assert len(logs) == 1 and logs[0].startswith(
        f"[extract] plan: outputs: 300 samples in 5 shards, ~{plan.bytes / 1e6:.1f} MB, ~")
    assert loc.list_dir("", recursive=True) == []  # refused before anything was written

    for i in todo:  # the same work, written: the plan's bytes were a prediction of exactly this
        rows = writer.shard_rows(i)
        cols = compute_rows("outputs", teachers, {}, taps, pool.images[rows.start:rows.stop], 32)
        table, side = shard_table("outputs", rows, pool.ids, pool.images, cols)
        writer.write_shard(i, table, side)
    written = sum(e.size for e in loc.list_dir("outputs/t/p/shards"))
    assert plan.samples == 300 and plan.shards == 5 and plan.measured_rows == 64
    assert abs(plan.bytes - written) / written < 0.1, (plan.bytes, written)
    assert plan.seconds > 0
