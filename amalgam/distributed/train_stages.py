"""Layer-wise stages in parallel on Ray Train.

The engine's stages are independent (each maps the teachers' frozen code of one tap to the
next tap's code), so one TorchTrainer runs them side by side: every worker owns a subset of
stages (balanced by cost), reads only the taps its stages need from the store, and steps
them with the engine's own :class:`~amalgam.engine.stages.StageFitter`. There is no
gradient synchronisation: different ranks fit different models.

Fault tolerance: after every epoch each rank writes its stages' full training state
(weights, optimiser, schedule, loss curve) into a rank-named file and all ranks report the
same checkpoint. With ``FailureConfig(max_failures=...)`` a dead worker makes Ray Train
restart the group, and every rank resumes its stages from the last checkpoint instead of
starting over. Every rank reports once per epoch, as Ray Train V2 expects.
"""

from __future__ import annotations

import heapq
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from amalgam.engine.evaluate import count_macs
from amalgam.engine.stages import (
    LstsqStats,
    StageFitter,
    StageNet,
    StageSpec,
    build_stages,
    closed_form_stage,
    stage1_apply,
    stage1_update,
    stage_input,
)
from amalgam.engine.student import build_student
from amalgam.distributed.runs import TrainStorage, fit_trainer, inject_fault, use_worker_cpus
from amalgam.zoo.arch import config_from_dict
from amalgam.zoo.manifest import InputSpec, Normalize


def stage_costs(nets: dict[str, StageNet], specs: list[StageSpec], input_shapes: dict[str, tuple[int, ...]],
                closed_form_first: bool) -> dict[str, float]:
    """Relative cost of one epoch of each stage: its MACs per sample (x3 for backward)."""
    costs = {}
    first = closed_form_stage(specs, nets, closed_form_first)
    for s in specs:
        macs = count_macs(nets[s.name], input_shapes[s.name])
        closed = s is first
        costs[s.name] = float(macs) * (1.0 if closed else 3.0)  # closed form: one forward-like pass
    return costs


def assign_stages(costs: dict[str, float], workers: int) -> list[list[str]]:
    """Longest-processing-time-first: each stage to the least loaded worker; every stage exactly once."""
    heap = [(0.0, w) for w in range(workers)]
    out: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(costs, key=lambda n: -costs[n]):
        load, w = heapq.heappop(heap)
        out[w].append(name)
        heapq.heappush(heap, (load + costs[name], w))
    return out


@dataclass
class StageJob:
    """Everything a worker needs (picklable, small)."""

    student_config: dict
    input_spec: dict
    specs: list[StageSpec]
    widths: dict[str, int]
    target_var: dict[str, float]
    head_targets: torch.Tensor
    store_uri: str
    s3: dict
    codes_key: str
    epochs: int
    steps_per_epoch: int
    lr: float
    batch_size: int
    seed: int
    closed_form_first: bool
    assignment: list[list[str]]
    initial: dict[str, dict] | None = None  # the driver's initial stage weights: same start wherever a stage runs
    threads: int = 1
    fail_at: dict | None = None  # fault injection for tests: {"rank", "epoch", "marker"}


def _ckpt_file(rank: int) -> str:
    return f"stages-rank{rank}.pt"


def stage_worker(config: dict) -> None:
    """Ray Train loop: fit this rank's stages, checkpointing and reporting every epoch."""
    import ray.train
    import ray.train.torch

    from amalgam.distributed.store_source import store_epoch_batches
    from amalgam.store.dataset import Dataset
    from amalgam.store.location import S3Options, open_store

    job: StageJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    use_worker_cpus(job.threads)
    torch.manual_seed(job.seed)
    mine = set(job.assignment[rank]) if rank < len(job.assignment) else set()
    skeleton = build_student(config_from_dict(job.student_config))
    nets = build_stages(skeleton)
    for name, state in (job.initial or {}).items():
        nets[name].load_state_dict(state)
    specs = [s for s in job.specs if s.name in mine]
    first = closed_form_stage(specs, nets, job.closed_form_first)
    # SGD stages on this worker's device (a GPU when the run asked for one); the closed-form
    # stage stays on the CPU: its float64 normal equations are accumulated there.
    device = ray.train.torch.get_device()
    for s in specs:
        if s is not first:
            nets[s.name].to(device)
    fitters = {
        s.name: StageFitter(s, nets[s.name], job.target_var[s.target_tap], job.lr, job.epochs * job.steps_per_epoch)
        for s in specs if s is not first
    }
    start_epoch = resumed = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / _ckpt_file(rank), weights_only=True, map_location="cpu")
        for name, st in state["fitters"].items():
            fitters[name].load_state_dict(st)
        if first is not None and "first" in state:
            nets[first.name].load_state_dict(state["first"])
        start_epoch = resumed = state["epoch"] + 1
        print(f"[stages] rank {rank}: restored {sorted(mine)} from checkpoint after epoch {start_epoch}")
    taps = sorted({t for s in specs for t in (s.input_tap, s.target_tap) if t and t != "head"})
    loc = open_store(job.store_uri, S3Options(**job.s3))
    spec_in = InputSpec(**job.input_spec)
    batches = store_epoch_batches(
        Dataset.open(loc, job.codes_key), {t: job.widths[t] for t in taps}, job.head_targets,
        Normalize(spec_in.mean, spec_in.std), job.batch_size, job.seed, taps=taps,
        with_image=any(s.input_tap is None for s in specs),
    )
    for epoch in range(start_epoch, job.epochs):
        lstsq = LstsqStats()
        t0 = time.perf_counter()
        for step, batch in enumerate(batches(epoch) if specs else ()):
            inject_fault(job.fail_at, rank, epoch, step, "stages")
            if first is not None and epoch == 0:
                stage1_update(lstsq, nets[first.name], batch["image"], batch["codes"][first.target_tap])
            on_device = _to_device(batch, device) if fitters else batch
            for f in fitters.values():
                f.step(stage_input(on_device, f.spec), on_device["codes"][f.spec.target_tap])
        if first is not None and epoch == 0:
            stage1_apply(lstsq, nets[first.name])
        losses = {name: f.end_epoch() for name, f in fitters.items()}
        if specs:
            print(f"[stages] rank {rank} epoch {epoch + 1}/{job.epochs} ({time.perf_counter() - t0:.0f}s): "
                  + (", ".join(f"{k} {v:.4f}" for k, v in losses.items()) or f"{first.name} closed form"))
        state = {"epoch": epoch, "fitters": {n: f.state_dict() for n, f in fitters.items()}}
        if first is not None:
            state["first"] = nets[first.name].state_dict()
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / _ckpt_file(rank))
            ray.train.report({"epoch": epoch + 1, "resumed_after_epoch": resumed,
                              **{f"loss/{k}": v for k, v in losses.items()}},
                             checkpoint=ray.train.Checkpoint.from_directory(d))


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``; on the CPU the very same tensors (``Tensor.to`` is then a no-op)."""
    image = batch["image"]
    return {"image": image.to(device) if image is not None else None,
            "codes": {t: c.to(device) for t, c in batch["codes"].items()}}


def fit_stages_on_ray(job: StageJob, storage: TrainStorage, workers: int, cpus_per_worker: float, max_failures: int,
                      log=print, gpus_per_worker: float = 0.0,
                      callbacks: list | None = None) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Run the stage trainer; return each stage's trained net state and loss curve."""
    gpus = f", {gpus_per_worker:g} GPU each" if gpus_per_worker else ""
    log(f"[stages] Ray Train: {workers} workers{gpus}, assignment {job.assignment}; checkpoints under {storage.uri}")
    result = fit_trainer(stage_worker, job, "stages", storage, workers, cpus_per_worker, max_failures,
                         gpus_per_worker=gpus_per_worker, callbacks=callbacks)
    resumed = int(result.metrics.get("resumed_after_epoch", 0))
    if resumed:
        log(f"[stages] a worker was lost; the group restarted and restored from the checkpoint after epoch {resumed}")
    states: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    with result.checkpoint.as_directory() as d:
        for rank in range(workers):
            f = Path(d) / _ckpt_file(rank)
            if not f.exists():
                continue
            state = torch.load(f, weights_only=True, map_location="cpu")
            for name, st in state["fitters"].items():
                states[name] = st["net"]
                curves[name] = st["curve"]
            if "first" in state:
                first = next(s.name for s in job.specs if s.input_tap is None)
                states[first] = state["first"]
    missing = [s.name for s in job.specs if s.name not in states]
    if missing:
        raise RuntimeError(f"stage {missing[0]} has no trained state in the final checkpoint")
    return states, curves
