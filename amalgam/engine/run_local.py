"""The local recipe: the whole method in one process, teachers in-process, no Ray, no store.

This is the reference path (``amalgam run JOB --local``) that the distributed pipeline is
compared with. Read top to bottom, it is the method:

1. one teacher pass over the pool: per-tap PCA statistics + teacher logits
2. calibration of the teachers' logits (label-free)
3. feature amalgamation: a frozen linear auto-encoder per tap (pca / ifa / sgd)
4. layer-wise stages, all fitted side by side on the same teacher passes, then FAM folding
5. joint stage: the assembled student end to end against the calibrated teacher logits
6. baselines with the same student, data and budget; evaluation; the run directory
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from amalgam.classes import ClassSpace
from amalgam.data.datasets import to_float
from amalgam.data.pool import Pool, build_pool
from amalgam.engine.amalgamate import LinearCodec, SGDCodecTrainer, TapStats, fit_ifa, fit_pca
from amalgam.engine.calibrate import Calibration, fit_calibration
from amalgam.engine.augment import AugmentTerm
from amalgam.engine.capture import capture_teachers, frozen
from amalgam.engine.evaluate import (
    Concat,
    Metrics,
    count_macs,
    count_params,
    cpu_latency_ms,
    evaluate_logits,
    predict_logits,
)
from amalgam.engine.gating import fit_gate, gate_and_target, gated_targets
from amalgam.engine.features import FeatureTerm, feature_targets
from amalgam.engine.joint import SliceTerm, describe_loss, train_end_to_end
from amalgam.engine.report import MethodResult, format_table, write_report
from amalgam.errors import AmalgamError
from amalgam.engine.stages import assemble, build_stages, fit_stages, match_output_statistics, stage_specs
from amalgam.engine.student import build_student, common_topology, student_config
from amalgam.job import Job, dump_job
from amalgam.student_io import DeployedStudent, save_student
from amalgam.zoo.manifest import InputSpec, Normalize, Teacher, load_zoo

Log = Callable[[str], None]


def _batches(n: int, size: int, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    order = torch.arange(n) if order is None else order
    for i in range(0, n, size):
        yield order[i : i + size]


def feature_taps(teachers: list[Teacher]) -> list[str]:
    """Names of the amalgamated taps: every tap but the head (the head's 'code' is the logits)."""
    return [t.name for t in teachers[0].taps()][:-1]


def pool_input_spec(pool: Pool) -> InputSpec:
    """The student's own normalisation: pixel mean/std of the unlabeled pool."""
    x = to_float(pool.images)
    c = x.shape[1]
    return InputSpec(
        shape=list(x.shape[1:]),
        mean=[float(x[:, i].mean()) for i in range(c)],
        std=[float(x[:, i].std()) for i in range(c)],
    )


@dataclass
class TeacherPassResult:
    stats: dict[str, TapStats]
    logits: torch.Tensor  # [N, C] concatenated raw teacher logits on the pool


def statistics_pass(teachers: list[Teacher], pool: Pool, batch_size: int, log: Log = print) -> TeacherPassResult:
    """One pass of every teacher over the pool: exact per-tap statistics and the raw logits."""
    taps = feature_taps(teachers)
    infos = [{i.name: i for i in t.taps()} for t in teachers]
    stats = {tap: TapStats([inf[tap].channels for inf in infos], infos[0][tap].kind) for tap in taps}
    logits = []
    for idx in tqdm(list(_batches(len(pool), batch_size)), desc="teacher pass (statistics)", leave=False):
        out, feats = capture_teachers(teachers, to_float(pool.images[idx]))
        for tap in taps:
            stats[tap].update([f[tap] for f in feats])
        logits.append(torch.cat(out, 1))
    log(f"[amalgamate] statistics of {len(taps)} taps over {len(pool)} images")
    return TeacherPassResult(stats, torch.cat(logits))


def resolve_widths(job: Job, stats: dict[str, TapStats], maximum: bool = False) -> dict[str, int]:
    """Each tap's compact width (or the widest a sweep may ask for, with ``maximum``)."""
    cfg = job.amalgamation
    for field_name, table in (("widths", cfg.widths), ("max_width", cfg.max_width or {})):
        unknown = sorted(set(table) - set(stats) - {"default"})
        if unknown:
            raise AmalgamError(
                f"job {job.name}: field amalgamation.{field_name}.{unknown[0]}: no such tap; taps are {', '.join(stats)}"
            )
    widths = {}
    for tap, s in stats.items():
        k = cfg.max_width_for(tap, s.channels) if maximum else cfg.width_for(tap, s.channels)
        if cfg.max_energy:
            k = min(k, fit_pca(s, cfg.balance).energy_width(cfg.max_energy))
        widths[tap] = k
    return widths


def fit_codecs(
    job: Job, teachers: list[Teacher], pool: Pool, stats: dict[str, TapStats], log: Log = print,
    widths: dict[str, int] | None = None,
) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
    """Feature amalgamation for every tap, in the job's mode; returns codecs and SGD AE curves."""
    cfg = job.amalgamation
    widths = widths or resolve_widths(job, stats)
    if cfg.mode == "pca" and cfg.strategy == "dfa":
        return {tap: fit_pca(s, cfg.balance).codec(widths[tap]) for tap, s in stats.items()}, {}
    if cfg.mode == "pca":
        return {tap: fit_ifa(s, widths[tap], cfg.balance) for tap, s in stats.items()}, {}
    trainers = {
        tap: SGDCodecTrainer(s, widths[tap], cfg.balance, cfg.sgd.lr, seed=job.seed + i)
        for i, (tap, s) in enumerate(stats.items())
    }
    gen = torch.Generator().manual_seed(job.seed)
    for epoch in range(cfg.sgd.epochs):
        order = torch.randperm(len(pool), generator=gen)
        for idx in tqdm(list(_batches(len(pool), job.stages.batch_size, order)),
                        desc=f"sgd auto-encoders epoch {epoch + 1}/{cfg.sgd.epochs}", leave=False):
            _, feats = capture_teachers(teachers, to_float(pool.images[idx]))
            for tap, tr in trainers.items():
                tr.step([f[tap] for f in feats])
        losses = {tap: tr.end_epoch() for tap, tr in trainers.items()}
        log(f"[amalgamate] sgd epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return {tap: tr.codec() for tap, tr in trainers.items()}, {f"ae_{t}": tr.curve for t, tr in trainers.items()}


def code_batches(
    teachers: list[Teacher],
    codecs: dict[str, LinearCodec],
    pool: Pool,
    head_targets: torch.Tensor,
    student_norm: Normalize,
    batch_size: int,
    seed: int,
) -> Callable[[int], Iterator[dict]]:
    """Per epoch, shuffled batches of (student-normalised image, compact codes) from live teachers."""

    def epoch_batches(epoch: int) -> Iterator[dict]:
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for idx in _batches(len(pool), batch_size, order):
            x = to_float(pool.images[idx])
            _, feats = capture_teachers(teachers, x)
            with torch.no_grad():
                codes = {tap: c.encode(torch.cat([f[tap] for f in feats], 1)) for tap, c in codecs.items()}
                codes["head"] = head_targets[idx]
                image = student_norm(x)
            yield {"image": image, "codes": codes}

    return epoch_batches


class OnlineSource:
    """Teachers run in-process on every pass (the reference path: no Ray, no store)."""

    name = "local (teachers in-process)"

    def __init__(self, job: Job, teachers: list[Teacher], pool: Pool, log: Log = print):
        self.job, self.teachers, self.pool, self.log = job, teachers, pool, log
        self.teacher_forwards = 0

    def teacher_pass(self) -> TeacherPassResult:
        self.teacher_forwards += len(self.pool) * len(self.teachers)
        return statistics_pass(self.teachers, self.pool, self.job.batch_size, self.log)

    def fit(self, stats: dict[str, TapStats]) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
        if self.job.amalgamation.mode == "sgd":
            self.teacher_forwards += len(self.pool) * len(self.teachers) * self.job.amalgamation.sgd.epochs
        return fit_codecs(self.job, self.teachers, self.pool, stats, self.log)

    def epoch_batches(self, codecs: dict[str, LinearCodec], head_targets: torch.Tensor, student_norm: Normalize,
                      batch_size: int, seed: int) -> Callable[[int], Iterator[dict]]:
        inner = code_batches(self.teachers, codecs, self.pool, head_targets, student_norm, batch_size, seed)

        def counted(epoch: int) -> Iterator[dict]:
            self.teacher_forwards += len(self.pool) * len(self.teachers)
            return inner(epoch)

        return counted

    def joint_teachers(self, codecs: dict[str, LinearCodec] | None = None
                       ) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The teachers inside the joint step: float images in [0, 1] -> (concatenated raw logits,
        compact codes of the ``codecs``' taps; ``{}`` without codecs). Teachers eval, no_grad."""

        def run(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            self.teacher_forwards += len(x) * len(self.teachers)
            out, feats = capture_teachers(self.teachers, x)
            with torch.no_grad():
                codes = {tap: c.encode(torch.cat([f[tap] for f in feats], 1)) for tap, c in (codecs or {}).items()}
            return torch.cat(out, 1), codes

        return run

    def joint_codes(self, codecs: dict[str, LinearCodec]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """Compact codes of pool rows for the joint stage's feature terms (teachers run on them)."""
        run = self.joint_teachers(codecs)
        return lambda rows: run(to_float(self.pool.images[rows]))[1]


def check_feature_source(job: Job, source) -> None:
    """Refuse ``joint.feature_weight > 0`` or ``joint.augment`` where the source cannot run the
    teachers inside the joint step.

    The store path's joint stage (Ray Train DDP) streams images only: reading every sample's
    codes there (~100 KB a row at stored widths for mnist-fashion-4, vs ~1 KB for the image)
    is not wired yet, nor are teachers (and the gate) in its workers for function matching.
    Refused before any extraction, rather than silently ignored."""
    where = getattr(source, "name", type(source).__name__)
    if job.joint.feature_weight > 0 and job.joint.epochs and not hasattr(source, "joint_codes"):
        raise AmalgamError(f"job {job.name}: field joint.feature_weight: the feature terms are not wired into the "
                           f"{where} joint stage; run it with --local or set it to 0")
    if job.joint.augment is not None and job.joint.epochs and not hasattr(source, "joint_teachers"):
        raise AmalgamError(f"job {job.name}: field joint.augment: function matching (teachers re-run on each "
                           f"augmented view) is not wired into the {where} joint stage; run it with --local or remove it")


def target_from_teachers(job: Job, raw_logits: torch.Tensor, calib: Calibration, space: ClassSpace,
                         gate_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The joint target from the teachers' concatenated raw logits (and, for ``gated``, the gate's
    logits) on the same images: what :func:`joint_targets` gives on the pool, for any images."""
    calibrated = calib(raw_logits)
    if job.joint.target == "gated":
        return gated_targets(gate_logits, calibrated, space)
    return ungated_target(job, raw_logits, calibrated, space)


def ungated_target(job: Job, raw_logits: torch.Tensor, calibrated: torch.Tensor, space: ClassSpace) -> torch.Tensor:
    """Raw logits for the paper's mse with no calibration, else the calibrated ones, in the student's classes."""
    return space.to_union(raw_logits if job.joint.loss == "mse" and job.calibration == "none" else calibrated)


def augment_term(job: Job, source, calib: Calibration, space: ClassSpace, gate: DeployedStudent | None,
                 codecs: dict[str, LinearCodec] | None = None) -> AugmentTerm:
    """Function matching for the joint stage: teachers (and gate) re-run on each augmented view,
    with the calibration fitted on the clean pool (``codecs``: also the views' compact codes)."""
    teachers = source.joint_teachers(codecs)

    def targets(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw, codes = teachers(x)
        gate_logits = None
        if gate is not None:
            with frozen(gate):
                gate_logits = gate(x)
        return target_from_teachers(job, raw, calib, space, gate_logits), codes

    aug = job.joint.augment
    return AugmentTerm(aug.shift, aug.mixup, targets, job.seed)


def joint_slices(job: Job, space: ClassSpace) -> SliceTerm | None:
    """The job's per-teacher slice term (``joint.slices``) over the student's classes, or None."""
    sl = job.joint.slices
    return SliceTerm(sl.weight, sl.temperature, space.positions) if sl is not None and sl.weight > 0 else None


def joint_targets(job: Job, images: torch.Tensor, raw_logits: torch.Tensor, calibrated: torch.Tensor,
                  space: ClassSpace, input_spec: InputSpec, log: Log = print,
                  fit_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, DeployedStudent | None]:
    """What the joint stage regresses: raw logits (paper: mse, no calibration), the calibrated
    logits, or the gated mixture of experts (the gate is fitted here, label-free, on
    ``fit_rows`` only when given, and returned).

    ``raw_logits`` and ``calibrated`` are the teachers' concatenated outputs; the target is in
    the student's class space, shared classes combined by ``ClassSpace.to_union`` (logits:
    mean; the gated mixture: summed probability)."""
    if job.joint.target == "gated":
        rows = slice(None) if fit_rows is None else fit_rows
        gate = fit_gate(images[rows], calibrated[rows], space.blocks, input_spec, job.joint.gate.epochs,
                        job.joint.gate.keep, job.joint.lr, job.seed, log)
        return gate_and_target(gate, images, calibrated, space), gate
    return ungated_target(job, raw_logits, calibrated, space), None


@dataclass
class RunResult:
    run_dir: Path
    student: DeployedStudent
    results: list[MethodResult]
    extra: dict = field(default_factory=dict)


def _cost(model: nn.Module, shape: tuple[int, ...], latency: bool) -> dict:
    out = {"params": count_params(model), "macs": count_macs(model, shape), "latency_ms_b1": None, "latency_ms_b256": None}
    if latency:
        out["latency_ms_b1"] = cpu_latency_ms(model, shape, batch=1)
        out["latency_ms_b256"] = cpu_latency_ms(model, shape, batch=256, repeats=5)
    return out


def _only_task(metrics: Metrics, teacher: str) -> Metrics:
    """A single teacher covers only its sub-task: blank the columns it cannot answer."""
    nan = float("nan")
    return Metrics(
        task_aware={k: (v if k == teacher else nan) for k, v in metrics.task_aware.items()},
        comprehensive=nan,
        comprehensive_per_task={k: nan for k in metrics.comprehensive_per_task},
        confusion=metrics.confusion,
        n=metrics.n,
        shared=None if metrics.shared is None else nan,
        unshared=None if metrics.unshared is None else nan,
    )


def run_local(job: Job, run_dir: Path, log: Log = print, source_factory=None, phase=None,
              pool: Pool | None = None, epoch_end: Callable[[str, int, float], None] | None = None) -> RunResult:
    """Run the whole method; ``source_factory(job, teachers, pool, log)`` picks where features come
    from (default: teachers in-process; the store pipeline passes its own). ``phase(name)``, a
    context manager factory, brackets each step (the CLI passes the Prometheus phase tracker;
    the engine itself knows nothing of metrics). ``pool`` replaces the job's pool (``amalgam
    retrain`` passes the pool less a held-out slice it scores the student on).
    ``epoch_end(stage, epoch, loss)`` is called as each epoch of a layer-wise stage or of the
    joint stage (``"joint"``) ends, wherever it runs (the CLI updates its live metrics with it).

    A source may name the blocks of its statistics (``block_names``; default: the teachers),
    when its codecs read something else than the teachers' concatenated features (the
    incremental step reads ``[previous code | new teachers]``), and describe where its
    features are stored (``provenance()``, into the report's ``feature_store``)."""
    phase = phase or (lambda _name: contextlib.nullcontext())
    t_start = time.perf_counter()
    torch.manual_seed(job.seed)
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    manifest, teachers = load_zoo(job.zoo_path())
    # Provenance names the resolved zoo, so RUN_DIR/job.yaml reruns the same job from anywhere.
    job = job.model_copy(update={"zoo": str(job.zoo_path())})
    space: ClassSpace = manifest.class_space()
    ref_cfg = common_topology([t.name for t in teachers], [t.net.config for t in teachers])
    in_shape = teachers[0].entry.input.shape  # image files are decoded to the teachers' input shape
    pool = build_pool(job.pool, input_shape=in_shape, log=log) if pool is None else pool
    test = build_pool(job.evaluation.test, input_shape=in_shape, log=log)
    test_labels = space.remap(test.class_names, test.labels)
    log(f"[run] job {job.name}: {len(teachers)} teachers, {len(space)} classes, pool {len(pool)}, test {len(test)}")

    # 1-2. statistics, logits, calibration
    t0 = time.perf_counter()
    source = (source_factory or OnlineSource)(job, teachers, pool, log)
    check_feature_source(job, source)
    with phase("extract"):
        tp = source.teacher_pass()
    calib: Calibration = fit_calibration(tp.logits, space.blocks, job.calibration)
    calibrated = calib(tp.logits)  # the teachers' concatenated outputs (the gate reads these)
    targets = space.to_union(calibrated)  # the student's classes: shared ones averaged (amalgam.classes)
    t0 = lap("teacher_statistics_pass", t0)

    # 3. feature amalgamation
    with phase("amalgamate"):
        codecs, ae_curves = source.fit(tp.stats)
    amalg_report = {}
    block_names = getattr(source, "block_names", None) or [t.name for t in teachers]
    for tap, codec in codecs.items():
        err, var = codec.residual(tp.stats[tap])
        kept = codec.kept_variance(tp.stats[tap])
        amalg_report[tap] = {
            "concat_channels": tp.stats[tap].channels,
            "width": codec.width,
            "normalised_reconstruction_error": float(err.sum() / var.sum()),
            "kept_variance": {(block_names[int(k.split("_")[1])] if k.startswith("teacher_") else k): round(v, 5)
                              for k, v in kept.items()},
        }
        log(f"[amalgamate] {tap}: {tp.stats[tap].channels} -> {codec.width} channels, "
            f"reconstruction error {amalg_report[tap]['normalised_reconstruction_error']:.4f}")
    t0 = lap("amalgamation_fit", t0)

    # 4. student, stages, fold
    widths = {tap: c.width for tap, c in codecs.items()}
    s_cfg = student_config(ref_cfg, widths, len(space))
    s_spec = pool_input_spec(pool)
    student_norm = Normalize(s_spec.mean, s_spec.std)
    # Seeded here, not only at the start: the teacher pass may or may not have drawn random
    # numbers in this process (a fresh extraction does, a store rerun does not), and the
    # student's initial weights must not depend on which happened.
    torch.manual_seed(job.seed)
    skeleton = build_student(s_cfg)
    nets = build_stages(skeleton)
    specs = stage_specs(skeleton)
    moments = {tap: c.code_moments(tp.stats[tap]) for tap, c in codecs.items()}
    match_output_statistics(nets, moments)
    target_var = {tap: float(var.mean()) for tap, (_, var) in moments.items()}
    target_var["head"] = float(targets.var(0).mean())
    steps = -(-len(pool) // job.stages.batch_size)
    with phase("stages"):
        if hasattr(source, "fit_stages"):  # the source fits stages elsewhere (Ray Train workers)
            curves = source.fit_stages(specs, nets, target_var, targets, s_cfg, s_spec, widths, steps, run_dir,
                                       epoch_end=epoch_end)
        else:
            curves = fit_stages(
                specs, nets, target_var,
                source.epoch_batches(codecs, targets, student_norm, job.stages.batch_size, job.seed),
                job.stages.epochs, steps, job.stages.lr, job.stages.closed_form_first, log, epoch_end,
            )
    student = DeployedStudent(assemble(skeleton, nets), s_spec)
    t0 = lap("stages", t0)
    after_stages = evaluate_logits(predict_logits(student, test.images), test_labels, space)
    log(f"[stages] assembled student: comprehensive {after_stages.comprehensive:.4f}")

    # 5. joint stage (optionally against gated, mixture-of-experts targets)
    joint_target, gate = joint_targets(job, pool.images, tp.logits, calibrated, space, s_spec, log)
    features = None
    if job.joint.feature_weight > 0 and job.joint.epochs:
        # The folded student's tap l is FAM_{l+1}(layer l): its target is FAM_{l+1}(F_a^l) (engine/features.py).
        features = FeatureTerm(job.joint.feature_weight,
                               feature_targets(skeleton.unit_names, {n: net.fam for n, net in nets.items()}, codecs,
                                               tp.stats),
                               source.joint_codes(codecs))
    augment = None
    if job.joint.augment is not None and job.joint.epochs:
        augment = augment_term(job, source, calib, space, gate, codecs if features is not None else None)
    slices = joint_slices(job, space)
    if job.joint.epochs:
        log(f"[joint] loss {describe_loss(job.joint.loss, job.joint.temperature, slices)}")
    with phase("joint"):
        if job.joint.epochs and hasattr(source, "train_joint"):  # data-parallel elsewhere (Ray Train DDP)
            joint_curve = source.train_joint(student, joint_target, run_dir, epoch_end=epoch_end, slices=slices)
        else:
            joint_curve = train_end_to_end(
                student, pool.images, joint_target, job.joint.loss, job.joint.epochs, job.joint.lr,
                job.joint.batch_size, job.joint.temperature, job.seed, "joint", log, freeze_batchnorm=True,
                epoch_end=(lambda e, loss: epoch_end("joint", e, loss)) if epoch_end else None, features=features,
                augment=augment, slices=slices,
            ) if job.joint.epochs else []
    evaluate_phase = phase("evaluate")
    evaluate_phase.__enter__()
    t0 = lap("joint", t0)

    # 6. baselines and evaluation
    shape = tuple(s_spec.shape)
    teacher_test_logits = [predict_logits(t, test.images) for t in teachers]
    ens_raw = torch.cat(teacher_test_logits, 1)  # concatenated; ensembles combine shared classes as targets do
    results: list[MethodResult] = []
    for t, lg, pos in zip(teachers, teacher_test_logits, space.positions):
        full = torch.full((len(test), len(space)), float("-inf"))
        full[:, list(pos)] = lg
        m = _only_task(evaluate_logits(full, test_labels, space), t.name)
        results.append(MethodResult(f"teacher {t.name}", m, **_cost(t, shape, job.evaluation.latency)))
    all_teachers = Concat(teachers)
    teachers_cost = _cost(all_teachers, shape, job.evaluation.latency)
    results.append(MethodResult("ensemble (raw logits)", evaluate_logits(space.to_union(ens_raw), test_labels, space),
                                **teachers_cost))
    if job.calibration != "none":
        results.append(MethodResult(f"ensemble ({job.calibration})",
                                    evaluate_logits(space.to_union(calib(ens_raw)), test_labels, space), **teachers_cost))
    if gate is not None:
        gated_ens = gated_targets(predict_logits(gate, test.images), calib(ens_raw), space)
        gate_cost = {k: (v + c if v is not None and c is not None else None) for (k, v), c in
                     zip(teachers_cost.items(), _cost(gate, shape, job.evaluation.latency).values())}
        results.append(MethodResult("ensemble (gated, label-free)", evaluate_logits(gated_ens, test_labels, space),
                                    **gate_cost))
    budget = job.baselines.from_scratch_epochs or (job.stages.epochs + job.joint.epochs)
    student_cost = _cost(student, shape, job.evaluation.latency)
    if job.baselines.kd:
        kd = DeployedStudent(build_student(s_cfg), s_spec)
        train_end_to_end(kd, pool.images, targets, "kd", budget, job.joint.lr, job.joint.batch_size,
                         job.joint.temperature, job.seed, "kd baseline", log)
        results.append(MethodResult("multi-teacher KD (scratch)", evaluate_logits(predict_logits(kd, test.images), test_labels, space),
                                    **student_cost))
    if job.baselines.supervised:
        labels = space.remap(pool.class_names, pool.labels)
        keep = labels >= 0
        sup = DeployedStudent(build_student(s_cfg), s_spec)
        train_end_to_end(sup, pool.images[keep], labels[keep], "ce", budget, job.joint.lr, job.joint.batch_size,
                         1.0, job.seed, "supervised", log)
        results.append(MethodResult("supervised (labels)", evaluate_logits(predict_logits(sup, test.images), test_labels, space),
                                    labels_used=True, **student_cost))
    results.append(MethodResult("amalgamated: after stages", after_stages, **student_cost))
    target = "gated" if job.joint.target == "gated" else ("raw logits" if job.calibration == "none" else job.calibration)
    main_name = f"amalgamated ({job.amalgamation.mode}/{job.amalgamation.strategy}, {job.joint.loss}, {target})"
    final = evaluate_logits(predict_logits(student, test.images), test_labels, space)
    results.append(MethodResult(main_name, final, **student_cost))
    t0 = lap("baselines_and_evaluation", t0)
    evaluate_phase.__exit__(None, None, None)
    timings["total"] = round(time.perf_counter() - t_start, 2)

    # The run directory (created only now: a run that failed early leaves nothing behind).
    run_dir.mkdir(parents=True, exist_ok=True)
    save_student(
        run_dir, student.net, list(space.names), [(t.name, t.entry.classes) for t in teachers], s_spec,
        metrics={"comprehensive": final.comprehensive, **{f"task_aware/{k}": v for k, v in final.task_aware.items()}},
        job=json.loads(json.dumps(job.model_dump(mode="json"))),
    )
    (run_dir / "job.yaml").write_text(dump_job(job))
    extra = {
        "job": job.name,
        "stage_curves": curves,
        "teacher_to_student_params": round(student_cost["params"] / teachers_cost["params"], 4),
        "student_widths": widths,
        "amalgamation": amalg_report,
        "calibration": calib.to_dict(),
        "joint_curve": joint_curve,
        "autoencoder_curves": ae_curves,
        "timings_s": timings,
        "feature_source": source.name,
        "teacher_forwards": source.teacher_forwards,
        "pool_size": len(pool),
        "test_size": len(test),
    }
    if hasattr(source, "provenance"):
        extra["feature_store"] = source.provenance()
    if pool.skipped or test.skipped:  # unreadable image files, skipped (amalgam.data.images)
        extra["skipped_images"] = [{"set": name, "path": path, "reason": why}
                                   for name, p in (("pool", pool), ("test", test)) for path, why in p.skipped]
    write_report(run_dir, f"amalgam run {job.name}", space, results, main_name, curves, extra)
    log("\n" + format_table(space, results))
    log(f"\n[run] done in {timings['total']:.0f}s; run directory {run_dir}")
    return RunResult(run_dir, student, results, extra)
