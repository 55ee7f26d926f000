"""The ``amalgam`` command line.

Every user-facing failure is an :class:`~amalgam.errors.AmalgamError`, printed as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
Command groups live in :mod:`amalgam.commands`, one module each.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from amalgam.commands import COMMAND_MODULES
from amalgam.errors import AmalgamError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amalgam", description="Knowledge amalgamation: one compact student from a teacher zoo.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"amalgam.commands.{name}").register(sub)
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
