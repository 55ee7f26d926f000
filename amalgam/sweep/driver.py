"""``run_sweep``: prepare once, run the trials on Ray Tune (or resume them), write the results.

Trials are a Ray Tune function trainable with ``cpus_per_trial`` CPUs each; at most
``max_concurrent`` run at once (default: the cluster's CPUs / cpus_per_trial). ASHA stops
trials by joint-stage epoch. Tune's own state lives in ``OUT/tune``: rerunning the same
command with the same ``--out`` restores it (``Tuner.restore``), keeps every finished
trial and runs only what was pending or interrupted.
"""

from __future__ import annotations

import math
import time
from urllib.parse import urlencode
from dataclasses import dataclass
from pathlib import Path

from amalgam.engine.run_local import Log
from amalgam.errors import AmalgamError
from amalgam.job import Job
from amalgam.store.location import S3Options, StoreLocation, open_store
from amalgam.sweep.prepare import SweepSetup, prepare
from amalgam.sweep.results import TrialRow, write_results
from amalgam.sweep.space import param_space, sweep_of

TUNE_DIR = "tune"


@dataclass
class SweepResult:
    out: str  # the sweep directory's URI
    rows: list[TrialRow]
    summary: dict


def tune_storage_uri(out: StoreLocation, s3: S3Options) -> str:
    """Where Tune keeps its state, as a URI every process resolves itself.

    A URI rather than a filesystem object: Tune pickles its storage into the experiment state
    (and to every trial), and a pickled S3 filesystem carries the credentials. From a URI each
    process builds its own filesystem from its environment (AWS_* variables, as the store does);
    an endpoint set in the job's ``store.s3`` rides along as pyarrow URI options."""
    if not out.is_s3:
        return out.root
    opts = {}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.partition("://")
        opts = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    if s3.region:
        opts["region"] = s3.region
    return out.uri + ("?" + urlencode(opts) if opts else "")


def _join(uri: str, name: str) -> str:
    base, sep, query = uri.partition("?")
    return f"{base}/{name}{sep}{query}"


def _tuner(job: Job, setup: SweepSetup, out: StoreLocation, max_concurrent: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from amalgam.sweep.scheduler import ResumableASHA, finished_results
    from amalgam.sweep.trial import run_trial

    sweep = sweep_of(job)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": sweep.cpus_per_trial})
    storage = tune_storage_uri(out, job.store.s3)
    path = _join(storage, TUNE_DIR)
    if tune.Tuner.can_restore(path):
        done = finished_results(open_store(out.uri_of(TUNE_DIR), job.store.s3))
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        return tuner, len(done)
    epochs = job.joint.epochs
    scheduler = (
        ResumableASHA(out.uri_of(TUNE_DIR), job.store.s3.model_dump(), time_attr="training_iteration", max_t=epochs,
                      grace_period=min(sweep.scheduler.grace_period, epochs),
                      reduction_factor=sweep.scheduler.reduction_factor)
        if sweep.scheduler.type == "asha" and epochs > 1 else FIFOScheduler()
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(job),
        tune_config=tune.TuneConfig(
            metric="objective", mode="max", num_samples=sweep.trials, scheduler=scheduler,
            # The limit goes to the generator itself: Tune ignores max_concurrent_trials (with
            # only a log warning) when search_alg is a BasicVariantGenerator, so every trial
            # ran at once and ASHA compared trials that had not reported yet.
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent),
        ),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage, verbose=1),
    )
    return tuner, None


def _row(result, setup: SweepSetup) -> TrialRow:
    m, cfg = result.metrics or {}, result.config or {}
    epochs = int(m.get("joint_epoch", 0))
    if result.error is not None:
        status = "error"
    else:
        status = "completed" if epochs >= setup.job.joint.epochs else "stopped early"
    df = result.metrics_dataframe
    curve = [float(x) for x in df["objective"]] if df is not None and "objective" in df else []
    widths = {k.split("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("width/")}
    nan = float("nan")
    return TrialRow(
        trial=str(m.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]),
        status=status, balance=bool(cfg.get("balance")), joint_lr=float(cfg.get("joint_lr", nan)),
        temperature=float(cfg.get("temperature", nan)), widths=widths, objective=float(m.get("objective", nan)),
        kl=float(m.get("kl", nan)), params=int(m.get("params", 0)), macs=int(m.get("macs", 0)),
        latency_ms_b1=float(m.get("latency_ms_b1", nan)), joint_epochs=epochs,
        after_stages=float(m.get("after_stages", nan)), wall_s=float(m.get("wall_s", nan)),
        teacher_forwards=int(m.get("teacher_forwards", 0)), autoencoder_fits=int(m.get("autoencoder_fits", 0)),
        accuracy=(float(m["accuracy"]) if "accuracy" in m else None),
        error=(str(result.error).strip().splitlines()[-1] if result.error is not None else None), curve=curve,
    )


def run_sweep(job: Job, out: Path | str, address: str | None = None, log: Log = print) -> SweepResult:
    """``out``: a local directory or ``s3://BUCKET/PREFIX`` (S3 settings from the job's ``store.s3``)."""
    import ray

    t0 = time.perf_counter()
    out_uri = str(out) if str(out).startswith("s3://") else str(Path(out).resolve())
    loc = open_store(out_uri, job.store.s3)
    setup = prepare(job, address, log)
    sweep = sweep_of(job)
    cpus = ray.cluster_resources().get("CPU", 1)
    max_concurrent = sweep.max_concurrent or max(1, int(cpus // sweep.cpus_per_trial))
    tuner, resumed = _tuner(job, setup, loc, max_concurrent)
    state = "starting" if resumed is None else f"resuming ({resumed} finished earlier, kept)"
    log(f"[sweep] {state}: {sweep.trials} trials, at most {max_concurrent} at once "
        f"({sweep.cpus_per_trial:g} CPU each), objective {setup.objective}, "
        f"scheduler {sweep.scheduler.type}; Tune state in {loc.uri_of(TUNE_DIR)}")
    grid = tuner.fit()
    rows = sorted((_row(r, setup) for r in grid), key=lambda r: r.trial)
    if not rows:
        raise AmalgamError(f"sweep {job.name}: no trial produced a result (see {loc.uri_of(TUNE_DIR)})")
    counts = {
        "teacher_forwards_preparation": setup.prep_counts.get("teacher_forwards", 0),
        "autoencoder_fits_preparation": setup.prep_counts.get("autoencoder_fits", 0),
        "teacher_forwards_trials": sum(r.teacher_forwards for r in rows),
        "autoencoder_fits_trials": sum(r.autoencoder_fits for r in rows),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    summary = write_results(loc, job, rows, setup.objective, counts)
    errors = [r for r in rows if r.status == "error"]
    for r in errors:
        log(f"[sweep] trial {r.trial} failed: {r.error}")
    log(f"[sweep] {len(rows)} trials: {sum(r.status == 'completed' for r in rows)} completed, "
        f"{sum(r.status == 'stopped early' for r in rows)} stopped early, {len(errors)} failed")
    log(f"[sweep] teacher forwards: preparation {counts['teacher_forwards_preparation']:,}, trials "
        f"{counts['teacher_forwards_trials']:,}; auto-encoder fits: preparation "
        f"{counts['autoencoder_fits_preparation']}, trials {counts['autoencoder_fits_trials']}")
    if summary["best"] is not None:
        best = next(r for r in rows if r.trial == summary["best"])
        log(f"[sweep] best: trial {best.trial}, {setup.objective} {best.objective:.4f}, {best.params:,} params, "
            f"widths {best.widths}; job file {loc.uri_of('best.yaml')}")
    log(f"[sweep] results in {loc.uri} (sweep.md, trials.csv, pareto.png) after {counts['wall_s']:.0f}s")
    if math.isnan(max((r.objective for r in rows), default=float("nan"))):
        raise AmalgamError(f"sweep {job.name}: every trial failed; first error: {errors[0].error if errors else '?'}")
    return SweepResult(loc.uri, rows, summary)
