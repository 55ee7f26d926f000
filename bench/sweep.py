"""A sweep vs the same configurations as independent runs: teacher forwards and wall time.

1. ``amalgam sweep`` of the demo sweep job into a fresh store: the teachers run only to fill
   the store (statistics + logits once, codes once per balancing setting), never in a trial.
2. The same configurations (every trial's widths, balancing, joint lr and temperature) as
   independent ``amalgam run`` jobs, each with its own fresh store: what a user without
   sweeps would do. Each run pays its own extraction.

Prints teacher forwards and wall time of both and their ratios. The sweep's trials train on
90 % of the pool (10 % held out to score them) and ASHA stops some early; the runs train on
the whole pool with no baselines, so the comparison favours the runs slightly.

    .venv/bin/python bench/sweep.py [--trials 4] [--pool-per-dataset 2500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--pool-per-dataset", type=int, default=2500)
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from amalgam.distributed.store_source import store_source_factory
    from amalgam.engine.run_local import run_local
    from amalgam.job import load_job
    from amalgam.sweep.driver import run_sweep
    from amalgam.sweep.results import best_job

    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    job = load_job(ROOT / "jobs/mnist-fashion-4-sweep.yaml")
    for src in job.pool.sources:
        src.count = args.pool_per_dataset
    job.sweep.trials = args.trials
    job.store.uri = str(scratch / "store-sweep")
    job.baselines.kd = job.baselines.supervised = False
    job.evaluation.latency = False
    quiet = lambda _m: None  # noqa: E731

    t0 = time.perf_counter()
    res = run_sweep(job, scratch / "sweep", log=quiet)
    sweep_wall = time.perf_counter() - t0
    counts = res.summary["counts"]
    sweep_forwards = counts["teacher_forwards_preparation"] + counts["teacher_forwards_trials"]

    run_forwards, run_wall = 0, 0.0
    for i, row in enumerate(res.rows):
        one = best_job(job, row).model_copy(update={"name": f"bench-run-{i}"})
        one.store.uri = str(scratch / f"store-run-{i}")  # independent: nothing shared
        t1 = time.perf_counter()
        out = run_local(one, scratch / f"run-{i}", log=quiet, source_factory=store_source_factory())
        run_wall += time.perf_counter() - t1
        run_forwards += out.extra["teacher_forwards"]

    n = len(res.rows)
    pool = 2 * args.pool_per_dataset
    print(f"\npool {pool} images, 4 teachers, {n} configurations "
          f"({sum(r.status == 'stopped early' for r in res.rows)} stopped early by ASHA in the sweep)")
    print("| | teacher forwards | per pool image x teacher | wall s |\n|---|---:|---:|---:|")
    print(f"| sweep ({n} trials) | {sweep_forwards:,} | {sweep_forwards / (pool * 4):.2f} | {sweep_wall:.0f} |")
    print(f"| {n} independent runs | {run_forwards:,} | {run_forwards / (pool * 4):.2f} | {run_wall:.0f} |")
    print(f"| ratio (runs / sweep) | {run_forwards / max(1, sweep_forwards):.1f}x | | {run_wall / sweep_wall:.2f}x |")
    print(f"teacher forwards inside trials: {counts['teacher_forwards_trials']}; "
          f"auto-encoder fits inside trials: {counts['autoencoder_fits_trials']}")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"scratch kept in {scratch}")


if __name__ == "__main__":
    main()
