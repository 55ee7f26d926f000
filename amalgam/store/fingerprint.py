"""Content fingerprints: equal inputs get equal keys, so a second job reuses what exists.

A teacher's fingerprint covers everything that changes its outputs: weights hash,
architecture and its arguments, taps and input preprocessing. A pool's covers its sample
ids and pixels (so the data files and the sampling are both in it). A codec's covers the
fitted auto-encoder weights themselves.
"""

from __future__ import annotations

import hashlib
import json

import torch

from amalgam.zoo.manifest import TeacherEntry

FINGERPRINT_CHARS = 16  # in keys; manifests keep the full digest


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def teacher_fingerprint(entry: TeacherEntry) -> str:
    return _digest({
        "sha256": entry.sha256, "arch": entry.arch, "arch_args": entry.arch_args,
        "taps": [t.model_dump() for t in entry.taps], "input": entry.input.model_dump(),
    })


def zoo_fingerprint(entries: list[TeacherEntry]) -> str:
    return _digest([teacher_fingerprint(e) for e in entries])


def tensors_fingerprint(named: dict[str, torch.Tensor], meta: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def short(fp: str) -> str:
    return fp[:FINGERPRINT_CHARS]
