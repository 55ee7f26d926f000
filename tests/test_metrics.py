"""amalgam.metrics with real servers: a driver process scraped over HTTP while it runs, and batch
jobs pushing to a real Pushgateway (Debian's prometheus-pushgateway, on loopback) on success
and on failure, read back from it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amalgam import metrics as M
from amalgam.errors import AmalgamError

ROOT = Path(__file__).resolve().parent.parent
PUSHGATEWAY = os.environ.get("AMALGAM_PUSHGATEWAY_BIN", "/usr/bin/prometheus-pushgateway")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page fetched over HTTP."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = textwrap.dedent("""
    import sys
    from amalgam import metrics as M

    server = M.serve(0)                         # loopback, any free port
    print(server.port, flush=True)
    M.job_started()
    with M.phase("extract"):
        for teacher in ("mnist-0-4", "fashion-5-9"):
            M.samples_extracted(teacher, 256)
            M.teacher_forward(teacher)
        M.bytes_written(4096, "s3")
        print("extracting", flush=True)
        sys.stdin.readline()                     # the test scrapes now, mid-phase
    with M.phase("stages"):
        M.stage_epoch("conv1", 0.5)
        M.stage_epoch("conv1", 0.25)
    with M.phase("tune"):
        M.trial_finished("completed")
        M.trial_finished("pruned")
    with M.phase("evaluate"):
        M.student_accuracy(0.93)
        M.student_accuracy(0.91, model="kd")
    M.job_finished(ok=True)
    print("done", flush=True)
    sys.stdin.readline()
    server.close()
""")


@pytest.fixture
def driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_driver_endpoint_is_scraped_over_http_during_the_run(driver):
    port = int(driver.stdout.readline())
    assert driver.stdout.readline().strip() == "extracting"
    url = f"http://127.0.0.1:{port}/metrics"

    during = scrape(url)
    assert value(during, "amalgam_job_phase", amalgam_job_phase="extract") == 1
    assert value(during, "amalgam_job_phase", amalgam_job_phase="succeeded") == 0
    assert value(during, "amalgam_samples_extracted_total", teacher="fashion-5-9") == 256
    assert value(during, "amalgam_teacher_forwards_total", teacher="mnist-0-4") == 1
    assert value(during, "amalgam_store_written_bytes_total", backend="s3") == 4096
    first = value(during, "amalgam_job_duration_seconds")
    time.sleep(0.05)
    assert value(scrape(url), "amalgam_job_duration_seconds") > first > 0  # live while running

    driver.stdin.write("go\n")
    driver.stdin.flush()
    assert driver.stdout.readline().strip() == "done"
    after = scrape(url)
    assert value(after, "amalgam_job_phase", amalgam_job_phase="succeeded") == 1
    assert value(after, "amalgam_stage_loss", stage="conv1") == 0.25
    assert value(after, "amalgam_stage_epochs_total", stage="conv1") == 2
    assert value(after, "amalgam_trials_total", status="pruned") == 1
    assert value(after, "amalgam_student_accuracy", model="student", split="test") == 0.93
    assert value(after, "amalgam_phase_duration_seconds", phase="extract") >= 0.05
    assert {dict(ls)["phase"] for (n, ls) in after if n == "amalgam_phase_duration_seconds"} == \
        {"extract", "stages", "tune", "evaluate"}
    final = value(after, "amalgam_job_duration_seconds")
    time.sleep(0.05)
    assert value(scrape(url), "amalgam_job_duration_seconds") == final  # frozen once ended
    assert value(after, "amalgam_job_last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    driver.stdin.write("\n")
    driver.stdin.flush()
    assert driver.wait(timeout=10) == 0


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    """Debian's prometheus-pushgateway on a free loopback port, in memory only."""
    if not Path(PUSHGATEWAY).exists():
        pytest.fail(f"{PUSHGATEWAY} not found: apt-get install -y prometheus-pushgateway (.ci/run does)")
    port = _free_port()
    log = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


BATCH = textwrap.dedent("""
    import sys
    from amalgam import metrics as M

    gateway, job, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "fail"
    with M.batch_job(gateway, job):
        with M.phase("extract"):
            M.samples_extracted("mnist-0-4", 1000)
        with M.phase("stages"):
            M.stage_epoch("conv2", 0.125)
            if fail:
                raise RuntimeError("stage conv2 diverged")
        with M.phase("evaluate"):
            M.student_accuracy(0.95)
""")


def test_batch_jobs_push_to_a_real_pushgateway_on_success_and_on_failure(pushgateway, tmp_path):
    script = tmp_path / "batch.py"
    script.write_text(BATCH)
    ok = subprocess.run([sys.executable, str(script), pushgateway, "retrain-ok", "ok"], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    bad = subprocess.run([sys.executable, str(script), pushgateway, "retrain-bad", "fail"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().endswith("RuntimeError: stage conv2 diverged")

    got = scrape(f"{pushgateway}/metrics")  # what Prometheus would scrape from the gateway
    assert value(got, "amalgam_job_phase", job="retrain-ok", amalgam_job_phase="succeeded") == 1
    assert value(got, "amalgam_student_accuracy", job="retrain-ok", model="student") == 0.95
    assert value(got, "amalgam_samples_extracted_total", job="retrain-ok", teacher="mnist-0-4") == 1000
    assert value(got, "amalgam_job_last_success_timestamp_seconds", job="retrain-ok") == pytest.approx(time.time(), abs=120)
    # The failed job pushed too: phase failed, its last stage's loss, no success time.
    assert value(got, "amalgam_job_phase", job="retrain-bad", amalgam_job_phase="failed") == 1
    assert value(got, "amalgam_job_phase", job="retrain-bad", amalgam_job_phase="succeeded") == 0
    assert value(got, "amalgam_stage_loss", job="retrain-bad", stage="conv2") == 0.125
    assert value(got, "amalgam_job_last_success_timestamp_seconds", job="retrain-bad") == 0
    assert value(got, "amalgam_job_duration_seconds", job="retrain-bad") > 0
    assert value(got, "push_time_seconds", job="retrain-bad") > 0  # the gateway's own record of the push


def test_a_failed_push_is_one_line_and_never_hides_the_job_error():
    dead = f"http://127.0.0.1:{_free_port()}"
    m = M.AmalgamMetrics()
    with pytest.raises(AmalgamError, match=rf"^Pushgateway {dead}: push of job j failed \("):
        M.push(dead, "j", m)
    logged: list[str] = []
    with pytest.raises(RuntimeError, match="the real error"):
        with M.batch_job(dead, "j", m, log=logged.append):
            raise RuntimeError("the real error")
    assert len(logged) == 1 and logged[0].startswith(f"amalgam: warning: Pushgateway {dead}: push of job j failed")
    assert m.job_phase._value == M.PHASES.index("failed")


def test_label_cardinality_stays_bounded():
    m = M.AmalgamMetrics()
    for bad in ("/data/amalgam/zoos/a.safetensors", "sample 123", "x" * 65, ""):
        with pytest.raises(ValueError, match="is not a short name"):
            m.samples_extracted(bad, 1)
    with pytest.raises(ValueError, match="backend must be one of local, s3"):
        m.bytes_read(1, "gs")
    with pytest.raises(ValueError, match="phase must be one of"):
        with m.phase("finished"):
            pass
    for i in range(M.MAX_SERIES):
        m.teacher_forward(f"t{i}")
    m.teacher_forward("t0")  # an existing series is always fine
    with pytest.raises(ValueError, match=f"more than {M.MAX_SERIES} label sets"):
        m.teacher_forward("one-too-many")
    labels = {k for fam in m.registry.collect() for s in fam.samples for k in s.labels}
    assert labels <= {"teacher", "backend", "stage", "status", "model", "split", "phase", "amalgam_job_phase"}


def test_every_metric_is_named_amalgam_and_settings_come_from_the_environment():
    assert all(f.name.startswith("amalgam_") for f in M.AmalgamMetrics().registry.collect())
    s = M.MetricsSettings.from_env({"AMALGAM_METRICS_PORT": "9400", "AMALGAM_METRICS_ADDR": "0.0.0.0",
                                    "AMALGAM_PUSHGATEWAY": "http://gw:9091"})
    assert (s.port, s.addr, s.pushgateway) == (9400, "0.0.0.0", "http://gw:9091")
    assert M.MetricsSettings.from_env({}) == M.MetricsSettings(port=None, addr="127.0.0.1", pushgateway=None)
    with pytest.raises(AmalgamError, match=r"^AMALGAM_METRICS_PORT='http': Input should be a valid integer"):
        M.MetricsSettings.from_env({"AMALGAM_METRICS_PORT": "http"})
    with pytest.raises(AmalgamError, match=r"metrics endpoint 127\.0\.0\.1:\d+: cannot listen"):
        taken = M.serve(0, metrics=M.AmalgamMetrics())
        try:
            M.serve(taken.port, metrics=M.AmalgamMetrics())
        finally:
            taken.close()


@pytest.mark.slow
def test_a_real_local_run_is_scraped_during_its_stages(tmp_path, data_root):
    """`amalgam run --local` with AMALGAM_METRICS_PORT: stage losses appear epoch by epoch while the
    stages phase runs (not only once the run returns), and the teachers' forwards are counted."""
    import json

    import yaml

    from tests.conftest import make_tiny_zoo

    zoo = make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                           ("b", ["mnist/3", "mnist/4"], [6, 8])])
    pool, epochs = 1500, 3
    job = tmp_path / "live.yaml"
    job.write_text(yaml.safe_dump({
        "version": 1, "name": "live", "zoo": str(zoo),
        "pool": {"sources": [{"dataset": "mnist", "count": pool}]},
        "stages": {"epochs": epochs, "batch_size": 128}, "joint": {"epochs": 1},
        "baselines": {"kd": False, "supervised": False}, "batch_size": 256,
        "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 100}]}, "latency": False},
    }, sort_keys=False))
    port = _free_port()
    env = {**os.environ, "AMALGAM_METRICS_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "amalgam.cli", "run", str(job), "--local", "--threads", "1",
                             "--out", str(tmp_path / "run")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    snapshots = []  # (phase, {stage: epochs}, {stage: loss}) of every scrape while the run goes on
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                got = scrape(url)
            except OSError:  # not serving yet, or already closed
                time.sleep(0.05)
                continue
            phase = next((dict(ls)["amalgam_job_phase"] for (n, ls), v in got.items()
                          if n == "amalgam_job_phase" and v == 1), None)
            snapshots.append((phase, {dict(ls)["stage"]: v for (n, ls), v in got.items()
                                      if n == "amalgam_stage_epochs_total"},
                              {dict(ls)["stage"]: v for (n, ls), v in got.items() if n == "amalgam_stage_loss"},
                              {dict(ls)["teacher"]: v for (n, ls), v in got.items()
                               if n == "amalgam_teacher_forwards_total"}))
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, out[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    curves = report["extra"]["stage_curves"]

    during = [(epochs_, losses) for phase, epochs_, losses, _ in snapshots if phase == "stages"]
    assert during, f"no scrape during the stages phase ({len(snapshots)} scrapes)"
    # Mid-phase: a stage's loss series after some epochs, before the phase ended.
    live = [(e, lo) for e, lo in during if 1 <= e.get("conv2", 0) < epochs]
    assert live, [e for e, _ in during]
    e, lo = live[0]
    assert lo["conv2"] == pytest.approx(curves["conv2"][int(e["conv2"]) - 1])
    assert "joint" not in e  # the joint stage has not started

    # --local: the teachers run in this driver; their forward passes (batches) are counted as they go.
    stats_pass, per_epoch = -(-pool // 256), -(-pool // 128)
    counted = [(int(e["conv2"]), f) for ph, e, _, f in snapshots if ph == "stages" and "conv2" in e]
    for k, f in counted:  # synced as each epoch ends: a scrape may fall between the sync and conv2's update
        assert f["a"] == f["b"] and stats_pass + k * per_epoch <= f["a"] <= stats_pass + (k + 1) * per_epoch, (k, f)
    after = [s for s in snapshots if s[0] in ("joint", "evaluate", "succeeded")]
    assert after, [s[0] for s in snapshots]
    _, final_epochs, final_losses, forwards = after[-1]
    for stage, curve in curves.items():
        assert final_epochs[stage] == len(curve) == epochs and final_losses[stage] == pytest.approx(curve[-1])
    batches = stats_pass + epochs * per_epoch  # statistics pass, then every stage epoch; none after
    assert forwards == {"a": batches, "b": batches} and report["extra"]["teacher_forwards"] == 2 * (1 + epochs) * pool
    print(f"{len(snapshots)} scrapes, {len(during)} in the stages phase, {len(live)} mid-phase with a conv2 loss")


def test_ray_train_reports_become_epoch_ends_once_each():
    """What the driver makes of Ray Train's reports (amalgam.distributed.progress), without Ray:
    stage reports per rank, the joint stage's rank 0, an epoch replayed after a restart passed on
    once, and what did not arrive live caught up from the final curves."""
    from amalgam.distributed.progress import EpochProgress, report_items

    stages = [{"epoch": 1, "resumed_after_epoch": 0, "loss/conv2": 0.5, "loss/head": 2.0}, {"epoch": 1, "loss/fc1": 0.25}]
    assert report_items("stages", stages) == [("conv2", 0, 0.5), ("head", 0, 2.0), ("fc1", 0, 0.25)]
    assert report_items("stages", [{"epoch": 1, "resumed_after_epoch": 0}]) == []  # a closed-form-only rank
    assert report_items("joint", [{"epoch": 2, "loss": 0.125}, {"epoch": 2, "loss": 9.0}]) == [("joint", 1, 0.125)]

    seen: list[tuple[str, int, float]] = []
    p = EpochProgress("stages", lambda *a: seen.append(a))
    for item in [("conv2", 0, 0.5), ("conv2", 1, 0.4), ("conv2", 1, 0.45), ("head", 0, 2.0)]:  # epoch 1 replayed
        p._emit(*item)
    p.catch_up({"conv2": [0.5, 0.4, 0.3], "head": [2.0, 1.5]})
    assert seen == [("conv2", 0, 0.5), ("conv2", 1, 0.4), ("head", 0, 2.0), ("conv2", 2, 0.3), ("head", 1, 1.5)]
    with EpochProgress("joint", None) as quiet:  # no epoch_end: no actor, no thread, nothing to do
        assert quiet.callbacks == []
    quiet.catch_up({"joint": [1.0]})
