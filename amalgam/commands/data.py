"""``amalgam data fetch``."""

from __future__ import annotations

import argparse
from pathlib import Path

from amalgam.paths import default_data_root


def _fetch(args: argparse.Namespace) -> None:
    from amalgam.data.fetch import fetch_all

    root = Path(args.root or default_data_root())
    fetch_all(root, args.datasets or None)
    print(f"[data] ready under {root}")


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    fetch = data.add_parser("fetch", help="fetch and verify MNIST and Fashion-MNIST")
    fetch.add_argument("--root", help="data root (default $AMALGAM_HOME/data)")
    fetch.add_argument("datasets", nargs="*", help="subset of: mnist fashion")
    fetch.set_defaults(func=_fetch)
