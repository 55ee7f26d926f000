"""The ``amalgam`` command line.

Every user-facing failure is an :class:`~amalgam.errors.AmalgamError`, printed as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amalgam.errors import AmalgamError
from amalgam.paths import amalgam_home, default_data_root


def _cmd_data_fetch(args: argparse.Namespace) -> None:
    from amalgam.data.fetch import fetch_all

    root = Path(args.root or default_data_root())
    fetch_all(root, args.datasets or None)
    print(f"[data] ready under {root}")


def _cmd_zoo_train(args: argparse.Namespace) -> None:
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


def _cmd_zoo_show(args: argparse.Namespace) -> None:
    from amalgam.zoo.manifest import load_zoo
    from amalgam.zoo.train import zoo_table

    manifest, _ = load_zoo(args.manifest)
    print(zoo_table(manifest))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amalgam", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    fetch = data.add_parser("fetch", help="fetch and verify MNIST and Fashion-MNIST")
    fetch.add_argument("--root", help="data root (default $AMALGAM_HOME/data)")
    fetch.add_argument("datasets", nargs="*", help="subset of: mnist fashion")
    fetch.set_defaults(func=_cmd_data_fetch)

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
    train.set_defaults(func=_cmd_zoo_train)
    show = zoo.add_parser("show", help="verify a zoo and print its table")
    show.add_argument("manifest")
    show.set_defaults(func=_cmd_zoo_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except AmalgamError as exc:
        print(f"amalgam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amalgam: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
