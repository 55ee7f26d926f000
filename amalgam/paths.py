"""Where amalgam keeps things on this machine.

Everything defaults under ``$AMALGAM_HOME`` (default ``~/.cache/amalgam``) so a fresh
clone needs no configuration, and tests can redirect the whole tree with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def amalgam_home() -> Path:
    return Path(os.environ.get("AMALGAM_HOME", Path.home() / ".cache" / "amalgam")).expanduser()


def default_data_root() -> Path:
    """Root that torchvision datasets read from (``root/MNIST/raw``, ``root/FashionMNIST/raw``)."""
    return Path(os.environ.get("AMALGAM_DATA", amalgam_home() / "data")).expanduser()
