"""The distributed pipeline on a real local Ray: store extraction, stages on Ray Train, fault recovery.

A tiny mnist-2 zoo trained here, a 1500-image pool, two Ray Train workers. The same job is
run three ways: stages on Ray Train, stages in-process from the same store, and with a
worker killed mid-stage and a DDP worker killed mid-joint-stage, in one run (each group must
restart from its epoch checkpoint and finish; bit-equality after worker loss:
tests/robustness/test_driver_loss.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from amalgam.cli import main
from amalgam.distributed.train_stages import IMAGE, MACS_PER_READ_BYTE, assign_stages, rank_loads, stage_reads
from amalgam.engine.stages import StageSpec
from tests.conftest import copy_zoo

JOB = {
    "version": 1,
    "name": "tiny-ray",
    "zoo": "zoo/zoo.yaml",
    "pool": {"sources": [{"dataset": "mnist", "count": 1500}]},
    "amalgamation": {"widths": {"default": 0.4}},
    # Whole stages per rank: the same seeded batches as the in-driver stages below (row-parallel
    # stages split each batch differently; they are checked bit for bit across worker loss in
    # tests/robustness/test_driver_loss.py and against one process in tests/test_stage_plan.py).
    "stages": {"epochs": 3, "lr": 0.01, "workers": 2, "parallel": "stages"},
    "joint": {"epochs": 1},
    "baselines": {"kd": False, "supervised": False},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 1000}]}, "latency": False},
    "store": {"uri": "store"},
    "extraction": {"actors": 1, "shard_size": 512},
}


def test_assignment_covers_every_stage_once_and_balances():
    costs = {"conv1": 1.0, "conv2": 50.0, "conv3": 40.0, "fc1": 30.0, "head": 2.0}
    for workers in (1, 2, 3, 5, 7):
        groups = assign_stages(costs, workers)
        flat = [s for g in groups for s in g]
        assert sorted(flat) == sorted(costs) and len(flat) == len(set(flat))
        assert len(groups) == workers
    loads = sorted(sum(costs[s] for s in g) for g in assign_stages(costs, 2))
    assert loads == [53.0, 70.0]  # LPT: conv2 -> w0, conv3 -> w1, fc1 -> w1, head and conv1 -> w0


def test_assignment_charges_a_ranks_reads_once_per_tap():
    """A rank reads the union of its stages' taps: a shared input tap is charged once, and
    when compute ties, the split reading fewer bytes wins."""
    specs = [StageSpec("a", "x", "ya"), StageSpec("b", "x", "yb"), StageSpec("c", "z", "yc"), StageSpec("d", "z", "yd")]
    costs = {s.name: 10.0 for s in specs}  # compute ties: every 2 + 2 split is equal on compute
    bytes_per_sample = {"x": 1000.0, "z": 1000.0, "ya": 1.0, "yb": 1.0, "yc": 1.0, "yd": 1.0}
    reads, read_costs = stage_reads(specs, None, bytes_per_sample, epochs=2)
    per_byte = MACS_PER_READ_BYTE * 2  # two epochs
    (c, r), = rank_loads([["a", "b"]], costs, reads, read_costs)
    assert (c, r) == (20.0, pytest.approx(per_byte * 1002))  # x once, not twice
    groups = assign_stages(costs, 2, reads, read_costs)
    assert sorted(map(sorted, groups)) == [["a", "b"], ["c", "d"]]  # each rank reads one big tap, not both
    # The closed-form first stage reads only in epoch 0: its image costs one epoch, its target
    # too unless an SGD stage on the same rank reads it every epoch.
    first = StageSpec("s1", None, "t1")
    reads, read_costs = stage_reads([first, StageSpec("s2", "t1", "t2")], first, {IMAGE: 10.0, "t1": 100.0, "t2": 1.0},
                                    epochs=3)
    assert reads["s1"] == {"image@0", "t1@0"}
    (_, r1), (_, r12) = rank_loads([["s1"], ["s1", "s2"]], {"s1": 0.0, "s2": 0.0}, reads, read_costs)
    assert r1 == pytest.approx(MACS_PER_READ_BYTE * 110) and r12 == pytest.approx(MACS_PER_READ_BYTE * (10 + 3 * 101))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mnist2_zoo) -> Path:
    d = tmp_path_factory.mktemp("ray_pipeline")
    copy_zoo(mnist2_zoo, d / "zoo")
    yield d
    import ray

    ray.shutdown()


def _run(workdir: Path, job: dict, out: str, *extra: str) -> dict:
    path = workdir / f"{out}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    assert main(["run", str(path), "--out", str(workdir / out), *extra]) == 0
    return json.loads((workdir / out / "report.json").read_text())


def _spy_epoch_ends(monkeypatch) -> list[tuple[str, float, str]]:
    """Every amalgam_stage_loss update of `amalgam run` in this process: (stage, loss, thread)."""
    import threading

    from amalgam import metrics

    calls: list[tuple[str, float, str]] = []
    real = metrics.stage_epoch

    def spy(stage: str, loss: float) -> None:
        calls.append((stage, loss, threading.current_thread().name))
        real(stage, loss)

    monkeypatch.setattr(metrics, "stage_epoch", spy)
    return calls


def _after_stages(report: dict) -> float:
    return next(m for m in report["methods"] if m["name"] == "amalgamated: after stages")["metrics"]["comprehensive"]


@pytest.mark.slow
def test_ray_stages_match_in_process_stages_and_survive_a_killed_worker(workdir: Path, capfd, monkeypatch):
    # One Ray run with two faults (one run, not a clean and a faulty one: the suite's time): kill
    # stage rank 0 in its third epoch, so Ray Train restarts the group and ranks resume (a death
    # right after the first report can race that checkpoint's registration and restart from
    # nothing, as Ray Train documents; dying one epoch later leaves a registered checkpoint), and
    # DDP rank 1 in the third joint epoch, so the joint group restarts from the last epoch
    # checkpoint (bit-equality after worker loss: tests/robustness/test_driver_loss.py).
    epoch_ends = _spy_epoch_ends(monkeypatch)
    faulty = {**JOB, "stages": {**JOB["stages"], "fail_at": {"rank": 0, "epoch": 2, "marker": "killed"}},
              "joint": {"epochs": 3, "workers": 2, "fail_at": {"rank": 1, "epoch": 2, "marker": "joint-killed"},
                        "slices": {"weight": 1.0}}}
    ray_report = _run(workdir, faulty, "ray")
    # The driver's metrics moved epoch by epoch while Ray Train ran (amalgam.distributed.progress):
    # every epoch of every stage once, in order (a restart counts no epoch twice); each stage's
    # first epoch from the thread that drains the reports during trainer.fit(), not caught up
    # once it returned.
    curves = {**ray_report["extra"]["stage_curves"], "joint": ray_report["extra"]["joint_curve"]}
    assert {len(c) for c in curves.values()} == {3}, curves
    for stage, curve in curves.items():
        assert [loss for s, loss, _ in epoch_ends if s == stage] == pytest.approx(curve), (stage, epoch_ends)
    first = {s: thread for s, _, thread in reversed(epoch_ends)}
    assert all(first[s] == "amalgam-stages-progress" for s in ray_report["extra"]["stage_curves"]), epoch_ends
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Ray Train: 2 workers" in text
    assert ray_report["extra"]["feature_source"] == "store (Ray extraction)"
    assert (workdir / "ray" / "killed").exists(), "the fault was not injected"
    assert "fault injection, worker exits in epoch 3" in text
    assert re.search(r"restored from the checkpoint after epoch [12]\b", text)
    assert (workdir / "ray" / "joint-killed").exists(), "the joint fault was not injected"
    assert "[joint] rank 1: fault injection, worker exits in epoch 3" in text
    # The DDP workers' loss carries the per-teacher slice term (engine/joint.py joint_loss).
    assert "[joint] rank 0: loss kd (T 2) + 1 x per-teacher slices (T 4)" in text
    assert re.search(r"\[joint\] rank \d: restored from checkpoint after epoch [12]\b", text)
    acc_ray = _after_stages(ray_report)
    assert acc_ray > 0.5  # 10 classes: far above chance even on this tiny budget

    # Same store, same job, stages in the driver: the engine's own loop.
    from amalgam.distributed.store_source import StoreSource
    from amalgam.engine.run_local import run_local
    from amalgam.job import load_job

    class InDriver(StoreSource):
        def __getattribute__(self, name):
            if name == "fit_stages":
                raise AttributeError(name)
            return super().__getattribute__(name)

    (workdir / "local.yaml").write_text(yaml.safe_dump(JOB))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each Ray Train worker (cpus_per_worker 1): same float reductions
    res = run_local(load_job(workdir / "local.yaml"), workdir / "in-driver", log=lambda _m: None,
                    source_factory=lambda j, t, p, log: InDriver(j, t, p, log))
    torch.set_num_threads(before)
    acc_local = next(r for r in res.results if r.name == "amalgamated: after stages").metrics.comprehensive
    assert res.extra["teacher_forwards"] == 0  # everything came from the store
    # Measured: identical (0.5557 both) when the two runs are separate CLI processes; 0.007 apart
    # (7 of 1000 test images) when the in-driver run follows in this process. Unexplained yet.
    assert abs(acc_ray - acc_local) <= 0.01
