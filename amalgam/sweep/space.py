"""The ``sweep:`` section of a job as a Ray Tune search space, and width resolution.

A trial's config has four keys: ``widths`` (tap or ``default`` -> int or ratio),
``balance``, ``joint_lr`` and ``temperature``. Widths resolve exactly as ``amalgam run``
resolves ``amalgamation.widths`` (:meth:`Amalgamation.width_for`), then are capped at the
width the codes were stored at (the widest any trial can ask for, so never binding unless
``max_energy`` capped the stored width).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from amalgam.engine.amalgamate import TapStats, fit_pca
from amalgam.job import Choice, Dim, Job, LogUniform, Sweep, Uniform, dim_extremes


def to_tune(dim: Dim) -> Any:
    if isinstance(dim, Choice):
        return tune.choice(list(dim.choice))
    if isinstance(dim, Uniform):
        return tune.uniform(*dim.uniform)
    if isinstance(dim, LogUniform):
        return tune.loguniform(*dim.loguniform)
    return dim


def sweep_of(job: Job) -> Sweep:
    return job.sweep or Sweep()


def balance_dim(job: Job) -> Dim:
    s = sweep_of(job)
    return job.amalgamation.balance if s.balance is None else s.balance


def balance_values(job: Job) -> list[bool]:
    """Every balancing setting a trial can ask for (each needs its own eigenbasis and codes)."""
    return sorted({bool(v) for v in dim_extremes(balance_dim(job))})


def param_space(job: Job) -> dict[str, Any]:
    s = sweep_of(job)
    return {
        "widths": {tap: to_tune(dim) for tap, dim in s.widths.items()},
        "balance": to_tune(balance_dim(job)),
        "joint_lr": to_tune(job.joint.lr if s.joint_lr is None else s.joint_lr),
        "temperature": to_tune(job.joint.temperature if s.temperature is None else s.temperature),
    }


def _table(job: Job, widths: dict[str, Any]) -> dict[str, Any]:
    """The sweep's widths over the job's own (taps the sweep does not name keep the job's)."""
    return {**job.amalgamation.widths, **widths}


def check_taps(job: Job, taps: list[str]) -> None:
    from amalgam.errors import AmalgamError

    unknown = sorted(set(sweep_of(job).widths) - set(taps) - {"default"})
    if unknown:
        raise AmalgamError(f"job {job.name}: field sweep.widths.{unknown[0]}: no such tap; taps are {', '.join(taps)}")


def stored_widths(job: Job, stats: dict[str, TapStats], balance: bool) -> dict[str, int]:
    """Per tap, the widest width any trial can ask for: the codes are stored at it."""
    check_taps(job, list(stats))
    cfg = job.amalgamation
    out = {}
    for tap, st in stats.items():
        dim = sweep_of(job).widths.get(tap, sweep_of(job).widths.get("default"))
        candidates = dim_extremes(dim) if dim is not None else [None]
        ks = [cfg.width_for(tap, st.channels, _table(job, {} if v is None else {tap: v})) for v in candidates]
        k = max(ks)
        if cfg.max_energy:
            k = min(k, fit_pca(st, balance).energy_width(cfg.max_energy))
        out[tap] = k
    return out


def trial_widths(job: Job, config_widths: dict[str, Any], channels: dict[str, int], stored: dict[str, int]) -> dict[str, int]:
    table = _table(job, config_widths)
    return {tap: min(job.amalgamation.width_for(tap, c, table), stored[tap]) for tap, c in channels.items()}
