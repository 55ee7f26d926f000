"""``amalgam sweep JOB``: Ray Tune over the job's ``sweep:`` section (see :mod:`amalgam.sweep`)."""

from __future__ import annotations

import argparse
import os
import time

from amalgam.paths import amalgam_home


def _sweep(args: argparse.Namespace) -> None:
    from amalgam.job import load_job

    job = load_job(args.job)
    out = args.out if args.out else amalgam_home() / "sweeps" / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Trials print through Tune's status table; per-batch progress bars from a dozen worker
    # processes would bury it. Workers of an embedded Ray inherit this.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from amalgam import metrics
    from amalgam.sweep.driver import run_sweep

    settings = metrics.MetricsSettings.from_env()
    server = metrics.serve(settings.port, settings.addr) if settings.port is not None else None
    if server:
        print(f"[metrics] serving {server.url}")
    with metrics.batch_job(settings.pushgateway, job.name):
        with metrics.phase("tune"):
            result = run_sweep(job, out, args.address)
        status = {"completed": "completed", "stopped early": "pruned", "error": "failed"}
        for row in result.rows:
            metrics.trial_finished(status[row.status])


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="search compact widths, balancing, joint lr and KD temperature with Ray Tune")
    s.add_argument("job")
    s.add_argument("--out", help="sweep directory (default $AMALGAM_HOME/sweeps/NAME-TIME); rerun with the same "
                                 "--out to resume an interrupted sweep")
    s.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    s.set_defaults(func=_sweep)
