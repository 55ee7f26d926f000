"""Naming of Ray Train runs inside a run directory.

Ray Train resumes a run that already has state under ``storage_path/name``. That is what we
want after a crash of the same job (issue: driver loss), and never what we want when the
settings changed, so the name carries a fingerprint of everything the run depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib

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
