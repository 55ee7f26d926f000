"""Reading a committed dataset: aligned batches for the engine, Ray Data for distributed consumers.

Both readers start from the same URI and key (``open_dataset(uri, key)``):

* :func:`iter_aligned` yields batches in which row ``j`` of every field (sample id, pool
  index, image, logits, the codes of each chosen tap) is the same pool sample. Alignment
  is checked, not assumed: every shard's checksum is verified on read and its ``index``
  column must be exactly the pool rows the shard stands for (shard ``i`` holds rows
  ``[i*S, (i+1)*S)``), so a misplaced or corrupted shard is refused in one line naming it.
  Batches run across shard boundaries (every batch is full but the last), and the next
  shard is fetched and decoded on a background thread while the current one is consumed
  (the decode releases the GIL; on S3 the fetch is network-bound).
* :func:`ray_dataset` is Ray Data's ``read_parquet`` over the manifest's shards (for
  ``iter_torch_batches`` in Ray Train workers). Ray reads the Parquet files itself, so it
  does not see the manifest's checksums: pass ``verify=True`` (one full read in the
  driver) where a silently corrupted object store is a concern.

Codes are stored at the job's ``max_width``; for PCA codecs a narrower code is a prefix
of the stored one, so ``widths`` cuts them on read.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from amalgam.errors import AmalgamError
from amalgam.store.dataset import Dataset, ShardInfo, column_to_numpy
from amalgam.store.location import S3Options, open_store


def open_dataset(uri: str, key: str, s3: S3Options | None = None) -> Dataset:
    """The committed dataset ``key`` of the store at ``uri`` (a path, ``file://`` or ``s3://``)."""
    return Dataset.open(open_store(uri, s3), key)


def code_taps(ds: Dataset) -> list[str]:
    """Taps whose codes the dataset holds, in stored order."""
    return [c.name.removeprefix("code.") for c in ds.manifest.columns if c.name.startswith("code.")]


def _resolve(ds: Dataset, taps: list[str], widths: dict[str, int] | None, with_image: bool | None) -> tuple[list[str], bool]:
    uri = ds.loc.uri_of(ds.key)
    columns = {c.name: c for c in ds.manifest.columns}
    for col in ("index", "sample_id", "logits"):
        if col not in columns:
            raise AmalgamError(f"{uri}: no {col} column; this is not an extraction dataset")
    for tap in taps:
        if f"code.{tap}" not in columns:
            stored = ", ".join(code_taps(ds)) or "none"
            raise AmalgamError(f"{uri}: no codes for tap {tap} (stored: {stored})")
    for tap, w in (widths or {}).items():
        if tap not in taps:
            raise AmalgamError(f"{uri}: width given for tap {tap}, which was not asked for")
        stored_w = columns[f"code.{tap}"].shape[0]
        if not 1 <= w <= stored_w:
            raise AmalgamError(f"{uri}: tap {tap} is stored at width {stored_w}, cannot read width {w}")
    has_image = "image" in columns
    if with_image and not has_image:
        raise AmalgamError(f"{uri}: no image column (a {ds.manifest.kind} dataset)")
    names = ["index", "sample_id", "logits", *(["image"] if (has_image if with_image is None else with_image) else []),
             *(f"code.{t}" for t in taps)]
    return names, "image" in names


def _shard_arrays(ds: Dataset, s: ShardInfo, names: list[str]) -> dict[str, np.ndarray]:
    """One shard's columns as arrays, checksum-verified and checked to be the pool rows it stands for."""
    table = ds.read_shard(s, names)
    start = s.index * ds.manifest.shard_size
    if table.num_rows != s.rows or not np.array_equal(table.column("index").to_numpy(), np.arange(start, start + s.rows)):
        raise AmalgamError(f"{ds.shard_uri(s)}: rows are not pool rows {start}..{start + s.rows - 1} in order "
                           "(misaligned shard)")
    out = {}
    for n in names:
        col = table.column(n)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[n] = np.asarray(col.to_pylist(), dtype=object)
        else:  # a writable copy (Arrow's buffers are read-only), made here on the prefetch thread
            out[n] = np.array(column_to_numpy(col))
    return out


def _take(cols: dict[str, np.ndarray], sel: slice | np.ndarray) -> dict[str, np.ndarray]:
    return {n: a[sel] for n, a in cols.items()}


def _concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.concatenate([a[n], b[n]]) for n in a}


def iter_aligned(
    ds: Dataset,
    taps: list[str],
    batch_size: int,
    widths: dict[str, int] | None = None,
    shuffle_seed: int | None = None,
    with_image: bool | None = None,
) -> Iterator[dict]:
    """Batches of ``{"sample_id", "index", "codes": {tap: ...}, "logits", "image"}``, row-aligned.

    ``sample_id`` is a list of str, ``index`` a LongTensor of pool rows, codes and logits
    float32 tensors (codes cut to ``widths[tap]`` channels where given), ``image`` uint8
    (present when the dataset has images, unless ``with_image=False``). Without a seed the
    order is the pool's; with one, shard order and rows within each shard are permuted
    (deterministically: the same seed gives the same batches, whichever taps are read).
    Every sample appears exactly once per pass. Arguments are checked when called (one
    line naming the dataset), shards as they are read.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    names, has_image = _resolve(ds, taps, widths, with_image)
    widths = widths or {}
    shards = ds.manifest.shards
    gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    order = torch.randperm(len(shards), generator=gen).tolist() if gen is not None else list(range(len(shards)))
    row_perms = [torch.randperm(shards[i].rows, generator=gen).numpy() if gen is not None else None for i in order]

    def to_batch(cols: dict[str, np.ndarray]) -> dict:
        # torch converts float16 to float32 several times faster than numpy does.
        batch = {
            "sample_id": [str(x) for x in cols["sample_id"]],
            "index": torch.from_numpy(cols["index"]).long(),
            "logits": torch.from_numpy(cols["logits"]).float(),
            "codes": {t: torch.from_numpy(cols[f"code.{t}"][:, : widths.get(t, None)]).float() for t in taps},
        }
        if has_image:
            batch["image"] = torch.from_numpy(cols["image"])
        return batch

    def batches() -> Iterator[dict]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="amalgam-read") as pool:
            pending: Future | None = pool.submit(_shard_arrays, ds, shards[order[0]], names) if order else None
            carry: dict[str, np.ndarray] | None = None
            for pos in range(len(order)):
                assert pending is not None
                cols = pending.result()
                pending = pool.submit(_shard_arrays, ds, shards[order[pos + 1]], names) if pos + 1 < len(order) else None
                if row_perms[pos] is not None:
                    cols = _take(cols, row_perms[pos])
                n, start = len(cols["index"]), 0
                if carry is not None:
                    need = batch_size - len(carry["index"])
                    carry = _concat(carry, _take(cols, slice(0, need)))
                    start = min(need, n)
                    if len(carry["index"]) < batch_size:
                        continue
                    yield to_batch(carry)
                    carry = None
                while start + batch_size <= n:
                    yield to_batch(_take(cols, slice(start, start + batch_size)))
                    start += batch_size
                if start < n:
                    carry = _take(cols, slice(start, n))
            if carry is not None:
                yield to_batch(carry)

    return batches()


def ray_dataset(uri: str, key: str, columns: list[str] | None = None, s3: S3Options | None = None,
                verify: bool = False):
    """Ray Data access to the same dataset (``.iter_torch_batches()`` over tensor columns).

    ``verify`` checks every shard against the manifest's checksums first (Ray itself
    does not), at the cost of one full read in the caller.
    """
    ds = open_dataset(uri, key, s3)
    if verify:
        ds.verify()
    return ds.ray_dataset(columns)
