"""Naming of Ray Train runs inside a run directory.

Ray Train resumes a run that already has state under ``storage_path/name``. That is what we
want after a crash of the same job (issue: driver loss), and never what we want when the
settings changed, so the name carries a fingerprint of everything the run depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch


def run_fingerprint(job: object) -> str:
    h = hashlib.sha256()
    for f in dataclasses.fields(job):  # type: ignore[arg-type]
        v = getattr(job, f.name)
        h.update(f.name.encode())
        _feed(h, v)
    return h.hexdigest()[:12]


def _feed(h, v) -> None:
    if isinstance(v, torch.Tensor):
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(str(k).encode())
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        for x in v:
            _feed(h, x)
    else:
        h.update(repr(v).encode())


def fit_trainer(loop, job: object, kind: str, run_dir, workers: int, cpus_per_worker: float, max_failures: int,
                datasets: dict | None = None):
    """One TorchTrainer run of ``loop`` with ``{"job": job}``, checkpointed under RUN_DIR/ray/KIND-FP.

    Both Ray Train uses (stages, joint) share it: same storage layout, restart policy and
    checkpoint retention.
    """
    from pathlib import Path

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config={"job": job},
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=f"{kind}-{run_fingerprint(job)}", storage_path=str(Path(run_dir).resolve() / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def inject_fault(fail_at: dict | None, rank: int, epoch: int, step: int, what: str) -> None:
    """Test-only fault injection (a job's ``fail_at: {rank, epoch, marker}``): at the fourth step
    of that epoch the worker process exits once, like a lost node. The marker file makes it
    happen once only, so the restarted worker group runs through."""
    if fail_at and fail_at["rank"] == rank and fail_at["epoch"] == epoch and step == 3:
        marker = Path(fail_at["marker"])
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"killed {what} rank {rank} in epoch {epoch}\n")
            print(f"[{what}] rank {rank}: fault injection, worker exits in epoch {epoch + 1}", flush=True)
            os._exit(1)
