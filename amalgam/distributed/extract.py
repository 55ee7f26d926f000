"""Distributed extraction: frozen teachers on Ray Data actors, features streamed to the store.

Two passes over the pool, neither of which writes raw taps (the demo zoo's taps of four
teachers are ~440 KB per image in float32; its stored codes ~40 KB, see bench/README.md):

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
algorithm is copied here. The per-shard work (:func:`compute_rows` + :func:`shard_table`)
is one function shared by the Ray actors, the driver's capacity planner and the
single-process loop of ``bench/extract.py``, so all three do exactly the same work.

Before a pass starts, the driver measures one small batch (teacher forwards, encoding,
zstd Parquet bytes) and prints the expected bytes and time; a local store without the
space is refused in one line before any teacher runs (:func:`check_capacity`).

Incremental passes (``amalgam retrain`` adding teachers to a champion) run only the new
teachers (``PassSpec.teachers``) and prepend, row by row, the champion's stored code to
their features (``PassSpec.base_codes_key``): the same two passes over
``[previous code | new teachers]``, and no old teacher is run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
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


def select_teachers(teachers: list, names: tuple[str, ...] | list[str] | None) -> list:
    """The teachers named (in the order given), or all of them when ``names`` is None."""
    if names is None:
        return list(teachers)
    by_name = {t.name: t for t in teachers}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise AmalgamError(f"teacher {missing[0]!r} is not in the zoo")
    return [by_name[n] for n in names]


def read_prefix(ds: Dataset, widths: dict[str, int], rows: range) -> dict[str, torch.Tensor]:
    """Codes of pool rows ``rows`` from a committed codes dataset, each tap cut to ``widths[tap]`` (float32).

    Rows are located by the dataset's shard layout (shard ``i`` holds rows ``[i*S, (i+1)*S)``)
    and checked against its ``index`` column, so a different shard size is fine and a
    misaligned dataset is refused.
    """
    size = ds.manifest.shard_size
    if rows.stop > ds.manifest.num_rows:
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: {ds.manifest.num_rows} rows, rows up to {rows.stop - 1} asked for")
    columns = ["index", *(f"code.{t}" for t in widths)]
    first, last = rows.start // size, (rows.stop - 1) // size
    table = pa.concat_tables([ds.read_shard(ds.manifest.shards[i], columns) for i in range(first, last + 1)])
    lo = rows.start - first * size
    table = table.slice(lo, len(rows))
    index = column_to_numpy(table.column("index"))
    if not np.array_equal(index, np.arange(rows.start, rows.stop)):
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: rows are not pool rows {rows.start}..{rows.stop - 1} in order")
    out = {}
    for tap, w in widths.items():
        code = column_to_numpy(table.column(f"code.{tap}"))
        if not 1 <= w <= code.shape[1]:
            raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: code.{tap} has {code.shape[1]} channels, {w} asked for")
        out[tap] = torch.from_numpy(np.array(code[:, :w], dtype=np.float32))  # a writable copy
    return out


class ShardExtractor:
    """Ray Data callable class: loads the zoo once per actor, then extracts whole shards."""

    def __init__(self, spec: PassSpec, images_ref: list, ids_ref: list):
        import ray

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _, teachers = load_zoo(spec.zoo_path)  # verifies hashes, taps and shapes
        self.teachers = [t.to(self.device) for t in select_teachers(teachers, spec.teachers)]
        self.images = torch.from_numpy(np.array(ray.get(images_ref[0])))  # writable copy
        self.ids = ray.get(ids_ref[0])
        self.loc = open_store(spec.store_uri, S3Options(**spec.s3))
        self.writer = DatasetWriter(self.loc, spec.key, spec.kind, spec.fingerprints, spec.num_rows, spec.shard_size)
        self.codecs: dict[str, LinearCodec] = {}
        if spec.codecs_key:
            self.codecs = {t: c.to(self.device) for t, c in load_codecs(self.loc, spec.codecs_key)[0].items()}
        self.taps = [i.name for i in self.teachers[0].taps()][:-1]
        self.base = Dataset.open(self.loc, spec.base_codes_key) if spec.base_codes_key else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, rows, forwards, seconds, errors, nbytes = [], [], [], [], [], []
        for i in batch["shard"].tolist():
            t0 = time.perf_counter()
            try:
                (n, b), error = self._extract(int(i)), ""
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

    def _extract(self, shard: int) -> tuple[int, int]:
        """Compute and write one shard; (rows, bytes stored)."""
        rows = self.writer.shard_rows(shard)
        prefix = read_prefix(self.base, self.spec.base_widths or {}, rows) if self.base is not None else None
        cols = compute_rows(self.spec.kind, self.teachers, self.codecs, self.taps, self.images[rows.start:rows.stop],
                            self.spec.batch_size, self.device, prefix)
        table, side = shard_table(self.spec.kind, rows, self.ids, self.images, cols)
        return len(rows), self.writer.write_shard(shard, table, side)


@dataclass
class ShardColumns:
    """One shard's computed values, before they become Arrow columns."""

    logits: torch.Tensor  # float32 [n, classes of all teachers]
    codes: dict[str, torch.Tensor]  # tap -> float16 [n, width, ...] (codes pass)
    stats: dict[str, TapStats] | None  # the rows' share of every tap's statistics (outputs pass)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]: :func:`amalgam.data.datasets.to_float`, which this
    module does not import (see the ``TYPE_CHECKING`` imports; a test keeps the two equal)."""
    return images.float().div_(255.0)


@torch.no_grad()
def compute_rows(kind: str, teachers: list, codecs: dict[str, LinearCodec], taps: list[str], images: torch.Tensor,
                 batch_size: int, device: torch.device | str = "cpu",
                 prefix: dict[str, torch.Tensor] | None = None) -> ShardColumns:
    """Teacher forwards over ``images`` (uint8) in batches: logits plus statistics or codes.

    The one definition of a shard's content: actors, the capacity planner and the bench's
    single-process loop all call it. ``prefix`` (tap -> [len(images), w, ...], row-aligned
    with ``images``) is an earlier code prepended to every tap's features: the incremental
    step of ``amalgam retrain`` (statistics and codes of ``[previous code | teachers]``).
    """
    infos = [{i.name: i for i in t.taps()} for t in teachers]
    pre_blocks = {tap: ([prefix[tap].shape[1]] if prefix is not None else []) for tap in taps}
    stats = {tap: TapStats(pre_blocks[tap] + [inf[tap].channels for inf in infos], infos[0][tap].kind) for tap in taps} \
        if kind == "outputs" else None
    logits, codes = [], {tap: [] for tap in codecs}
    for start in range(0, len(images), batch_size):
        out, feats = capture_teachers(teachers, to_unit(images[start : start + batch_size]).to(device))
        logits.append(torch.cat(out, 1).float().cpu())
        pre = {tap: [p[start : start + batch_size]] for tap, p in (prefix or {}).items()}
        if stats is not None:
            for tap in taps:
                stats[tap].update([*pre.get(tap, []), *(f[tap].cpu() for f in feats)])
        else:
            for tap, codec in codecs.items():
                x = torch.cat([*(p.to(device) for p in pre.get(tap, [])), *(f[tap] for f in feats)], 1)
                codes[tap].append(codec.encode(x).half().cpu())
    return ShardColumns(torch.cat(logits), {tap: torch.cat(parts) for tap, parts in codes.items()}, stats)


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


@dataclass(frozen=True)
class CapacityPlan:
    """What a pass will write and roughly how long it will take, from one measured batch."""

    samples: int
    shards: int
    bytes: int
    seconds: float
    measured_rows: int

    def line(self, kind: str, parallel: int) -> str:
        return (f"[extract] plan: {kind}: {self.samples} samples in {self.shards} shards, ~{_mb(self.bytes)} MB, "
                f"~{self.seconds:.1f} s of teacher work on {parallel} actor{'s' if parallel != 1 else ''} "
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
                 base: Dataset | None = None) -> CapacityPlan:
    """Run the real shard work on the first ``sample_rows`` rows still to do, in this process, and extrapolate.

    Bytes: that batch's zstd Parquet bytes per row times the rows to write, plus the side
    files (whose size does not depend on the rows: statistics are per-tap sums) per shard.
    Time: seconds per row, with the actors' torch threads, times rows over ``parallel``
    actors (a warm-up batch first, so one-off initialisation is not extrapolated). The
    time is measured on the driver's CPU: with GPU actors it is an upper bound.
    """
    first = writer.shard_rows(todo[0])
    rows = range(first.start, min(first.stop, first.start + sample_rows))
    pre = read_prefix(base, spec.base_widths or {}, rows) if base is not None else None
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.torch_threads)
    try:
        compute_rows(spec.kind, teachers, codecs, taps, pool.images[rows.start : rows.start + 4], spec.batch_size,
                     prefix=None if pre is None else {t: p[:4] for t, p in pre.items()})
        t0 = time.perf_counter()
        cols = compute_rows(spec.kind, teachers, codecs, taps, pool.images[rows.start : rows.stop], spec.batch_size,
                            prefix=pre)
        table, side = shard_table(spec.kind, rows, pool.ids, pool.images, cols)
        data = parquet_bytes(table)
        secs = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    total = sum(len(writer.shard_rows(i)) for i in todo)
    side_bytes = sum(len(v) for v in (side or {}).values())
    need = int(len(data) / len(rows) * total) + side_bytes * len(todo)
    return CapacityPlan(total, len(todo), need, secs / len(rows) * total / max(1, parallel), len(rows))


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
    """
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
    timings: dict[str, float] = {}
    if todo:
        ext = job.extraction
        parallel = min(ext.actors, len(todo))
        if teachers is None:
            _, teachers = load_zoo(spec.zoo_path)
        teachers = select_teachers(teachers, spec.teachers)
        codecs = load_codecs(loc, spec.codecs_key)[0] if spec.codecs_key else {}
        taps = [i.name for i in teachers[0].taps()][:-1]
        base = Dataset.open(loc, spec.base_codes_key) if spec.base_codes_key else None
        plan = measure_plan(spec, teachers, codecs, taps, pool, writer, todo, parallel, base=base)
        log(plan.line(spec.kind, parallel))
        timings["plan"] = time.perf_counter() - t0
        free = free_bytes() if callable(free_bytes) else free_bytes
        check_capacity(loc.uri_of(spec.key), plan.bytes, loc.free_bytes() if free is None else free)
        if loc.is_s3:
            _check_worker_s3_env(loc.uri)
        images_ref = [ray.put(pool.images.numpy())]
        ids_ref = [ray.put(pool.ids)]
        ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        out = ds.map_batches(
            ShardExtractor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=parallel),
            num_cpus=ext.cpus_per_actor,
            num_gpus=ext.gpus_per_actor,
            fn_constructor_kwargs={"spec": spec, "images_ref": images_ref, "ids_ref": ids_ref},
        )
        total = sum(len(writer.shard_rows(i)) for i in todo)
        from amalgam.zoo.manifest import read_manifest

        teacher_names = [t.name for t in read_manifest(spec.zoo_path).teachers if spec.teachers is None or t.name in spec.teachers]
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
    manifest = writer.commit(side_names)
    timings["commit"] = time.perf_counter() - t_commit
    secs = time.perf_counter() - t0
    if not writer.won_commit:  # another job extracting the same dataset committed it first: the same shards
        by = manifest.created_by
        log(f"[extract] {spec.kind}: {loc.uri_of(spec.key)} was committed meanwhile by another job "
            f"({by.get('host')} pid {by.get('pid')}); same shards, reusing it")
        return PassResult(Dataset.open(loc, spec.key), forwards, secs, False, timings)
    rate = sum(len(writer.shard_rows(i)) for i in todo) / max(secs, 1e-9)
    startup = f", {timings['startup']:.1f} s of it Ray start-up" if "startup" in timings else ""
    log(f"[extract] {spec.kind}: committed {manifest.num_rows} rows in {len(manifest.shards)} shards "
        f"({len(todo)} extracted, {rate:.0f} samples/s{startup}) at {loc.uri_of(spec.key)}")
    return PassResult(Dataset.open(loc, spec.key), forwards, secs, False, timings)


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
