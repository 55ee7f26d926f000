"""What a sweep leaves behind: every trial, the Pareto front, and the best job as a file.

``trials.csv`` / ``sweep.json`` / ``sweep.md`` list every trial (its configuration, the
widths it resolved to, objective, size, latency, joint epochs run, and whether ASHA
stopped it). The Pareto front (objective vs params) counts only trials that ran the full
joint-stage budget: an early-stopped trial's score is an underestimate, not a point of the
trade-off. ``best.yaml`` is the base job with the best trial's settings, widths written as
absolute channel counts, ready for ``amalgam run``.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amalgam.job import Job, dump_job
from amalgam.store.location import StoreLocation


@dataclass
class TrialRow:
    trial: str
    status: str  # completed | stopped early | error
    balance: bool
    joint_lr: float
    temperature: float
    widths: dict[str, int]
    objective: float
    kl: float
    params: int
    macs: int
    latency_ms_b1: float
    joint_epochs: int
    after_stages: float
    wall_s: float
    teacher_forwards: int
    autoencoder_fits: int
    accuracy: float | None = None
    error: str | None = None
    curve: list[float] = field(default_factory=list)  # objective after each joint epoch


def pareto_front(rows: list[TrialRow]) -> list[TrialRow]:
    """Completed trials no other completed trial beats on both objective (higher) and params (fewer)."""
    done = [r for r in rows if r.status == "completed" and not math.isnan(r.objective)]
    front = [
        r for r in done
        if not any(o.objective >= r.objective and o.params <= r.params and (o.objective > r.objective or o.params < r.params)
                   for o in done)
    ]
    return sorted(front, key=lambda r: r.params)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    done = [r for r in rows if r.status == "completed" and not math.isnan(r.objective)]
    return max(done, key=lambda r: (r.objective, -r.params)) if done else None


def best_job(job: Job, row: TrialRow) -> Job:
    amalg = job.amalgamation.model_copy(update={"balance": row.balance, "widths": dict(row.widths),
                                                "max_energy": None, "max_width": None})
    joint = job.joint.model_copy(update={"lr": row.joint_lr, "temperature": row.temperature})
    store = job.store.model_copy(update={"uri": job.store_uri()})  # absolute: best.yaml lives elsewhere
    return job.model_copy(update={"name": f"{job.name}-best", "zoo": str(job.zoo_path()), "store": store,
                                  "amalgamation": amalg, "joint": joint, "sweep": None})


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _widths(w: dict[str, int]) -> str:
    return "/".join(str(v) for v in w.values())


def table(rows: list[TrialRow], objective: str) -> str:
    head = (f"| trial | status | widths | balance | joint lr | T | {objective} | KL | params | latency b1 ms "
            "| joint epochs | wall s |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r.trial} | {r.status} | {_widths(r.widths)} | {r.balance} | {r.joint_lr:.2e} | {r.temperature:g} "
        f"| {_fmt(r.objective)} | {_fmt(r.kl)} | {r.params:,} | {_fmt(r.latency_ms_b1, 3)} | {r.joint_epochs} "
        f"| {r.wall_s:.0f} |\n"
        for r in rows
    )


def plot_pareto(rows: list[TrialRow], front: list[TrialRow], best: TrialRow | None, objective: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for status, style in (("completed", dict(c="tab:blue", marker="o")), ("stopped early", dict(c="0.6", marker="x"))):
        pts = [r for r in rows if r.status == status and not math.isnan(r.objective)]
        if pts:
            ax.scatter([r.params for r in pts], [r.objective for r in pts], label=status, **style)
    if front:
        ax.plot([r.params for r in front], [r.objective for r in front], "-o", c="tab:orange", mfc="none", ms=11,
                label="Pareto front")
    if best is not None:
        ax.scatter([best.params], [best.objective], marker="*", s=220, c="tab:red", label="best", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("student parameters (log scale)")
    ax.set_ylabel(objective)
    ax.set_title("sweep: objective vs student size")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(loc: StoreLocation, job: Job, rows: list[TrialRow], objective: str, counts: dict) -> dict:
    """Write trials.csv, sweep.json, sweep.md, pareto.png and best.yaml into the sweep directory
    (local or S3: each file is written whole, atomically); return the summary."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = _write_local(Path(tmp), job, rows, objective, counts)
        for f in sorted(Path(tmp).iterdir()):
            loc.write_bytes(f.name, f.read_bytes())
    return summary


def _write_local(out: Path, job: Job, rows: list[TrialRow], objective: str, counts: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    front, best = pareto_front(rows), best_row(rows)
    with open(out / "trials.csv", "w", newline="") as f:
        keys = [k for k in asdict(rows[0]) if k not in ("widths", "curve")] if rows else []
        taps = list(rows[0].widths) if rows else []
        w = csv.writer(f)
        w.writerow(keys + [f"width/{t}" for t in taps])
        for r in rows:
            d = asdict(r)
            w.writerow([d[k] for k in keys] + [r.widths[t] for t in taps])
    plot_pareto(rows, front, best, objective, out / "pareto.png")
    if best is not None:
        (out / "best.yaml").write_text(f"# best trial {best.trial} of sweep {job.name} ({objective} {best.objective:.4f})\n"
                                       + dump_job(best_job(job, best)))
    summary = {"job": job.name, "objective": objective, "trials": [asdict(r) for r in rows],
               "pareto": [r.trial for r in front], "best": best.trial if best else None, "counts": counts}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=float))
    stopped = sum(r.status == "stopped early" for r in rows)
    md = [f"# amalgam sweep {job.name}\n",
          f"Objective: **{objective}** ({'held-out pool fidelity to the calibrated teachers' if objective == 'agreement' else 'labelled validation set'}), "
          f"{len(rows)} trials, {stopped} stopped early by ASHA.\n",
          "## Pareto front (completed trials: objective vs params)\n", table(front, objective),
          "\n![pareto](pareto.png)\n", "## All trials\n", table(rows, objective),
          "\n## Work\n", "".join(f"- {k}: {v:,}\n" for k, v in counts.items())]
    if best is not None:
        md.insert(2, f"Best: trial {best.trial} ({objective} {best.objective:.4f}, {best.params:,} params): "
                     "`amalgam run best.yaml` trains it on the whole pool.\n")
    (out / "sweep.md").write_text("\n".join(md))
    return summary
