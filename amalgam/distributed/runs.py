"""Ray Train runs: their names, storage (local or S3), resources (CPU, GPU) and the trainer.

Ray Train resumes a run that already has state under ``storage_path/name``. That is what we
want after a crash of the same job (issue: driver loss), and never what we want when the
settings changed, so the name carries a fingerprint of everything the run depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import pyarrow.fs as pafs
import torch

from amalgam.store.location import S3Options, open_store, s3_filesystem_kwargs


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


class EnvS3FileSystem(pafs.S3FileSystem):
    """The store's S3 filesystem (:func:`~amalgam.store.location.s3_filesystem_kwargs`) that
    pickles as its URI and ``store.s3`` options, never as its credentials.

    Ray Train ships ``RunConfig.storage_filesystem`` to its controller and to every worker;
    a plain ``S3FileSystem`` would carry the access key and secret in those task arguments.
    This one is rebuilt in each process from that process's environment, as the store is.
    It stays an ``S3FileSystem`` (Ray Train turns off pyarrow's threaded uploads for S3 by
    that type).
    """

    def __init__(self, uri: str, s3: dict | None = None):
        super().__init__(**s3_filesystem_kwargs(uri, S3Options(**(s3 or {}))))
        self._where = (uri, dict(s3 or {}))

    def __reduce__(self):
        return (EnvS3FileSystem, self._where)


@dataclass(frozen=True)
class TrainStorage:
    """Where Ray Train keeps a run's state and checkpoints (``RunConfig(storage_path, storage_filesystem)``)."""

    path: str  # a local directory, or BUCKET/PREFIX inside ``filesystem``
    uri: str  # the same place, for people: a path or s3://BUCKET/PREFIX
    filesystem: pafs.FileSystem | None = None  # None: the local filesystem


def train_storage(store_uri: str, s3: dict | None, run_dir) -> TrainStorage:
    """Ray Train storage for a run: beside the features when the store is on S3, else in the run directory.

    With an ``s3://BUCKET/PREFIX`` store, checkpoints go to ``s3://BUCKET/PREFIX/runs/<run
    directory name>/ray`` (the storage every node of a cluster can reach; the same endpoint and
    credentials as the store). With a local store they stay in ``RUN_DIR/ray`` as before.
    """
    run_dir = Path(run_dir).resolve()
    if not store_uri.startswith("s3://"):
        local = str(run_dir / "ray")
        return TrainStorage(local, local)
    loc = open_store(store_uri, S3Options(**(s3 or {})))  # checks the URI and the credentials here, on the driver
    rel = f"runs/{run_dir.name}/ray"
    return TrainStorage(loc.path(rel), loc.uri_of(rel), EnvS3FileSystem(loc.uri, s3))


def store_train_storage(store_uri: str, s3: dict | None, rel: str) -> TrainStorage:
    """Ray Train storage at ``rel`` inside the store (local or S3): for runs that belong to a
    store entry rather than to a run directory (the SGD auto-encoders of ``codecs/<fp>``, which
    ``amalgam extract`` fits with no run directory at all)."""
    loc = open_store(store_uri, S3Options(**(s3 or {})))
    if not loc.is_s3:
        return TrainStorage(loc.path(rel), loc.uri_of(rel))
    return TrainStorage(loc.path(rel), loc.uri_of(rel), EnvS3FileSystem(loc.uri, s3))


def use_worker_cpus(threads: int) -> None:
    """Keep a Ray Train worker to the CPUs it was given: torch's intra-op threads and pyarrow's
    CPU pool (Parquet decoding, zstd) both default to every core of the node, so a 1-CPU worker
    reading codes would decode on all of them, and workers side by side would fight over them."""
    import pyarrow as pa

    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)


GpuSetting = Union[float, Literal["auto"]]


def worker_gpus(setting: GpuSetting, workers: int, cluster_gpus: float | None = None) -> float:
    """GPUs per Ray Train worker: the job's number, or with ``auto`` the cluster's GPUs shared
    out (at most one each; none when the cluster has none). ``cluster_gpus`` defaults to what
    the connected Ray cluster reports."""
    if setting != "auto":
        return float(setting)
    if cluster_gpus is None:
        import ray

        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if cluster_gpus <= 0:
        return 0.0
    return min(1.0, math.floor(cluster_gpus / workers * 1e4) / 1e4)  # Ray's resource precision is 1e-4


def scaling_config(workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0):
    """The ScalingConfig of a stage or joint run; with no GPU exactly the CPU-only one."""
    from ray.train import ScalingConfig

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def torch_backend(gpus_per_worker: float, ddp: bool) -> str:
    """NCCL only for DDP with a whole GPU per worker (NCCL refuses two ranks on one GPU);
    gloo otherwise: stage workers never communicate, and gloo all-reduces CUDA tensors too."""
    return "nccl" if ddp and gpus_per_worker >= 1 else "gloo"


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by Ray Train's controller (propagated from the driver)
TRAIN_POLL_S = "0.5"


def fit_trainer(loop, job: object, kind: str, storage: TrainStorage, workers: int, cpus_per_worker: float,
                max_failures: int, datasets: dict | None = None, gpus_per_worker: float = 0.0, ddp: bool = False,
                callbacks: list | None = None, dataset_config=None):
    """One TorchTrainer run of ``loop`` with ``{"job": job}``, checkpointed under STORAGE/KIND-FP.

    Both Ray Train uses (stages, joint) share it: same storage layout, restart policy and
    checkpoint retention. ``callbacks`` (``ray.train.UserCallback``; run on Ray Train's
    controller) see every round of reports: :mod:`amalgam.distributed.progress`.
    ``dataset_config`` (``ray.train.DataConfig``) replaces Ray Train's default ingest of
    ``datasets`` (the joint stage keeps block order: ``train_joint.ordered_ingest``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train's controller polls the worker group every HEALTH_CHECK_INTERVAL (2 s by
    # default) and advances its start-up, reports and shutdown only at polls: for stages of a
    # few seconds an epoch that waiting dominated. Measured here (2 workers, 3 reports, 2-core
    # machine under load 11-18, alternating in one process): 22-29 s a fit at 2 s, 12-20 s at
    # 0.5 s. A poll is one small remote call per worker. The environment wins when set.
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"job": job},
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
        torch_config=TorchConfig(backend=torch_backend(gpus_per_worker, ddp)),
        scaling_config=scaling_config(workers, cpus_per_worker, gpus_per_worker),
        run_config=RunConfig(
            name=f"{kind}-{run_fingerprint(job)}", storage_path=storage.path, storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )
    return trainer.fit()


def inject_fault(fail_at: dict | None, rank: int, epoch: int, step: int, what: str) -> None:
    """Test-only fault injection (a job's ``fail_at: {rank, epoch, marker}``): at the fourth step
    of each listed epoch the worker process exits once, like a lost node. The marker file records
    the epochs already killed, so the restarted worker group runs through each of them."""
    if fail_at and fail_at["rank"] == rank and epoch in fail_at["epochs"] and step == 3:
        marker = Path(fail_at["marker"])
        line = f"killed {what} rank {rank} in epoch {epoch}\n"
        if line not in (marker.read_text() if marker.exists() else ""):
            marker.parent.mkdir(parents=True, exist_ok=True)
            with open(marker, "a") as f:
                f.write(line)
            print(f"[{what}] rank {rank}: fault injection, worker exits in epoch {epoch + 1}", flush=True)
            os._exit(1)
