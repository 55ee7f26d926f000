"""The joint stage, data-parallel: DDP across Ray Train workers, no teacher forward.

Images stream from the store's codes dataset through Ray Data (each worker gets a shard of
the pool); the targets (calibrated or gated teacher outputs, computed once on the driver
from the stored logits) are looked up by row index. The loss is the engine's
:func:`~amalgam.engine.joint.joint_loss`. Rank 0 checkpoints the model and optimiser
after every epoch, so a lost worker costs at most one epoch.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from amalgam.engine.joint import SliceTerm, describe_loss, joint_loss, set_train_mode
from amalgam.student_io import DeployedStudent
from amalgam.distributed.runs import TrainStorage, fit_trainer, inject_fault, use_worker_cpus
from amalgam.zoo.arch import build_net, config_from_dict
from amalgam.zoo.manifest import InputSpec


@dataclass
class JointJob:
    student_config: dict
    input_spec: dict
    initial: dict  # the assembled student's state (DeployedStudent)
    targets: torch.Tensor  # [N, C] by pool row index
    num_rows: int
    loss: str
    epochs: int
    lr: float
    batch_size: int
    temperature: float
    seed: int
    threads: int = 1
    fail_at: dict | None = None  # fault injection for tests: {"rank", "epoch", "marker"}
    slices: SliceTerm | None = None  # the per-teacher slice term (job field joint.slices)


def worker_batch(batch_size: int, world: int) -> int:
    """Each DDP rank's share of the global batch (at least 1)."""
    return max(1, math.ceil(batch_size / world))


def joint_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    job: JointJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_worker_cpus(job.threads)
    torch.manual_seed(job.seed)
    model = DeployedStudent(build_net(config_from_dict(job.student_config)), InputSpec(**job.input_spec))
    model.load_state_dict(job.initial)
    # On the worker's device (a GPU when the run asked for one) before the optimiser exists, so
    # a restored optimiser state lands there too; on the CPU these moves are no-ops.
    device = ray.train.torch.get_device()
    model.to(device)
    targets = job.targets.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=1e-4)
    # joint.batch_size is the global batch, as in the local path: each of the ``world`` ranks
    # takes its share and DDP averages their gradients, so the run makes the same number of
    # optimiser steps with the same schedule as one process would.
    rank_batch = worker_batch(job.batch_size, world)
    steps = job.epochs * math.ceil(job.num_rows / world / rank_batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=job.lr, total_steps=max(1, steps), pct_start=0.15)
    start = 0
    curve: list[float] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "joint.pt", weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["epoch"] + 1
        curve = list(state["curve"])
        print(f"[joint] rank {rank}: restored from checkpoint after epoch {start}")
    ddp = ray.train.torch.prepare_model(model)
    if rank == 0:
        print(f"[joint] rank 0: loss {describe_loss(job.loss, job.temperature, job.slices)}")
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, job.epochs):
        set_train_mode(ddp, freeze_batchnorm=True)  # the assembled student: keep the folded BN statistics
        total, n = 0.0, 0
        for step, batch in enumerate(shard.iter_torch_batches(
                batch_size=rank_batch, local_shuffle_buffer_size=2048, local_shuffle_seed=job.seed * 1000 + epoch,
                device=device)):
            inject_fault(job.fail_at, rank, epoch, step, "joint")
            x = batch["image"].float().div_(255.0)
            target = targets[batch["index"].long()]
            loss = joint_loss(ddp(x), target, job.loss, job.temperature, job.slices)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            total += loss.item()
            n += 1
        mean = total / max(1, n)
        curve.append(mean)
        if rank == 0:
            print(f"[joint] epoch {epoch + 1}/{job.epochs}: loss {mean:.4f} ({world} workers)")
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "epoch": epoch, "curve": curve}, Path(d) / "joint.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"epoch": epoch + 1, "loss": mean}, checkpoint=checkpoint)


def ordered_ingest():
    """Ray Train's data ingest with ``preserve_order``: every epoch each rank gets the same rows
    in the same order, run after run (and after a restart from a checkpoint).

    By default Ray Data hands blocks out as they come (the materialised dataset's block order is
    the reads' completion order; ``OutputSplitter`` dispatches by arrival and locality), so two
    runs with the same seed trained on different row orders (two identical runs of a
    512-image job, one worker: final accuracy 0.148 and 0.114), and a restart after a lost
    worker replayed its epoch on other rows (``tests/test_ray_pipeline.py`` noted 0.748 clean
    vs 0.741 restarted). With ``preserve_order`` the splitter ignores locality and deals the
    blocks out in order; the dataset is materialised before training (in order too,
    ``StoreSource.train_joint``), so no read is waited for. Both are then the same student bit
    for bit (``tests/robustness/test_driver_loss.py``).
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def train_joint_on_ray(job: JointJob, dataset, storage: TrainStorage, workers: int, cpus_per_worker: float,
                       max_failures: int, log=print, gpus_per_worker: float = 0.0,
                       callbacks: list | None = None) -> tuple[dict, list[float]]:
    """Train; return the final student state and the per-epoch loss of rank 0."""
    gpus = f", {gpus_per_worker:g} GPU each" if gpus_per_worker else ""
    log(f"[joint] Ray Train DDP: {workers} workers{gpus}; checkpoints under {storage.uri}")
    result = fit_trainer(joint_worker, job, "joint", storage, workers, cpus_per_worker, max_failures,
                         datasets={"train": dataset}, gpus_per_worker=gpus_per_worker, ddp=True, callbacks=callbacks,
                         dataset_config=ordered_ingest())
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "joint.pt", weights_only=True, map_location="cpu")
    return state["model"], [float(v) for v in state["curve"]]
