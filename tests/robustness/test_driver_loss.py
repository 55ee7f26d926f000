"""Driver loss and worker loss (issue 10, parts 1 and 2) on one tiny job and one local Ray cluster.

Driver loss: ``amalgam extract JOB`` and ``amalgam run JOB`` run as real subprocesses against
this module's Ray cluster (``--address``, as against a real cluster, which outlives its
drivers) and are killed with SIGKILL, process group and all, at 10 seeded random points; each
kill is followed by a rerun of the same command, which is itself killed at the next point,
until a last ``amalgam run`` finishes. The points are uniform (seeded, sorted) over the work
of an uninterrupted run of the same job measured first, less each driver's start-up: 3 over
its ``amalgam extract``, then 7 over its ``amalgam run``. A point is placed by the milestones
the commands print (extraction passes, stage and joint epochs, see ``MILESTONES``): "t seconds
after milestone m", so a rerun, which resumes and skips what is done, is killed at the same
place of the job however long its own start-up took on a loaded machine; the kills spread
over the extraction passes, the stages and the joint stage. What must hold afterwards:

* the store holds exactly the uninterrupted store's datasets (same keys), every one committed
  with a valid manifest, nothing uncommitted or stray left, and ``amalgam store verify`` passes;
* every dataset holds exactly the pool's samples, in order, none missing, none twice;
* the stored values are the uninterrupted run's, bit for bit (float16 codes included);
* the finished run's student equals the uninterrupted run's: the stage loss curves, the joint
  curve, the accuracy after stages and the final accuracies, all bit-equal (the pipeline is
  deterministic with a fixed seed: stages read seeded batches; the joint stage's Ray Data
  ingest keeps block order, see :func:`amalgam.distributed.train_joint.ordered_ingest`).

Worker loss: the same job with a Ray Train worker killed (``fail_at``: the worker process
exits) in the first and the second epoch of the stages and of the joint stage (four kill
points, one run): the run finishes from its checkpoints, and its final comprehensive
accuracy is within 0.5 points of the uninterrupted run (the issue's criterion). Measured: the
very same student, bit for bit, which is asserted too: a restart replays the lost epoch with the
same seeded batches (stages) and the same rows in the same order on each rank (joint).

Each test records its number of fault points as the JUnit property ``fault_points``, which
``bench/faults.py`` sums per fault class.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from amalgam.cli import main
from tests.conftest import copy_zoo
from tests.test_extract import _kill_session

pytestmark = pytest.mark.slow

SEED = 10  # of the kill points
EXTRACT_KILLS, RUN_KILLS = 3, 7  # of `amalgam extract`, then of `amalgam run`: 10 in all
KILLS = EXTRACT_KILLS + RUN_KILLS
POOL = 512
SHARD = 64  # 8 shards a dataset: a kill mid-extraction leaves some stored, some not
BOUND = 0.005  # issue 10: final comprehensive accuracy within 0.5 points after a lost worker

JOB = {
    "version": 1,
    "name": "driver-loss",
    "zoo": "zoo/zoo.yaml",
    "pool": {"sources": [{"dataset": "mnist", "count": POOL}]},
    "amalgamation": {"widths": {"default": 0.4}},
    # batch 32: 16 steps an epoch, enough for a real student (--local: 0.43 after stages, 0.73 final)
    # Row-parallel stages (every stage on both ranks, gradients all-reduced): the mode whose
    # restarts must resume a gradient exchange mid-epoch (whole stages per rank: test_ray_pipeline).
    "stages": {"epochs": 2, "lr": 0.01, "workers": 2, "batch_size": 32, "parallel": "rows"},
    "joint": {"epochs": 2, "workers": 2, "batch_size": 32},
    "baselines": {"kd": False, "supervised": False},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 1000}]}, "latency": False},
    "store": {"uri": "store"},
    "extraction": {"actors": 1, "shard_size": SHARD},
}


# What each command prints as it gets on, in order (regular expressions, searched in each
# output line, Ray workers' lines included). A rerun skips some (resumed shards, restored
# epochs): reaching a later milestone counts as reaching every earlier one.
MILESTONES: dict[str, list[str]] = {
    "extract": [
        r"\[extract\] (plan: outputs|outputs: )",
        r"\[extract\] outputs: (committed|reusing)",
        r"\[extract\] (plan: codes|codes: )",
        r"\[extract\] (codes: (committed|reusing)|done)",
    ],
    "run": [
        r"\[extract\] (plan: outputs|outputs: )",
        r"\[amalgamate\]",
        r"\[stages\] Ray Train",
        r"\[stages\] (rank \d epoch 1/|rank \d: restored)",
        r"\[stages\] (rank \d epoch 2/|rank \d: restored .* after epoch 2)",
        r"\[stages\] assembled student",
        r"\[joint\] Ray Train",
        r"\[joint\] (epoch 1/|rank \d: restored)",
        r"\[joint\] (epoch 2/|rank \d: restored from checkpoint after epoch 2)",
        r"\[run\] done",
    ],
}


@dataclass
class Attempt:
    """One driver process: its command, exit, output lines and milestones (seconds since launch)."""

    cmd: list[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    reached: dict[int, float] = field(default_factory=dict)  # milestone index -> when it (or a later one) was reached
    rc: int | None = None
    killed_at: float | None = None  # seconds after launch; None: it exited by itself
    seconds: float = 0.0

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


@dataclass
class Env:
    dir: Path
    address: str


@pytest.fixture(scope="module")
def env(tmp_path_factory, mnist2_zoo):
    import ray

    from amalgam.distributed.extract import ensure_ray

    d = tmp_path_factory.mktemp("process_loss")
    copy_zoo(mnist2_zoo, d / "zoo")
    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=2)  # sets RAY_AUTH_MODE in os.environ when Ray enables token auth: the drivers inherit it
    yield Env(d, ray.get_runtime_context().gcs_address)
    ray.shutdown()


def _job_file(env: Env, name: str, **changes) -> Path:
    path = env.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**JOB, "store": {"uri": f"store-{name}"}, **changes}, sort_keys=False))
    return path


def _launch(env: Env, args: list[str], kill: tuple[int, float] | None, log: Path) -> Attempt:
    """Run ``amalgam ARGS --address`` in its own session; with ``kill=(m, t)``, SIGKILL its
    process group ``t`` seconds after it reaches milestone ``m`` (of ``MILESTONES[ARGS[0]]``),
    or as soon as it reaches milestone ``m + 1``, whichever comes first: on a machine less
    loaded than during the uninterrupted run, ``t`` may lie beyond the next milestone."""
    import re

    cmd = [sys.executable, "-m", "amalgam.cli", *args, "--address", env.address]
    milestones = [re.compile(m) for m in MILESTONES[args[0]]]
    att = Attempt(cmd)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=env.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})

    def drain() -> None:
        for line in proc.stdout:
            now = time.monotonic() - t0
            att.lines.append((now, line))
            hit = max((i for i, m in enumerate(milestones) if m.search(line)), default=-1)
            for i in range(hit + 1):
                att.reached.setdefault(i, now)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = t0 + 900
        while proc.poll() is None and time.monotonic() < deadline:
            m, t = kill if kill is not None else (None, 0.0)
            if m is not None and (m + 1 in att.reached or (m in att.reached
                                                            and time.monotonic() - t0 >= att.reached[m] + t)):
                att.killed_at = time.monotonic() - t0
                break
            time.sleep(0.02)
    finally:
        _kill_session(proc)  # the whole group and session: the driver and anything it started
        reader.join(timeout=30)
    att.rc, att.seconds = proc.returncode, time.monotonic() - t0
    with open(log, "a") as f:
        f.write(f"### {' '.join(args)}: rc {att.rc}, kill {kill}, killed at {att.killed_at}, {att.seconds:.1f} s, "
                f"milestones {att.reached}\n{att.text()}\n")
    return att


@dataclass
class Reference:
    job: Path
    store: Path
    run: Path
    report: dict
    extract: Attempt
    run_attempt: Attempt


@pytest.fixture(scope="module")
def reference(env) -> Reference:
    """The uninterrupted run: `amalgam extract`, then `amalgam run`, timed."""
    job = _job_file(env, "reference")
    log = env.dir / "reference.log"
    ext = _launch(env, ["extract", str(job)], None, log)
    assert ext.rc == 0, ext.text()[-3000:]
    run = _launch(env, ["run", str(job), "--out", "run-reference"], None, log)
    assert run.rc == 0, run.text()[-3000:]
    report = json.loads((env.dir / "run-reference" / "report.json").read_text())
    return Reference(job, env.dir / "store-reference", env.dir / "run-reference", report, ext, run)


def kill_plan(extract: Attempt, run: Attempt, seed: int = SEED) -> list[tuple[str, int, float]]:
    """(command, milestone, seconds after it) for each seeded point, in order.

    ``EXTRACT_KILLS`` points uniform over the uninterrupted ``amalgam extract``'s work (from its
    first milestone to its end), then ``RUN_KILLS`` over the uninterrupted ``amalgam run``'s;
    each placed after the last milestone that command had reached by then."""
    rng = random.Random(seed)
    plan = []
    for cmd, ref, n in (("extract", extract, EXTRACT_KILLS), ("run", run, RUN_KILLS)):
        start = ref.reached[0]
        for t in sorted(start + rng.uniform(0.02, 0.98) * (ref.seconds - start) for _ in range(n)):
            m = max(i for i, when in ref.reached.items() if when <= t)
            plan.append((cmd, m, round(t - ref.reached[m], 2)))
    return plan


def _methods(report: dict) -> dict[str, dict]:
    return {m["name"]: m["metrics"] for m in report["methods"]}


def _entries(store: Path):
    from amalgam.store.catalog import scan
    from amalgam.store.location import open_store

    loc = open_store(str(store))
    return loc, scan(loc)


def test_driver_killed_at_ten_points_resumes_to_the_uninterrupted_result(env, reference, record_property):
    from amalgam.store.dataset import Dataset

    plan = kill_plan(reference.extract, reference.run_attempt)
    job = _job_file(env, "killed")
    log = env.dir / "killed.log"
    attempts = []
    for cmd, milestone, seconds in plan:
        args = ["extract", str(job)] if cmd == "extract" else ["run", str(job), "--out", "run-killed"]
        att = _launch(env, args, (milestone, seconds), log)
        # Killed, or (a rerun of a command already done, faster than the point) finished: never failed.
        assert att.killed_at is not None or att.rc == 0, att.text()[-3000:]
        attempts.append((cmd, att))
    final = _launch(env, ["run", str(job), "--out", "run-killed"], None, log)
    assert final.rc == 0, final.text()[-3000:]
    landed = [(cmd, max(a.reached, default=-1), round(a.killed_at, 1))
              for cmd, a in attempts if a.killed_at is not None]
    print(f"driver loss: kill plan (command, milestone, s after it) {plan}; "
          f"landed (command, last milestone, s after launch) {landed}")
    record_property("fault_points", len(landed))
    # Every kill lands, except that one placed in a command's last steps (after its second-last
    # milestone: the end of the joint stage, the "done" line) may find it already gone.
    missed = [(cmd, m) for (cmd, m, _), (_, a) in zip(plan, attempts) if a.killed_at is None]
    assert all(m >= len(MILESTONES[cmd]) - 2 for cmd, m in missed), (plan, landed)
    assert len(landed) >= KILLS - 2 and {c for c, _, _ in landed} == {"extract", "run"}, (plan, landed)

    # The store: the uninterrupted run's datasets, all committed and verified, nothing left over.
    loc, entries = _entries(env.dir / "store-killed")
    ref_loc, ref_entries = _entries(reference.store)
    assert [(e.key, e.kind) for e in entries] == [(e.key, e.kind) for e in ref_entries]
    assert {e.kind for e in entries} == {"outputs", "codecs", "codes"}
    assert all(e.committed and not e.stray for e in entries), entries
    assert main(["store", "verify", str(env.dir / "store-killed")]) == 0
    from amalgam.data.pool import PoolSpec, build_pool

    pool_ids = build_pool(PoolSpec.model_validate(JOB["pool"])).ids
    for e in entries:
        if e.kind == "codecs":  # no shards: the fitted codecs file, byte for byte
            assert [(f.base_name, loc.read_bytes(f"{e.key}/{f.base_name}")) for f in loc.list_dir(e.key)] == [
                (f.base_name, ref_loc.read_bytes(f"{e.key}/{f.base_name}")) for f in ref_loc.list_dir(e.key)]
            continue
        ds, ref = Dataset.open(loc, e.key), Dataset.open(ref_loc, e.key)
        assert ds.verify() == POOL and len(ds.manifest.shards) == POOL // SHARD
        got, want = ds.read_all(), ref.read_all()
        assert list(got["sample_id"]) == pool_ids and len(set(got["sample_id"])) == POOL  # exactly the pool
        assert list(got) == list(want)
        for name in want:
            if want[name].dtype == object:
                assert list(got[name]) == list(want[name]), name
            else:
                assert got[name].dtype == want[name].dtype, name  # float16 codes stay float16
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    # The result: the uninterrupted run's, bit for bit.
    report = json.loads((env.dir / "run-killed" / "report.json").read_text())
    assert report["extra"]["stage_curves"] == reference.report["extra"]["stage_curves"]
    assert report["extra"]["joint_curve"] == reference.report["extra"]["joint_curve"]
    assert _methods(report) == _methods(reference.report)
    assert (env.dir / "run-killed" / "student.safetensors").read_bytes() == (
        reference.run / "student.safetensors").read_bytes()


def test_killed_workers_finish_from_checkpoints_within_half_a_point(env, reference, capfd, record_property):
    """One run, four worker exits: a stage worker in the first and the second stage epoch, a joint
    (DDP) worker in the first and the second joint epoch (``fail_at`` lists the epochs; one run
    instead of one per fault pair keeps the suite's time down, and each restart must still resume
    from what the previous restart left)."""
    name = "workers"
    job = {**JOB, "store": {"uri": "store-reference"},  # the reference's features: no teacher runs again
           "stages": {**JOB["stages"], "fail_at": {"rank": 1, "epoch": [0, 1], "marker": "stage-killed"}},
           "joint": {**JOB["joint"], "fail_at": {"rank": 0, "epoch": [0, 1], "marker": "joint-killed"}}}
    path = env.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    assert main(["run", str(path), "--out", str(env.dir / name), "--address", env.address]) == 0
    text = "".join(capfd.readouterr())
    assert (env.dir / name / "stage-killed").read_text().splitlines() == [
        "killed stages rank 1 in epoch 0", "killed stages rank 1 in epoch 1"]
    assert (env.dir / name / "joint-killed").read_text().splitlines() == [
        "killed joint rank 0 in epoch 0", "killed joint rank 0 in epoch 1"]
    for epoch in (1, 2):
        assert f"[stages] rank 1: fault injection, worker exits in epoch {epoch}" in text
        assert f"[joint] rank 0: fault injection, worker exits in epoch {epoch}" in text
    report = json.loads((env.dir / name / "report.json").read_text())
    record_property("fault_points", 4)
    got, want = _methods(report), _methods(reference.report)
    main_name = reference.report["main"]
    diff = abs(got[main_name]["comprehensive"] - want[main_name]["comprehensive"])
    print(f"worker loss (stage epochs 1 and 2, joint epochs 1 and 2): final comprehensive "
          f"{got[main_name]['comprehensive']:.4f} vs uninterrupted {want[main_name]['comprehensive']:.4f}")
    assert diff <= BOUND, (got[main_name], want[main_name])
    # Stronger, as measured: the restarts change nothing at all.
    assert report["extra"]["stage_curves"] == reference.report["extra"]["stage_curves"]
    assert report["extra"]["joint_curve"] == reference.report["extra"]["joint_curve"]
    assert got == want
    assert (env.dir / name / "student.safetensors").read_bytes() == (reference.run / "student.safetensors").read_bytes()
