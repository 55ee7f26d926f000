"""Distributed extraction: frozen teachers on Ray Data actors, features streamed to the store.

Two passes over the pool, neither of which writes raw taps (the demo's full-resolution taps
of four teachers are ~250 KB per image; the compact codes are a fraction of that):

1. ``outputs``: per shard, the teachers' logits, plus the shard's share of every tap's
   PCA statistics as a side file (sums, so the whole pool's statistics are their sum:
   exact, whichever actor computed which shard, and resumable shard by shard).
2. ``codes``: after the auto-encoders are fitted from those statistics, per shard the
   images, logits and compact codes of every tap at the job's ``max_width``.

Each pass is a Ray Dataset of shard indices mapped by :class:`ShardExtractor`, a callable
class (Ray Data's pattern for stateful models): an actor loads and verifies the teachers
once, then turns shard indices into written shards. Shards already in the store are
skipped, so a killed extraction resumes where it stopped; the manifest is written last.
Both passes call the engine (:func:`capture_teachers`, :class:`TapStats`, codecs): no
algorithm is copied here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from amalgam.data.datasets import to_float
from amalgam.data.pool import Pool
from amalgam.engine.amalgamate import LinearCodec, TapStats
from amalgam.engine.capture import capture_teachers
from amalgam.errors import AmalgamError
from amalgam.job import Job
from amalgam.store.codecs import load_codecs, stats_from_bytes, stats_to_bytes
from amalgam.store.dataset import Dataset, DatasetWriter, tensor_column
from amalgam.store.fingerprint import short, zoo_fingerprint
from amalgam.store.location import S3Options, StoreLocation, open_store
from amalgam.zoo.manifest import load_zoo

STATS_SIDE = "stats.safetensors"


def outputs_key(zoo_fp: str, pool_fp: str) -> str:
    return f"outputs/{short(zoo_fp)}/{short(pool_fp)}"


def codes_key(codec_fp: str, pool_fp: str) -> str:
    return f"codes/{short(codec_fp)}/{short(pool_fp)}"


def codecs_key(codec_fp: str) -> str:
    return f"codecs/{short(codec_fp)}"


@dataclass(frozen=True)
class PassSpec:
    """Everything an extraction actor needs, picklable."""

    kind: str  # "outputs" or "codes"
    zoo_path: str
    store_uri: str
    s3: dict
    key: str
    fingerprints: dict[str, str]
    num_rows: int
    shard_size: int
    batch_size: int
    codecs_key: str | None = None
    torch_threads: int = 1


class ShardExtractor:
    """Ray Data callable class: loads the zoo once per actor, then extracts whole shards."""

    def __init__(self, spec: PassSpec, images_ref: list, ids_ref: list):
        import ray

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _, teachers = load_zoo(spec.zoo_path)  # verifies hashes, taps and shapes
        self.teachers = [t.to(self.device) for t in teachers]
        self.images = torch.from_numpy(np.array(ray.get(images_ref[0])))  # writable copy
        self.ids = ray.get(ids_ref[0])
        self.loc = open_store(spec.store_uri, S3Options(**spec.s3))
        self.writer = DatasetWriter(self.loc, spec.key, spec.kind, spec.fingerprints, spec.num_rows, spec.shard_size)
        self.codecs: dict[str, LinearCodec] = {}
        if spec.codecs_key:
            self.codecs = {t: c.to(self.device) for t, c in load_codecs(self.loc, spec.codecs_key)[0].items()}
        self.taps = [i.name for i in self.teachers[0].taps()][:-1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, rows, forwards, seconds = [], [], [], []
        for i in batch["shard"].tolist():
            t0 = time.perf_counter()
            n = self._extract(int(i))
            shards.append(int(i))
            rows.append(n)
            forwards.append(n * len(self.teachers))
            seconds.append(time.perf_counter() - t0)
        return {"shard": np.array(shards), "rows": np.array(rows), "teacher_forwards": np.array(forwards),
                "seconds": np.array(seconds)}

    @torch.no_grad()
    def _extract(self, shard: int) -> int:
        rows = self.writer.shard_rows(shard)
        idx = torch.arange(rows.start, rows.stop)
        infos = [{i.name: i for i in t.taps()} for t in self.teachers]
        stats = {tap: TapStats([inf[tap].channels for inf in infos], infos[0][tap].kind) for tap in self.taps}
        logits, codes = [], {tap: [] for tap in self.codecs}
        for start in range(0, len(idx), self.spec.batch_size):
            b = idx[start : start + self.spec.batch_size]
            out, feats = capture_teachers(self.teachers, to_float(self.images[b]).to(self.device))
            logits.append(torch.cat(out, 1).float().cpu())
            if self.spec.kind == "outputs":
                for tap in self.taps:
                    stats[tap].update([f[tap].cpu() for f in feats])
            else:
                for tap, codec in self.codecs.items():
                    codes[tap].append(codec.encode(torch.cat([f[tap] for f in feats], 1)).half().cpu())
        columns = {
            "index": pa.array(idx.numpy().astype(np.int64)),
            "sample_id": pa.array([self.ids[j] for j in rows]),
            "logits": tensor_column(torch.cat(logits).numpy()),
        }
        side = None
        if self.spec.kind == "outputs":
            side = {STATS_SIDE: stats_to_bytes(stats)}
        else:
            columns["image"] = tensor_column(self.images[idx].numpy())
            for tap, parts in codes.items():
                columns[f"code.{tap}"] = tensor_column(torch.cat(parts).numpy())
        self.writer.write_shard(shard, pa.table(columns), side)
        return len(idx)


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` or start an embedded local Ray (on loopback), once per process."""
    import ray

    if ray.is_initialized():
        return
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    import logging

    import ray.data

    # Our own progress bar reports samples/s; Ray Data's per-operator bars and periodic
    # progress logs would interleave with it on a terminal.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass
class PassResult:
    dataset: Dataset
    teacher_forwards: int  # performed by this call (0 when everything was already stored)
    seconds: float
    reused: bool


def run_pass(spec: PassSpec, job: Job, pool: Pool, side_names: list[str], log=print) -> PassResult:
    """Extract the shards of ``spec`` that the store lacks, on a Ray Data actor pool; commit."""
    import ray
    import ray.data

    loc = open_store(spec.store_uri, S3Options(**spec.s3))
    writer = DatasetWriter(loc, spec.key, spec.kind, spec.fingerprints, spec.num_rows, spec.shard_size)
    if writer.committed():
        log(f"[extract] {spec.kind}: reusing {loc.uri_of(spec.key)} (no teacher run)")
        return PassResult(Dataset.open(loc, spec.key), 0, 0.0, True)
    done = writer.done_shards(side_names)
    todo = [i for i in range(writer.num_shards) if i not in done]
    if done:
        log(f"[extract] {spec.kind}: resuming, {len(done)}/{writer.num_shards} shards already stored")
    t0 = time.perf_counter()
    forwards = 0
    if todo:
        images_ref = [ray.put(pool.images.numpy())]
        ids_ref = [ray.put(pool.ids)]
        ext = job.extraction
        ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        out = ds.map_batches(
            ShardExtractor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(ext.actors, len(todo))),
            num_cpus=ext.cpus_per_actor,
            num_gpus=ext.gpus_per_actor,
            fn_constructor_kwargs={"spec": spec, "images_ref": images_ref, "ids_ref": ids_ref},
        )
        total = sum(len(writer.shard_rows(i)) for i in todo)
        bar = tqdm(total=total, desc=f"extract {spec.kind}", unit="sample", leave=False)
        for row in out.iter_rows():
            bar.update(int(row["rows"]))
            forwards += int(row["teacher_forwards"])
        bar.close()
    manifest = writer.commit(side_names)
    secs = time.perf_counter() - t0
    rate = sum(len(writer.shard_rows(i)) for i in todo) / max(secs, 1e-9)
    log(f"[extract] {spec.kind}: committed {manifest.num_rows} rows in {len(manifest.shards)} shards "
        f"({len(todo)} extracted, {rate:.0f} samples/s) at {loc.uri_of(spec.key)}")
    return PassResult(Dataset.open(loc, spec.key), forwards, secs, False)


def sum_stats(ds: Dataset) -> dict[str, TapStats]:
    total: dict[str, TapStats] | None = None
    for s in ds.manifest.shards:
        part = stats_from_bytes(ds.read_side(s, STATS_SIDE))
        total = part if total is None else {t: total[t] + part[t] for t in total}
    if total is None:
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: no statistics")
    return total


def outputs_spec(job: Job, pool_fp: str, zoo_fp: str) -> PassSpec:
    return PassSpec(
        kind="outputs", zoo_path=str(job.zoo_path()), store_uri=job.store_uri(),
        s3=job.store.s3.model_dump(), key=outputs_key(zoo_fp, pool_fp),
        fingerprints={"zoo": zoo_fp, "pool": pool_fp}, num_rows=0, shard_size=job.extraction.shard_size,
        batch_size=job.extraction.batch_size,
    )


def zoo_fp_of(job: Job) -> str:
    manifest, _ = load_zoo(job.zoo_path())
    return zoo_fingerprint(manifest.teachers)


def store_location(job: Job) -> StoreLocation:
    return open_store(job.store_uri(), job.store.s3)


def zoo_dir(job: Job) -> Path:
    return job.zoo_path().parent
