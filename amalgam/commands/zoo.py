"""``amalgam zoo train|show|import``."""

from __future__ import annotations

import argparse
from pathlib import Path

from amalgam.errors import AmalgamError
from amalgam.paths import amalgam_home


def _train(args: argparse.Namespace) -> None:
    import torch

    from amalgam.zoo.train import train_zoo, zoo_table

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or amalgam_home() / "zoos" / args.preset)
    manifest = train_zoo(
        args.preset, out, Path(args.data_root) if args.data_root else None,
        limit=args.limit, epochs=args.epochs, force=args.force, seed=args.seed,
    )
    print(f"\nzoo {manifest.name} at {out / 'zoo.yaml'}\n")
    print(zoo_table(manifest))
    failed = [t.name for t in manifest.teachers if t.metrics.get("test_accuracy", 0) < t.metrics.get("target_accuracy", 0)]
    if failed and args.limit is None and args.epochs is None:
        raise AmalgamError(f"teacher {failed[0]} is below its accuracy target (see table)")


def _show(args: argparse.Namespace) -> None:
    from amalgam.zoo.manifest import load_zoo
    from amalgam.zoo.train import zoo_table

    manifest, _ = load_zoo(args.manifest)
    print(zoo_table(manifest))


def _import(args: argparse.Namespace) -> None:
    from amalgam.zoo.importer import import_table, import_zoo, read_import_spec

    out = Path(args.out) if args.out else amalgam_home() / "zoos" / read_import_spec(args.spec).name
    manifest, rows = import_zoo(args.spec, out, force=args.force)
    print(f"\nzoo {manifest.name} at {out / 'zoo.yaml'} (verified)\n")
    print(import_table(rows))


def register(sub: argparse._SubParsersAction) -> None:
    zoo = sub.add_parser("zoo", help="teacher zoos").add_subparsers(dest="action", required=True)
    train = zoo.add_parser("train", help="train a demo teacher zoo")
    train.add_argument("--preset", default="mnist-fashion-4")
    train.add_argument("--out", help="zoo directory (default $AMALGAM_HOME/zoos/PRESET)")
    train.add_argument("--data-root")
    train.add_argument("--limit", type=int, help="train images per teacher (quick runs)")
    train.add_argument("--epochs", type=int, help="override every teacher's epochs")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--force", action="store_true", help="retrain even if a verified zoo exists")
    train.set_defaults(func=_train)
    show = zoo.add_parser("show", help="verify a zoo and print its table")
    show.add_argument("manifest")
    show.set_defaults(func=_show)
    imp = zoo.add_parser(
        "import", help="a zoo from teachers trained elsewhere (safetensors or state_dict files)",
        description="Build a zoo manifest from existing weight files, an architecture name, class names and "
                    "preprocessing, as listed in an import spec (YAML). Pickled modules are refused, never loaded.",
    )
    imp.add_argument("spec", help="the import spec (YAML): name, teachers: [{name, weights, arch, classes, input}]")
    imp.add_argument("--out", help="zoo directory (default $AMALGAM_HOME/zoos/NAME)")
    imp.add_argument("--force", action="store_true", help="overwrite an existing zoo.yaml and teacher weights in --out")
    imp.set_defaults(func=_import)
