"""Stage-fitting speed: all layer-wise stages on 1 Ray Train worker vs 2 (same threads per worker).

Runs the demo job's extraction (reused from the store when present), then fits the stages
twice from the same stored codes, with ``stages.workers`` = 1 and 2, and prints wall times
and their ratio (issue 6 target: >= 1.6x on a 2-core machine). Defaults: the demo job's sizes
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
    for workers in (1, 2):
        job.stages.workers = workers
        lines.clear()
        print(f"[bench] {workers} worker(s), load average {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
        torch.manual_seed(0)
        skeleton = build_student(cfg)
        nets = build_stages(skeleton)
        t0 = time.perf_counter()
        src.fit_stages(stage_specs(skeleton), nets, target_var, targets, cfg, spec,
                       {t: c.width for t, c in codecs.items()}, steps, out / f"w{workers}-{time.time():.0f}")
        times[workers] = time.perf_counter() - t0
        timing = next(m for m in lines if "time in the epochs per rank" in m)
        loops[workers] = max(float(x) for x in re.findall(r"rank \d+ ([\d.]+)s", timing))
    print(f"\n## Stage fitting on Ray Train ({len(pool)} images, {job.stages.epochs} epochs, 1 CPU per worker)\n")
    print("| workers | wall s | slowest rank in its epochs, s |")
    print("|---:|---:|---:|")
    for w, t in times.items():
        print(f"| {w} | {t:.1f} | {loops[w]:.1f} |")
    print(f"\nspeed-up 2 vs 1 workers: wall {times[1] / times[2]:.2f}x, in the epochs (start-up excluded) "
          f"{loops[1] / loops[2]:.2f}x (target >= 1.6x)")
    print(f"load average at the end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
