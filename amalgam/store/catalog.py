"""What a store holds: committed datasets, fitted codecs, and uncommitted leftovers.

Only the store's own layout is looked at (``outputs/<zoo>/<pool>``, ``taps/<zoo>/<pool>`` (raw
taps: mode sgd, and the added teachers of a single-pass retrain), ``codes/<codec>/<pool>``, ``codecs/<codec>``): anything else under the root belongs to someone else and is never
listed as garbage, let alone deleted. An entry is committed when its commit object exists
(``manifest.json`` for a dataset, ``codecs.json`` for codecs; both are written last), so
an uncommitted entry is exactly the leftover of an interrupted write, or one in progress:
garbage collection spares entries written to within ``older_than_s`` for that reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from amalgam.errors import AmalgamError
from amalgam.store.dataset import MANIFEST, Dataset
from amalgam.store.location import StoreLocation

# top-level directory -> (components in a key, the object whose presence commits an entry)
LAYOUT: dict[str, tuple[int, str]] = {"outputs": (3, MANIFEST), "taps": (3, MANIFEST), "codes": (3, MANIFEST),
                                     "codecs": (2, "codecs.json")}


@dataclass
class Entry:
    key: str
    kind: str  # outputs | taps | codes | codecs
    committed: bool = False
    bytes: int = 0
    files: int = 0
    newest: float | None = None  # newest modification time of anything under it (epoch seconds)
    stray: list[str] = field(default_factory=list)  # files under it that are not part of the layout


def scan(loc: StoreLocation) -> list[Entry]:
    """Every entry of the store's layout, sorted by key (one recursive listing per top-level directory)."""
    entries: dict[str, Entry] = {}
    for top, (depth, commit) in LAYOUT.items():
        for info in loc.list_dir(top, recursive=True):
            rel = info.path[len(loc.root) + 1 :] if loc.root else info.path
            parts = rel.split("/")
            if len(parts) < depth:  # an intermediate directory (or an S3 directory marker)
                continue
            key = "/".join(parts[:depth])
            e = entries.setdefault(key, Entry(key, top))
            mtime = info.mtime.timestamp() if info.mtime is not None else None
            if mtime is not None:
                e.newest = mtime if e.newest is None else max(e.newest, mtime)
            if info.type == pafs.FileType.File:
                e.files += 1
                e.bytes += info.size or 0
                if len(parts) == depth + 1 and parts[-1] == commit:
                    e.committed = True
    return [entries[k] for k in sorted(entries)]


def find(loc: StoreLocation, key: str) -> Entry:
    key = key.strip("/")
    for e in scan(loc):
        if e.key == key:
            return e
    raise AmalgamError(f"{loc.uri_of(key)}: no such dataset in the store")


def gc_candidates(loc: StoreLocation, older_than_s: float, now: float | None = None) -> list[Entry]:
    """Uncommitted entries not written to for ``older_than_s`` seconds: safe to delete.

    A committed dataset or committed codecs are never candidates.
    """
    now = time.time() if now is None else now
    return [e for e in scan(loc) if not e.committed and (e.newest is None or now - e.newest >= older_than_s)]


def verify_dataset(ds: Dataset) -> list[str]:
    """Check every shard and side file against the manifest; one message per bad file (empty: all good)."""
    problems: list[str] = []
    rows = 0
    for s in ds.manifest.shards:
        try:
            t = ds.read_shard(s, columns=[ds.manifest.columns[0].name] if ds.manifest.columns else None)
            if t.num_rows != s.rows:
                raise AmalgamError(f"{ds.shard_uri(s)}: {t.num_rows} rows, manifest says {s.rows}")
            for name in s.side_files:
                ds.read_side(s, name)
        except AmalgamError as exc:
            problems.append(str(exc))
        rows += s.rows
    if rows != ds.manifest.num_rows:
        problems.append(f"{ds.loc.uri_of(ds.key)}: {rows} rows in shards, manifest says {ds.manifest.num_rows}")
    return problems
