"""Extraction benchmark: Ray vs a single-process loop vs the compute limit; stored bytes; read throughput.

On the demo zoo (``$AMALGAM_HOME/zoos/mnist-fashion-4``) and one pool (half MNIST, half
Fashion-MNIST), the codes pass (teacher forwards, encoding, images + logits + codes to
zstd Parquet shards) is run three ways in one process, side by side:

1. Ray: :func:`run_pass` exactly as ``amalgam extract`` runs it (an embedded Ray, an
   actor pool, the driver's capacity plan, commit), wall time from call to commit.
2. loop: one process, no Ray, the same :func:`compute_rows` + :func:`shard_table` per
   shard, written through the same :class:`DatasetWriter` and committed.
3. no I/O: the same loop computing the same values and writing nothing (the compute limit).

Each comparison gives both sides the same cores: W actors of one torch thread each against
a loop with W torch threads (W = 1 measures Ray's overhead alone; W = all cores, what a
user gets).

The three are run in rounds (ray, loop, no-I/O, then again) and each reports its best
round, so a neighbour's burst on this shared machine does not land on one of them only.
Then: bytes of the stored codes dataset vs the raw float32 taps of all teachers for the
same samples (arithmetic from the tap shapes, and a real zstd Parquet of raw taps on a
subset), and the aligned reader's throughput.

    .venv/bin/python bench/extract.py [--pool 4000] [--shard-size 500] [--workers 1,2] [--rounds 2] [--keep]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from amalgam.data.datasets import to_float
from amalgam.data.pool import Pool, PoolSpec, build_pool
from amalgam.distributed.extract import PassSpec, compute_rows, ensure_ray, run_pass, shard_table
from amalgam.engine.amalgamate import TapStats, fit_pca
from amalgam.engine.capture import capture_teachers
from amalgam.engine.run_local import resolve_widths
from amalgam.job import load_job
from amalgam.paths import amalgam_home
from amalgam.store.codecs import save_codecs
from amalgam.store.dataset import Dataset, DatasetWriter, parquet_bytes, tensor_column
from amalgam.store.location import open_store
from amalgam.store.reader import iter_aligned
from amalgam.zoo.manifest import load_zoo

ROOT = Path(__file__).resolve().parents[1]


def loop_pass(teachers, codecs, taps, pool: Pool, shard_size: int, batch_size: int, writer: DatasetWriter | None) -> float:
    """The single-process extraction: same work per shard as a Ray actor; ``writer=None``: no I/O at all."""
    t0 = time.perf_counter()
    num_shards = -(-len(pool) // shard_size)
    for i in range(num_shards):
        rows = range(i * shard_size, min(len(pool), (i + 1) * shard_size))
        cols = compute_rows("codes", teachers, codecs, taps, pool.images[rows.start : rows.stop], batch_size)
        if writer is not None:
            table, _ = shard_table("codes", rows, pool.ids, pool.images, cols)
            writer.write_shard(i, table)
    if writer is not None:
        writer.commit()
    return time.perf_counter() - t0


def fit_codecs(job, teachers, taps, pool: Pool, batch_size: int):
    """The job's DFA codecs at its widths, from statistics of a pool subset (the bench times the codes pass)."""
    infos = [{i.name: i for i in t.taps()} for t in teachers]
    stats = {tap: TapStats([inf[tap].channels for inf in infos], infos[0][tap].kind) for tap in taps}
    with torch.no_grad():
        for s in range(0, len(pool), batch_size):
            _, feats = capture_teachers(teachers, to_float(pool.images[s : s + batch_size]))
            for tap in taps:
                stats[tap].update([f[tap] for f in feats])
    widths = resolve_widths(job, stats, maximum=True)
    return {tap: fit_pca(s, job.amalgamation.balance).codec(widths[tap]) for tap, s in stats.items()}


def raw_tap_sizes(teachers, pool: Pool) -> dict[str, int]:
    """float32 values per sample of every tap of every teacher (the head tap is the logits)."""
    with torch.no_grad():
        out, feats = capture_teachers(teachers, to_float(pool.images[:1]))
    sizes: dict[str, int] = {}
    for f in feats:
        for tap, x in f.items():
            sizes[tap] = sizes.get(tap, 0) + x[0].numel()
    return sizes


def raw_parquet_bytes_per_sample(teachers, pool: Pool, n: int) -> float:
    """The raw float32 taps of all teachers for ``n`` samples, written as the store writes shards; per sample."""
    with torch.no_grad():
        _, feats = capture_teachers(teachers, to_float(pool.images[:n]))
    cols = {f"{t.name}.{tap}": tensor_column(x.float().numpy()) for t, f in zip(teachers, feats) for tap, x in f.items()}
    return len(parquet_bytes(pa.table(cols))) / n


def dataset_bytes(ds: Dataset) -> dict[str, int]:
    """Stored bytes of the dataset, and of each column (compressed, from the Parquet metadata)."""
    total, per_col = 0, {}
    for s in ds.manifest.shards:
        data = ds.loc.read_bytes(f"{ds.key}/{s.file}")
        total += len(data)
        md = pq.ParquetFile(io.BytesIO(data)).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0] if not col.path_in_schema.startswith("code.") else \
                    ".".join(col.path_in_schema.split(".")[:2])
                per_col[name] = per_col.get(name, 0) + col.total_compressed_size
    return {"total": total, **per_col}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(amalgam_home() / "zoos" / "mnist-fashion-4" / "zoo.yaml"))
    ap.add_argument("--job", default=str(ROOT / "jobs" / "mnist-fashion-4.yaml"), help="amalgamation widths from here")
    ap.add_argument("--pool", type=int, default=4000, help="images (half MNIST, half Fashion-MNIST)")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")],
                    default=sorted({1, os.cpu_count() or 1}),
                    help="comma-separated: Ray actors (1 torch thread each) = loop threads, per configuration")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(amalgam_home() / "bench" / "extract"))
    ap.add_argument("--keep", action="store_true", help="keep the bench store (default: deleted at the end)")
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    job = load_job(args.job)
    job.zoo = args.zoo
    job.store.uri = str(out / "store")
    job.extraction.shard_size, job.extraction.batch_size = args.shard_size, args.batch_size
    manifest, teachers = load_zoo(args.zoo)
    half = args.pool // 2
    pool = build_pool(PoolSpec.model_validate(
        {"sources": [{"dataset": "mnist", "count": half}, {"dataset": "fashion", "count": args.pool - half}]}))
    taps = [i.name for i in teachers[0].taps()][:-1]
    torch.set_num_threads(max(args.workers))
    codecs = fit_codecs(job, teachers, taps, pool.subset(slice(0, min(len(pool), 2000))), args.batch_size)
    loc = open_store(job.store_uri())
    save_codecs(loc, "codecs/bench", codecs, {"bench": True})
    n = len(pool)
    print(f"# extraction benchmark: zoo {manifest.name} ({len(teachers)} teachers), pool {n} images, "
          f"shards of {args.shard_size}, batch {args.batch_size}; {os.cpu_count()} CPUs; best of {args.rounds} rounds "
          f"(rounds interleave Ray, loop and no-I/O runs)\n")
    print("codes widths: " + ", ".join(f"{t} {c.width}/{c.in_channels}" for t, c in codecs.items()))

    ensure_ray(num_cpus=max(args.workers))
    print("\n## Throughput (codes pass)\n")
    print("| workers | extraction | seconds | samples/s | vs loop |")
    print("|---:|---|---:|---:|---:|")
    verdicts, ray_ds, same = [], None, True
    for w in args.workers:
        job.extraction.actors = w
        ray_s, ray_warm, loop_s, noio_s = [], [], [], []
        for r in range(args.rounds):
            key = f"codes/ray-{w}-{r}/pool"
            spec = PassSpec(kind="codes", zoo_path=args.zoo, store_uri=job.store_uri(), s3={}, key=key, fingerprints={},
                            num_rows=n, shard_size=args.shard_size, batch_size=args.batch_size, codecs_key="codecs/bench")
            res = run_pass(spec, job, pool, [], log=lambda m: print("  " + m, file=sys.stderr), teachers=teachers)
            ray_s.append(res.seconds)
            ray_warm.append(res.timings["extract"] + res.timings["commit"])
            torch.set_num_threads(w)  # the loop gets as many cores as the actors
            lkey = f"codes/loop-{w}-{r}/pool"
            writer = DatasetWriter(loc, lkey, "codes", {}, n, args.shard_size)
            loop_s.append(loop_pass(teachers, codecs, taps, pool, args.shard_size, args.batch_size, writer))
            noio_s.append(loop_pass(teachers, codecs, taps, pool, args.shard_size, args.batch_size, None))
            print(f"  {w} workers, round {r + 1}: ray {ray_s[-1]:.2f}s ("
                  + ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items())
                  + f"), loop {loop_s[-1]:.2f}s, no I/O {noio_s[-1]:.2f}s", file=sys.stderr)
            same = same and all(a.equals(b) for a, b in zip(res.dataset.iter_shards(), Dataset.open(loc, lkey).iter_shards()))
            loc.delete_dir(lkey)
            if ray_ds is not None:
                loc.delete_dir(ray_ds.key)
            ray_ds = res.dataset
        ray_t, warm_t, loop_t, noio_t = min(ray_s), min(ray_warm), min(loop_s), min(noio_s)
        what = f"{w} actor{'s' if w > 1 else ''} x 1 thread vs {w}-thread loop"
        print(f"| {w} | Ray Data actor pool (`run_pass` end to end: plan, Ray/actor start-up, extraction, commit) | "
              f"{ray_t:.2f} | {n / ray_t:.0f} | {loop_t / ray_t:.2f}x |")
        print(f"| {w} | Ray after start-up (extraction + commit) | {warm_t:.2f} | {n / warm_t:.0f} | {loop_t / warm_t:.2f}x |")
        print(f"| {w} | single-process loop: same forwards, same Parquet shards, commit | {loop_t:.2f} | {n / loop_t:.0f} | 1.00x |")
        print(f"| {w} | single-process loop, no I/O (compute limit) | {noio_t:.2f} | {n / noio_t:.0f} | {loop_t / noio_t:.2f}x |")
        verdicts.append(f"{what}: Ray {loop_t / ray_t:.2f}x of the loop end to end (target >= 0.9x: "
                        f"{'met' if loop_t / ray_t >= 0.9 else 'NOT met'}), {loop_t / warm_t:.2f}x after start-up; "
                        f"{noio_t / ray_t:.2f}x of the compute limit")
    print("\n" + "\n".join(f"- {v}" for v in verdicts))
    print(f"- Ray and loop datasets identical (every shard, every round): {same}")
    assert ray_ds is not None

    sizes = raw_tap_sizes(teachers, pool)
    feat_raw = sum(v for t, v in sizes.items() if t != "head") * 4
    all_raw = sum(sizes.values()) * 4
    stored = dataset_bytes(ray_ds)
    codes_b = sum(v for k, v in stored.items() if k.startswith("code.")) / n
    total_b = stored["total"] / n
    raw_pq = raw_parquet_bytes_per_sample(teachers, pool, 256)
    print("\n## Bytes per sample\n")
    print("| what | bytes/sample | vs raw float32 taps |")
    print("|---|---:|---:|")
    print(f"| raw float32 taps of all teachers ({', '.join(f'{t} {v}' for t, v in sizes.items())} values) | "
          f"{all_raw:,.0f} | 1.000x |")
    print(f"| raw float32 taps, zstd Parquet (measured on 256 samples) | {raw_pq:,.0f} | {raw_pq / all_raw:.3f}x |")
    print(f"| stored compact codes (float16, zstd) | {codes_b:,.0f} | {codes_b / feat_raw:.3f}x of the raw feature taps |")
    print(f"| stored dataset: codes + image + logits + ids | {total_b:,.0f} | {total_b / all_raw:.3f}x |")
    ratio = total_b / all_raw
    print(f"\nstored vs raw taps: {ratio:.3f}x (target <= 0.3x: {'met' if ratio <= 0.3 else 'NOT met'})")

    print("\n## Aligned reader (local store, all taps' codes + image + logits + ids)\n")
    print("| read | samples/s |")
    print("|---|---:|")
    for label, seed in (("in order", None), ("shuffled", 0)):
        t0 = time.perf_counter()
        got = sum(len(b["sample_id"]) for b in iter_aligned(ray_ds, taps, 256, shuffle_seed=seed))
        assert got == n
        print(f"| iter_aligned, batch 256, {label} | {n / (time.perf_counter() - t0):,.0f} |")
    t0 = time.perf_counter()
    got = sum(len(b["index"]) for b in ray_ds.ray_dataset(["index", "logits", *(f"code.{t}" for t in taps)])
              .iter_torch_batches(batch_size=256))
    assert got == n
    print(f"| Ray Data read_parquet + iter_torch_batches (codes, logits, index), batch 256, incl. read-task start-up | "
          f"{n / (time.perf_counter() - t0):,.0f} |")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
