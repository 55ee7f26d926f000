"""Features from the store: extract through Ray (once), then train with no teacher at all.

Plugs into the engine's recipe (:func:`amalgam.engine.run_local.run_local`) in place of the
in-process teachers: the same statistics, codecs and code batches, read from Parquet.
Codes are stored at ``max_width``; with PCA (DFA) a narrower width is a prefix of the same
basis, so one extraction serves every width a sweep asks for.

Mode ``sgd`` (the paper's auto-encoders, trained on raw features) keeps the raw taps: the
teacher pass also writes them, the auto-encoders train on them on Ray Train
(:mod:`amalgam.distributed.train_codecs`) and the codes pass encodes them, so the teachers
still run once. SGD codecs have no prefix property: codes are stored at the widths used.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from amalgam.data.pool import Pool
from amalgam.engine.amalgamate import LinearCodec, TapStats, fit_ifa, fit_pca
from amalgam.engine.run_local import TeacherPassResult, resolve_widths
from amalgam.errors import AmalgamError
from amalgam.job import Job
from amalgam.store.codecs import load_codecs, save_codecs
from amalgam.store.dataset import Dataset, column_to_numpy
from amalgam.store.fingerprint import zoo_fingerprint
from amalgam.zoo.arch import config_to_dict
from amalgam.zoo.manifest import Normalize, Teacher
from amalgam.distributed.runs import TrainStorage, train_storage, worker_gpus
from amalgam.distributed.extract import (
    STATS_SIDE,
    PassSpec,
    codecs_key,
    codes_key,
    ensure_ray,
    outputs_key,
    run_pass,
    taps_key,
    store_location,
    sum_stats,
)


class StoreSource:
    name = "store (Ray extraction)"

    def __init__(self, job: Job, teachers: list[Teacher], pool: Pool, log=print, address: str | None = None):
        self.job, self.teachers, self.pool, self.log = job, teachers, pool, log
        self.loc = store_location(job)
        self.pool_fp = pool.fingerprint()
        self.zoo_fp = zoo_fingerprint([t.entry for t in teachers])
        self.teacher_forwards = 0
        self.codes: Dataset | None = None
        self.outputs: Dataset | None = None
        self.taps: Dataset | None = None  # raw taps (mode sgd)
        ensure_ray(address)

    def _spec(self, kind: str, key: str, fingerprints: dict[str, str], codecs: str | None = None,
              **extra) -> PassSpec:
        return PassSpec(
            kind=kind, zoo_path=str(self.job.zoo_path()), store_uri=self.job.store_uri(),
            s3=self.job.store.s3.model_dump(), key=key, fingerprints=fingerprints, num_rows=len(self.pool),
            shard_size=self.job.extraction.shard_size, batch_size=self.job.extraction.batch_size, codecs_key=codecs,
            **extra,
        )

    def provenance(self) -> dict:
        """Where this run's features are in the store (``report.json`` extra ``feature_store``).

        ``amalgam retrain`` keeps it with a registered student: a later retrain that only adds
        teachers reads the old teachers' logits (``logits``) and compact codes (``codes_key``,
        cut to the student's widths) from here instead of running them again.
        """
        out = {
            "pool": self.pool_fp,
            "zoo": self.zoo_fp,
            "codes_key": self.codes.key if self.codes is not None else None,
            "stored_widths": dict(getattr(self, "stored_widths", {}) or {}),
            "code_teachers": [t.name for t in self.teachers],
            "logits": [{"key": self.outputs.key, "teachers": [t.name for t in self.teachers],
                        "classes": [len(t.entry.classes) for t in self.teachers]}] if self.outputs is not None else [],
        }
        if self.taps is not None:
            out["taps_key"] = self.taps.key
        return out

    def teacher_pass(self) -> TeacherPassResult:
        """Logits and statistics (and, in mode sgd, the raw taps) of the pool: one teacher pass, or none if stored."""
        raw = taps_key(self.zoo_fp, self.pool_fp) if self.job.amalgamation.mode == "sgd" else None
        spec = self._spec("outputs", outputs_key(self.zoo_fp, self.pool_fp), {"zoo": self.zoo_fp, "pool": self.pool_fp},
                          taps_key=raw)
        res = run_pass(spec, self.job, self.pool, [STATS_SIDE], self.log)
        self.teacher_forwards += res.teacher_forwards
        self.outputs = res.dataset
        self.taps = res.taps
        data = res.dataset.read_all(["index", "logits"])
        if not np.array_equal(data["index"], np.arange(len(self.pool))):
            raise AmalgamError(f"{self.loc.uri_of(res.dataset.key)}: rows are not the pool's samples in order")
        return TeacherPassResult(sum_stats(res.dataset), torch.from_numpy(np.array(data["logits"])).float())

    def fit(self, stats: dict[str, TapStats]) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
        """Fit (or reuse) the codecs, then make sure the codes at their width are stored.

        The codecs are keyed by what determines them (zoo, pool, mode, balancing, widths), not
        by their fitted values: refitting in another process can differ in the last float bit,
        and that must not orphan the stored codes.
        """
        cfg = self.job.amalgamation
        if cfg.mode == "sgd":
            return self._fit_sgd(stats)
        widths = resolve_widths(self.job, stats)
        stored_widths = resolve_widths(self.job, stats, maximum=True) if cfg.strategy == "dfa" else widths
        meta = {"mode": cfg.mode, "strategy": cfg.strategy, "balance": cfg.balance, "zoo": self.zoo_fp,
                "pool": self.pool_fp, "widths": stored_widths}
        codec_fp = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        ckey = codecs_key(codec_fp)
        if self.loc.exists(f"{ckey}/codecs.json"):
            stored, _ = load_codecs(self.loc, ckey)
            self.log(f"[amalgamate] reusing codecs at {self.loc.uri_of(ckey)}")
        else:
            if cfg.strategy == "dfa":
                stored = {tap: fit_pca(s, cfg.balance).codec(stored_widths[tap]) for tap, s in stats.items()}
            else:  # IFA's basis depends on the width: no prefix property, store exactly what is used
                stored = {tap: fit_ifa(s, widths[tap], cfg.balance) for tap, s in stats.items()}
            save_codecs(self.loc, ckey, stored, meta)
            stored, _ = load_codecs(self.loc, ckey)  # another job's may have been there first
        spec = self._spec("codes", codes_key(codec_fp, self.pool_fp),
                          {"zoo": self.zoo_fp, "pool": self.pool_fp, "codecs": codec_fp}, codecs=ckey)
        res = run_pass(spec, self.job, self.pool, [], self.log)
        self.teacher_forwards += res.teacher_forwards
        self.codes = res.dataset
        self.stored_widths = {tap: c.width for tap, c in stored.items()}
        return {tap: c.prefix(widths[tap]) for tap, c in stored.items()}, {}

    def _fit_sgd(self, stats: dict[str, TapStats]) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
        """The paper's auto-encoders: trained on Ray Train from the stored raw taps (or reused), then
        the stored taps encoded into the codes dataset, with no teacher.

        Keyed by everything the training depends on (taps dataset, widths, balancing, epochs,
        lr, batch size, seed). Codes are stored at exactly the widths used: an SGD code has no
        prefix property (``max_width`` does not apply; a sweep refuses mode sgd).
        """
        from amalgam.distributed.runs import store_train_storage, worker_gpus
        from amalgam.distributed.train_codecs import fit_codecs_on_ray, plan_codec_job

        if self.taps is None:
            raise AmalgamError(f"job {self.job.name}: mode sgd needs the raw taps: teacher_pass() first")
        cfg, st = self.job.amalgamation, self.job.stages
        widths = resolve_widths(self.job, stats)
        meta = {"mode": "sgd", "strategy": cfg.strategy, "balance": cfg.balance, "zoo": self.zoo_fp,
                "pool": self.pool_fp, "widths": widths, "raw_taps": self.taps.key, "epochs": cfg.sgd.epochs,
                "lr": cfg.sgd.lr, "batch_size": st.batch_size, "seed": self.job.seed}
        codec_fp = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        ckey = codecs_key(codec_fp)
        if self.loc.exists(f"{ckey}/codecs.json"):
            self.log(f"[amalgamate] reusing sgd auto-encoders at {self.loc.uri_of(ckey)}")
        else:
            workers = max(1, min(st.workers, len(widths)))
            job = plan_codec_job(
                stats, widths, {tap: self.job.seed + i for i, tap in enumerate(stats)}, self.taps, workers,
                balance=cfg.balance, lr=cfg.sgd.lr, epochs=cfg.sgd.epochs, batch_size=st.batch_size,
                seed=self.job.seed, store_uri=self.job.store_uri(), s3=self.job.store.s3.model_dump(),
                threads=max(1, int(st.cpus_per_worker)),
            )
            # The training state lives in the (uncommitted) codecs entry it produces: a killed
            # driver's rerun resumes from it, `amalgam store gc` collects an abandoned one.
            storage = store_train_storage(self.job.store_uri(), self.job.store.s3.model_dump(), f"{ckey}/train")
            fitted, curves = fit_codecs_on_ray(job, storage, workers, st.cpus_per_worker, st.max_failures,
                                               {t: s.kind for t, s in stats.items()}, self.log,
                                               worker_gpus(st.gpus_per_worker, workers))
            save_codecs(self.loc, ckey, fitted, {**meta, "curves": curves})
            if self.loc.exists(f"{ckey}/train"):  # the codecs are committed: their training state is spent
                self.loc.delete_dir(f"{ckey}/train")
        stored, info = load_codecs(self.loc, ckey)  # another job's may have been there first
        spec = self._spec("codes", codes_key(codec_fp, self.pool_fp),
                          {"zoo": self.zoo_fp, "pool": self.pool_fp, "codecs": codec_fp}, codecs=ckey,
                          raw_key=self.taps.key)
        res = run_pass(spec, self.job, self.pool, [], self.log)
        self.teacher_forwards += res.teacher_forwards
        self.codes = res.dataset
        self.stored_widths = {tap: c.width for tap, c in stored.items()}
        return stored, {k: list(v) for k, v in info.get("curves", {}).items()}

    def epoch_batches(self, codecs: dict[str, LinearCodec], head_targets: torch.Tensor, student_norm: Normalize,
                      batch_size: int, seed: int) -> Callable[[int], Iterator[dict]]:
        assert self.codes is not None, "fit() first"
        return store_epoch_batches(self.codes, {tap: c.width for tap, c in codecs.items()}, head_targets,
                                   student_norm, batch_size, seed)


    def train_storage(self, run_dir) -> TrainStorage:
        """Ray Train's checkpoints: under the store when it is on S3, else in the run directory."""
        return train_storage(self.job.store_uri(), self.job.store.s3.model_dump(), run_dir)

    def fit_stages(self, specs, nets, target_var, head_targets, student_config, input_spec, widths, steps, run_dir,
                   epoch_end=None):
        """All stages in parallel on Ray Train; loads the trained layers into ``nets``.
        ``epoch_end(stage, epoch, loss)`` is called in this process as the workers' epochs end."""
        from amalgam.distributed.progress import EpochProgress
        from amalgam.distributed.train_stages import (
            IMAGE, StageJob, closed_form_stage, fit_stages_on_ray, plan_stages, stage_costs, stage_reads,
        )

        st = self.job.stages
        shapes = {}
        size = input_spec.shape
        for s in specs:
            if s.input_tap is None:
                shapes[s.name] = tuple(size)
            else:
                code = self.codes.manifest.columns
                shape = next(c.shape for c in code if c.name == f"code.{s.input_tap}")
                shapes[s.name] = (widths[s.input_tap], *shape[1:])
        costs = stage_costs(nets, specs, shapes, st.closed_form_first, st.epochs)
        stored = {c.name: c for c in self.codes.manifest.columns}
        bytes_per_sample = {name.removeprefix("code."): _row_bytes(c.shape, c.dtype) for name, c in stored.items()
                            if name.startswith("code.")}
        bytes_per_sample[IMAGE] = _row_bytes(stored["image"].shape, stored["image"].dtype)
        first = closed_form_stage(specs, nets, st.closed_form_first)
        reads, read_costs = stage_reads(specs, first, bytes_per_sample, st.epochs)
        # What a row-parallel step all-reduces: the SGD stages' gradients (the closed-form stage's
        # normal equations are reduced once, at the end of epoch 0).
        param_bytes = 4.0 * sum(p.numel() for n, net in nets.items()
                                if n in costs and (first is None or n != first.name) for p in net.parameters())
        plan = plan_stages(costs, st.workers, reads, read_costs, [sh.rows for sh in self.codes.manifest.shards],
                           st.parallel, param_bytes, st.batch_size, st.epochs)
        workers = plan.workers
        job = StageJob(
            student_config=config_to_dict(student_config), input_spec=input_spec.model_dump(), specs=specs,
            widths=widths, target_var=target_var, head_targets=head_targets, store_uri=self.job.store_uri(),
            s3=self.job.store.s3.model_dump(), codes_key=self.codes.key, epochs=st.epochs, steps_per_epoch=steps,
            lr=st.lr, batch_size=st.batch_size, seed=self.job.seed, closed_form_first=st.closed_form_first,
            assignment=plan.assignment, groups=plan.groups, rows=plan.rows, batch_sizes=plan.batch_sizes,
            rank_costs=plan.loads, initial={n: net.state_dict() for n, net in nets.items()},
            threads=max(1, int(st.cpus_per_worker)), fail_at=st.fail_at.resolved(run_dir) if st.fail_at else None,
        )
        with EpochProgress("stages", epoch_end) as progress:
            states, curves = fit_stages_on_ray(job, self.train_storage(run_dir), workers, st.cpus_per_worker,
                                               st.max_failures, self.log, worker_gpus(st.gpus_per_worker, workers),
                                               callbacks=progress.callbacks)
        progress.catch_up(curves)
        for name, state in states.items():
            nets[name].load_state_dict(state)
        return curves


    def train_joint(self, student, targets: torch.Tensor, run_dir, epoch_end=None, slices=None) -> list[float]:
        """The joint stage with DDP on Ray Train; images from the store via Ray Data (``slices``: the
        engine's per-teacher slice term, or None)."""
        from amalgam.distributed.progress import EpochProgress
        from amalgam.distributed.train_joint import JointJob, train_joint_on_ray

        jc = self.job.joint
        job = JointJob(
            student_config=config_to_dict(student.net.config), input_spec=student.spec.model_dump(),
            initial=student.state_dict(), targets=targets, num_rows=len(self.pool), loss=jc.loss, epochs=jc.epochs,
            lr=jc.lr, batch_size=jc.batch_size, temperature=jc.temperature, seed=self.job.seed,
            threads=max(1, int(jc.cpus_per_worker)), fail_at=jc.fail_at.resolved(run_dir) if jc.fail_at else None,
            slices=slices,
        )
        # Materialised before training: on a small cluster the DDP workers hold every CPU, and
        # streaming reads would wait for a CPU forever. Images are ~1 KB a row.
        dataset = self.codes.ray_dataset(columns=["index", "image"])
        # Blocks in shard order, so each rank gets the same rows every run (see ordered_ingest).
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
        with EpochProgress("joint", epoch_end) as progress:
            state, curve = train_joint_on_ray(job, dataset, self.train_storage(run_dir), jc.workers,
                                              jc.cpus_per_worker, self.job.stages.max_failures, self.log,
                                              worker_gpus(jc.gpus_per_worker, jc.workers),
                                              callbacks=progress.callbacks)
        progress.catch_up({"joint": curve})
        student.load_state_dict(state)
        student.eval()
        return curve


def store_epoch_batches(
    codes_ds: Dataset,
    widths: dict[str, int],
    head_targets: torch.Tensor,
    student_norm: Normalize,
    batch_size: int,
    seed: int,
    taps: list[str] | None = None,
    with_image: bool = True,
    rows: torch.Tensor | None = None,
    verified: set[int] | None = None,
    segments: list[tuple[int, int, int]] | None = None,
) -> Callable[[int], Iterator[dict]]:
    """Shuffled batches per epoch (shard order, then rows within a shard), codes cut to ``widths``.

    The shuffle depends only on ``seed`` and the epoch, never on which columns are read,
    so a Ray Train worker reading only its stages' taps sees exactly the batches the
    driver would: each stage trains identically wherever it runs. ``rows`` (a boolean mask
    over pool indices) keeps only those samples: a sweep holds some out to score trials.

    Each shard's first read in this process is checked against its manifest checksum (the
    whole file is read and hashed); once a shard is in ``verified`` (pass one set to share it
    between several of these readers), later epochs read only ``columns``' byte ranges from it:
    datasets are write-once, and on the demo a checked whole-file read cost a worker ~90 us a
    row every epoch, more than decoding the taps a small stage needs.

    ``segments`` (``(shard, start, end)`` row ranges) reads only those: one rank's share when
    several ranks fit the same stages row-parallel (``train_stages.split_rows``). They come
    longest first, ties in the epoch's shard order: ranks holding equally long segments then
    move to their next shard on the same step, so no rank waits at the gradient all-reduce
    while another decodes a shard.
    """
    taps = list(widths) if taps is None else taps
    columns = ["index", *(["image"] if with_image else []), *(f"code.{t}" for t in taps)]
    verified = set() if verified is None else verified

    def read(i: int) -> pa.Table:
        table = codes_ds.read_shard(codes_ds.manifest.shards[i], columns, checked=i not in verified)
        verified.add(i)
        return table

    def epoch_batches(epoch: int) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(codes_ds.manifest.shards), generator=gen).tolist()
        if segments is None:
            plan = [(i, 0, None) for i in order]
        else:
            position = {shard: p for p, shard in enumerate(order)}
            plan = sorted(segments, key=lambda seg: (seg[1] - seg[2], position[seg[0]]))
        for i, start, end in plan:
            table = read(i)
            if end is not None:
                table = table.slice(start, end - start)
            # Arrow's buffers are read-only: each batch is gathered in numpy (a fresh, writable copy)
            # before torch sees it, rather than copying whole columns first.
            cols = {n: column_to_numpy(table.column(n)) for n in columns}
            index = torch.from_numpy(np.array(cols["index"]))
            perm = torch.randperm(table.num_rows, generator=gen)
            if rows is not None:
                perm = perm[rows[index[perm]]]
            for j in range(0, len(perm), batch_size):  # with ``rows``, fewer than num_rows: no empty batches
                p = perm[j : j + batch_size]
                q = p.numpy()
                with torch.no_grad():
                    batch_codes = {t: torch.from_numpy(cols[f"code.{t}"][q, : widths[t]]).float() for t in taps}
                    batch_codes["head"] = head_targets[index[p]]
                    image = student_norm(torch.from_numpy(cols["image"][q]).float().div_(255.0)) if with_image else None
                yield {"image": image, "codes": batch_codes}

    return epoch_batches


def _row_bytes(shape: list[int], dtype: str) -> float:
    """Stored bytes of one row of a fixed-shape column (as decoded)."""
    return float(np.prod(shape, dtype=np.int64)) * pa.type_for_alias(dtype).bit_width / 8


def store_source_factory(address: str | None = None):
    return lambda job, teachers, pool, log: StoreSource(job, teachers, pool, log, address)
