"""``amalgam retrain JOB``: retrain as the zoo changes; only added or changed teachers run; champion/challenger gate.

Exits 0 when nothing changed (no teacher added, changed or removed since the champion), without
loading a teacher: a scheduled run (the RayCronJob in ``k8s/``) is then a no-op. A rejected
challenger also exits 0: it is registered with the reason, and the champion keeps serving.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _retrain(args: argparse.Namespace) -> None:
    from amalgam.job import load_job
    from amalgam.paths import amalgam_home
    from amalgam.retrain import retrain

    job = load_job(args.job)
    out = Path(args.out) if args.out else amalgam_home() / "runs" / f"{job.name}-retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.dry_run:
        retrain(job, out, args.address, dry_run=True)
        return
    import torch

    from amalgam import metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = metrics.MetricsSettings.from_env()
    server = metrics.serve(settings.port, settings.addr) if settings.port is not None else None
    if server:
        print(f"[metrics] serving {server.url}")
    from amalgam.commands.run import _LiveMetrics, _record

    live = _LiveMetrics(teachers_in_process=False)  # retrain's teachers run in extraction, counted per shard
    with metrics.batch_job(settings.pushgateway, job.name):
        outcome = retrain(job, out, args.address, phase=live.phase, epoch_end=live.epoch_end)
        if outcome.run_dir is not None:
            _record(outcome.result)


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "retrain",
        help="retrain as the zoo changes: run only added or changed teachers, judge the new student against the champion",
        description="Diff the zoo with the registry champion of the job's student line; run only added and changed "
                    "teachers (incremental amalgamation, IFA or DFA as the job says, on the champion's stored codes: "
                    "a removed teacher leaves them with no teacher run) or, when the stored features cannot serve, "
                    "a full run; register the new student and promote it only if it covers the zoo and does not "
                    "regress beyond retrain.tolerance. Exits 0 with nothing to do when the zoo is unchanged.",
    )
    r.add_argument("job")
    r.add_argument("--dry-run", action="store_true", help="print the diff and what would be run, trained and compared")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    r.add_argument("--out", help="run directory (default $AMALGAM_HOME/runs/NAME-retrain-TIME)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.set_defaults(func=_retrain)
