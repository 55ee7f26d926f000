"""Process-wide work counters: teacher forwards and auto-encoder fits.

A sweep's promise is that its trials run no teacher and fit no auto-encoder. Rather than
trust the code path, each process counts what it actually did (the capture and fitting
functions increment these), and trials report the difference over their lifetime.
"""

from __future__ import annotations

from collections import Counter

TEACHER_FORWARDS = "teacher_forwards"  # samples x teachers pushed through capture_teachers
AUTOENCODER_FITS = "autoencoder_fits"  # PCA eigendecompositions, IFA fits, SGD auto-encoders built
_TEACHER_BATCH = "teacher_batch:"  # + teacher name: forward passes (batches) of that teacher

_counts: Counter[str] = Counter()


def add(name: str, n: int = 1) -> None:
    _counts[name] += n


def teacher_batch(teacher: str) -> None:
    _counts[_TEACHER_BATCH + teacher] += 1


def teacher_batches() -> dict[str, int]:
    """Forward passes (batches) per teacher name in this process so far; a driver turns the
    growth into its ``amalgam_teacher_forwards_total{teacher}`` (the engine knows no metrics)."""
    return {k[len(_TEACHER_BATCH):]: v for k, v in list(_counts.items()) if k.startswith(_TEACHER_BATCH)}


def snapshot() -> dict[str, int]:
    return {TEACHER_FORWARDS: _counts[TEACHER_FORWARDS], AUTOENCODER_FITS: _counts[AUTOENCODER_FITS]}


def since(before: dict[str, int]) -> dict[str, int]:
    now = snapshot()
    return {k: now[k] - before.get(k, 0) for k in now}
