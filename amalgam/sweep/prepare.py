"""The driver's one-off work before any trial: everything the trials share.

Teachers run here at most twice per balancing setting (statistics + logits, then codes at
the widest width any trial can ask for), and not at all when the store already holds them.
One eigendecomposition per tap and balancing setting serves every trial: a narrower width
is a prefix of the same basis and of the stored codes. Calibration, the gate (gated joint
targets) and the hold-out split are fitted once here too, so trials differ only in what
the sweep varies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from amalgam.classes import ClassSpace
from amalgam.data.pool import build_pool
from amalgam.engine import counters
from amalgam.engine.calibrate import fit_calibration
from amalgam.engine.run_local import Log, joint_targets, pool_input_spec
from amalgam.engine.student import common_topology
from amalgam.job import Job
from amalgam.sweep.space import balance_values, stored_widths, sweep_of
from amalgam.zoo.arch import config_to_dict
from amalgam.zoo.manifest import load_zoo


@dataclass
class StoredCodes:
    """Codes of one balancing setting in the store, and what a trial needs to use them."""

    codes_key: str
    widths: dict[str, int]  # the stored (widest) width per tap
    channels: dict[str, int]  # concatenated teacher channels per tap
    code_var: dict[str, torch.Tensor]  # per-channel variance of the stored code (a prefix gives a narrower one)


@dataclass
class SweepSetup:
    """Shipped once to the object store (``tune.with_parameters``) and shared by every trial."""

    job: Job
    store_uri: str
    s3: dict
    codes: dict[bool, StoredCodes]
    teacher_config: dict
    space: ClassSpace
    input_spec: dict
    head_targets: torch.Tensor  # [N, C] calibrated teacher logits: the last stage's target
    joint_targets: torch.Tensor  # [N, C] what the joint stage regresses
    train_rows: torch.Tensor  # bool [N]: rows trials train on
    holdout_rows: torch.Tensor  # int64 indices of the held-out rows
    validation: tuple[torch.Tensor, torch.Tensor] | None  # (uint8 images, global labels) when the job names a set
    threads: int
    prep_counts: dict[str, int] = field(default_factory=dict)  # teacher forwards and AE fits of this preparation

    @property
    def objective(self) -> str:
        return "accuracy" if self.validation is not None else "agreement"


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = perm[: max(1, round(n * fraction))].sort().values
    train = torch.ones(n, dtype=torch.bool)
    train[held] = False
    return train, held


def with_widths(job: Job, balance: bool, widths: dict[str, int]) -> Job:
    """The job whose store pass writes codes at ``widths`` (absolute) for one balancing setting."""
    amalg = job.amalgamation.model_copy(update={"balance": balance, "widths": dict(widths), "max_width": None,
                                                "max_energy": None})
    return job.model_copy(update={"amalgamation": amalg})


def prepare(job: Job, address: str | None, log: Log = print) -> SweepSetup:
    from amalgam.distributed.store_source import StoreSource

    sweep = sweep_of(job)
    if job.amalgamation.mode != "pca" or job.amalgamation.strategy != "dfa":
        from amalgam.errors import AmalgamError

        raise AmalgamError(
            f"job {job.name}: field amalgamation: a sweep needs mode pca with strategy dfa (every width a prefix "
            f"of one basis); got {job.amalgamation.mode}/{job.amalgamation.strategy}"
        )
    if job.joint.feature_weight > 0 and job.joint.epochs:
        from amalgam.errors import AmalgamError

        raise AmalgamError(f"job {job.name}: field joint.feature_weight: a sweep trains from the store, where the "
                           "joint stage has no feature terms yet; set it to 0 (or run the job with --local)")
    if job.joint.augment is not None and job.joint.epochs:
        from amalgam.errors import AmalgamError

        raise AmalgamError(f"job {job.name}: field joint.augment: a sweep trains from the store, where the joint "
                           "stage has no teachers to re-run on augmented views; remove it (or run the job with --local)")
    before = counters.snapshot()
    manifest, teachers = load_zoo(job.zoo_path())
    space = manifest.class_space()
    ref = common_topology([t.name for t in teachers], [t.net.config for t in teachers])
    if job.pool.has_images():
        from amalgam.distributed.extract import ensure_ray

        ensure_ray(address)  # before the pool is built, so Ray Data reads the image files
    pool = build_pool(job.pool, input_shape=teachers[0].entry.input.shape, log=log)
    log(f"[sweep] job {job.name}: {len(teachers)} teachers, {len(space)} classes, pool {len(pool)}")
    codes: dict[bool, StoredCodes] = {}
    forwards = 0
    tp = None
    for balance in balance_values(job):
        src = StoreSource(job.model_copy(update={"amalgamation": job.amalgamation.model_copy(update={"balance": balance})}),
                          teachers, pool, log, address)
        tp = src.teacher_pass() if tp is None else tp
        widths = stored_widths(job, tp.stats, balance)
        src.job = with_widths(job, balance, widths)
        codecs, _ = src.fit(tp.stats)
        forwards += src.teacher_forwards
        codes[balance] = StoredCodes(
            codes_key=src.codes.key, widths=widths, channels={t: s.channels for t, s in tp.stats.items()},
            code_var={t: c.code_moments(tp.stats[t])[1].float() for t, c in codecs.items()},
        )
        log(f"[sweep] balance={balance}: codes at widths {widths} in {src.loc.uri_of(src.codes.key)}")
    assert tp is not None
    calib = fit_calibration(tp.logits, space.blocks, job.calibration)
    calibrated = calib(tp.logits)  # concatenated teacher outputs
    targets = space.to_union(calibrated)  # the student's classes (shared ones combined: amalgam.classes)
    train_rows, held = holdout_split(len(pool), sweep.holdout, sweep.seed)
    s_spec = pool_input_spec(pool)
    # The gate (if any) sees only training rows, so hold-out images stay unseen by everything trained.
    jt, _ = joint_targets(job, pool.images, tp.logits, calibrated, space, s_spec, log, fit_rows=train_rows)
    validation = None
    if sweep.validation is not None:
        vpool = build_pool(sweep.validation, input_shape=teachers[0].entry.input.shape, log=log)
        validation = (vpool.images, space.remap(vpool.class_names, vpool.labels))
    counts = counters.since(before)
    counts[counters.TEACHER_FORWARDS] += forwards  # the extraction actors' forwards (other processes)
    return SweepSetup(
        job=job, store_uri=job.store_uri(), s3=job.store.s3.model_dump(), codes=codes, teacher_config=config_to_dict(ref),
        space=space, input_spec=s_spec.model_dump(), head_targets=targets, joint_targets=jt, train_rows=train_rows,
        holdout_rows=held, validation=validation, threads=max(1, int(sweep.cpus_per_trial)), prep_counts=counts,
    )

