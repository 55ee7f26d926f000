"""Incremental amalgamation from the store: a champion's codes plus new teachers, no old teacher run.

``amalgam retrain`` uses this source when the zoo only *gained* teachers since the champion
was trained. Per tap, the next auto-encoder reads ``[champion's compact code | new teachers'
features]`` (the IFA step of :func:`amalgam.engine.amalgamate.fit_ifa`, with the previous code
taken from the store instead of recomputed from the old teachers):

1. ``outputs`` pass, new teachers only: their logits and the exact statistics
   (:class:`~amalgam.engine.amalgamate.TapStats`) of ``[old code | new features]``, the old
   code read row-aligned (by pool index) from the champion's codes dataset;
2. one PCA per tap on those statistics (balanced as the job says: the old code is one block,
   each new teacher another) gives the codec;
3. ``codes`` pass, new teachers only: the new codes dataset (image + code per tap), which the
   recipe trains from exactly as from a full run's. Its ``logits`` column (like the outputs
   dataset's) holds the *new* teachers' logits only; the manifest's ``increment``
   fingerprint names the step (base codes, their widths, the new teachers).

The old teachers' logits come from the stored outputs datasets the champion was trained
from; the class space is the zoo's, in zoo order. Two passes of the new teachers over the
pool are the whole teacher cost (PCA needs the statistics of the whole pool before any code
can be written). Everything else is :class:`StoreSource`'s: the Ray extraction, the stages
on Ray Train and the joint stage.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from amalgam.data.pool import Pool
from amalgam.distributed.extract import STATS_SIDE, codecs_key, codes_key, outputs_key, run_pass, sum_stats
from amalgam.distributed.store_source import StoreSource
from amalgam.engine.amalgamate import LinearCodec, TapStats, fit_pca
from amalgam.engine.run_local import TeacherPassResult, feature_taps
from amalgam.errors import AmalgamError
from amalgam.job import Job
from amalgam.store.codecs import load_codecs, save_codecs
from amalgam.store.dataset import Dataset
from amalgam.store.fingerprint import zoo_fingerprint
from amalgam.zoo.manifest import Teacher

PREVIOUS_CODE = "previous code"  # the name of the old code's block in the amalgamation report


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_logits(ds: Dataset, num_rows: int) -> torch.Tensor:
    """The ``logits`` column of an extraction dataset, checked to be pool rows ``0..num_rows-1`` in order."""
    data = ds.read_all(["index", "logits"])
    if not np.array_equal(data["index"], np.arange(num_rows)):
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: rows are not the pool's samples in order")
    return torch.from_numpy(np.array(data["logits"])).float()


class IncrementalSource(StoreSource):
    """The champion's stored codes and logits, plus passes of the new teachers only.

    ``base`` is the champion's :class:`amalgam.retrain.FeatureState` (what its student was
    trained from); ``new`` the names of the teachers to add.
    """

    name = "store (incremental: champion codes + new teachers)"

    def __init__(self, job: Job, teachers: list[Teacher], pool: Pool, log=print, address: str | None = None,
                 base=None, new: list[str] | None = None):
        if job.amalgamation.mode != "pca":
            raise AmalgamError(f"job {job.name}: field amalgamation.mode: incremental amalgamation needs pca")
        super().__init__(job, teachers, pool, log, address)
        if base is None or not new:
            raise AmalgamError("incremental amalgamation needs the champion's features and at least one new teacher")
        if base.pool != self.pool_fp:
            raise AmalgamError(f"job {job.name}: the pool differs from the one the champion was trained on")
        names = set(new)
        self.base = base
        self.new = [t for t in teachers if t.name in names]
        if len(self.new) != len(names):
            raise AmalgamError(f"teacher {sorted(names - {t.name for t in teachers})[0]!r} is not in the zoo")
        self.block_names = [PREVIOUS_CODE, *(t.name for t in self.new)]
        self.increment_fp = _digest({
            "base_codes": base.codes_key, "base_widths": dict(sorted(base.code_widths.items())),
            "teachers": zoo_fingerprint([t.entry for t in self.new]),
        })

    def _increment_spec(self, kind: str, key: str, fingerprints: dict[str, str], codecs: str | None = None):
        return self._spec(
            kind, key, {**fingerprints, "pool": self.pool_fp, "increment": self.increment_fp}, codecs,
            teachers=tuple(t.name for t in self.new), base_codes_key=self.base.codes_key,
            base_widths=dict(self.base.code_widths),
        )

    def teacher_pass(self) -> TeacherPassResult:
        spec = self._increment_spec("outputs", outputs_key(self.increment_fp, self.pool_fp), {})
        res = run_pass(spec, self.job, self.pool, [STATS_SIDE], self.log, teachers=self.teachers)
        self.teacher_forwards += res.teacher_forwards
        self.outputs = res.dataset
        by_name: dict[str, torch.Tensor] = {}
        sources = [(res.dataset, [t.name for t in self.new], [len(t.entry.classes) for t in self.new])]
        sources += [(Dataset.open(self.loc, s.key), s.teachers, s.classes) for s in self.base.logits]
        for ds, names, classes in sources:
            logits = read_logits(ds, len(self.pool))
            if logits.shape[1] != sum(classes):
                raise AmalgamError(f"{self.loc.uri_of(ds.key)}: {logits.shape[1]} logits, expected {sum(classes)}")
            for name, part in zip(names, logits.split(classes, 1)):
                by_name.setdefault(name, part)
        for t in self.teachers:
            if t.name not in by_name:
                raise AmalgamError(f"teacher {t.name}: no stored logits and not a new teacher")
            if by_name[t.name].shape[1] != len(t.entry.classes):
                raise AmalgamError(f"teacher {t.name}: stored logits have {by_name[t.name].shape[1]} classes, "
                                   f"the zoo lists {len(t.entry.classes)}")
        self.log(f"[retrain] logits of {len(self.teachers) - len(self.new)} old teachers read from the store, "
                 f"{len(self.new)} new teacher(s) run")
        logits = torch.cat([by_name[t.name] for t in self.teachers], 1)  # zoo order: the class space's
        return TeacherPassResult(sum_stats(res.dataset), logits)

    def widths(self, stats: dict[str, TapStats]) -> dict[str, int]:
        """Each tap's width: the job's width of the *whole* zoo's concatenation (what a full run
        would use), at most the step's input channels (old code + new teachers)."""
        cfg = self.job.amalgamation
        infos = [{i.name: i for i in t.taps()} for t in self.teachers]
        full = {tap: sum(inf[tap].channels for inf in infos) for tap in feature_taps(self.teachers)}
        widths = {}
        for tap, s in stats.items():
            k = cfg.width_for(tap, full[tap])
            if cfg.max_energy:
                k = min(k, fit_pca(s, cfg.balance).energy_width(cfg.max_energy))
            widths[tap] = min(k, s.channels)
        return widths

    def fit(self, stats: dict[str, TapStats]) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
        cfg = self.job.amalgamation
        widths = self.widths(stats)
        meta = {"mode": "pca", "strategy": "ifa-step", "balance": cfg.balance, "increment": self.increment_fp,
                "base_codes": self.base.codes_key, "pool": self.pool_fp, "widths": widths}
        codec_fp = _digest(meta)
        ckey = codecs_key(codec_fp)
        if self.loc.exists(f"{ckey}/codecs.json"):
            codecs, _ = load_codecs(self.loc, ckey)
            self.log(f"[amalgamate] reusing codecs at {self.loc.uri_of(ckey)}")
        else:
            codecs = {tap: fit_pca(s, cfg.balance).codec(widths[tap]) for tap, s in stats.items()}
            save_codecs(self.loc, ckey, codecs, meta)
            codecs, _ = load_codecs(self.loc, ckey)  # another job's may have been there first
        spec = self._increment_spec("codes", codes_key(codec_fp, self.pool_fp), {"codecs": codec_fp}, codecs=ckey)
        res = run_pass(spec, self.job, self.pool, [], self.log, teachers=self.teachers)
        self.teacher_forwards += res.teacher_forwards
        self.codes = res.dataset
        self.stored_widths = {tap: c.width for tap, c in codecs.items()}
        return codecs, {}

    def provenance(self) -> dict:
        out = super().provenance()
        new = [t.name for t in self.new]
        out["code_teachers"] = [t.name for t in self.base.code_teachers] + new
        out["logits"] = [s.model_dump() for s in self.base.logits]
        if self.outputs is not None:
            out["logits"].append({"key": self.outputs.key, "teachers": new,
                                  "classes": [len(t.entry.classes) for t in self.new]})
        out["increment"] = {"base_codes": self.base.codes_key, "base_widths": dict(self.base.code_widths),
                            "new_teachers": new}
        return out
