"""Sweeps on Ray Tune: search space, Pareto front, and a real 4-trial sweep on a local Ray.

The end-to-end test trains a tiny mnist-2 zoo, starts ``amalgam sweep`` in a subprocess,
kills its whole process group (driver and embedded Ray) once Tune has recorded a finished
trial, then reruns the same command: finished trials must be kept byte for byte, the rest
run, ASHA must have stopped at least one trial, and no trial may run a teacher or fit an
auto-encoder (the process-wide counters every trial reports).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from amalgam.engine.amalgamate import TapStats
from amalgam.job import Job, Sweep, parse_job
from amalgam.sweep.prepare import holdout_split
from amalgam.sweep.results import TrialRow, best_row, pareto_front
from amalgam.sweep.space import param_space, stored_widths, trial_widths
from tests.conftest import copy_zoo


def _row(trial: str, objective: float, params: int, status: str = "completed") -> TrialRow:
    return TrialRow(trial=trial, status=status, balance=True, joint_lr=1e-3, temperature=2.0, widths={"conv1": 4},
                    objective=objective, kl=0.1, params=params, macs=0, latency_ms_b1=0.1, joint_epochs=3,
                    after_stages=0.5, wall_s=1.0, teacher_forwards=0, autoencoder_fits=0)


def test_pareto_front_is_exactly_the_non_dominated_completed_trials():
    rows = [_row("a", 0.90, 100), _row("b", 0.95, 200), _row("c", 0.93, 300), _row("d", 0.97, 400),
            _row("e", 0.99, 50, status="stopped early"), _row("f", 0.90, 150), _row("g", 0.97, 400)]
    front = pareto_front(rows)
    # c is beaten by b (better and smaller), f by a; d and g tie (equal points dominate neither).
    assert [r.trial for r in front] == ["a", "b", "d", "g"]
    for r in front:
        assert not any(o.objective >= r.objective and o.params <= r.params and (o.objective, o.params) != (r.objective, r.params)
                       for o in rows if o.status == "completed")
    assert best_row(rows).trial == "d"  # ties on objective: fewer params, then first
    assert best_row([_row("x", float("nan"), 1), _row("y", 0.5, 9, status="error")]) is None


def _job(sweep: dict, widths: dict | None = None) -> Job:
    raw = {"version": 1, "name": "j", "zoo": "z.yaml", "pool": {"sources": [{"dataset": "mnist", "count": 10}]},
           "sweep": sweep}
    if widths:
        raw["amalgamation"] = {"widths": widths}
    return parse_job(raw, Path("/tmp/j.yaml"))


def _stats(channels: list[int], kind: str = "conv") -> TapStats:
    s = TapStats(channels, kind)
    gen = torch.Generator().manual_seed(0)
    s.update([torch.randn(64, c, 3, 3, generator=gen) for c in channels])
    return s


def test_search_space_and_width_resolution():
    from ray.tune.search.sample import Categorical, Float

    job = _job({"widths": {"default": {"choice": [0.25, 0.5]}, "conv2": 6}, "joint_lr": {"loguniform": [1e-4, 1e-2]},
                "balance": {"choice": [True, False]}, "temperature": 3.0})
    space = param_space(job)
    assert isinstance(space["widths"]["default"], Categorical) and space["widths"]["default"].categories == [0.25, 0.5]
    assert space["widths"]["conv2"] == 6 and space["temperature"] == 3.0
    assert isinstance(space["joint_lr"], Float) and space["balance"].categories == [True, False]

    stats = {"conv1": _stats([8, 8]), "conv2": _stats([10, 10]), "fc1": _stats([4, 4])}
    stored = stored_widths(job, stats, balance=True)
    assert stored == {"conv1": 8, "conv2": 6, "fc1": 4}  # the widest choice: 0.5 x 16, the fixed 6, 0.5 x 8
    channels = {t: s.channels for t, s in stats.items()}
    assert trial_widths(job, {"default": 0.25, "conv2": 6}, channels, stored) == {"conv1": 4, "conv2": 6, "fc1": 2}
    with pytest.raises(Exception, match=r"sweep\.widths\.conv9: no such tap"):
        stored_widths(_job({"widths": {"conv9": 3}}), stats, balance=True)


def test_sweep_section_is_validated():
    with pytest.raises(ValidationError, match="ratio in"):
        Sweep.model_validate({"widths": {"default": {"choice": [0.2, 1.5]}}})
    with pytest.raises(ValidationError, match="loguniform bounds"):
        Sweep.model_validate({"joint_lr": {"loguniform": [0, 1e-2]}})
    with pytest.raises(ValidationError):
        Sweep.model_validate({"trials": 4, "widthz": {}})


def test_sweep_refuses_joint_feature_terms_before_loading_anything():
    """The sweep's trials train from the store, whose joint stage has no feature terms: refused in
    one line naming the field, not silently ignored (the zoo path does not even exist)."""
    from amalgam.errors import AmalgamError
    from amalgam.sweep.prepare import prepare

    job = _job({"widths": {"default": {"choice": [0.25, 0.5]}}})
    job = job.model_copy(update={"joint": job.joint.model_copy(update={"feature_weight": 1.0})})
    with pytest.raises(AmalgamError, match=r"^job j: field joint\.feature_weight: a sweep trains from the store"):
        prepare(job, None)
    # Function matching re-runs the teachers inside the joint step: refused the same way.
    from amalgam.job import Augment

    job = _job({"widths": {"default": {"choice": [0.25, 0.5]}}})
    job = job.model_copy(update={"joint": job.joint.model_copy(update={"augment": Augment(mixup=1.0)})})
    with pytest.raises(AmalgamError, match=r"^job j: field joint\.augment: a sweep trains from the store"):
        prepare(job, None)


def test_holdout_split_is_seeded_and_disjoint():
    train, held = holdout_split(1000, 0.1, seed=3)
    assert len(held) == 100 and int(train.sum()) == 900 and not train[held].any()
    assert torch.equal(holdout_split(1000, 0.1, seed=3)[1], held)
    assert not torch.equal(holdout_split(1000, 0.1, seed=4)[1], held)


JOB = {
    "version": 1,
    "name": "tiny-sweep",
    "zoo": "zoo/zoo.yaml",
    "pool": {"sources": [{"dataset": "mnist", "count": 1500}]},
    "amalgamation": {"widths": {"default": 0.4}},
    "stages": {"epochs": 2, "lr": 0.01},
    "joint": {"epochs": 4, "lr": 0.003},
    "baselines": {"kd": False, "supervised": False},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 1000}]}, "latency": False},
    "store": {"uri": "store"},
    "extraction": {"actors": 1, "shard_size": 512},
    "sweep": {
        "trials": 4,
        "widths": {"default": {"choice": [0.1, 0.25, 0.5]}},
        "joint_lr": {"loguniform": [0.0003, 0.01]},
        "max_concurrent": 1,
        "scheduler": {"grace_period": 1, "reduction_factor": 2},
    },
}


def _terminated(tune_dir: Path) -> set[str]:
    """Trials Tune's experiment state records as TERMINATED (what a restore keeps)."""
    out: set[str] = set()
    for f in tune_dir.glob("experiment_state-*.json"):
        try:
            state = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # caught mid-write
        for entry in state.get("trial_data", []):
            t = json.loads(entry[0])
            if t.get("status") == "TERMINATED":
                out.add(t["trial_id"])
    return out


def _amalgam(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amalgam.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mnist2_zoo) -> Path:
    d = tmp_path_factory.mktemp("sweep")
    copy_zoo(mnist2_zoo, d / "zoo")
    (d / "job.yaml").write_text(yaml.safe_dump(JOB, sort_keys=False))
    return d


@pytest.mark.slow
def test_sweep_resumes_after_a_kill_stops_early_and_runs_no_teacher(workdir: Path):
    tmp_path = workdir
    out = tmp_path / "sweep"

    # 1. Start the sweep and kill driver + embedded Ray once Tune has recorded a finished trial.
    proc = subprocess.Popen([sys.executable, "-m", "amalgam.cli", "sweep", "job.yaml", "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    done: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        done = _terminated(out / "tune")
        if done:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be interrupted:\n" + proc.stdout.read().decode()[-3000:]
    assert done, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    def last_row(p: Path) -> dict:  # a trial that had just started has an empty result.json
        lines = p.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    kept = {p.parent.name: p.read_bytes() for p in (out / "tune").glob("*/result.json")
            if last_row(p).get("trial_id") in done}
    assert len(kept) == len(done)

    # 2. The same command resumes: finished trials untouched, the others run.
    res = _amalgam("sweep", "job.yaml", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming ({len(done)} finished earlier, kept)" in res.stdout
    for name, data in kept.items():
        assert (out / "tune" / name / "result.json").read_bytes() == data, f"finished trial {name} was rerun"

    summary = json.loads((out / "sweep.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["status"] != "error" for t in trials)
    # max_concurrent 1 is honoured: no two trials' reports interleave in time (Tune ignored the
    # limit once, trials ran side by side and ASHA judged them against nothing).
    spans = []
    for p in (out / "tune").glob("*/result.json"):
        stamps = [json.loads(line)["timestamp"] for line in p.read_text().splitlines() if line.strip()]
        spans.append((min(stamps), max(stamps), p.parent.name))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"trials overlapped: {spans}"
    assert sum(t["status"] == "stopped early" for t in trials) >= 1  # ASHA at work
    assert all(t["teacher_forwards"] == 0 and t["autoencoder_fits"] == 0 for t in trials)
    counts = summary["counts"]
    assert counts["teacher_forwards_trials"] == 0 and counts["autoencoder_fits_trials"] == 0
    assert counts["teacher_forwards_preparation"] == 0  # the interrupted run filled the store
    assert "teacher forwards: preparation 0, trials 0" in res.stdout

    # Pareto table: non-dominated completed trials; each trial's params follow from its widths.
    completed = [t for t in trials if t["status"] == "completed"]
    front = [t for t in trials if t["trial"] in summary["pareto"]]
    assert front
    for t in front:
        assert not any(o["objective"] >= t["objective"] and o["params"] <= t["params"]
                       and (o["objective"], o["params"]) != (t["objective"], t["params"]) for o in completed)
    assert all(0 <= t["objective"] <= 1 and not math.isnan(t["kl"]) for t in trials)
    for name in ("sweep.md", "trials.csv", "pareto.png", "best.yaml"):
        assert (out / name).stat().st_size > 0

    # 3. The best configuration is a ready job file.
    best = yaml.safe_load((out / "best.yaml").read_text())
    row = next(t for t in trials if t["trial"] == summary["best"])
    assert best["amalgamation"]["widths"] == row["widths"] and best["joint"]["lr"] == pytest.approx(row["joint_lr"])
    assert "sweep" not in best or best["sweep"] is None
    res = _amalgam("run", str(out / "best.yaml"), "--local", "--out", str(tmp_path / "best-run"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "best-run" / "report.json").read_text())
    assert report["extra"]["student_widths"] == row["widths"]


def test_resumable_asha_re_records_finished_trials(tmp_path: Path):
    """Ray Tune rebuilds the scheduler empty on restore; ours re-reads finished trials' results."""
    from types import SimpleNamespace

    from amalgam.sweep.scheduler import ResumableASHA

    def write(trial_id: str, scores: list[float], done: bool) -> None:
        d = tmp_path / f"run_trial_{trial_id}"
        d.mkdir()
        rows = [{"trial_id": trial_id, "training_iteration": i + 1, "objective": s, "done": done and i == len(scores) - 1}
                for i, s in enumerate(scores)]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("t0", [0.8, 0.85, 0.9, 0.92], done=True)
    write("t1", [0.3], done=True)  # stopped at the first rung
    write("t2", [0.95, 0.96], done=False)  # interrupted: restarts from epoch 1, not recorded
    sched = ResumableASHA(str(tmp_path), time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    sched.set_search_properties("objective", "max")
    sched.on_trial_add(None, SimpleNamespace(trial_id="t2"))
    rungs = dict(sched.recorded)
    assert rungs[1] == {"t0": 0.8, "t1": 0.3} and rungs[2] == {"t0": 0.85}
    # A resumed trial at rung 1 is judged against the re-recorded scores: 0.5 < median(0.8, 0.3)? no -> continue
    assert sched.on_trial_result(None, SimpleNamespace(trial_id="t2"), {"training_iteration": 1, "objective": 0.6}) == "CONTINUE"
    sched.on_trial_add(None, SimpleNamespace(trial_id="t3"))
    assert sched.on_trial_result(None, SimpleNamespace(trial_id="t3"), {"training_iteration": 1, "objective": 0.2}) == "STOP"


def test_objective_is_holdout_agreement_or_validation_accuracy():
    """Label-free by default; with a labelled validation set, its comprehensive accuracy."""
    from amalgam.classes import ClassSpace
    from amalgam.sweep.prepare import SweepSetup
    from amalgam.sweep.trial import score

    space = ClassSpace.from_teachers([("a", ["mnist/0", "mnist/1"]), ("b", ["mnist/2"])])
    teacher = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])

    class Fixed(torch.nn.Module):  # a "student" that answers from a lookup on the first pixel
        def forward(self, x):
            return torch.stack([[torch.tensor([4.0, 0, 0]), torch.tensor([0, 0, 4.0])][int(v > 0.5)] for v in x[:, 0, 0, 0]])

    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    images[1:3, 0, 0, 0] = 255  # rows 1, 2 -> class 2; rows 0, 3 -> class 0
    setup = SweepSetup(job=None, store_uri="", s3={}, codes={}, teacher_config={}, space=space, input_spec={},
                       head_targets=teacher, joint_targets=teacher, train_rows=torch.tensor([False] * 4),
                       holdout_rows=torch.arange(4), validation=None, threads=1)
    s = score(Fixed(), setup, images)
    assert s["objective"] == s["agreement"] == 0.75  # row 1: teacher says 1, student 2
    assert s["kl"] > 0 and "accuracy" not in s
    setup.validation = (images, torch.tensor([0, 2, 2, 1]))
    s = score(Fixed(), setup, images)
    assert s["objective"] == s["accuracy"] == 0.75 and s["agreement"] == 0.75


@pytest.mark.slow
def test_sweep_directory_on_s3_and_resume_from_it(workdir: Path):
    """Tune state and results in a bucket (moto on loopback); a rerun restores from the bucket."""
    import boto3

    from tests.test_store import _free_port, _moto

    port = _free_port()
    server = _moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="sweeps")
        small = {**JOB, "joint": {"epochs": 2, "lr": 0.003}, "sweep": {**JOB["sweep"], "trials": 2}}
        (workdir / "s3.yaml").write_text(yaml.safe_dump(small, sort_keys=False))
        cmd = [sys.executable, "-m", "amalgam.cli", "sweep", "s3.yaml", "--out", "s3://sweeps/tiny/run1"]
        res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="sweeps", Prefix="tiny/run1/")["Contents"]}
        for name in ("sweep.json", "sweep.md", "trials.csv", "pareto.png", "best.yaml"):
            assert f"tiny/run1/{name}" in keys
        assert any(k.startswith("tiny/run1/tune/") and k.endswith("/result.json") for k in keys)
        blob = b"".join(s3.get_object(Bucket="sweeps", Key=k)["Body"].read() for k in keys if "/tune/" in k)
        assert b"testing" not in blob.replace(b"testing_", b"")  # no credentials pickled into Tune's state
        summary = json.loads(s3.get_object(Bucket="sweeps", Key="tiny/run1/sweep.json")["Body"].read())
        assert len(summary["trials"]) == 2 and summary["counts"]["teacher_forwards_trials"] == 0

        res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "resuming (2 finished earlier, kept)" in res.stdout
    finally:
        server.stop()
