"""The paper-faithful (``sgd``) auto-encoders on Ray Train, from the stored raw taps.

Mode ``sgd`` trains one linear auto-encoder per tap by MSE reconstruction of the teachers'
concatenated features (the engine's :class:`~amalgam.engine.amalgamate.SGDCodecTrainer`,
stepped here exactly as ``fit_codecs`` steps it in-process). The taps' auto-encoders are
independent, so, like the layer-wise stages, one TorchTrainer fits them side by side: every
worker owns some taps (balanced by cost), reads only those taps' columns of the raw-tap
dataset (:func:`amalgam.distributed.extract.taps_key`) and never synchronises gradients.

Batches are read shard by shard: per epoch, shards in a seeded random order and rows
shuffled within each shard (the stages' scheme, :func:`store_epoch_batches`), so a worker
holds one shard of its taps in memory, not the pool. The order therefore differs from the
in-process run's global shuffle, and the stored taps are float16: the fitted codecs are
close to ``--local``'s, not bit-equal (tests/test_ray_sgd.py measures how close).

Fault tolerance as for the stages: after every epoch each rank writes its auto-encoders'
training state (weights, Adam state, loss curve) and their frozen codecs into a rank-named
file of one reported checkpoint; a restarted group resumes from it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from amalgam.distributed.runs import TrainStorage, fit_trainer, use_worker_cpus
from amalgam.distributed.train_stages import assign_stages
from amalgam.engine.amalgamate import LinearCodec, SGDCodecTrainer, TapStats
from amalgam.store.codecs import FIELDS
from amalgam.store.dataset import Dataset, column_to_numpy


@dataclass
class CodecJob:
    """Everything a worker needs (picklable; its fields fingerprint the Ray Train run)."""

    stats: dict[str, dict[str, torch.Tensor]]  # tap -> TapStats.state_dict() (centring and balancing)
    widths: dict[str, int]
    seeds: dict[str, int]  # tap -> initialisation seed (the in-process path's: job seed + tap index)
    balance: bool
    lr: float
    epochs: int
    batch_size: int
    seed: int  # data order
    store_uri: str
    s3: dict
    taps_key: str
    assignment: list[list[str]]
    threads: int = 1


def tap_costs(ds: Dataset, widths: dict[str, int]) -> dict[str, float]:
    """Relative cost of an epoch of each tap's auto-encoder: positions x channels x width."""
    shapes = {c.name: c.shape for c in ds.manifest.columns}
    costs = {}
    for tap, k in widths.items():
        shape = shapes[f"tap.{tap}"]
        costs[tap] = float(np.prod(shape[1:], dtype=np.float64) * shape[0] * k) if shape else float(k)
    return costs


def raw_epoch_batches(ds: Dataset, taps: list[str], batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
    """One epoch of ``{tap: float16 [B, C, ...]}`` batches: shards in a seeded order, rows shuffled in each."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(ds.manifest.shards), generator=gen).tolist()
    columns = [f"tap.{t}" for t in taps]
    for table in ds.iter_shards(columns, order):
        cols = {t: torch.from_numpy(np.require(column_to_numpy(table.column(f"tap.{t}")), requirements="W"))
                for t in taps}
        perm = torch.randperm(table.num_rows, generator=gen)
        for i in range(0, table.num_rows, batch_size):
            p = perm[i : i + batch_size]
            yield {t: x[p] for t, x in cols.items()}


def _to_device(tr: SGDCodecTrainer, device: torch.device) -> None:
    """The trainer's maps and its centring on ``device`` (before any step: Adam's state follows the weights)."""
    tr.enc.to(device)
    tr.dec.to(device)
    tr.mean, tr.scale = tr.mean.to(device), tr.scale.to(device)


def trainer_state(tr: SGDCodecTrainer) -> dict:
    return {"enc": tr.enc.state_dict(), "dec": tr.dec.state_dict(), "opt": tr.opt.state_dict(),
            "curve": list(tr.curve)}


def load_trainer_state(tr: SGDCodecTrainer, state: dict) -> None:
    tr.enc.load_state_dict(state["enc"])
    tr.dec.load_state_dict(state["dec"])
    tr.opt.load_state_dict(state["opt"])
    tr.curve = list(state["curve"])


def _ckpt_file(rank: int) -> str:
    return f"autoencoders-rank{rank}.pt"


def codec_worker(config: dict) -> None:
    """Ray Train loop: fit this rank's auto-encoders, checkpointing and reporting every epoch."""
    import ray.train
    import ray.train.torch

    from amalgam.store.location import S3Options, open_store

    job: CodecJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    use_worker_cpus(job.threads)
    mine = job.assignment[rank] if rank < len(job.assignment) else []
    device = ray.train.torch.get_device()
    trainers = {tap: SGDCodecTrainer(TapStats.from_state_dict(job.stats[tap]), job.widths[tap], job.balance, job.lr,
                                     seed=job.seeds[tap]) for tap in mine}
    for tr in trainers.values():
        _to_device(tr, device)
    start_epoch = resumed = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / _ckpt_file(rank), weights_only=True, map_location="cpu")
        for tap, st in state["trainers"].items():
            load_trainer_state(trainers[tap], st)
        start_epoch = resumed = state["epoch"] + 1
        print(f"[amalgamate] rank {rank}: restored {sorted(mine)} from checkpoint after epoch {start_epoch}")
    ds = Dataset.open(open_store(job.store_uri, S3Options(**job.s3)), job.taps_key)
    for epoch in range(start_epoch, job.epochs):
        t0 = time.perf_counter()
        for batch in raw_epoch_batches(ds, mine, job.batch_size, job.seed, epoch) if mine else ():
            for tap, tr in trainers.items():
                tr.step([batch[tap].to(device).float()])
        losses = {tap: tr.end_epoch() for tap, tr in trainers.items()}
        if mine:
            print(f"[amalgamate] rank {rank} sgd epoch {epoch + 1}/{job.epochs} ({time.perf_counter() - t0:.0f}s): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        state = {
            "epoch": epoch,
            "trainers": {tap: trainer_state(tr) for tap, tr in trainers.items()},
            "codecs": {tap: {f: getattr(c, f).cpu() for f in FIELDS}
                       for tap, c in ((t, tr.codec()) for t, tr in trainers.items())},
        }
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / _ckpt_file(rank))
            ray.train.report({"epoch": epoch + 1, "resumed_after_epoch": resumed,
                              **{f"loss/{k}": v for k, v in losses.items()}},
                             checkpoint=ray.train.Checkpoint.from_directory(d))


def plan_codec_job(stats: dict[str, TapStats], widths: dict[str, int], seeds: dict[str, int], taps: Dataset,
                   workers: int, **fields) -> CodecJob:
    """A :class:`CodecJob` with the taps shared out over ``workers`` (longest first)."""
    return CodecJob(stats={t: s.state_dict() for t, s in stats.items()}, widths=widths, seeds=seeds,
                    taps_key=taps.key, assignment=assign_stages(tap_costs(taps, widths), workers), **fields)


def fit_codecs_on_ray(job: CodecJob, storage: TrainStorage, workers: int, cpus_per_worker: float, max_failures: int,
                      kinds: dict[str, str], log=print,
                      gpus_per_worker: float = 0.0) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
    """Run the auto-encoder trainer; the frozen codecs and each tap's loss curve (``ae_<tap>``)."""
    log(f"[amalgamate] sgd auto-encoders on Ray Train: {workers} workers, taps {job.assignment}, "
        f"{job.epochs} epochs; checkpoints under {storage.uri}")
    result = fit_trainer(codec_worker, job, "autoencoders", storage, workers, cpus_per_worker, max_failures,
                         gpus_per_worker=gpus_per_worker)
    resumed = int(result.metrics.get("resumed_after_epoch", 0))
    if resumed:
        log(f"[amalgamate] a worker was lost; the group restarted and restored from the checkpoint after epoch {resumed}")
    codecs: dict[str, LinearCodec] = {}
    curves: dict[str, list[float]] = {}
    with result.checkpoint.as_directory() as d:
        for rank in range(workers):
            f = Path(d) / _ckpt_file(rank)
            if not f.exists():
                continue
            state = torch.load(f, weights_only=True, map_location="cpu")
            for tap, c in state["codecs"].items():
                codecs[tap] = LinearCodec(*(c[f] for f in FIELDS), kind=kinds[tap])
                curves[f"ae_{tap}"] = list(state["trainers"][tap]["curve"])
    missing = [t for t in job.widths if t not in codecs]
    if missing:
        raise RuntimeError(f"tap {missing[0]} has no trained auto-encoder in the final checkpoint")
    for tap, curve in curves.items():
        log(f"[amalgamate] {tap.removeprefix('ae_')}: sgd auto-encoder loss " + " -> ".join(f"{v:.4f}" for v in curve))
    return {t: codecs[t] for t in job.widths}, {f"ae_{t}": curves[f"ae_{t}"] for t in job.widths}
