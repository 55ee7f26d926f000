"""Joint-stage variants from one set of stages: the levers of the joint loss, side by side.

Runs the improved job (``jobs/mnist-fashion-4.yaml``, ``--local`` recipe) once up to the
assembled student (stages, no joint stage, no baselines), then trains the joint stage from
that same student once per variant (same targets, same gate, same seed unless the variant
says otherwise) and prints task-aware and comprehensive accuracy per variant. The stages and
the teachers' pool logits are cached in ``--out``, so a second call with other variants
runs no stage and no teacher.

A variant is a JSON object: ``slices`` (weight of the per-teacher slice term, 0 = off),
``slice_temperature`` (default 4), ``temperature`` (the main KD term's), ``seed``, ``epochs``.

    .venv/bin/python bench/joint_terms.py [--pool-per-dataset 15000] [--stage-epochs 3] \\
        [--joint-epochs 5] [--variants '[{"slices": 0}, {"slices": 30}]'] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from amalgam.data.pool import build_pool
from amalgam.engine.calibrate import fit_calibration
from amalgam.engine.evaluate import evaluate_logits, predict_logits
from amalgam.engine.joint import train_end_to_end
from amalgam.engine.run_local import joint_slices, joint_targets, pool_input_spec, run_local
from amalgam.job import Slices, load_job
from amalgam.paths import amalgam_home
from amalgam.student_io import load_student
from amalgam.zoo.manifest import load_zoo

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = '[{"slices": 0}, {"slices": 10}, {"slices": 30}]'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(ROOT / "jobs/mnist-fashion-4.yaml"))
    ap.add_argument("--pool-per-dataset", type=int, default=None, help="pool images per dataset (job default)")
    ap.add_argument("--stage-epochs", type=int, default=None, help="job default")
    ap.add_argument("--joint-epochs", type=int, default=None, help="job default, unless a variant says")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="JSON list of variants (see the module doc)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="cache and results (default $AMALGAM_HOME/bench/joint_terms/POOL-STAGES)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = json.loads(args.variants)

    job = load_job(args.job)
    if args.pool_per_dataset:
        for src in job.pool.sources:
            src.count = args.pool_per_dataset
    if args.stage_epochs is not None:
        job.stages.epochs = args.stage_epochs
    joint_epochs = job.joint.epochs if args.joint_epochs is None else args.joint_epochs
    pool_n = sum(s.count or 0 for s in job.pool.sources)
    out = Path(args.out or amalgam_home() / "bench" / "joint_terms" / f"{pool_n}-{job.stages.epochs}")
    out.mkdir(parents=True, exist_ok=True)

    stages_dir = out / "stages"
    if not (stages_dir / "student.json").exists():
        t0 = time.perf_counter()
        run_local(job.model_copy(update={
            "joint": job.joint.model_copy(update={"epochs": 0}),
            "baselines": job.baselines.model_copy(update={"kd": False, "supervised": False}),
            "evaluation": job.evaluation.model_copy(update={"latency": False}),
        }), stages_dir)
        print(f"[bench] stages: {time.perf_counter() - t0:.0f} s -> {stages_dir}", flush=True)

    manifest, teachers = load_zoo(job.zoo_path())
    space = manifest.class_space()
    shape = teachers[0].entry.input.shape
    pool = build_pool(job.pool, input_shape=shape)
    test = build_pool(job.evaluation.test, input_shape=shape)
    labels = space.remap(test.class_names, test.labels)
    cache = out / "pool_logits.pt"
    if cache.exists():
        raw = torch.load(cache, weights_only=True)
    else:
        raw = torch.cat([predict_logits(t, pool.images) for t in teachers], 1)
        torch.save(raw, cache)
    calibrated = fit_calibration(raw, space.blocks, job.calibration)(raw)
    target, _gate = joint_targets(job, pool.images, raw, calibrated, space, pool_input_spec(pool), log=lambda _m: None)
    # The teachers' own-task accuracy, as the stages run scored it (same test set).
    stage_report = {m["name"]: m["metrics"] for m in json.loads((stages_dir / "report.json").read_text())["methods"]}
    names = [t.name for t in teachers]
    teacher_acc = [stage_report[f"teacher {n}"]["task_aware"][n] for n in names]
    print(f"[bench] pool {len(pool)}, stages {job.stages.epochs} epochs; teachers "
          + " / ".join(f"{n} {a:.4f}" for n, a in zip(names, teacher_acc)), flush=True)

    rows = []
    for v in variants:
        student, _, _ = load_student(stages_dir)
        sl = Slices(weight=float(v.get("slices", 0)),
                    **({"temperature": float(v["slice_temperature"])} if "slice_temperature" in v else {}))
        slices = joint_slices(job.model_copy(update={"joint": job.joint.model_copy(update={"slices": sl})}), space)
        t0 = time.perf_counter()
        train_end_to_end(student, pool.images, target, job.joint.loss, int(v.get("epochs", joint_epochs)),
                         job.joint.lr, job.joint.batch_size, float(v.get("temperature", job.joint.temperature)),
                         int(v.get("seed", job.seed)), "joint", log=lambda _m: None, freeze_batchnorm=True,
                         slices=slices)
        m = evaluate_logits(predict_logits(student, test.images), labels, space)
        row = {"variant": v, "task_aware": m.task_aware, "comprehensive": m.comprehensive,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\npool {len(pool)}, stages {job.stages.epochs}, joint {joint_epochs} epochs (unless the variant says)\n")
    print("| variant | " + " | ".join(names) + " | comprehensive |")
    print("|---|" + "---:|" * (len(names) + 1))
    print("| teachers | " + " | ".join(f"{a:.4f}" for a in teacher_acc) + " | - |")
    for r in rows:
        print(f"| {json.dumps(r['variant'])} | " + " | ".join(f"{r['task_aware'][n]:.4f}" for n in names)
              + f" | {r['comprehensive']:.4f} |")
    (out / "results.json").write_text(json.dumps({"teachers": dict(zip(names, teacher_acc)), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
