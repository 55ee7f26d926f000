"""Naming of Ray Train runs inside a run directory.

Ray Train resumes a run that already has state under ``storage_path/name``. That is what we
want after a crash of the same job (issue: driver loss), and never what we want when the
settings changed, so the name carries a fingerprint of everything the run depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch


def run_fingerprint(job: object) -> str:
    h = hashlib.sha256()
    for f in dataclasses.fields(job):  # type: ignore[arg-type]
        v = getattr(job, f.name)
        h.update(f.name.encode())
        _feed(h, v)
    return h.hexdigest()[:12]


def _feed(h, v) -> None:
    if isinstance(v, torch.Tensor):
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(str(k).encode())
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        for x in v:
            _feed(h, x)
    else:
        h.update(repr(v).encode())
