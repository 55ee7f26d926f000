"""One sweep trial: the engine's stages and joint stage from the store, scored every epoch.

A trial runs in one Ray Tune worker process with ``cpus_per_trial`` threads: stages are
fitted in-process (the engine's :func:`~amalgam.engine.stages.fit_stages`, not a nested
Ray Train run, which could wait forever for CPUs that concurrent trials hold), then the
joint stage (:func:`~amalgam.engine.joint.train_end_to_end`) reports the objective after
every epoch so ASHA can stop a poor trial early. No teacher is loaded: the process-wide
counters prove it (``teacher_forwards`` and ``autoencoder_fits`` in every report).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from amalgam.engine import counters
from amalgam.engine.evaluate import count_macs, count_params, cpu_latency_ms, evaluate_logits, predict_logits
from amalgam.engine.fidelity import fidelity
from amalgam.engine.joint import train_end_to_end
from amalgam.engine.run_local import joint_slices
from amalgam.engine.stages import assemble, build_stages, fit_stages, match_output_statistics, stage_specs
from amalgam.engine.student import build_student, student_config
from amalgam.student_io import DeployedStudent
from amalgam.sweep.prepare import SweepSetup
from amalgam.sweep.space import trial_widths
from amalgam.zoo.arch import config_from_dict
from amalgam.zoo.manifest import InputSpec, Normalize

def _pool_images(ds, n: int) -> torch.Tensor:
    data = ds.read_all(["index", "image"])
    images = torch.from_numpy(np.ascontiguousarray(data["image"]))
    out = torch.empty((n, *images.shape[1:]), dtype=images.dtype)
    out[torch.from_numpy(np.asarray(data["index"]))] = images
    return out


def score(student: DeployedStudent, setup: SweepSetup, images: torch.Tensor) -> dict[str, float]:
    """The objective (label-free agreement on the hold-out, or validation accuracy) and KL."""
    held = setup.holdout_rows
    fid = fidelity(predict_logits(student, images[held]), setup.head_targets[held])
    out = {"agreement": fid.agreement, "kl": fid.kl}
    if setup.validation is not None:
        v_images, v_labels = setup.validation
        out["accuracy"] = evaluate_logits(predict_logits(student, v_images), v_labels, setup.space).comprehensive
    out["objective"] = out[setup.objective]
    return out


def run_trial(config: dict, setup: SweepSetup) -> None:
    """The Ray Tune function trainable (bound with ``tune.with_parameters(run_trial, setup=...)``)."""
    from ray import tune

    from amalgam.distributed.store_source import store_epoch_batches
    from amalgam.store.dataset import Dataset
    from amalgam.store.location import S3Options, open_store

    t0 = time.perf_counter()
    before = counters.snapshot()
    torch.set_num_threads(setup.threads)
    job = setup.job
    seed = job.seed
    torch.manual_seed(seed)
    quiet = lambda _msg: None  # noqa: E731 (Tune's table shows progress; per-batch lines would flood the driver)
    stored = setup.codes[bool(config["balance"])]
    widths = trial_widths(job, config["widths"], stored.channels, stored.widths)
    cfg = student_config(config_from_dict(setup.teacher_config), widths, len(setup.space))
    spec_in = InputSpec(**setup.input_spec)
    skeleton = build_student(cfg)
    nets, specs = build_stages(skeleton), stage_specs(skeleton)
    var = {t: torch.as_tensor(stored.code_var[t][:w]) for t, w in widths.items()}
    match_output_statistics(nets, {t: (torch.zeros_like(v), v) for t, v in var.items()})  # PCA codes are centred
    target_var = {t: float(v.mean()) for t, v in var.items()}
    target_var["head"] = float(setup.head_targets.var(0).mean())
    ds = Dataset.open(open_store(setup.store_uri, S3Options(**setup.s3)), stored.codes_key)
    batches = store_epoch_batches(ds, widths, setup.head_targets, Normalize(spec_in.mean, spec_in.std),
                                  job.stages.batch_size, seed, rows=setup.train_rows)
    steps = -(-int(setup.train_rows.sum()) // job.stages.batch_size)
    fit_stages(specs, nets, target_var, batches, job.stages.epochs, steps, job.stages.lr,
                        job.stages.closed_form_first, quiet)
    student = DeployedStudent(assemble(skeleton, nets), spec_in)
    images = _pool_images(ds, len(setup.train_rows))
    shape = tuple(spec_in.shape)
    cost = {"params": count_params(student), "macs": count_macs(student, shape),
            "latency_ms_b1": cpu_latency_ms(student, shape, batch=1) if job.evaluation.latency else float("nan")}
    fixed = {**cost, **{f"width/{t}": w for t, w in widths.items()}}
    after_stages = score(student, setup, images)

    def report(epoch: int, loss: float | None) -> None:
        work = counters.since(before)
        tune.report({**score(student, setup, images), **fixed, "joint_epoch": epoch, "joint_loss": loss,
                     "after_stages": after_stages["objective"], **work, "wall_s": time.perf_counter() - t0})

    train = setup.train_rows
    if job.joint.epochs == 0:
        report(0, None)
    else:
        train_end_to_end(student, images[train], setup.joint_targets[train], job.joint.loss, job.joint.epochs,
                         float(config["joint_lr"]), job.joint.batch_size, float(config["temperature"]), seed,
                         "joint", quiet, epoch_end=lambda e, loss: report(e + 1, loss), freeze_batchnorm=True,
                         slices=joint_slices(job, setup.space))
