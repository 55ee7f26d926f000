"""``amalgam retrain JOB``: scheduled retraining as the zoo grows, with a champion/challenger gate.

The previous state is the registry champion of the job's student line (the registry in the
job's store): its record lists the teachers (name, weights sha256) it was trained from, and
``features.json`` next to it (:class:`FeatureState`, written here when a retrain registers a
student) says where its features are in the store. The current zoo manifest is diffed
against it:

* nothing new, changed or removed: "nothing to do", exit 0, no teacher is loaded;
* no champion yet (or no ``features.json``: a student registered by hand): a full run;
* otherwise **incremental** amalgamation (:mod:`amalgam.distributed.incremental`) on the
  champion's stored codes and logits, which stand in for the old teachers: only added and
  changed teachers run, once over the training pool (statistics; their raw taps are kept and
  encoded for the codes with no teacher), or twice with ``retrain.single_pass: false``.

  - added: their features join the champion's code;
  - removed: the champion's decoder reconstructs every teacher from the code, so the kept
    teachers' features are its rows applied to the code; the removed teacher's rows (and its
    classes) simply leave. Removal alone runs no teacher at all;
  - changed (other weights): removed, then added again (only it runs).

  ``amalgamation.strategy`` is honoured: ``ifa`` amalgamates ``[previous code | new teachers]``;
  ``dfa`` one auto-encoder over every teacher, the old ones' Gram blocks (with each other and
  with the new teachers) read off the statistics of ``[stored code | new features]`` through the
  decoder (:data:`DFA_NOTE` says so once, kept in ``retrain.json`` and ``features.json``);
* a full run over the current zoo when the stored features cannot serve (the reason is
  printed): other pool or amalgamation settings, features gone from the store, or a
  champion whose code has no decoder to its teachers' features (an incremental student
  registered before decoders were kept) when a teacher must leave it.

Held-out slice: a fixed fraction of the job's pool (``retrain.holdout``, drawn with the job's
seed) is excluded from everything trained (statistics, codecs, calibration, stages, joint),
so the challenger and the champion are both scored on images neither saw. Each teacher's
logits on it are computed once and kept in the store (``holdout/<teacher>/<slice>/``), so an
old teacher is never re-run for it either.

Judging: by default label-free, the fidelity of each student to each teacher on the held-out
slice (task-aware agreement: the student's argmax within that teacher's classes equals the
teacher's argmax); with ``retrain.evaluation: labelled``, task-aware accuracy on
``evaluation.test``. Both students are scored now, on the same images, against the current
teachers. The challenger is promoted only if it covers every class of the zoo and no sub-task
it shares with the champion drops by more than ``retrain.tolerance``
(:func:`amalgam.registry.judge`); otherwise it stays registered as a rejected challenger with
the reason. ``--dry-run`` prints the diff and what would be run, trained and compared, and
writes nothing.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict

from amalgam.errors import AmalgamError, parse_json_object, validate_as
from amalgam.job import Job
from amalgam.registry import Registry, RecordMetrics, StudentRecord, finite_or_none, judge

Log = Callable[[str], None]
FEATURES_JSON = "features.json"
STATE_VERSION = 1
# An incremental DFA step sees the old teachers only through the champion's code: it says so.
DFA_NOTE = ("dfa over every teacher: the old teachers' features are reconstructed from the champion's "
            "stored code (no old teacher runs)")
# A champion whose code cannot be decoded to its teachers' features can only be grown by IFA.
NO_DECODER_NOTE = ("dfa requested; the champion's code has no decoder to its teachers' features, so "
                   "retrain amalgamates incrementally (IFA); run a full `amalgam run` for DFA")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogitSource(_Strict):
    key: str  # an extraction dataset in the store (its ``logits`` column)
    teachers: list[str]  # whose logits, in column order
    classes: list[int]  # logit columns of each


class CodeTeacher(_Strict):
    name: str
    fingerprint: str  # amalgam.store.fingerprint.teacher_fingerprint: weights, architecture, taps, input


class FeatureState(_Strict):
    """What a registered student was trained from, in the store: ``versions/<N>/features.json``."""

    version: int = STATE_VERSION
    kind: Literal["full", "incremental"]
    base_version: int | None = None  # incremental: the champion it grew from
    pool: str  # fingerprint of the training pool (the job's pool less the held-out slice)
    holdout: str  # fingerprint of the held-out slice
    codes_key: str
    code_widths: dict[str, int]  # the widths the student used: a prefix of the stored codes
    code_teachers: list[CodeTeacher]  # whose features the codes encode
    logits: list[LogitSource]
    amalgamation: dict  # the job's amalgamation section
    strategy: Literal["dfa", "ifa"] | None = None  # how these codes were made (None: written before it was kept)
    note: str | None = None  # e.g. DFA_NOTE: how the strategy was carried out
    # Codecs in the store whose decoders map the code (cut to ``code_widths``) to the code
    # teachers' concatenated features, and each teacher's channels per tap (``code_teachers``
    # order): what lets a later retrain drop or change a teacher without running the others.
    # None: not kept (a full run's are found from its datasets; an older incremental one has none).
    decoder_key: str | None = None
    code_blocks: dict[str, list[int]] | None = None


# ------------------------------------------------------------------------------------------ planning

@dataclass
class ZooDiff:
    unchanged: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def nothing(self) -> bool:
        return not (self.new or self.changed or self.removed)

    def lines(self) -> list[str]:
        return [f"  {label}: {', '.join(names) if names else '-'}" for label, names in
                (("unchanged", self.unchanged), ("new", self.new), ("changed", self.changed), ("removed", self.removed))]


def diff_zoo(champion: StudentRecord | None, entries: list) -> ZooDiff:
    """Champion teachers (name, sha256, classes) against the zoo's entries, in zoo order."""
    if champion is None:
        return ZooDiff(new=[e.name for e in entries])
    old = {t.name: t for t in champion.teachers}
    d = ZooDiff()
    for e in entries:
        t = old.get(e.name)
        if t is None:
            d.new.append(e.name)
        elif t.sha256 != e.sha256 or list(t.classes) != list(e.classes):
            d.changed.append(e.name)
        else:
            d.unchanged.append(e.name)
    names = {e.name for e in entries}
    d.removed = [t.name for t in champion.teachers if t.name not in names]
    return d


@dataclass
class Plan:
    mode: Literal["nothing", "full", "incremental"]
    reason: str
    diff: ZooDiff
    champion: StudentRecord | None = None
    epoch: int = 0  # champion log epoch read (0: none): the compare-and-swap of the promotion
    state: FeatureState | None = None
    note: str | None = None  # said once in the log and kept in retrain.json and features.json
    step_strategy: str | None = None  # set when an incremental step cannot do what the job asks

    def strategy(self, job: Job) -> str:
        """The amalgamation strategy this plan carries out."""
        return self.step_strategy or job.amalgamation.strategy

    @property
    def run(self) -> list[str]:
        """The teachers an incremental step runs: added and changed ones."""
        return [*self.diff.new, *self.diff.changed]

    @property
    def drop(self) -> list[str]:
        """The champion's teachers an incremental step drops from its code: removed and changed ones."""
        return [*self.diff.removed, *self.diff.changed]


def holdout_split(n: int, fraction: float, seed: int):
    """(training rows, held-out rows): int64 indices, sorted; the same for the same n, fraction, seed."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(n - 1, max(1, round(n * fraction)))
    return perm[k:].sort().values, perm[:k].sort().values


def read_state(reg: Registry, version: int) -> FeatureState | None:
    rel = f"{reg.base}/versions/{version:06d}/{FEATURES_JSON}"
    if not reg.loc.exists(rel):
        return None
    where = reg.loc.uri_of(rel)
    return validate_as(FeatureState, parse_json_object(reg.loc.read_bytes(rel), where, "feature state"), where)


def write_state(reg: Registry, version: int, state: FeatureState) -> None:
    reg.loc.write_bytes(f"{reg.base}/versions/{version:06d}/{FEATURES_JSON}",
                        (json.dumps(state.model_dump(mode="json"), indent=1) + "\n").encode())


def _without_strategy(amalgamation: dict) -> dict:
    # The strategy says how a step amalgamates, not what the stored codes are: either can extend them.
    return {k: v for k, v in amalgamation.items() if k != "strategy"}


def with_decoder(loc, state: FeatureState) -> FeatureState:
    """``state`` with ``decoder_key`` and ``code_blocks`` filled in where they can be found: a
    full run's codecs decode to its teachers' features (found from its codes and outputs
    datasets); an incremental state has them only if it kept them."""
    if state.decoder_key is not None and state.code_blocks is not None:
        return state
    if state.kind != "full" or not state.logits:
        return state
    from amalgam.distributed.incremental import full_run_decoder

    try:
        key, blocks = full_run_decoder(loc, state.codes_key, state.logits[0].key)
    except (AmalgamError, KeyError, IndexError):
        return state
    return state.model_copy(update={"decoder_key": key, "code_blocks": blocks})


def _incremental_blocker(job: Job, reg: Registry, plan: Plan, entries: dict, pool_fp: str) -> str | None:
    """Why the champion's stored features cannot serve this step (None: they can).

    May fill in ``plan.state``'s decoder, and fall back to an IFA step (``plan.step_strategy``,
    ``plan.note``) when DFA is asked of a code that cannot be decoded and no teacher leaves it.
    """
    from amalgam.store.fingerprint import teacher_fingerprint

    st, v = plan.state, plan.champion.version
    if st is None:
        return f"champion v{v} has no {FEATURES_JSON} (registered by hand?), its features are unknown"
    if st.pool != pool_fp:
        return f"the training pool differs from champion v{v}'s (job pool or retrain.holdout changed)"
    if _without_strategy(st.amalgamation) != _without_strategy(job.amalgamation.model_dump(mode="json")):
        return f"the job's amalgamation section differs from champion v{v}'s"
    if job.amalgamation.mode != "pca":
        return "incremental amalgamation needs amalgamation.mode pca"
    drop = set(plan.drop)
    if not {t.name for t in st.code_teachers} - drop and not plan.run:
        return f"no teacher of champion v{v}'s codes is left"
    for t in st.code_teachers:
        if t.name in drop:
            continue
        if t.name not in entries or teacher_fingerprint(entries[t.name]) != t.fingerprint:
            return f"teacher {t.name} of champion v{v}'s codes is no longer in the zoo as it was"
    for key in [st.codes_key, *(s.key for s in st.logits)]:
        if not reg.loc.exists(f"{key}/manifest.json"):
            return f"champion v{v}'s features are no longer in the store ({reg.loc.uri_of(key)})"
    st = plan.state = with_decoder(reg.loc, st)
    decodable = (st.decoder_key is not None and st.code_blocks is not None
                 and reg.loc.exists(f"{st.decoder_key}/codecs.json"))
    if not decodable:
        if plan.drop:
            return (f"champion v{v}'s code has no decoder to its teachers' features (an incremental student "
                    f"registered before they were kept), so {', '.join(plan.drop)} cannot leave it")
        if job.amalgamation.strategy == "dfa":
            plan.step_strategy, plan.note = "ifa", NO_DECODER_NOTE
    return None


def make_plan(job: Job, reg: Registry, entries: list, pool_fp: str | None) -> Plan:
    """The diff and what to do. ``pool_fp`` (training pool) may be None only when nothing changed."""
    head = reg.head()
    champion = reg.record(head.version) if head else None
    diff = diff_zoo(champion, entries)
    epoch = head.epoch if head else 0
    if champion is None:
        return Plan("full", "no champion yet", diff, None, epoch)
    if diff.nothing:
        return Plan("nothing", f"the zoo has the teachers champion v{champion.version} was trained on", diff,
                    champion, epoch)
    plan = Plan("full", "", diff, champion, epoch, read_state(reg, champion.version))
    assert pool_fp is not None
    blocker = _incremental_blocker(job, reg, plan, {e.name: e for e in entries}, pool_fp)
    if blocker:
        plan.reason = blocker
        return plan
    plan.mode = "incremental"
    what = [f"{label} {', '.join(names)}" for label, names in
            (("added", diff.new), ("removed", diff.removed), ("changed", diff.changed)) if names]
    runs = f"only {', '.join(plan.run)} run" if plan.run else "no teacher runs"
    plan.reason = (f"{'; '.join(what)}: {plan.strategy(job).upper()} step on champion v{champion.version}'s "
                   f"stored codes, {runs}")
    if plan.strategy(job) == "dfa":
        plan.note = DFA_NOTE
    return plan


# ----------------------------------------------------------------------------------- holdout logits

def holdout_key(teacher_fp: str, holdout_fp: str) -> str:
    from amalgam.store.fingerprint import short

    return f"holdout/{short(teacher_fp)}/{short(holdout_fp)}/logits.safetensors"


def holdout_missing(loc, entries: list, holdout_fp: str) -> list[str]:
    from amalgam.store.fingerprint import teacher_fingerprint

    return [e.name for e in entries if not loc.exists(holdout_key(teacher_fingerprint(e), holdout_fp))]


def holdout_logits(loc, zoo_path: Path, entries: list, holdout, log: Log) -> tuple[dict, int]:
    """Each teacher's logits on the held-out images: from the store, or computed once and stored there.

    Returns (name -> [n, classes] tensor, teacher forwards done here).
    """
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from amalgam.engine.evaluate import predict_logits
    from amalgam.store.fingerprint import teacher_fingerprint
    from amalgam.zoo.manifest import load_teacher

    hfp = holdout.fingerprint()
    out, forwards = {}, 0
    for e in entries:
        rel = holdout_key(teacher_fingerprint(e), hfp)
        if loc.exists(rel):
            out[e.name] = st_load(loc.read_bytes(rel))["logits"]
            continue
        teacher = load_teacher(e, Path(zoo_path).parent)
        out[e.name] = predict_logits(teacher, holdout.images)
        forwards += len(holdout)
        loc.write_bytes(rel, st_save({"logits": out[e.name].contiguous()}))
    if forwards:
        ran = forwards // len(holdout)
        rest = f"; the other {len(entries) - ran}'s logits read from the store" if ran < len(entries) else ""
        log(f"[retrain] held-out slice: {forwards} teacher forwards ({ran} teacher(s) x {len(holdout)} images){rest}")
    return out, forwards


# ----------------------------------------------------------------------------------------- judging

def task_fidelity(student_logits, classes: list[str], teachers: list[dict], teacher_logits: dict,
                  zoo_classes: dict[str, list[str]]) -> dict[str, float]:
    """Per teacher: agreement of the student's argmax within that teacher's classes with the teacher's argmax.

    ``teachers`` are the student's own ``[{"name", "classes"}]`` (its output order); a teacher is
    scored only if it is in the zoo with the same class list.
    """
    out = {}
    for t in teachers:
        name = t["name"]
        if name not in teacher_logits or list(zoo_classes.get(name, [])) != list(t["classes"]):
            continue
        cols = [classes.index(c) for c in t["classes"]]
        mine = student_logits[:, cols].argmax(1)
        out[name] = float((mine == teacher_logits[name].argmax(1)).float().mean())
    return out


def load_registered_student(reg: Registry, version: int):
    """A registered version's student (verified as any student): copied out of the store to a temp dir."""
    from amalgam.student_io import STUDENT_JSON, load_student, read_student_manifest

    vdir = f"{reg.base}/versions/{version:06d}"
    with tempfile.TemporaryDirectory(prefix="amalgam-champion-") as d:
        (Path(d) / STUDENT_JSON).write_bytes(reg.loc.read_bytes(f"{vdir}/{STUDENT_JSON}"))
        manifest, _ = read_student_manifest(d)
        (Path(d) / manifest.weights).write_bytes(reg.loc.read_bytes(f"{vdir}/{manifest.weights}"))
        model, classes, _ = load_student(d)
    return model, classes, manifest.teachers


def add_student_metrics(run_dir: Path, metrics: dict) -> None:
    """Add figures to ``student.json``'s metrics (the weights and their hash are untouched)."""
    from amalgam.student_io import read_student_manifest

    manifest, path = read_student_manifest(run_dir)
    manifest = manifest.model_copy(update={"metrics": {**manifest.metrics, **metrics}})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- run

@dataclass
class Outcome:
    mode: str
    reason: str
    diff: ZooDiff
    version: int | None = None  # the challenger's registered version
    promoted: bool | None = None
    decision: str | None = None
    teacher_forwards: int = 0
    run_dir: Path | None = None
    report: dict = field(default_factory=dict)
    result: object = None  # the run's RunResult


def _expected_forwards(plan: Plan, entries: list, n_train: int, n_hold: int, hold_missing: list[str],
                       single_pass: bool = True) -> tuple[int, str]:
    run = plan.run if plan.mode == "incremental" else [e.name for e in entries]
    # An incremental step keeps the new teachers' raw taps and encodes them (retrain.single_pass).
    one = plan.mode == "incremental" and single_pass
    passes = "1 pass (statistics; codes from the stored raw taps)" if one else "2 passes (statistics, codes)"
    extraction = len(run) * n_train * (1 if one else 2)
    total = extraction + len(hold_missing) * n_hold
    if run:
        what = (f"{', '.join(run)} on {n_train} training images x {passes} = {extraction}"
                + (" at most (datasets already in the store are reused)" if plan.mode == "full" else ""))
    else:
        what = "none on the training images (the champion's stored code and logits serve) = 0"
    if plan.mode == "incremental" and plan.drop:
        what += f"; dropped from the code: {', '.join(plan.drop)} (no forward)"
    what += f"; held-out slice: {', '.join(hold_missing) or 'none'} on {n_hold} images = {len(hold_missing) * n_hold}"
    return total, what


def retrain(job: Job, out: Path, address: str | None = None, dry_run: bool = False, log: Log = print,
            phase=None, epoch_end=None) -> Outcome:
    from amalgam.zoo.manifest import read_manifest

    manifest = read_manifest(job.zoo_path())
    reg = Registry.open(job.store_uri(), job.name, job.store.s3)
    head = reg.head()
    champion = reg.record(head.version) if head else None
    early = diff_zoo(champion, manifest.teachers)
    if champion is not None and early.nothing:
        log(f"[retrain] job {job.name}: zoo {manifest.name} has the {len(champion.teachers)} teachers champion "
            f"v{champion.version} was trained on: nothing to do (teacher forwards: 0)")
        return Outcome("nothing", "no teacher added, changed or removed", early)

    from amalgam.data.pool import build_pool

    full = build_pool(job.pool, input_shape=manifest.teachers[0].input.shape, log=log)
    train_idx, held_idx = holdout_split(len(full), job.retrain.holdout, job.seed)
    train_pool, holdout = full.subset(train_idx), full.subset(held_idx)
    plan = make_plan(job, reg, manifest.teachers, train_pool.fingerprint())
    space = manifest.class_space()
    hold_missing = holdout_missing(reg.loc, manifest.teachers, holdout.fingerprint())
    expected, what = _expected_forwards(plan, manifest.teachers, len(train_pool), len(holdout), hold_missing,
                                        job.retrain.single_pass)
    champ = f"champion v{plan.champion.version} ({len(plan.champion.teachers)} teachers)" if plan.champion else "no champion"
    log(f"[retrain] job {job.name}: {champ}; zoo {manifest.name}: {len(manifest.teachers)} teachers")
    for line in plan.diff.lines():
        log(line)
    log(f"[retrain] plan: {plan.mode} amalgamation ({plan.reason})")
    if plan.note:
        log(f"[retrain] {plan.note}")
    log(f"[retrain] teachers to run: {what}; total {expected} teacher forwards")
    log(f"[retrain] train: a student of {len(space)} classes on {len(train_pool)} pool images "
        f"(stages {job.stages.epochs} epochs, joint {job.joint.epochs} epochs); {len(holdout)} images held out")
    how = ("fidelity to each teacher on the held-out slice" if job.retrain.evaluation == "fidelity"
           else "task-aware accuracy on evaluation.test")
    against = f"champion v{plan.champion.version}" if plan.champion else "no champion (promoted if it covers the zoo)"
    log(f"[retrain] compare: {how} against {against}, tolerance {job.retrain.tolerance:g}")
    outcome = Outcome(plan.mode, plan.reason, plan.diff)
    if dry_run:
        log("[retrain] dry run: nothing extracted, trained or written")
        return outcome
    return _execute(job, out, address, log, phase, reg, manifest, plan, train_pool, holdout, outcome, epoch_end)


def _execute(job, out, address, log, phase, reg, manifest, plan, train_pool, holdout, outcome, epoch_end=None) -> Outcome:
    from amalgam.distributed.incremental import IncrementalSource
    from amalgam.distributed.store_source import StoreSource
    from amalgam.engine.evaluate import evaluate_logits, predict_logits
    from amalgam.engine.run_local import run_local
    from amalgam.classes import ClassSpace
    from amalgam.store.fingerprint import teacher_fingerprint

    t0 = time.perf_counter()
    if plan.mode == "incremental":
        def factory(j, teachers, pool, lg):
            return IncrementalSource(j, teachers, pool, lg, address, base=plan.state, new=plan.run,
                                     drop=plan.drop, strategy=plan.strategy(job))
    else:
        def factory(j, teachers, pool, lg):
            return StoreSource(j, teachers, pool, lg, address)
    result = run_local(job, out, log, source_factory=factory, phase=phase, pool=train_pool, epoch_end=epoch_end)
    prov = result.extra["feature_store"]
    extraction_forwards = int(result.extra["teacher_forwards"])
    entries = {e.name: e for e in manifest.teachers}

    # Score the challenger (and the champion, now, on the same images and teachers).
    zoo_classes = {e.name: list(e.classes) for e in manifest.teachers}
    hold, hold_forwards = holdout_logits(reg.loc, job.zoo_path(), manifest.teachers, holdout, log)
    challenger_teachers = [{"name": e.name, "classes": list(e.classes)} for e in manifest.teachers]
    space = manifest.class_space()
    chal_logits = predict_logits(result.student, holdout.images)
    chal_fid = task_fidelity(chal_logits, list(space.names), challenger_teachers, hold, zoo_classes)
    final = result.results[-1].metrics
    chal_metrics = RecordMetrics(fidelity=chal_fid) if job.retrain.evaluation == "fidelity" else \
        RecordMetrics(task_aware={k: finite_or_none(v) for k, v in final.task_aware.items()})
    champ_metrics, champ_fid = None, None
    if plan.champion is not None:
        model, classes, teachers = load_registered_student(reg, plan.champion.version)
        champ_fid = task_fidelity(predict_logits(model, holdout.images), classes, teachers, hold, zoo_classes)
        if job.retrain.evaluation == "fidelity":
            champ_metrics = RecordMetrics(fidelity=champ_fid)
        else:
            from amalgam.data.pool import build_pool

            test = build_pool(job.evaluation.test, input_shape=manifest.teachers[0].input.shape, log=log)
            cspace = ClassSpace.from_teachers([(t["name"], t["classes"]) for t in teachers])
            m = evaluate_logits(predict_logits(model, test.images), cspace.remap(test.class_names, test.labels), cspace)
            champ_metrics = RecordMetrics(task_aware={k: finite_or_none(v) for k, v in m.task_aware.items()})
    add_student_metrics(out, {**{f"fidelity/{k}": v for k, v in chal_fid.items()}, "holdout_images": len(holdout)})

    # Register, remember the features, judge.
    rec = reg.register(out, zoo=job.zoo_path())
    state = FeatureState(
        kind=plan.mode, base_version=plan.champion.version if plan.mode == "incremental" else None,
        pool=prov["pool"], holdout=holdout.fingerprint(), codes_key=prov["codes_key"],
        code_widths=dict(result.extra["student_widths"]),
        code_teachers=[CodeTeacher(name=n, fingerprint=teacher_fingerprint(entries[n])) for n in prov["code_teachers"]],
        logits=[LogitSource(**s) for s in prov["logits"]], amalgamation=job.amalgamation.model_dump(mode="json"),
        strategy=plan.strategy(job), note=plan.note,
        decoder_key=prov.get("decoder_key"), code_blocks=prov.get("code_blocks"),
    )
    if plan.mode == "full":  # a full run's codecs decode to its teachers: found now, kept with the state
        state = with_decoder(reg.loc, state)
    write_state(reg, rec.version, state)
    covered = set(space.names) <= set(rec.classes)
    decision = judge(chal_metrics, champ_metrics, covered, job.retrain.tolerance)
    if decision.promote:
        vs = f" against v{plan.champion.version}" if plan.champion else ""
        reg.promote(rec.version, f"retrain judged{vs}: {decision.reason}", expected_epoch=plan.epoch)
    else:
        reg.reject(rec.version, decision.reason)  # kept as a challenger, with the reason
    forwards = extraction_forwards + hold_forwards
    report = {
        "job": job.name, "mode": plan.mode, "reason": plan.reason,
        "amalgamation": {"requested": job.amalgamation.strategy, "done": plan.strategy(job), "note": plan.note},
        "diff": {k: getattr(plan.diff, k) for k in ("unchanged", "new", "changed", "removed")},
        "champion": plan.champion.version if plan.champion else None, "version": rec.version,
        "promoted": decision.promote, "decision": decision.reason,
        "evaluation": job.retrain.evaluation, "tolerance": job.retrain.tolerance,
        "challenger": chal_metrics.model_dump(), "champion_now": champ_metrics.model_dump() if champ_metrics else None,
        "fidelity": {"challenger": chal_fid, "champion": champ_fid},
        "teacher_forwards": {"extraction": extraction_forwards, "holdout": hold_forwards, "total": forwards},
        "train_images": len(train_pool), "holdout_images": len(holdout),
        "comprehensive": final.comprehensive, "task_aware": dict(final.task_aware),
        "classes": len(space), "seconds": round(time.perf_counter() - t0, 2),
    }
    (Path(out) / "retrain.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    verdict = "promoted" if decision.promote else "rejected (kept as a challenger)"
    log(f"[retrain] registered v{rec.version} ({len(rec.classes)} classes): {verdict}: {decision.reason}")
    log(f"[retrain] teacher forwards: {forwards} (extraction {extraction_forwards}, held-out slice {hold_forwards})")
    outcome.version, outcome.promoted, outcome.decision = rec.version, decision.promote, decision.reason
    outcome.teacher_forwards, outcome.run_dir, outcome.report = forwards, Path(out), report
    outcome.result = result
    return outcome
