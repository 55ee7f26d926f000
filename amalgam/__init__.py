"""amalgam: one compact student from a zoo of expert teachers.

``import amalgam`` stays light (no torch). Public helpers are imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_student"]

_LAZY = {"load_student": "amalgam.student_io"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'amalgam' has no attribute {name!r}")
