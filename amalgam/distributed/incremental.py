"""Incremental amalgamation from the store: a champion's codes, plus changed and new teachers only.

``amalgam retrain`` uses this source when the champion's stored features can stand in for
the teachers it was trained on. The zoo may have *gained* teachers, *lost* some, or some may
have *changed* (other weights): a changed teacher is a removed one plus a new one. Per tap,
the step reads ``y = [champion's compact code | new teachers' features]`` and amalgamates an
affine image of it (:func:`amalgam.engine.amalgamate.code_step`):

* IFA, nothing removed: ``y`` itself (the IFA step of :func:`~amalgam.engine.amalgamate.fit_ifa`
  with the previous code taken from the store instead of recomputed from the old teachers);
* IFA, teachers removed or changed: the kept teachers' features reconstructed from the code by
  the champion's decoder (its rows of the kept teachers), as the previous-code block;
* DFA: every kept teacher's reconstruction and every new teacher its own block, one
  auto-encoder over all teachers. The Gram blocks old-old, old-new and new-new all come from
  the statistics of ``y`` (exact), none from an old teacher's forward.

Passes:

1. ``outputs``, new teachers only: their logits and the exact statistics
   (:class:`~amalgam.engine.amalgamate.TapStats`) of ``y``, the old code read row-aligned (by
   pool index) from the champion's codes dataset. With no new teacher (only removals), the
   statistics of the code are read from the store in this process: no teacher runs at all;
2. one PCA per tap on the step's statistics (balanced per block) gives the codec; composed
   with the step's map it encodes ``y`` directly, and its decoder reconstructs the teachers'
   features (old kept ones, then new ones), so the next retrain can drop or change a teacher
   of this student's code again (the state's ``decoder_key`` and ``code_blocks``);
3. ``codes``: the new codes dataset (image + code per tap), which the recipe trains from
   exactly as from a full run's. Its ``logits`` column (like the outputs dataset's) holds the *new* teachers'
   logits only (all teachers' when none is new); the manifest's ``increment`` fingerprint
   names the step (base codes, their widths, the new and dropped teachers, the strategy).
   By default (``retrain.single_pass``) no teacher runs here: pass 1 also stored the new
   teachers' raw taps (float16, :func:`~amalgam.distributed.extract.taps_key` of the increment
   and pool), and this pass encodes ``[stored code | stored raw taps]``, the same codes as a
   second forward would give up to the float16 rounding of the taps. With
   ``single_pass: false`` the new teachers run again instead (no raw taps stored); with no new
   teacher the stored code is mapped in this process.

The old teachers' logits come from the stored outputs datasets the champion was trained
from (a changed teacher's from its new pass); the class space is the zoo's, in zoo order:
a removed teacher's classes leave it. One pass of the new teachers over the pool is the
whole teacher cost (two with ``single_pass: false``: PCA needs the statistics of the whole
pool before any code can be written, so the codes come from the stored taps or a second
forward). Everything else is :class:`StoreSource`'s: the Ray extraction, the stages on Ray
Train and the joint stage.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from amalgam.data.pool import Pool
from amalgam.distributed.extract import (
    STATS_SIDE,
    ShardColumns,
    codecs_key,
    codes_key,
    outputs_key,
    read_prefix,
    run_pass,
    shard_table,
    sum_stats,
    taps_key,
)
from amalgam.distributed.store_source import StoreSource
from amalgam.engine.amalgamate import CodeStep, LinearCodec, TapStats, code_step, fit_pca
from amalgam.engine.run_local import TeacherPassResult, feature_taps
from amalgam.errors import AmalgamError
from amalgam.job import Job
from amalgam.store.codecs import load_codecs, save_codecs, stats_from_bytes
from amalgam.store.dataset import Dataset, DatasetWriter
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


def full_run_decoder(loc, codes: str, outputs: str) -> tuple[str, dict[str, list[int]]]:
    """(codecs key, teacher blocks per tap) of a full run's features: its codecs (named by its
    codes dataset) decode the code to the teachers' concatenated features, whose per-teacher
    channels its outputs dataset's statistics record."""
    fp = Dataset.open(loc, codes).manifest.fingerprints.get("codecs")
    if not fp or not loc.exists(f"{codecs_key(fp)}/codecs.json"):
        raise AmalgamError(f"{loc.uri_of(codes)}: its codecs are not in the store")
    ds = Dataset.open(loc, outputs)
    stats = stats_from_bytes(ds.read_side(ds.manifest.shards[0], STATS_SIDE))
    return codecs_key(fp), {tap: list(s.blocks) for tap, s in stats.items()}


def code_statistics(ds: Dataset, widths: dict[str, int], kinds: dict[str, str], num_rows: int) -> dict[str, TapStats]:
    """Exact statistics of a stored code (each tap cut to ``widths``), read shard by shard: no teacher runs."""
    if ds.manifest.num_rows != num_rows:
        raise AmalgamError(f"{ds.loc.uri_of(ds.key)}: {ds.manifest.num_rows} rows, the pool has {num_rows}")
    stats = {tap: TapStats([w], kinds[tap]) for tap, w in widths.items()}
    size = ds.manifest.shard_size
    for i in range(len(ds.manifest.shards)):
        rows = range(i * size, min(num_rows, (i + 1) * size))
        for tap, code in read_prefix(ds, widths, rows).items():
            stats[tap].update([code])
    return stats


class IncrementalSource(StoreSource):
    """The champion's stored codes and logits, plus passes of the new (added or changed) teachers only.

    ``base`` is the champion's :class:`amalgam.retrain.FeatureState` (what its student was
    trained from; with ``decoder_key`` and ``code_blocks`` when teachers are dropped or the
    step is DFA); ``new`` the names of the teachers to run (added, and the new versions of
    changed ones); ``drop`` the names of the champion's code teachers that leave the code
    (removed, and the old versions of changed ones); ``strategy`` the step's amalgamation.
    """

    name = "store (incremental: champion codes + new teachers)"

    def __init__(self, job: Job, teachers: list[Teacher], pool: Pool, log=print, address: str | None = None,
                 base=None, new: list[str] | None = None, drop: list[str] | None = None, strategy: str = "ifa"):
        if job.amalgamation.mode != "pca":
            raise AmalgamError(f"job {job.name}: field amalgamation.mode: incremental amalgamation needs pca")
        super().__init__(job, teachers, pool, log, address)
        new, drop = list(new or []), list(drop or [])
        if base is None or not (new or drop):
            raise AmalgamError("incremental amalgamation needs the champion's features and a teacher to add, "
                               "change or remove")
        if base.pool != self.pool_fp:
            raise AmalgamError(f"job {job.name}: the pool differs from the one the champion was trained on")
        names = set(new)
        self.base = base
        self.new = [t for t in teachers if t.name in names]
        if len(self.new) != len(names):
            raise AmalgamError(f"teacher {sorted(names - {t.name for t in teachers})[0]!r} is not in the zoo")
        old = [t.name for t in base.code_teachers]
        unknown = sorted(set(drop) - set(old))
        if unknown:
            raise AmalgamError(f"teacher {unknown[0]!r} is not in the champion's code")
        self.drop = [n for n in old if n in set(drop)]
        self.kept = [n for n in old if n not in set(drop)]
        self.strategy = strategy
        # The plain IFA step (nothing dropped) reads the code as it is; everything else reads
        # the old teachers' features through the champion's decoder.
        self.needs_decoder = bool(self.drop) or strategy == "dfa"
        if self.needs_decoder and (base.decoder_key is None or base.code_blocks is None):
            raise AmalgamError("the champion's code has no decoder to its teachers' features: "
                               "teachers can only be added to it, by IFA")
        new_names = [t.name for t in self.new]
        if strategy == "dfa":
            self.block_names = [*self.kept, *new_names]
        else:
            self.block_names = [*([PREVIOUS_CODE] if self.kept else []), *new_names]
        step = {"base_codes": base.codes_key, "base_widths": dict(sorted(base.code_widths.items())),
                "teachers": zoo_fingerprint([t.entry for t in self.new])}
        if self.needs_decoder:  # the plain IFA step keeps the fingerprint it always had
            step.update(drop=self.drop, strategy=strategy)
        self.increment_fp = _digest(step)
        self.steps: dict[str, CodeStep] = {}
        self.logits: torch.Tensor | None = None
        self.decoder_key: str | None = None
        self.code_blocks: dict[str, list[int]] | None = None

    def _increment_spec(self, kind: str, key: str, fingerprints: dict[str, str], codecs: str | None = None,
                        **extra):
        return self._spec(
            kind, key, {**fingerprints, "pool": self.pool_fp, "increment": self.increment_fp}, codecs,
            teachers=tuple(t.name for t in self.new), base_codes_key=self.base.codes_key,
            base_widths=dict(self.base.code_widths), **extra,
        )

    def _decoders(self) -> dict[str, LinearCodec] | None:
        """The champion's decoders to its code teachers' features, cut to the code widths it used."""
        if self.base.decoder_key is None or self.base.code_blocks is None:
            return None
        codecs, _ = load_codecs(self.loc, self.base.decoder_key)
        return {tap: c.prefix(self.base.code_widths[tap]) for tap, c in codecs.items() if tap in self.base.code_widths}

    def teacher_pass(self) -> TeacherPassResult:
        base_codes = Dataset.open(self.loc, self.base.codes_key)
        decoders = self._decoders()
        sources: list[tuple[Dataset | str, list[str], list[int]]] = []
        if self.new:
            # Single pass: the same forward keeps the new teachers' raw taps for the codes pass.
            raw = taps_key(self.increment_fp, self.pool_fp) if self.job.retrain.single_pass else None
            spec = self._increment_spec("outputs", outputs_key(self.increment_fp, self.pool_fp), {}, taps_key=raw)
            res = run_pass(spec, self.job, self.pool, [STATS_SIDE], self.log, teachers=self.teachers)
            self.teacher_forwards += res.teacher_forwards
            self.outputs, self.taps = res.dataset, res.taps
            y_stats = sum_stats(res.dataset)
            sources.append((res.dataset, [t.name for t in self.new], [len(t.entry.classes) for t in self.new]))
        else:  # only removals: the statistics of the stored code are all the step needs
            infos = {i.name: i for i in self.teachers[0].taps()}
            kinds = {tap: infos[tap].kind for tap in self.base.code_widths}
            y_stats = code_statistics(base_codes, dict(self.base.code_widths), kinds, len(self.pool))
            self.log(f"[retrain] statistics of champion's stored code read from {self.loc.uri_of(base_codes.key)} "
                     "(no teacher runs)")
        for tap, s in y_stats.items():
            if self.needs_decoder:
                old_blocks = self.base.code_blocks[tap]
                names = [t.name for t in self.base.code_teachers]
                keep = [i for i, n in enumerate(names) if n in set(self.kept)]
                self.steps[tap] = code_step(s, self.strategy, self.job.amalgamation.balance, decoders[tap],
                                            old_blocks, keep)
            elif decoders is not None and self.base.code_blocks is not None:
                self.steps[tap] = code_step(s, "ifa", self.job.amalgamation.balance, decoders[tap],
                                            self.base.code_blocks[tap])
            else:
                self.steps[tap] = code_step(s, "ifa", self.job.amalgamation.balance)
        self.y_channels = {tap: s.channels for tap, s in y_stats.items()}
        # Logits: the new teachers' pass first, then the champion's sources newest first, so a
        # changed teacher's logits are its new version's; a removed teacher's are not read.
        sources += [(s.key, s.teachers, s.classes) for s in self.base.logits]
        by_name: dict[str, torch.Tensor] = {}
        wanted = {t.name for t in self.teachers}
        for ds, names, classes in sources:
            if not (set(names) & wanted) - set(by_name):
                continue  # nothing this step still needs (a removed or superseded teacher's logits)
            if isinstance(ds, str):
                ds = Dataset.open(self.loc, ds)
            logits = read_logits(ds, len(self.pool))
            if logits.shape[1] != sum(classes):
                raise AmalgamError(f"{self.loc.uri_of(ds.key)}: {logits.shape[1]} logits, expected {sum(classes)}")
            for name, part in zip(names, logits.split(classes, 1)):
                if name in wanted:
                    by_name.setdefault(name, part)
        for t in self.teachers:
            if t.name not in by_name:
                raise AmalgamError(f"teacher {t.name}: no stored logits and not a new teacher")
            if by_name[t.name].shape[1] != len(t.entry.classes):
                raise AmalgamError(f"teacher {t.name}: stored logits have {by_name[t.name].shape[1]} classes, "
                                   f"the zoo lists {len(t.entry.classes)}")
        dropped = f"; {', '.join(self.drop)} dropped from the code" if self.drop else ""
        self.log(f"[retrain] logits of {len(self.teachers) - len(self.new)} old teachers read from the store, "
                 f"{len(self.new)} new teacher(s) run{dropped}; {self.strategy} step")
        self.logits = torch.cat([by_name[t.name] for t in self.teachers], 1)  # zoo order: the class space's
        return TeacherPassResult({tap: self.steps[tap].stats(s) for tap, s in y_stats.items()}, self.logits)

    def widths(self, stats: dict[str, TapStats]) -> dict[str, int]:
        """Each tap's width: the job's width of the *whole* zoo's concatenation (what a full run
        would use), at most the rank of the step's input (old code + new teachers)."""
        cfg = self.job.amalgamation
        infos = [{i.name: i for i in t.taps()} for t in self.teachers]
        full = {tap: sum(inf[tap].channels for inf in infos) for tap in feature_taps(self.teachers)}
        widths = {}
        for tap, s in stats.items():
            k = cfg.width_for(tap, full[tap])
            if cfg.max_energy:
                k = min(k, fit_pca(s, cfg.balance).energy_width(cfg.max_energy))
            widths[tap] = min(k, s.channels, self.y_channels[tap])
        return widths

    def fit(self, stats: dict[str, TapStats]) -> tuple[dict[str, LinearCodec], dict[str, list[float]]]:
        cfg = self.job.amalgamation
        widths = self.widths(stats)
        decodes = "teachers" if all(st.g_w is not None for st in self.steps.values()) else "code"
        meta = {"mode": "pca", "strategy": f"{self.strategy}-step", "balance": cfg.balance,
                "increment": self.increment_fp, "base_codes": self.base.codes_key, "pool": self.pool_fp,
                "widths": widths, "decodes": decodes}
        codec_fp = _digest(meta)
        ckey = codecs_key(codec_fp)
        # Fitted on the step's input z; stored composed with its map, to encode [code | new] directly.
        codecs = {tap: fit_pca(s, cfg.balance).codec(widths[tap]) for tap, s in stats.items()}
        if self.loc.exists(f"{ckey}/codecs.json"):
            self.log(f"[amalgamate] reusing codecs at {self.loc.uri_of(ckey)}")
        else:
            save_codecs(self.loc, ckey, {tap: self.steps[tap].input_codec(c) for tap, c in codecs.items()}, meta)
        stored, _ = load_codecs(self.loc, ckey)  # another job's may have been there first
        key = codes_key(codec_fp, self.pool_fp)
        if self.new:  # from the stored raw taps (no teacher), or a second forward of the new teachers
            raw = {"raw_key": self.taps.key} if self.taps is not None else {}
            spec = self._increment_spec("codes", key, {"codecs": codec_fp}, codecs=ckey, **raw)
            res = run_pass(spec, self.job, self.pool, [], self.log, teachers=self.teachers)
            self.teacher_forwards += res.teacher_forwards
            self.codes = res.dataset
        else:
            self.codes = self._map_codes(stored, key, {"codecs": codec_fp, "pool": self.pool_fp,
                                                       "increment": self.increment_fp})
        self.stored_widths = {tap: c.width for tap, c in stored.items()}
        if decodes == "teachers":
            self.decoder_key = ckey
            self.code_blocks = {tap: list(st.teacher_blocks) for tap, st in self.steps.items()}
        return codecs, {}

    def _map_codes(self, codecs: dict[str, LinearCodec], key: str, fingerprints: dict[str, str]) -> Dataset:
        """The codes pass with no teacher: the stored code through the step's encoder, in this process."""
        base = Dataset.open(self.loc, self.base.codes_key)
        writer = DatasetWriter(self.loc, key, "codes", fingerprints, len(self.pool), self.job.extraction.shard_size)
        if writer.committed():
            self.log(f"[extract] codes: reusing {self.loc.uri_of(key)} (no teacher run)")
            return Dataset.open(self.loc, key)
        done = writer.done_shards()
        with torch.no_grad():
            for i in range(writer.num_shards):
                if i in done:
                    continue
                rows = writer.shard_rows(i)
                pre = read_prefix(base, dict(self.base.code_widths), rows)
                codes = {tap: c.encode(pre[tap]).half() for tap, c in codecs.items()}
                cols = ShardColumns(self.logits[rows.start:rows.stop].contiguous(), codes, None)
                table, _ = shard_table("codes", rows, self.pool.ids, self.pool.images, cols)
                writer.write_shard(i, table)
        manifest = writer.commit()
        self.log(f"[extract] codes: {manifest.num_rows} rows mapped from champion's code (no teacher run) "
                 f"at {self.loc.uri_of(key)}")
        return Dataset.open(self.loc, key)

    def provenance(self) -> dict:
        out = super().provenance()
        new = [t.name for t in self.new]
        out["code_teachers"] = [*self.kept, *new]
        out["logits"] = [s.model_dump() for s in self.base.logits]
        if self.outputs is not None:  # newest first: it wins over an older source of the same teacher
            out["logits"].insert(0, {"key": self.outputs.key, "teachers": new,
                                     "classes": [len(t.entry.classes) for t in self.new]})
        out["increment"] = {"base_codes": self.base.codes_key, "base_widths": dict(self.base.code_widths),
                            "new_teachers": new, "dropped": self.drop, "strategy": self.strategy}
        out["decoder_key"] = self.decoder_key
        out["code_blocks"] = self.code_blocks
        return out
