"""``amalgam submit JOB`` and ``amalgam job list|status|logs|stop``: jobs on a Ray cluster.

They mirror ``ray job submit|list|status|logs|stop`` through Ray's Jobs API
(:mod:`amalgam.cluster_client` says what is shipped and how the token is found). ``submit``
prints only the job id on stdout, so ``id=$(amalgam submit job.yaml)`` works in scripts;
everything else a command has to say about the cluster goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from amalgam.errors import AmalgamError

ADDRESS_HELP = "Jobs API address, e.g. http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)"


def _finish(client, job_id: str, details) -> None:
    """Report a followed job's end: one status line, and a failure is an error (exit 2)."""
    from amalgam import cluster_client as cc

    status = cc.status_text(details)
    if status == "FAILED":
        raise AmalgamError(f"job {job_id} FAILED: {cc.error_line(details, cc.logs(client, job_id))}")
    print(f"job {job_id}: {status}", file=sys.stderr)
    if status == "STOPPED":
        raise AmalgamError(f"job {job_id} was STOPPED")


def _submit(args: argparse.Namespace) -> None:
    from amalgam import cluster_client as cc

    job_file = Path(args.job)
    if not job_file.is_file():
        raise AmalgamError(f"{job_file}: job file not found")
    client = cc.connect(args.address)
    job_id = cc.submit(
        client, job_file, command="validate" if args.validate_only else "run", local=args.local, out=args.out,
        threads=args.threads, submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
    )
    print(job_id, flush=True)
    if args.follow:
        _finish(client, job_id, cc.follow(client, job_id))


def _list(args: argparse.Namespace) -> None:
    from amalgam import cluster_client as cc

    jobs = cc.list_jobs(cc.connect(args.address))
    rows = [("SUBMISSION ID", "STATUS", "STARTED (UTC)", "JOB", "ENTRYPOINT")]
    for j in jobs:
        started = datetime.fromtimestamp(j.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") \
            if j.start_time else "-"
        name = (j.metadata or {}).get("amalgam_job", "-")
        rows.append((j.submission_id or j.job_id or "-", cc.status_text(j), started, name, j.entrypoint[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


def _status(args: argparse.Namespace) -> None:
    from amalgam import cluster_client as cc

    client = cc.connect(args.address)
    details = cc.info(client, args.job_id)
    status = cc.status_text(details)
    print(f"{args.job_id}: {status}")
    if status == "FAILED":
        print(f"error: {cc.error_line(details, cc.logs(client, args.job_id))}")
    elif details.message and status not in ("SUCCEEDED",):
        print(f"message: {details.message.splitlines()[0]}")


def _logs(args: argparse.Namespace) -> None:
    from amalgam import cluster_client as cc

    client = cc.connect(args.address)
    if args.follow:
        _finish(client, args.job_id, cc.follow(client, args.job_id))
    else:
        sys.stdout.write(cc.logs(client, args.job_id))


def _stop(args: argparse.Namespace) -> None:
    from amalgam import cluster_client as cc

    client = cc.connect(args.address)
    if cc.stop(client, args.job_id):
        print(f"job {args.job_id}: stop requested")
    else:
        print(f"job {args.job_id}: already ended ({cc.status_text(cc.info(client, args.job_id))})")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("submit", help="submit a job to a Ray cluster (Jobs API); prints the job id")
    s.add_argument("job", help="job file; shipped to the cluster with this amalgam package")
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument("--local", action="store_true", help="pass --local to `amalgam run` on the cluster")
    s.add_argument("--out", help="run directory on the cluster (passed to `amalgam run --out`)")
    s.add_argument("--threads", type=int, help="torch CPU threads of the driver (`amalgam run --threads`)")
    s.add_argument("--validate-only", action="store_true",
                   help="run `amalgam validate JOB` on the cluster instead: checks it sees the zoo and data")
    s.add_argument("--submission-id", help="job id to use (default: Ray generates one)")
    s.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    s.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 2 if it fails")
    s.set_defaults(func=_submit)

    j = sub.add_parser("job", help="list, inspect, follow or stop jobs on a Ray cluster")
    jsub = j.add_subparsers(dest="job_command", required=True)
    for name, func, helptext in (
        ("list", _list, "all jobs of the cluster"),
        ("status", _status, "a job's status; for a failed job, its error line"),
        ("logs", _logs, "a job's logs"),
        ("stop", _stop, "stop a running job"),
    ):
        p = jsub.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("job_id")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 2 if it fails")
        p.add_argument("--address", help=ADDRESS_HELP)
        p.set_defaults(func=func)
