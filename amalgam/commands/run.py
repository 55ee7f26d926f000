"""``amalgam validate JOB`` and ``amalgam run JOB``."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from amalgam.paths import amalgam_home


def _validate(args: argparse.Namespace) -> None:
    from amalgam.job import load_job

    job = load_job(args.job)  # before importing torch: a bad job file is reported at once
    job.store_uri()  # `uri: $VAR` expands as `amalgam run` will expand it: one naming credentials is refused now

    from amalgam.data.pool import check_sources
    from amalgam.engine.student import common_topology
    from amalgam.zoo.manifest import load_zoo

    manifest, teachers = load_zoo(job.zoo_path())  # hashes, taps, shapes
    common_topology([t.name for t in teachers], [t.net.config for t in teachers])
    for spec in (job.pool, job.evaluation.test):
        check_sources(spec)  # datasets fetched; image folders, prefixes and lists hold images
    space = manifest.class_space()
    print(f"{args.job}: ok (job {job.name}; zoo {manifest.name}: {len(teachers)} teachers, {len(space)} classes; "
          f"amalgamation {job.amalgamation.mode}/{job.amalgamation.strategy})")


def default_run_dir(name: str) -> Path:
    return amalgam_home() / "runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(args: argparse.Namespace) -> None:
    import torch

    from amalgam.job import load_job

    job = load_job(args.job)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_run_dir(job.name)
    from amalgam import metrics
    from amalgam.engine.run_local import run_local

    settings = metrics.MetricsSettings.from_env()
    server = metrics.serve(settings.port, settings.addr) if settings.port is not None else None
    if server:
        print(f"[metrics] serving {server.url}")
    factory = None
    if not args.local:
        from amalgam.distributed.store_source import store_source_factory

        factory = store_source_factory(args.address)
        if job.pool.has_images() or job.evaluation.test.has_images():
            from amalgam.distributed.extract import ensure_ray

            ensure_ray(args.address)  # before the pool is built, so Ray Data reads the image files
    live = _LiveMetrics(teachers_in_process=args.local)
    with metrics.batch_job(settings.pushgateway, job.name):
        result = run_local(job, out, source_factory=factory, phase=live.phase, epoch_end=live.epoch_end)
        live.sync_teacher_forwards()
        _record(result)


class _LiveMetrics:
    """What moves while a run goes on: the phase, each stage's loss and epochs as each epoch ends
    (``run_local``'s ``epoch_end``, in this process or relayed from Ray Train workers by
    :mod:`amalgam.distributed.progress`) and, with ``--local``, the teachers' forward passes
    (the engine's process-wide counters, synced at every epoch and phase end; on the store
    path the extraction counts them per shard instead)."""

    def __init__(self, teachers_in_process: bool) -> None:
        from amalgam.engine import counters

        self.teachers_in_process = teachers_in_process
        self._seen = counters.teacher_batches()

    def sync_teacher_forwards(self) -> None:
        from amalgam import metrics
        from amalgam.engine import counters

        if not self.teachers_in_process:
            return
        now = counters.teacher_batches()
        for teacher, n in now.items():
            if n > self._seen.get(teacher, 0):
                metrics.teacher_forward(teacher, n - self._seen.get(teacher, 0))
        self._seen = now

    def epoch_end(self, stage: str, epoch: int, loss: float) -> None:  # noqa: ARG002 (epoch: the counter counts)
        from amalgam import metrics

        self.sync_teacher_forwards()
        metrics.stage_epoch(stage, loss)

    @contextlib.contextmanager
    def phase(self, name: str):
        from amalgam import metrics

        with metrics.phase(name):
            try:
                yield
            finally:
                self.sync_teacher_forwards()


def _record(result) -> None:
    """Final figures of a run into the amalgam_* metrics (stage losses went in live, epoch by epoch)."""
    from amalgam import metrics

    names = {"multi-teacher KD (scratch)": "kd", "supervised (labels)": "supervised"}
    for r in result.results:
        model = "student" if r is result.results[-1] else names.get(r.name)
        if model and r.metrics is not None:
            metrics.student_accuracy(r.metrics.comprehensive, model=model)


def _extract(args: argparse.Namespace) -> None:
    """Both extraction passes into the store (statistics + logits, then codes), nothing else.
    Mode sgd: the first pass also stores the raw taps, and the auto-encoders are trained on
    them (Ray Train) before the codes are encoded from them."""
    from amalgam.data.pool import build_pool
    from amalgam.distributed.store_source import StoreSource
    from amalgam.job import load_job
    from amalgam.zoo.manifest import load_zoo

    job = load_job(args.job)
    _, teachers = load_zoo(job.zoo_path())
    if job.pool.has_images():
        from amalgam.distributed.extract import ensure_ray

        ensure_ray(args.address)  # before the pool is built, so Ray Data reads the image files
    pool = build_pool(job.pool, input_shape=teachers[0].entry.input.shape, log=print)
    src = StoreSource(job, teachers, pool, address=args.address)
    tp = src.teacher_pass()
    src.fit(tp.stats)
    print(f"[extract] done: teacher forwards this run {src.teacher_forwards}; "
          f"codes at {src.loc.uri_of(src.codes.key)} (widths {src.stored_widths})")


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("validate", help="check a job file and the files it names, without running anything")
    v.add_argument("job")
    v.set_defaults(func=_validate)
    r = sub.add_parser("run", help="run an amalgamation job")
    r.add_argument("job")
    r.add_argument("--local", action="store_true", help="one process, teachers in-process, no Ray, no store")
    r.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    r.add_argument("--out", help="run directory (default $AMALGAM_HOME/runs/NAME-TIME)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.set_defaults(func=_run)
    e = sub.add_parser("extract", help="run the teachers on Ray and fill the store (statistics, logits, codes; "
                                             "mode sgd: raw taps and trained auto-encoders too)")
    e.add_argument("job")
    e.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    e.set_defaults(func=_extract)
