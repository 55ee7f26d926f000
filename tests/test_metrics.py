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
