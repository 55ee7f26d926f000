"""Process-wide work counters: teacher forwards and auto-encoder fits.

A sweep's promise is that its trials run no teacher and fit no auto-encoder. Rather than
trust the code path, each process counts what it actually did (the capture and fitting
functions increment these), and trials report the difference over their lifetime.
"""

from __future__ import annotations

from collections import Counter

TEACHER_FORWARDS = "teacher_forwards"  # samples x teachers pushed through capture_teachers
AUTOENCODER_FITS = "autoencoder_fits"  # PCA eigendecompositions, IFA fits, SGD auto-encoders built

_counts: Counter[str] = Counter()


def add(name: str, n: int = 1) -> None:
    _counts[name] += n


def snapshot() -> dict[str, int]:
    return {TEACHER_FORWARDS: _counts[TEACHER_FORWARDS], AUTOENCODER_FITS: _counts[AUTOENCODER_FITS]}


def since(before: dict[str, int]) -> dict[str, int]:
    now = snapshot()
    return {k: now[k] - before.get(k, 0) for k in now}
