"""Stage-fitting speed: all layer-wise stages on 1 Ray Train worker vs 2 (same threads per worker).

Runs the demo job's extraction (reused from the store when present), then fits the stages
three times from the same stored codes: 1 worker; 2 workers each owning whole stages
(``stages.parallel: stages``); 2 workers each fitting every stage on half the pool's shards
with gradients all-reduced (``rows``), and prints wall times, their ratios (issue 6 target:
>= 1.6x on a 2-core machine) and each run's last-epoch stage losses (same fit quality?). Defaults: the demo job's sizes
(30 000-image pool, its stage epochs). Two ratios: whole wall time (each run pays Ray Train's
start-up, ~10 s here, whatever the size), and the slowest rank's time inside its epochs
(start-up excluded; from the workers' checkpointed timings, which also split read vs compute).

    .venv/bin/python bench/stages.py [--pool 30000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from amalgam.data.pool import build_pool
from amalgam.distributed.store_source import StoreSource
from amalgam.engine.run_local import pool_input_spec
from amalgam.engine.calibrate import fit_calibration
from amalgam.engine.stages import build_stages, stage_specs
from amalgam.engine.student import build_student, common_topology, student_config
from amalgam.job import load_job
from amalgam.paths import amalgam_home
from amalgam.zoo.manifest import load_zoo

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=None, help="images in all (split evenly); default: the demo job's")
    ap.add_argument("--pool-per-dataset", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="stage epochs; default: the demo job's")
    ap.add_argument("--only", default=None, help="comma list of runs among 1-stages,2-stages,2-rows (default: all)")
    args = ap.parse_args()
    job = load_job(ROOT / "jobs/mnist-fashion-4.yaml")
    per = args.pool // len(job.pool.sources) if args.pool else args.pool_per_dataset
    for src in job.pool.sources:
        src.count = per or src.count
    job.stages.epochs = args.epochs or job.stages.epochs
    manifest, teachers = load_zoo(job.zoo_path())
    space = manifest.class_space()
    pool = build_pool(job.pool)
    src = StoreSource(job, teachers, pool, log=lambda _m: None)
    tp = src.teacher_pass()
    codecs, _ = src.fit(tp.stats)
    targets = fit_calibration(tp.logits, space.slices, job.calibration)(tp.logits)
    ref = common_topology([t.name for t in teachers], [t.net.config for t in teachers])
    cfg = student_config(ref, {t: c.width for t, c in codecs.items()}, len(space))
    spec = pool_input_spec(pool)
    target_var = {tap: float(c.code_moments(tp.stats[tap])[1].mean()) for tap, c in codecs.items()}
    target_var["head"] = float(targets.var(0).mean())
    steps = -(-len(pool) // job.stages.batch_size)
    out = amalgam_home() / "bench" / "stages"
    times, loops = {}, {}
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    src.log = log
    runs = [(1, "stages"), (2, "stages"), (2, "rows")]
    if args.only:
        runs = [r for r in runs if f"{r[0]}-{r[1]}" in args.only.split(",")]
    finals: dict[tuple[int, str], dict[str, float]] = {}
    for workers, parallel in runs:
        job.stages.workers, job.stages.parallel = workers, parallel
        lines.clear()
        print(f"[bench] {workers} worker(s), {parallel}, load average {Path('/proc/loadavg').read_text().split()[:3]}",
              flush=True)
        torch.manual_seed(0)
        skeleton = build_student(cfg)
        nets = build_stages(skeleton)
        t0 = time.perf_counter()
        curves = src.fit_stages(stage_specs(skeleton), nets, target_var, targets, cfg, spec,
                                {t: c.width for t, c in codecs.items()}, steps, out / f"w{workers}-{parallel}-{time.time():.0f}")
        key = (workers, parallel)
        times[key] = time.perf_counter() - t0
        finals[key] = {name: curve[-1] for name, curve in curves.items()}
        timing = next(m for m in lines if "time in the epochs per rank" in m)
        loops[key] = max(float(x) for x in re.findall(r"rank \d+ ([\d.]+)s", timing))
    print(f"\n## Stage fitting on Ray Train ({len(pool)} images, {job.stages.epochs} epochs, 1 CPU per worker)\n")
    stages = sorted({n for f in finals.values() for n in f})
    print("| workers | parallel | wall s | slowest rank in its epochs, s | last-epoch loss " + " / ".join(stages) + " |")
    print("|---:|---|---:|---:|---|")
    for (w, par), t in times.items():
        print(f"| {w} | {par} | {t:.1f} | {loops[(w, par)]:.1f} | "
              + " / ".join(f"{finals[(w, par)][n]:.4f}" for n in stages) + " |")
    base = (1, "stages")
    if base in times:
        for key in times:
            if key != base:
                print(f"speed-up {key[0]} workers ({key[1]}) vs 1: wall {times[base] / times[key]:.2f}x, in the epochs "
                      f"(start-up excluded) {loops[base] / loops[key]:.2f}x (target >= 1.6x)")
    print(f"load average at the end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
