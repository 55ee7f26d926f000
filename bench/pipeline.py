"""The cached pipeline (teachers once, into the store) vs an online one (teachers in every step).

Existing amalgamation libraries run the teachers inside every training step. We run them
once on Ray, store compact codes, and train from the store. Which is faster depends on how
expensive a teacher forward is compared with reading a stored code, and on how many epochs
train from it. For the demo zoo and wider versions of it (same family, every layer x2 and
x4 wide: about 4x and 16x the teacher MACs; random weights, which cost the same as trained
ones), on the same pool and the same stage epochs, this prints:

- online: one statistics pass + E stage epochs whose batches come from live teachers, then
  J joint epochs whose teacher logits come from live teachers (one logits forward of every
  teacher per sample per epoch, as a KD loop that runs its teachers in the step does)
- cached: Ray extraction (statistics + codes + logits into the Parquet store) + E stage epochs
  from the store, then J joint epochs on the stored logits
- per sample: teacher forward + encode vs stored-code read, and the break-even stage epoch
  count ((extraction - statistics pass) / per-epoch saving) after which the store pays, alone
  and with the J joint epochs' teacher-logit passes (which the store also saves) counted.

Both sides fit the same stages with the engine's ``fit_stages`` in this process (2 threads).
The joint stage's student training is the same work on both sides (same student, images,
targets and epochs), so it is timed once (``train_end_to_end``, J epochs) and added to both;
what differs is the online side's J teacher-logit passes, each timed. E and J default to the
demo job's (``jobs/mnist-fashion-4.yaml``). The Ray cluster is started before timing (its
start-up is a one-off per session, not per job).

    .venv/bin/python bench/pipeline.py [--pool-per-dataset 2000] [--epochs E] [--joint-epochs J] [--scales 1 2 4]
        [--depth D] [--fixed-student]

``--depth D`` makes the teachers deeper instead (or as well): D convs per conv unit, the
extra ones at the unit's width, so a teacher forward costs more while its taps, and with
them the statistics, the stored codes and the (pinned) student, stay the demo's
(D = 5: about 12x the demo teachers' MACs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def scaled_zoo(src_zoo: Path, out: Path, scale: int, depth: int = 1) -> Path:
    """The demo zoo with every hidden layer ``scale`` x wider and ``depth`` convs per conv unit
    (``depth - 1`` extra convs at the unit's width before the tapped one: the teacher's cost
    grows, its taps, statistics and stored codes do not); random weights, same classes and taps."""
    from amalgam.zoo.arch import TappedCNN
    from amalgam.zoo.manifest import TapSpec, ZooManifest, load_zoo, save_weights, write_manifest

    manifest, teachers = load_zoo(src_zoo)
    if scale == 1 and depth == 1:
        return src_zoo
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (e, t) in enumerate(zip(manifest.teachers, teachers)):
        cfg = t.net.config
        cfg = cfg.with_widths([w * scale for w in cfg.conv_widths + cfg.fc_widths] + [cfg.num_classes])
        cfg = cfg.model_copy(update={"depth": depth})
        torch.manual_seed(i)
        net = TappedCNN(cfg)
        digest = save_weights(net, out / f"{e.name}.safetensors")
        entries.append(e.model_copy(update={"arch_args": cfg.model_dump(), "weights": f"{e.name}.safetensors",
                                            "sha256": digest, "taps": [TapSpec(**x.as_dict()) for x in net.feature_info()]}))
    suffix = f"-x{scale}" + (f"-d{depth}" if depth > 1 else "")
    write_manifest(ZooManifest(name=f"{manifest.name}{suffix}", teachers=entries), out / "zoo.yaml")
    return out / "zoo.yaml"


def absolute_widths(zoo: Path, ratio: float, names: list[str] | None = None) -> dict[str, int]:
    """Per-tap widths ``ratio`` x the concatenated channels of ``names`` (default: every teacher)
    in ``zoo``: what a width ratio resolves to there, as absolute widths, so a wider zoo trains
    and stores the very same student (also bench/retrain.py's pinned student)."""
    from amalgam.zoo.manifest import read_manifest

    teachers = [t for t in read_manifest(zoo).teachers if names is None or t.name in names]
    taps = [t.name for t in teachers[0].taps][:-1]  # all but the logits
    return {tap: max(1, round(ratio * sum(next(x.channels for x in t.taps if x.name == tap) for t in teachers)))
            for tap in taps}


def fixed_widths(job) -> dict[str, int]:
    """The job's width ratio of its (x1) zoo, as absolute widths."""
    return absolute_widths(job.zoo_path(), float(job.amalgamation.widths.get("default", 0.4)))


def drain(batches, epochs: int) -> float:
    t0 = time.perf_counter()
    for e in range(epochs):
        for _ in batches(e):
            pass
    return time.perf_counter() - t0


def measure(job, log, joint_epochs: int) -> dict:
    from amalgam.data.pool import build_pool
    from amalgam.distributed.store_source import StoreSource
    from amalgam.engine.calibrate import fit_calibration
    from amalgam.engine.evaluate import count_macs, predict_logits
    from amalgam.engine.joint import train_end_to_end
    from amalgam.engine.run_local import OnlineSource, pool_input_spec
    from amalgam.engine.stages import build_stages, fit_stages, stage_specs
    from amalgam.engine.student import build_student, common_topology, student_config
    from amalgam.zoo.manifest import Normalize, load_zoo

    manifest, teachers = load_zoo(job.zoo_path())
    space = manifest.class_space()
    pool = build_pool(job.pool)
    spec = pool_input_spec(pool)
    norm = Normalize(spec.mean, spec.std)
    epochs, bs = job.stages.epochs, job.stages.batch_size
    steps = -(-len(pool) // bs)
    teacher_macs = sum(count_macs(t, tuple(spec.shape)) for t in teachers)

    def train(source, codecs, targets, tp) -> float:
        widths = {t: c.width for t, c in codecs.items()}
        cfg = student_config(common_topology([t.name for t in teachers], [t.net.config for t in teachers]),
                             widths, len(space))
        torch.manual_seed(0)
        skeleton = build_student(cfg)
        nets = build_stages(skeleton)
        tv = {t: float(c.code_moments(tp.stats[t])[1].mean()) for t, c in codecs.items()}
        tv["head"] = float(targets.var(0).mean())
        batches = source.epoch_batches(codecs, targets, norm, bs, job.seed)
        t0 = time.perf_counter()
        fit_stages(stage_specs(skeleton), nets, tv, batches, epochs, steps, job.stages.lr, True, log)
        return time.perf_counter() - t0

    # Online: the statistics pass, then every epoch's batches from live teachers.
    online = OnlineSource(job, teachers, pool, log)
    t0 = time.perf_counter()
    tp = online.teacher_pass()
    codecs, _ = online.fit(tp.stats)
    online_prep = time.perf_counter() - t0
    targets = fit_calibration(tp.logits, space.slices, job.calibration)(tp.logits)
    online_train = train(online, codecs, targets, tp)
    online_batches = drain(online.epoch_batches(codecs, targets, norm, bs, job.seed), 1)

    # Cached: Ray extraction into a fresh store, then every epoch from the store.
    cached = StoreSource(job, teachers, pool, log)
    t0 = time.perf_counter()
    tp_c = cached.teacher_pass()
    codecs_c, _ = cached.fit(tp_c.stats)
    extract = time.perf_counter() - t0
    cached_train = train(cached, codecs_c, targets, tp_c)
    cached_batches = drain(cached.epoch_batches(codecs_c, targets, norm, bs, job.seed), 1)
    n = len(pool)
    saving = (online_batches - cached_batches) / n  # per sample per epoch

    # Joint stage: the online side runs every teacher for logits in each of J epochs; the
    # student's training is the same work on both sides (timed once, added to both).
    # At the joint batch size: a KD loop runs its teachers on each training batch.
    t0 = time.perf_counter()
    for t in teachers:
        predict_logits(t, pool.images, batch=job.joint.batch_size)
    logits_epoch = time.perf_counter() - t0
    torch.manual_seed(0)
    student = build_student(student_config(common_topology([t.name for t in teachers], [t.net.config for t in teachers]),
                                           {t: c.width for t, c in codecs.items()}, len(space)))
    t0 = time.perf_counter()
    train_end_to_end(student, pool.images, space.to_union(targets), "kd", joint_epochs, job.joint.lr, job.joint.batch_size,
                     job.joint.temperature, job.seed, log=lambda _m: None)
    joint_train = time.perf_counter() - t0
    online_joint = joint_epochs * logits_epoch + joint_train
    return {
        "teacher_macs": teacher_macs, "online": online_prep + online_train + online_joint,
        "cached": extract + cached_train + joint_train, "joint_train": joint_train,
        "logits_epoch": logits_epoch, "stages_online": online_prep + online_train, "stages_cached": extract + cached_train,
        "extract": extract, "online_prep": online_prep, "teacher_us": 1e6 * online_batches / n,
        "read_us": 1e6 * cached_batches / n,
        "break_even_epochs": (extract - online_prep) / (saving * n) if saving > 0 else float("inf"),
        # ... and counting the J joint epochs' teacher-logit passes the store also saves.
        "break_even_with_joint": max(0.0, (extract - online_prep - joint_epochs * logits_epoch) / (saving * n))
        if saving > 0 else float("inf"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-per-dataset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, help="stage epochs (default: the demo job's)")
    ap.add_argument("--joint-epochs", type=int, help="joint epochs (default: the demo job's)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--depth", type=int, default=1,
                    help="convs per conv unit of every teacher (deeper preset: depth - 1 extra convs before each "
                         "tapped one; the taps, the statistics, the stored codes and the student do not change)")
    ap.add_argument("--fixed-student", action="store_true",
                    help="pin the student's per-tap widths to the x1 zoo's (teacher cost the only variable); "
                         "default: the job's width ratio, so the student widens with the teachers")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(2)

    from amalgam.distributed.extract import ensure_ray
    from amalgam.job import load_job

    ensure_ray()
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    base = load_job(ROOT / "jobs/mnist-fashion-4.yaml")
    epochs = args.epochs if args.epochs is not None else base.stages.epochs
    joint_epochs = args.joint_epochs if args.joint_epochs is not None else base.joint.epochs
    rows = []
    try:
        for scale in args.scales:
            job = base.model_copy(deep=True)
            for src in job.pool.sources:
                src.count = args.pool_per_dataset
            job.stages.epochs = epochs
            job.zoo = str(scaled_zoo(base.zoo_path(), scratch / f"zoo-x{scale}", scale, args.depth))
            job.store.uri = str(scratch / f"store-x{scale}")
            if args.fixed_student:
                job.amalgamation.widths = fixed_widths(base)
            r = measure(job, lambda _m: None, joint_epochs)
            rows.append((scale, r))
            print(f"x{scale}: online {r['online']:.1f}s (statistics pass {r['online_prep']:.1f} + stage epochs "
                  f"{r['stages_online'] - r['online_prep']:.1f} + joint {r['online'] - r['stages_online']:.1f}), "
                  f"cached {r['cached']:.1f}s (extraction {r['extract']:.1f} + stage epochs "
                  f"{r['stages_cached'] - r['extract']:.1f} + joint {r['joint_train']:.1f})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from amalgam.engine.evaluate import count_macs
    from amalgam.zoo.manifest import load_zoo

    demo_manifest, demo_teachers = load_zoo(base.zoo_path())  # MACs relative to the demo zoo's
    base_macs = sum(count_macs(t, tuple(e.input.shape)) for e, t in zip(demo_manifest.teachers, demo_teachers))
    deep = f", {args.depth} convs/unit" if args.depth > 1 else ""
    print(f"\npool {2 * args.pool_per_dataset} images, {epochs} stage epochs + {joint_epochs} joint epochs, "
          "4 teachers, 2 threads, student "
          + (f"fixed at the x1 zoo's widths {fixed_widths(base)}" if args.fixed_student else "widths a ratio of the zoo's"))
    print("| zoo | teacher MACs (rel.) | online s: stages + joint | cached s: stages (extraction) + joint "
          "| online / cached | stages only | teacher fwd+encode us/sample | stored read us/sample "
          f"| joint: teacher logits s/epoch | store pays after: stage epochs (with the {joint_epochs} joint epochs) |"
          "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scale, r in rows:
        online_joint = r["online"] - r["stages_online"]
        print(f"| demo x{scale} wide{deep} | {r['teacher_macs'] / base_macs:.1f}x | {r['online']:.1f}: {r['stages_online']:.1f} + "
              f"{online_joint:.1f} | {r['cached']:.1f}: {r['stages_cached']:.1f} ({r['extract']:.1f}) + "
              f"{r['joint_train']:.1f} | {r['online'] / r['cached']:.2f}x | {r['stages_online'] / r['stages_cached']:.2f}x "
              f"| {r['teacher_us']:.0f} | {r['read_us']:.0f} | {r['logits_epoch']:.2f} "
              f"| {r['break_even_epochs']:.1f} ({r['break_even_with_joint']:.1f}) |")


if __name__ == "__main__":
    main()
