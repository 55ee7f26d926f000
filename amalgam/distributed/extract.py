"""Distributed extraction: frozen teachers on Ray Data actors, features streamed to the store.

Two passes over the pool, neither of which writes raw taps by default (the demo zoo's taps of four
teachers are ~440 KB per image in float32; its stored codes ~40 KB, see bench/README.md):

1. ``outputs``: per shard, the teachers' logits, plus the shard's share of every tap's
   PCA statistics as a side file (sums, so the whole pool's statistics are their sum:
   exact, whichever actor computed which shard, and resumable shard by shard).
2. ``codes``: after the auto-encoders are fitted from those statistics, per shard the
   images, logits and compact codes of every tap at the job's ``max_width``.

Raw taps only when asked: the paper-faithful ``sgd`` amalgamation trains its auto-encoders
for several epochs on the raw features, which statistics cannot stand in for. Then the
``outputs`` pass also writes a ``taps`` dataset (``PassSpec.taps_key``: logits and each
tap's concatenated features, float16, zstd), the auto-encoders train on it (Ray Train,
:mod:`amalgam.distributed.train_codecs`), and the ``codes`` pass encodes the stored taps
(``PassSpec.raw_key``) with no teacher at all. Storing them beats re-running the teachers
every auto-encoder epoch (``sgd.epochs`` + 1 more teacher passes, on every rerun with
other auto-encoder settings): a teacher forward costs far more than reading ~half a MB.
The cost is space (demo zoo: 220 KB a sample in float16, 135 KB stored with zstd, as
measured on 2000 mnist+fashion images), which the capacity plan counts before anything
runs; the default ``pca`` mode never writes them.

Each pass is a Ray Dataset of shard indices mapped by :class:`ShardExtractor`, a callable
class (Ray Data's pattern for stateful models): an actor loads and verifies the teachers
once, then turns shard indices into written shards. Shards already in the store are
skipped, so a killed extraction resumes where it stopped; the manifest is written last.
Both passes call the engine (:func:`capture_teachers`, :class:`TapStats`, codecs): no
algorithm is copied here. The per-shard work (:func:`compute_rows` + :func:`shard_table`)
is one function shared by the Ray actors, the driver's capacity planner and the
single-process loop of ``bench/extract.py``, so all three do exactly the same work.

Before a pass starts, the driver measures one small batch (teacher forwards, encoding,
zstd Parquet bytes) and prints the expected bytes and time; a local store without the
space is refused in one line before any teacher runs (:func:`check_capacity`).

Incremental passes (``amalgam retrain`` adding teachers to a champion) run only the new
teachers (``PassSpec.teachers``) and prepend, row by row, the champion's stored code to
their features (``PassSpec.base_codes_key``): the same passes over
``[previous code | new teachers]``, and no old teacher is run. By default (``retrain.single_pass``)
the new teachers run once: their outputs pass also keeps their raw taps (``taps_key``; the
champion's code is not copied there, it is in the store already) and the codes pass reads
``[stored code | stored raw taps]`` (``base_codes_key`` with ``raw_key``) with no teacher.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from amalgam.engine.amalgamate import LinearCodec, TapStats
from amalgam.engine.capture import capture_teachers
from amalgam.errors import AmalgamError
from amalgam.store.codecs import load_codecs, stats_from_bytes, stats_to_bytes
from amalgam.store.dataset import Dataset, DatasetWriter, column_to_numpy, parquet_bytes, tensor_column
from amalgam.store.fingerprint import short
from amalgam.store.location import S3Options, StoreLocation, open_store
from amalgam.zoo.manifest import load_zoo

if TYPE_CHECKING:  # not imported at run time: they pull in torchvision, ~1 s of every actor's start-up
    from amalgam.data.pool import Pool
    from amalgam.job import Job

STATS_SIDE = "stats.safetensors"
PLAN_ROWS = 64  # rows the driver extracts to plan a pass


def outputs_key(zoo_fp: str, pool_fp: str) -> str:
    return f"outputs/{short(zoo_fp)}/{short(pool_fp)}"


def codes_key(codec_fp: str, pool_fp: str) -> str:
    return f"codes/{short(codec_fp)}/{short(pool_fp)}"


def codecs_key(codec_fp: str) -> str:
    return f"codecs/{short(codec_fp)}"


def taps_key(zoo_fp: str, pool_fp: str) -> str:
    """The raw-tap dataset of a zoo on a pool (mode ``sgd``): same inputs as ``outputs``, own key."""
    return f"taps/{short(zoo_fp)}/{short(pool_fp)}"


def tap_column(tap: str) -> str:
    return f"tap.{tap}"


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
    # Incremental amalgamation (``amalgam retrain``): run only these teachers of the zoo (zoo
    # order; None = all), and prepend to every tap's features the code of an earlier codes
    # dataset (same pool, row-aligned), cut to ``base_widths``: the statistics and codes are
    # then those of ``[previous code | new teachers' features]``.
    teachers: tuple[str, ...] | None = None
    base_codes_key: str | None = None
    base_widths: dict[str, int] | None = None
    # Raw taps (mode sgd). An outputs pass with ``taps_key`` also writes, in the same teacher
    # forward, every tap's concatenated features (float16) and the logits into the dataset
    # ``taps_key``; ``write_main`` is False when the outputs dataset is already committed and
    # only the taps are missing. A codes pass with ``raw_key`` encodes the taps stored there
    # (and copies their logits): no teacher runs. Both combine with ``base_codes_key``: the
    # taps are then the new teachers' only, and the codes pass prepends the stored code to them.
    taps_key: str | None = None
    write_main: bool = True
    raw_key: str | None = None


def select_teachers(teachers: list, names: tuple[str, ...] | list[str] | None) -> list:
    """The teachers named (in the order given), or all of them when ``names`` is None."""
    if names is None:
        return list(teachers)
    by_name = {t.name: t for t in teachers}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise AmalgamError(f"teacher {missing[0]!r} is not in the zoo")
    return [by_name[n] for n in names]


def read_rows(ds: Dataset, columns: list[str], rows: range) -> pa.Table:
    """Columns of pool rows ``rows`` from a committed dataset (``index`` is always read).

    Rows are located by the dataset's shard layout (shard ``i`` holds rows ``[i*S, (i+1)*S)``)
    and checked against its ``index`` column, so a different shard size is fine and a
    misaligned dataset is refused.
    """
    size = ds.manifest.shard_size
    if rows.stop > ds.manifest.num_rows:
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: {ds.manifest.num_rows} rows, rows up to {rows.stop - 1} asked for")
    columns = ["index", *(c for c in columns if c != "index")]
    first, last = rows.start // size, (rows.stop - 1) // size
    table = pa.concat_tables([ds.read_shard(ds.manifest.shards[i], columns) for i in range(first, last + 1)])
    table = table.slice(rows.start - first * size, len(rows))
    index = column_to_numpy(table.column("index"))
    if not np.array_equal(index, np.arange(rows.start, rows.stop)):
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: rows are not pool rows {rows.start}..{rows.stop - 1} in order")
    return table


def read_raw(ds: Dataset, taps: list[str], rows: range) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (float32) and the stored raw taps (float16, ``[n, C, ...]``) of pool rows ``rows``."""
    names = {c.name for c in ds.manifest.columns}
    missing = [t for t in taps if tap_column(t) not in names]
    if missing:
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: no raw taps for tap {missing[0]}")
    table = read_rows(ds, ["logits", *(tap_column(t) for t in taps)], rows)
    logits = torch.from_numpy(np.array(column_to_numpy(table.column("logits")), dtype=np.float32))
    return logits, {t: torch.from_numpy(np.array(column_to_numpy(table.column(tap_column(t))))) for t in taps}


def read_prefix(ds: Dataset, widths: dict[str, int], rows: range) -> dict[str, torch.Tensor]:
    """Codes of pool rows ``rows`` from a committed codes dataset, each tap cut to ``widths[tap]`` (float32)."""
    table = read_rows(ds, [f"code.{t}" for t in widths], rows)
    out = {}
    for tap, w in widths.items():
        code = column_to_numpy(table.column(f"code.{tap}"))
        if not 1 <= w <= code.shape[1]:
            raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: code.{tap} has {code.shape[1]} channels, {w} asked for")
        out[tap] = torch.from_numpy(np.array(code[:, :w], dtype=np.float32))  # a writable copy
    return out


class PoolRows:
    """One shard's slice of a pool-wide sequence (images or sample ids), indexed by pool
    positions: ``x[rows.start:rows.stop]`` reads the shard's own rows, as the helpers that
    build a shard expect of the whole pool's arrays."""

    def __init__(self, start: int, data) -> None:
        self.start, self.data, self.stop = start, data, start + len(data)

    def __getitem__(self, s: slice):
        if not (isinstance(s, slice) and self.start <= s.start and s.stop <= self.stop):
            raise IndexError(f"rows {s} outside this shard's rows {self.start}..{self.stop}")
        return self.data[s.start - self.start : s.stop - self.start]


def pool_dataset(pool: "Pool", shards: list[int], rows_of: Callable[[int], range]):
    """The pool as a Ray Dataset of (shard, sample id, image) rows, one block per shard to do.

    Blocks follow the store's shards, so an actor always receives whole shards (the unit of the
    commit protocol and of resumption) and holds only the shards it is working on, never the
    whole pool; images travel through Ray's object store as fixed-shape tensor columns.
    """
    import ray.data

    blocks = []
    for i in shards:
        rows = rows_of(i)
        blocks.append(pa.table({
            "shard": pa.array(np.full(len(rows), i, dtype=np.int64)),
            "sample_id": pa.array(pool.ids[rows.start : rows.stop]),
            "image": tensor_column(pool.images[rows.start : rows.stop].numpy()),
        }))
    return ray.data.from_arrow(blocks)


class ShardExtractor:
    """Ray Data callable class: loads the zoo once per actor, then extracts the whole shards it is given."""

    def __init__(self, spec: PassSpec):
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teachers: list = []
        if spec.raw_key is None:  # encoding stored raw taps needs no teacher
            _, teachers = load_zoo(spec.zoo_path)  # verifies hashes, taps and shapes
            self.teachers = [t.to(self.device) for t in select_teachers(teachers, spec.teachers)]
        self.loc = open_store(spec.store_uri, S3Options(**spec.s3))
        self.writer = DatasetWriter(self.loc, spec.key, spec.kind, spec.fingerprints, spec.num_rows, spec.shard_size)
        self.taps_writer = DatasetWriter(self.loc, spec.taps_key, "taps", spec.fingerprints, spec.num_rows,
                                         spec.shard_size) if spec.taps_key else None
        self.codecs: dict[str, LinearCodec] = {}
        if spec.codecs_key:
            self.codecs = {t: c.to(self.device) for t, c in load_codecs(self.loc, spec.codecs_key)[0].items()}
        self.taps = pass_taps(self.teachers, self.codecs)
        self.base = Dataset.open(self.loc, spec.base_codes_key) if spec.base_codes_key else None
        self.raw = Dataset.open(self.loc, spec.raw_key) if spec.raw_key else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, rows, forwards, seconds, errors, nbytes = [], [], [], [], [], []
        for i in dict.fromkeys(batch["shard"].tolist()):  # the shards in this batch, in order
            t0 = time.perf_counter()
            sel = batch["shard"] == i
            try:
                (n, b), error = self._extract(int(i), batch["image"][sel], batch["sample_id"][sel].tolist()), ""
            except AmalgamError as exc:  # raised here, the driver would get Ray's multi-line wrapper, not it
                n, b, error = 0, 0, str(exc)
            shards.append(int(i))
            rows.append(n)
            nbytes.append(b)
            forwards.append(n * len(self.teachers))
            seconds.append(time.perf_counter() - t0)
            errors.append(error)
        return {"shard": np.array(shards), "rows": np.array(rows), "teacher_forwards": np.array(forwards),
                "seconds": np.array(seconds), "error": np.array(errors, dtype=object), "bytes": np.array(nbytes)}

    def _extract(self, shard: int, images: np.ndarray, ids: list[str]) -> tuple[int, int]:
        """Compute and write one shard from its rows' images and ids; (rows, bytes stored). The raw
        taps first: a stored outputs shard then implies its taps shard (they are resumed together anyway)."""
        rows = self.writer.shard_rows(shard)
        if len(ids) != len(rows):  # a block split across batches would write a short shard
            raise AmalgamError(f"{self.loc.uri_of(self.spec.key)}: shard {shard} arrived with {len(ids)} of its "
                               f"{len(rows)} rows")
        out = shard_output(self.spec, self.teachers, self.codecs, self.taps,
                           PoolRows(rows.start, torch.from_numpy(np.ascontiguousarray(images))),
                           PoolRows(rows.start, ids), rows, self.device, self.base, self.raw)
        written = self.taps_writer.write_shard(shard, out.taps) if out.taps is not None else 0
        if out.table is not None:
            written += self.writer.write_shard(shard, out.table, out.side)
        return len(rows), written


def pass_taps(teachers: list, codecs: dict[str, LinearCodec]) -> list[str]:
    """The amalgamated taps of a pass: the teachers' (all but the head), or the codecs' when no teacher runs."""
    return [i.name for i in teachers[0].taps()][:-1] if teachers else list(codecs)


@dataclass
class ShardOutput:
    """What one shard of a pass writes: its own dataset's table and side files (None when that
    dataset is already committed), and the raw-tap dataset's table (outputs pass with taps)."""

    table: pa.Table | None
    side: dict[str, bytes] | None
    taps: pa.Table | None = None


def shard_output(spec: PassSpec, teachers: list, codecs: dict[str, LinearCodec], taps: list[str],
                 images: torch.Tensor, ids: list[str], rows: range, device: torch.device | str = "cpu",
                 base: Dataset | None = None, raw: Dataset | None = None) -> ShardOutput:
    """The whole content of pool rows ``rows`` for ``spec`` (``images``/``ids``: the whole pool's).

    Teachers run unless ``raw`` (the stored raw taps) is given: then the codes are those
    taps encoded, and the logits theirs. ``base`` (an earlier codes dataset, cut to
    ``spec.base_widths``) is prepended row by row to the teachers' features, or to the stored
    raw taps: the incremental codes pass of ``amalgam retrain`` with no teacher.
    """
    prefix = read_prefix(base, spec.base_widths or {}, rows) if base is not None else None
    if raw is not None:
        logits, feats = read_raw(raw, list(codecs), rows)
        cols = ShardColumns(logits, encode_rows(codecs, feats, spec.batch_size, device, prefix), None)
    else:
        cols = compute_rows(spec.kind, teachers, codecs, taps, images[rows.start:rows.stop], spec.batch_size, device,
                            prefix, keep_taps=spec.taps_key is not None)
    table, side = shard_table(spec.kind, rows, ids, images, cols) if spec.write_main else (None, None)
    return ShardOutput(table, side, taps_table(rows, ids, cols) if spec.taps_key else None)


@dataclass
class ShardColumns:
    """One shard's computed values, before they become Arrow columns."""

    logits: torch.Tensor  # float32 [n, classes of all teachers]
    codes: dict[str, torch.Tensor]  # tap -> float16 [n, width, ...] (codes pass)
    stats: dict[str, TapStats] | None  # the rows' share of every tap's statistics (outputs pass)
    taps: dict[str, torch.Tensor] | None = None  # tap -> float16 [n, channels of all teachers, ...] (raw taps)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]: :func:`amalgam.data.datasets.to_float`, which this
    module does not import (see the ``TYPE_CHECKING`` imports; a test keeps the two equal)."""
    return images.float().div_(255.0)


@torch.no_grad()
def compute_rows(kind: str, teachers: list, codecs: dict[str, LinearCodec], taps: list[str], images: torch.Tensor,
                 batch_size: int, device: torch.device | str = "cpu",
                 prefix: dict[str, torch.Tensor] | None = None, keep_taps: bool = False) -> ShardColumns:
    """Teacher forwards over ``images`` (uint8) in batches: logits plus statistics or codes.

    The one definition of a shard's content: actors, the capacity planner and the bench's
    single-process loop all call it. ``prefix`` (tap -> [len(images), w, ...], row-aligned
    with ``images``) is an earlier code prepended to every tap's features: the incremental
    step of ``amalgam retrain`` (statistics and codes of ``[previous code | teachers]``).
    ``keep_taps`` (outputs pass) also returns every tap's concatenated features in float16:
    the raw taps of mode ``sgd``, or, with a ``prefix``, the teachers' features only (the
    prefix is in the store already): what the single-pass incremental step encodes later.
    """
    if keep_taps and kind != "outputs":
        raise AmalgamError("raw taps are kept by an outputs pass only")
    infos = [{i.name: i for i in t.taps()} for t in teachers]
    pre_blocks = {tap: ([prefix[tap].shape[1]] if prefix is not None else []) for tap in taps}
    stats = {tap: TapStats(pre_blocks[tap] + [inf[tap].channels for inf in infos], infos[0][tap].kind) for tap in taps} \
        if kind == "outputs" else None
    logits, codes = [], {tap: [] for tap in codecs}
    raw: dict[str, list[torch.Tensor]] = {tap: [] for tap in taps} if keep_taps else {}
    for start in range(0, len(images), batch_size):
        out, feats = capture_teachers(teachers, to_unit(images[start : start + batch_size]).to(device))
        logits.append(torch.cat(out, 1).float().cpu())
        pre = {tap: [p[start : start + batch_size]] for tap, p in (prefix or {}).items()}
        if stats is not None:
            for tap in taps:
                stats[tap].update([*pre.get(tap, []), *(f[tap].cpu() for f in feats)])
            for tap in raw:
                raw[tap].append(torch.cat([f[tap] for f in feats], 1).half().cpu())
        else:
            for tap, codec in codecs.items():
                x = torch.cat([*(p.to(device) for p in pre.get(tap, [])), *(f[tap] for f in feats)], 1)
                codes[tap].append(codec.encode(x).half().cpu())
    return ShardColumns(torch.cat(logits), {tap: torch.cat(parts) for tap, parts in codes.items()}, stats,
                        {tap: torch.cat(parts) for tap, parts in raw.items()} if keep_taps else None)


@torch.no_grad()
def encode_rows(codecs: dict[str, LinearCodec], feats: dict[str, torch.Tensor], batch_size: int,
                device: torch.device | str = "cpu", prefix: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """Stored raw taps (float16) through their codecs, in batches: float16 codes, as the teachers' would be.

    ``prefix`` (tap -> float32 ``[n, w, ...]``, row-aligned) is prepended to each batch's taps,
    as :func:`compute_rows` prepends it to the teachers' features: ``[previous code | taps]``.
    Concatenated batch by batch, so a shard's taps are never held in float32 whole.
    """
    out = {}
    for tap, codec in codecs.items():
        x, pre = feats[tap], (prefix or {}).get(tap)
        parts = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device).float()
            if pre is not None:
                xb = torch.cat([pre[i : i + batch_size].to(device), xb], 1)
            parts.append(codec.encode(xb).half().cpu())
        out[tap] = torch.cat(parts)
    return out


def shard_table(kind: str, rows: range, ids: list[str], images: torch.Tensor,
                cols: ShardColumns) -> tuple[pa.Table, dict[str, bytes] | None]:
    """A shard's Arrow table (pool rows ``rows``) and side files; ``ids``/``images`` are the whole pool's."""
    columns = {
        "index": pa.array(np.arange(rows.start, rows.stop, dtype=np.int64)),
        "sample_id": pa.array(ids[rows.start : rows.stop]),
        "logits": tensor_column(cols.logits.numpy()),
    }
    if kind == "outputs":
        assert cols.stats is not None
        return pa.table(columns), {STATS_SIDE: stats_to_bytes(cols.stats)}
    columns["image"] = tensor_column(images[rows.start : rows.stop].numpy())
    for tap, code in cols.codes.items():
        columns[f"code.{tap}"] = tensor_column(code.numpy())
    return pa.table(columns), None


def taps_table(rows: range, ids: list[str], cols: ShardColumns) -> pa.Table:
    """A raw-tap shard: the rows' logits and every tap's concatenated features (float16)."""
    if cols.taps is None:
        raise AmalgamError("no raw taps were kept for this shard")
    columns = {
        "index": pa.array(np.arange(rows.start, rows.stop, dtype=np.int64)),
        "sample_id": pa.array(ids[rows.start : rows.stop]),
        "logits": tensor_column(cols.logits.numpy()),
    }
    for tap, x in cols.taps.items():
        columns[tap_column(tap)] = tensor_column(x.numpy())
    return pa.table(columns)


@dataclass(frozen=True)
class CapacityPlan:
    """What a pass will write and roughly how long it will take, from one measured batch."""

    samples: int
    shards: int
    bytes: int
    seconds: float
    measured_rows: int
    taps_bytes: int = 0  # of ``bytes``: the raw taps (mode sgd)
    teachers: bool = True  # False: the pass encodes stored raw taps

    def line(self, kind: str, parallel: int) -> str:
        taps = f" (raw taps ~{_mb(self.taps_bytes)} MB of it)" if self.taps_bytes else ""
        work = "teacher work" if self.teachers else "encoding of stored raw taps"
        return (f"[extract] plan: {kind}: {self.samples} samples in {self.shards} shards, ~{_mb(self.bytes)} MB{taps}, "
                f"~{self.seconds:.1f} s of {work} on {parallel} actor{'s' if parallel != 1 else ''} "
                f"(+ actor start-up; measured on {self.measured_rows} samples)")


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.1f}"


def check_capacity(uri: str, need_bytes: int, free_bytes: int | None) -> None:
    """Refuse, in one line, a pass whose expected bytes exceed the target's free space.

    ``free_bytes`` is None where there is no meaningful bound (S3): nothing to check.
    """
    if free_bytes is not None and need_bytes > free_bytes:
        raise AmalgamError(f"{uri}: needs ~{_mb(need_bytes)} MB, only {_mb(free_bytes)} MB free")


def measure_plan(spec: PassSpec, teachers: list, codecs: dict[str, LinearCodec], taps: list[str], pool: Pool,
                 writer: DatasetWriter, todo: list[int], parallel: int, sample_rows: int = PLAN_ROWS,
                 base: Dataset | None = None, raw: Dataset | None = None) -> CapacityPlan:
    """Run the real shard work on the first ``sample_rows`` rows still to do, in this process, and extrapolate.

    Bytes: that batch's zstd Parquet bytes per row times the rows to write, plus the side
    files (whose size does not depend on the rows: statistics are per-tap sums) per shard.
    Time: seconds per row, with the actors' torch threads, times rows over ``parallel``
    actors (a warm-up batch first, so one-off initialisation is not extrapolated). The
    time is measured on the driver's CPU: with GPU actors it is an upper bound. Raw taps
    (an outputs pass with ``taps_key``) are part of the bytes, and named in the plan.
    """
    first = writer.shard_rows(todo[0])
    if raw is not None:  # a stored shard is read whole however few rows are used: measure a whole one
        sample_rows = len(first)
    rows = range(first.start, min(first.stop, first.start + sample_rows))
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.torch_threads)
    try:
        if raw is None:  # warm-up
            shard_output(spec, teachers, codecs, taps, pool.images, pool.ids,
                         range(rows.start, min(rows.stop, rows.start + 4)), base=base)
        t0 = time.perf_counter()
        out = shard_output(spec, teachers, codecs, taps, pool.images, pool.ids, rows, base=base, raw=raw)
        data = len(parquet_bytes(out.table)) if out.table is not None else 0
        taps_data = len(parquet_bytes(out.taps)) if out.taps is not None else 0
        secs = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    total = sum(len(writer.shard_rows(i)) for i in todo)
    side_bytes = sum(len(v) for v in (out.side or {}).values())
    taps_need = int(taps_data / len(rows) * total)
    need = int(data / len(rows) * total) + side_bytes * len(todo) + taps_need
    return CapacityPlan(total, len(todo), need, secs / len(rows) * total / max(1, parallel), len(rows), taps_need,
                        raw is None)


def _check_worker_s3_env(uri: str) -> None:
    """Ray workers open the store themselves: fail in one line, before any actor starts, if they cannot.

    Workers of an embedded Ray inherit the driver's environment as it was when Ray started;
    on a cluster they take it from the pod (a Kubernetes Secret). Credentials are never
    shipped through Ray (a runtime_env would record them in Ray's logs and dashboard):
    only the names of missing variables come back.
    """
    import ray

    @ray.remote(num_cpus=0)
    def missing() -> list[str]:
        return [n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(n)]

    names = ray.get(missing.remote())
    if names:
        raise AmalgamError(f"{uri}: the Ray workers have no S3 credentials ({', '.join(names)} unset in their "
                           "environment; set them before Ray starts, or in the cluster's Secret)")


def dashboard_wanted() -> bool:
    """Whether the embedded Ray starts its dashboard (on 127.0.0.1): yes unless
    ``AMALGAM_RAY_DASHBOARD`` is ``0``/``false``/``no``/``off``. It costs about 1.5 s of start-up
    (2.5 s -> 4 s here); the test suite turns it off (tests/conftest.py)."""
    return os.environ.get("AMALGAM_RAY_DASHBOARD", "").strip().lower() not in ("0", "false", "no", "off")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``) or start an embedded local Ray, once per process.

    With no address, a new local instance is started explicitly (``address="local"``):
    a bare ``ray.init()`` would attach to whatever cluster ``ray start`` last left on this
    machine, another user's included. The embedded instance listens on loopback only:
    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode, node IP
    127.0.0.1) once, when ``ray`` is first imported, so it is set before the import, and
    corrected if something imported ``ray`` earlier without it (otherwise every Ray
    process would listen on the machine's public address). ``num_cpus`` caps the
    embedded instance (tests). The embedded instance runs the Ray dashboard on 127.0.0.1
    (see :func:`dashboard_wanted`) and its URL is printed; so is a cluster's, when connecting.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
        if ctx.dashboard_url:
            print(f"[ray] connected to {address}; dashboard http://{ctx.dashboard_url}", flush=True)
    else:
        dashboard = dashboard_wanted()
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       log_to_driver=True)
        if dashboard and ctx.dashboard_url:
            print(f"[ray] dashboard http://{ctx.dashboard_url} (embedded Ray, loopback only; "
                  "AMALGAM_RAY_DASHBOARD=0 turns it off)", flush=True)
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
    # Where the seconds went: plan (driver's measured batch), startup (until the first shard
    # came back, less its own extraction time: Ray Data and actor start-up), extract, commit.
    timings: dict[str, float] = field(default_factory=dict)
    taps: Dataset | None = None  # the raw-tap dataset (an outputs pass with ``taps_key``)


def _record_shard(teachers: list[str], rows: int, batch_size: int, s3: bool, nbytes: int) -> None:
    """Extraction counters in the driver's amalgam_* metrics (actors live in other processes)."""
    from amalgam import metrics

    for name in teachers:
        metrics.samples_extracted(name, rows)
        metrics.teacher_forward(name, -(-rows // batch_size))
    if nbytes:
        metrics.bytes_written(nbytes, "s3" if s3 else "local")


def run_pass(spec: PassSpec, job: Job, pool: Pool, side_names: list[str], log: Callable[[str], None] = print,
             teachers: list | None = None, free_bytes: int | None | Callable[[], int | None] = None) -> PassResult:
    """Extract the shards of ``spec`` that the store lacks, on a Ray Data actor pool; commit.

    A committed dataset is reused (no teacher runs); a partial one resumes from its
    missing shards. Before any actor starts, the driver plans the pass (prints expected
    bytes and time) and refuses it in one line if the store lacks the space.
    ``teachers`` saves re-loading the zoo in the driver; ``free_bytes`` (bytes, or a
    callable) replaces the store's measured free space, for callers that reserve space
    for other outputs.

    With ``spec.taps_key`` the same teacher forward fills two datasets (outputs and raw
    taps): whichever is committed is left alone, and a shard is to do when either lacks it.
    With ``spec.raw_key`` the pass encodes stored raw taps and runs no teacher.
    """
    import ray
    import ray.data

    loc = open_store(spec.store_uri, S3Options(**spec.s3))
    writer = DatasetWriter(loc, spec.key, spec.kind, spec.fingerprints, spec.num_rows, spec.shard_size)
    taps_ds = spec.taps_key  # committed by the time this returns
    taps_writer = DatasetWriter(loc, spec.taps_key, "taps", spec.fingerprints, spec.num_rows, spec.shard_size) \
        if spec.taps_key else None
    if taps_writer is not None and taps_writer.committed():
        log(f"[extract] taps: reusing {loc.uri_of(spec.taps_key)}")
        spec, taps_writer = replace(spec, taps_key=None), None
    if writer.committed():
        if taps_writer is None:
            log(f"[extract] {spec.kind}: reusing {loc.uri_of(spec.key)} (no teacher run)")
            return PassResult(Dataset.open(loc, spec.key), 0, 0.0, True, taps=_open_taps(loc, taps_ds))
        log(f"[extract] {spec.kind}: {loc.uri_of(spec.key)} is stored; its raw taps are not: a teacher pass for them")
        spec = replace(spec, write_main=False)
    done_sets = ([writer.done_shards(side_names)] if spec.write_main else []) + \
        ([taps_writer.done_shards()] if taps_writer is not None else [])
    done = set.intersection(*done_sets)
    todo = [i for i in range(writer.num_shards) if i not in done]
    if done:
        log(f"[extract] {spec.kind}: resuming, {len(done)}/{writer.num_shards} shards already stored")
    t0 = time.perf_counter()
    forwards = 0
    timings: dict[str, float] = {}
    if todo:
        ext = job.extraction
        parallel = min(ext.actors, len(todo))
        if spec.raw_key is not None:
            teachers = []  # encoding stored raw taps: no teacher
        elif teachers is None:
            _, teachers = load_zoo(spec.zoo_path)
        teachers = select_teachers(teachers, spec.teachers) if teachers else []
        codecs = load_codecs(loc, spec.codecs_key)[0] if spec.codecs_key else {}
        taps = pass_taps(teachers, codecs)
        base = Dataset.open(loc, spec.base_codes_key) if spec.base_codes_key else None
        raw = Dataset.open(loc, spec.raw_key) if spec.raw_key else None
        plan = measure_plan(spec, teachers, codecs, taps, pool, writer, todo, parallel, base=base, raw=raw)
        log(plan.line(spec.kind if spec.write_main else "taps", parallel))
        timings["plan"] = time.perf_counter() - t0
        free = free_bytes() if callable(free_bytes) else free_bytes
        check_capacity(loc.uri_of(spec.key), plan.bytes, loc.free_bytes() if free is None else free)
        if loc.is_s3:
            _check_worker_s3_env(loc.uri)
        out = pool_dataset(pool, todo, writer.shard_rows).map_batches(
            ShardExtractor,
            batch_size=None,  # whole blocks: each batch is one or more complete shards
            batch_format="numpy",
            # One shard in flight per actor: by default Ray Data queues several tasks on the first
            # actor that is ready, which then extracts a small pass's shards one after the other
            # while the others start (measured: 2 shards on 2 actors ran serially on one, 10.5 s
            # vs 7.0 s for 3-s shards). A shard is seconds of work: no pipelining is lost.
            compute=ray.data.ActorPoolStrategy(size=parallel, max_tasks_in_flight_per_actor=1),
            num_cpus=ext.cpus_per_actor,
            num_gpus=ext.gpus_per_actor if teachers else 0,
            fn_constructor_kwargs={"spec": spec},
        )
        total = sum(len(writer.shard_rows(i)) for i in todo)
        from amalgam.zoo.manifest import read_manifest

        teacher_names = [t.name for t in read_manifest(spec.zoo_path).teachers
                         if spec.teachers is None or t.name in spec.teachers] if teachers else []
        bar = tqdm(total=total, desc=f"extract {spec.kind}", unit="sample", leave=False)
        t_launch = time.perf_counter()
        try:
            for row in out.iter_rows():
                if row["error"]:  # an actor's one-line AmalgamError (a store outage, say): the pass fails with it
                    raise AmalgamError(row["error"])
                if "startup" not in timings:
                    timings["startup"] = max(0.0, time.perf_counter() - t_launch - float(row["seconds"]))
                bar.update(int(row["rows"]))
                forwards += int(row["teacher_forwards"])
                _record_shard(teacher_names, int(row["rows"]), spec.batch_size, loc.is_s3, int(row.get("bytes", 0)))
        finally:
            bar.close()
        timings["extract"] = time.perf_counter() - t_launch - timings["startup"]
    t_commit = time.perf_counter()
    if taps_writer is not None:
        taps_writer.commit()
        log(f"[extract] taps: committed raw taps of {taps_writer.num_rows} rows at {loc.uri_of(spec.taps_key)}")
    manifest = writer.commit(side_names) if spec.write_main else Dataset.open(loc, spec.key).manifest
    timings["commit"] = time.perf_counter() - t_commit
    secs = time.perf_counter() - t0
    if spec.write_main and not writer.won_commit:  # another job extracting the same dataset committed it first
        by = manifest.created_by
        log(f"[extract] {spec.kind}: {loc.uri_of(spec.key)} was committed meanwhile by another job "
            f"({by.get('host')} pid {by.get('pid')}); same shards, reusing it")
        return PassResult(Dataset.open(loc, spec.key), forwards, secs, False, timings, _open_taps(loc, taps_ds))
    rate = sum(len(writer.shard_rows(i)) for i in todo) / max(secs, 1e-9)
    startup = f", {timings['startup']:.1f} s of it Ray start-up" if "startup" in timings else ""
    log(f"[extract] {spec.kind}: committed {manifest.num_rows} rows in {len(manifest.shards)} shards "
        f"({len(todo)} extracted, {rate:.0f} samples/s{startup}) at {loc.uri_of(spec.key)}")
    return PassResult(Dataset.open(loc, spec.key), forwards, secs, False, timings, _open_taps(loc, taps_ds))


def _open_taps(loc: StoreLocation, key: str | None) -> Dataset | None:
    return Dataset.open(loc, key) if key else None


def sum_stats(ds: Dataset) -> dict[str, TapStats]:
    total: dict[str, TapStats] | None = None
    for s in ds.manifest.shards:
        part = stats_from_bytes(ds.read_side(s, STATS_SIDE))
        total = part if total is None else {t: total[t] + part[t] for t in total}
    if total is None:
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: no statistics")
    return total


def store_location(job: Job) -> StoreLocation:
    return open_store(job.store_uri(), job.store.s3)
