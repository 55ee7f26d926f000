"""``amalgam store list|show|verify|gc URI``: inspect, check and clean a feature store.

``URI`` is a path, ``file://PATH`` or ``s3://BUCKET/PREFIX`` (S3 settings from the standard
AWS environment variables, ``AWS_ENDPOINT_URL`` included). ``gc`` only ever deletes
uncommitted leftovers (entries without their commit object), never a committed dataset or
committed codecs, and only with ``--yes``; without it, it prints what it would delete.
"""

from __future__ import annotations

import argparse
import json
import time

from amalgam.errors import AmalgamError


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _list(args: argparse.Namespace) -> None:
    from amalgam.store.catalog import scan
    from amalgam.store.dataset import Dataset
    from amalgam.store.location import open_store

    loc = open_store(args.uri)
    entries = scan(loc)
    rows = [["KEY", "KIND", "ROWS", "SHARDS", "BYTES", "CREATED"]]
    for e in entries:
        if not e.committed:
            continue
        if e.kind == "codecs":
            info = json.loads(loc.read_bytes(f"{e.key}/codecs.json"))
            rows.append([e.key, "codecs", "-", "-", _size(e.bytes), f"{len(info.get('taps', {}))} taps"])
            continue
        m = Dataset.open(loc, e.key).manifest
        rows.append([e.key, m.kind, str(m.num_rows), str(len(m.shards)), _size(e.bytes), m.created_at])
    print(f"{loc.uri}: {len(rows) - 1} committed")
    if len(rows) > 1:
        print(_table(rows))
    pending = [e for e in entries if not e.committed]
    if pending:
        print(f"{len(pending)} uncommitted (interrupted or in progress): `amalgam store gc {loc.uri}` lists them")


def _show(args: argparse.Namespace) -> None:
    from amalgam.store.catalog import find
    from amalgam.store.dataset import Dataset
    from amalgam.store.location import open_store

    loc = open_store(args.uri)
    e = find(loc, args.key)
    if not e.committed:
        raise AmalgamError(f"{loc.uri_of(e.key)}: not committed (no {'codecs.json' if e.kind == 'codecs' else 'manifest'})")
    if e.kind == "codecs":
        info = json.loads(loc.read_bytes(f"{e.key}/codecs.json"))
        print(f"{loc.uri_of(e.key)}\n  kind: codecs\n  bytes: {e.bytes} ({_size(e.bytes)})")
        for tap, spec in info.get("taps", {}).items():
            print(f"  {tap}: {spec['kind']}, width {spec['width']} of {spec['in_channels']} channels")
        return
    m = Dataset.open(loc, e.key).manifest
    print(f"{loc.uri_of(e.key)}")
    print(f"  kind: {m.kind} (format version {m.version})")
    print(f"  rows: {m.num_rows} in {len(m.shards)} shards of {m.shard_size}")
    print(f"  bytes: {e.bytes} ({_size(e.bytes)}, {e.files} files)")
    print(f"  created: {m.created_at} by {m.created_by.get('user', '?')}@{m.created_by.get('host', '?')}")
    for name, fp in m.fingerprints.items():
        print(f"  fingerprint {name}: {fp}")
    for c in m.columns:
        print(f"  column {c.name}: {c.dtype}{'[' + ','.join(map(str, c.shape)) + ']' if c.shape else ''}")
    sides = sorted({n for s in m.shards for n in s.side_files})
    if sides:
        print(f"  side files per shard: {', '.join(sides)}")


def _verify(args: argparse.Namespace) -> None:
    from amalgam.store.catalog import find, scan, verify_dataset
    from amalgam.store.dataset import Dataset
    from amalgam.store.location import open_store

    loc = open_store(args.uri)
    entries = [find(loc, args.key)] if args.key else [e for e in scan(loc) if e.kind != "codecs" and e.committed]
    if args.key and entries[0].kind == "codecs":
        raise AmalgamError(f"{loc.uri_of(entries[0].key)}: codecs have no checksummed shards; verify a dataset")
    bad, first = 0, ""
    for e in entries:
        try:
            ds = Dataset.open(loc, e.key)  # a missing or malformed manifest is itself a failure
            problems = verify_dataset(ds)
        except AmalgamError as exc:
            problems = [str(exc)]
        if problems:
            bad += 1
            first = first or problems[0]
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            print(f"FAIL {e.key}: {problems[0]}{more}")
        else:
            print(f"ok   {e.key}: {ds.manifest.num_rows} rows, {len(ds.manifest.shards)} shards")
    if bad:
        # The one error line names the culprit itself; the FAIL lines above list every bad dataset.
        raise AmalgamError(f"{loc.uri}: {bad} of {len(entries)} datasets failed verification; first: {first}")
    print(f"{loc.uri}: {len(entries)} datasets verified")


def _gc(args: argparse.Namespace) -> None:
    from amalgam.store.catalog import gc_candidates
    from amalgam.store.location import open_store

    loc = open_store(args.uri)
    doomed = gc_candidates(loc, args.older_than * 60.0, time.time())
    if not doomed:
        print(f"{loc.uri}: nothing to collect")
        return
    for e in doomed:
        print(f"{'delete' if args.yes else 'would delete'} {e.key} ({e.kind}, uncommitted, {_size(e.bytes)})")
        if args.yes:
            loc.delete_dir(e.key)
    total = _size(sum(e.bytes for e in doomed))
    if args.yes:
        print(f"{loc.uri}: deleted {len(doomed)} uncommitted entries ({total})")
    else:
        print(f"{loc.uri}: {len(doomed)} uncommitted entries ({total}); run again with --yes to delete them")


def register(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="inspect, verify and clean a feature store").add_subparsers(
        dest="action", required=True)
    ls = store.add_parser("list", help="committed datasets and codecs")
    ls.add_argument("uri", help="store: a path, file://PATH or s3://BUCKET/PREFIX")
    ls.set_defaults(func=_list)
    show = store.add_parser("show", help="one dataset's manifest")
    show.add_argument("uri")
    show.add_argument("key", help="e.g. codes/<codec fp>/<pool fp> (as `store list` prints it)")
    show.set_defaults(func=_show)
    verify = store.add_parser("verify", help="check every shard's checksum (all datasets, or KEY)")
    verify.add_argument("uri")
    verify.add_argument("key", nargs="?")
    verify.set_defaults(func=_verify)
    gc = store.add_parser("gc", help="delete uncommitted leftovers (never a committed dataset)")
    gc.add_argument("uri")
    gc.add_argument("--yes", action="store_true", help="delete (default: only print what would be deleted)")
    gc.add_argument("--older-than", type=float, default=60.0, metavar="MINUTES",
                    help="spare entries written to more recently (an extraction may be running; default 60)")
    gc.set_defaults(func=_gc)
