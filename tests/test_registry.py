"""The student registry: versions, champion compare-and-swap, the decision rule, the CLI.

Storage behaviour runs on a local directory and on S3 (moto's standalone server on
loopback, conditional PUTs through boto3 and everything else through pyarrow, as against a
real bucket). Students are tiny random-weight TappedCNNs saved with ``save_student``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import amalgam.cli
from amalgam.cli import main
from amalgam.errors import AmalgamError
from amalgam.registry import Decision, ExclusiveWriter, Registry, RecordMetrics, judge
from amalgam.store.location import open_store
from amalgam.student_io import save_student
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.manifest import InputSpec
from tests.conftest import make_tiny_zoo
from tests.test_store import _bucket, _free_port, _moto, _s3_env

A, B = ["mnist/0", "mnist/1", "mnist/2"], ["mnist/3", "mnist/4"]
SPEC = InputSpec(shape=[1, 28, 28], mean=[0.5], std=[0.25])
LINE = "tiny-line"


@pytest.fixture(scope="module")
def moto_endpoint():
    port = _free_port()
    server = _moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    _s3_env(monkeypatch, endpoint)
    return f"s3://{_bucket(endpoint)}/store"


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    return make_tiny_zoo(tmp_path / "zoo", [("a", A, [4, 8]), ("b", B, [6, 8])])


def make_run(root: Path, zoo: Path, task: dict[str, float], comprehensive: float, seed: int = 0,
             teachers: list[tuple[str, list[str]]] | None = None, widths: list[int] | None = None) -> Path:
    teachers = teachers or [("a", A), ("b", B)]
    torch.manual_seed(seed)
    classes = [c for _, cs in teachers for c in cs]
    net = TappedCNN(CNNConfig(conv_widths=widths or [4, 8], fc_widths=[16], num_classes=len(classes)))
    metrics = {"comprehensive": comprehensive, **{f"task_aware/{k}": v for k, v in task.items()}}
    save_student(root, net, classes, teachers, SPEC, metrics=metrics, job={"name": LINE, "zoo": str(zoo), "seed": seed})
    return root


def cli(monkeypatch, *argv: str) -> int:
    """``amalgam registry ...`` through the real entry point (with registry added if cli.py lacks it yet)."""
    if "registry" not in amalgam.cli.COMMAND_MODULES:
        monkeypatch.setattr(amalgam.cli, "COMMAND_MODULES", [*amalgam.cli.COMMAND_MODULES, "registry"])
    return main(["registry", *argv])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("amalgam: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------------- decision rule (pure)

def M(task: dict, fid: dict | None = None, comp: float | None = 0.9) -> RecordMetrics:
    return RecordMetrics(comprehensive=comp, task_aware=task, fidelity=fid)


def test_judge_no_champion_promotes():
    assert judge(M({"a": 0.1}), None, True, 0.0) == Decision(True, "no champion yet")


def test_judge_within_tolerance_promotes_and_names_the_closest():
    d = judge(M({"a": 0.985, "b": 0.95}), M({"a": 0.99, "b": 0.90}), True, 0.01)
    assert d.promote and "tolerance 0.01" in d.reason and "a task-aware 0.9850 vs 0.9900" in d.reason


def test_judge_regression_names_sub_task_and_both_figures():
    d = judge(M({"a": 0.99, "b": 0.80}), M({"a": 0.98, "b": 0.85}), True, 0.01)
    assert d == Decision(False, "sub-task b: task-aware 0.8000 < champion 0.8500 - tolerance 0.01")


def test_judge_exactly_at_tolerance_promotes():
    assert judge(M({"a": 0.75}), M({"a": 1.0}), True, 0.25).promote  # binary-exact: 0.75 == 1.0 - 0.25


def test_judge_requires_class_coverage():
    d = judge(M({"a": 1.0}), M({"a": 0.5}), False, 0.5)
    assert not d.promote and "cover" in d.reason


def test_judge_only_shared_sub_tasks_count():
    # a new sub-task c (new teacher) has no champion figure; the champion's figures decide
    assert judge(M({"a": 0.9, "c": 0.1}), M({"a": 0.9}), True, 0.0).promote


def test_judge_missing_figure_is_a_regression():
    d = judge(M({"a": None}), M({"a": 0.9}), True, 0.1)
    assert d == Decision(False, "sub-task a: no task-aware figure, champion has 0.9000")
    assert judge(M({"a": 0.1}), M({"a": None}), True, 0.0).promote  # champion had no figure: nothing to beat


def test_judge_fidelity_checked_when_both_measured():
    d = judge(M({"a": 0.9}, fid={"a": 0.70}), M({"a": 0.9}, fid={"a": 0.95}), True, 0.05)
    assert d == Decision(False, "sub-task a: fidelity 0.7000 < champion 0.9500 - tolerance 0.05")
    assert judge(M({"a": 0.9}, fid={"a": 0.92}), M({"a": 0.9}, fid={"a": 0.95}), True, 0.05).promote


def test_metrics_from_student_json_flat_keys_and_nan():
    m = RecordMetrics.from_student({"comprehensive": 0.5, "task_aware/a": float("nan"), "task_aware/b": 0.75,
                                    "fidelity/a": 0.9, "test_accuracy": 1.0})
    assert m == RecordMetrics(comprehensive=0.5, task_aware={"a": None, "b": 0.75}, fidelity={"a": 0.9})


# --------------------------------------------------------------------------- versions, champion

def test_register_copies_checked_bytes_and_records(store_uri, zoo, tmp_path):
    r1 = make_run(tmp_path / "run1", zoo, {"a": 0.9, "b": 0.8}, 0.7, seed=1)
    r2 = make_run(tmp_path / "run2", zoo, {"a": 0.95, "b": 0.85}, 0.75, seed=2, widths=[6, 8])
    reg = Registry.open(store_uri, LINE)
    v1 = reg.register(r1)
    reg.promote(1)
    v2 = reg.register(r2)
    assert (v1.version, v2.version) == (1, 2)
    assert (v1.lineage, v2.lineage) == (None, 1)  # v2 challenges the champion of its time
    loc = open_store(store_uri)
    for rec, run in ((v1, r1), (v2, r2)):
        for f in ("student.safetensors", "student.json"):
            assert loc.read_bytes(f"registry/{LINE}/versions/{rec.version:06d}/{f}") == (run / f).read_bytes()
        assert rec.sha256 == hashlib.sha256((run / "student.safetensors").read_bytes()).hexdigest()
        assert rec.run_dir == str(run.resolve()) and rec.job["name"] == LINE
        assert [t.name for t in rec.teachers] == ["a", "b"] and rec.classes == A + B
    from amalgam.zoo.manifest import read_manifest
    from amalgam.store.fingerprint import zoo_fingerprint

    zm = read_manifest(zoo)
    assert v1.zoo_fingerprint == zoo_fingerprint(zm.teachers) and v1.teachers[0].sha256 == zm.teachers[0].sha256
    net = TappedCNN(CNNConfig(conv_widths=[6, 8], fc_widths=[16], num_classes=5))
    assert v2.params == sum(p.numel() for p in net.parameters())
    assert v2.metrics == RecordMetrics(comprehensive=0.75, task_aware={"a": 0.95, "b": 0.85})
    assert reg.record(2) == v2 and [r.version for r in reg.records()] == [1, 2]
    assert v2.status == "candidate" and reg.record(1).status == "champion"


def test_promote_rollback_and_history(store_uri, zoo, tmp_path):
    reg = Registry.open(store_uri, LINE)
    for i in (1, 2, 3):
        reg.register(make_run(tmp_path / f"run{i}", zoo, {"a": 0.9, "b": 0.9}, 0.8, seed=i))
    assert reg.head() is None
    with pytest.raises(AmalgamError, match="no champion to roll back"):
        reg.rollback()
    t1 = reg.promote(1, reason="first")
    assert (t1.epoch, t1.version, t1.previous) == (1, 1, None)
    t2 = reg.promote(2)
    assert (t2.epoch, t2.version, t2.previous) == (2, 2, 1)
    ptr = json.loads(open_store(store_uri).read_bytes(f"registry/{LINE}/champion.json"))
    assert (ptr["version"], ptr["previous"], ptr["epoch"]) == (2, 1, 2) and ptr["promoted_at"] and ptr["reason"]
    assert [reg.status_of(reg.record(v), reg.head()) for v in (1, 2, 3)] == ["retired", "champion", "candidate"]
    with pytest.raises(AmalgamError, match="v2 is already the champion"):
        reg.promote(2)
    t3 = reg.rollback(reason="bad in prod")
    assert (t3.epoch, t3.action, t3.version, t3.previous) == (3, "rollback", 1, None)
    assert reg.record(2).status == "rejected" and "bad in prod" in reg.record(2).reason
    with pytest.raises(AmalgamError, match="v1 has no earlier champion"):
        reg.rollback()
    # v1 is champion a second time: the next move away from it is a new epoch, not a clash
    t4 = reg.promote(3)
    assert (t4.epoch, t4.version, t4.previous) == (4, 3, 1)
    assert reg.rollback().version == 1
    assert [(t.epoch, t.action, t.version) for t in reg.history()] == [
        (1, "promote", 1), (2, "promote", 2), (3, "rollback", 1), (4, "promote", 3), (5, "rollback", 1)]
    assert reg.champion_pointer() == reg.head()


def test_stale_champion_cannot_be_replaced(store_uri, zoo, tmp_path):
    """Two retrains judged against champion v1; the second to act must fail, whichever check catches it."""
    reg = Registry.open(store_uri, LINE)
    for i in (1, 2, 3):
        reg.register(make_run(tmp_path / f"run{i}", zoo, {"a": 0.9, "b": 0.9}, 0.8, seed=i))
    reg.promote(1)
    seen = reg.head()
    reg.promote(2, expected_epoch=seen.epoch)
    with pytest.raises(AmalgamError) as exc:
        reg.promote(3, expected_epoch=seen.epoch)
    assert "concurrent retrains cannot both become champion" in str(exc.value) and "\n" not in str(exc.value)
    # the exclusive create itself: a writer that read epoch 1 and lost the race to epoch 2
    with pytest.raises(AmalgamError) as exc:
        reg._transition(seen, "promote", 3, 1, 1, "late")
    msg = str(exc.value)
    assert "was v1 at epoch 1, now v2 at epoch 2" in msg and "concurrent retrains cannot both become champion" in msg
    assert reg.head().version == 2 and len(reg.history()) == 2


RACER = """
import os, sys, time
from amalgam.errors import AmalgamError
from amalgam.registry import Registry
uri, name, version, epoch, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
reg = Registry.open(uri, name)
open(f"{go}.ready-{version}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    reg.promote(version, expected_epoch=epoch)
    print("won")
except AmalgamError as exc:
    print(exc)
"""


def _race_processes(uri: str, versions: list[int], epoch: int, go: Path) -> list[tuple[int, str]]:
    """Separate interpreters (only amalgam.registry imported: no torch, quick to start), released together."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, LINE, str(v), str(epoch), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.ready-{v}").exists() for v in versions) and time.monotonic() < deadline:
        time.sleep(0.01)  # every racer at its wait loop, then all released at once
    go.touch()
    out = []
    for v, p in zip(versions, procs):
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append((v, stdout.strip()))
    return out


def _race_threads(uri: str, versions: list[int], epoch: int) -> list[tuple[int, str]]:
    start, out = threading.Barrier(len(versions)), []

    def go(version: int) -> None:
        reg = Registry.open(uri, LINE)
        start.wait()
        try:
            reg.promote(version, expected_epoch=epoch)
            out.append((version, "won"))
        except AmalgamError as exc:
            out.append((version, str(exc)))

    threads = [threading.Thread(target=go, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_concurrent_promotes_exactly_one_wins(store_uri, zoo, tmp_path, processes):
    """Four retrains judged against v1 race to promote; one wins, three get the one-line CAS error.

    Most losers are stopped by the exclusive create of history/000002.json, some by the
    epoch check before it. On S3 this relies on the server honouring If-None-Match: moto
    checks then writes without a lock, so in principle it could let two through; 300
    four-way races of the bare primitive against it all had exactly one winner.
    """
    if processes and store_uri.startswith("s3://"):
        pytest.skip("on S3 threads exercise the same conditional PUTs; processes add only start-up time")
    reg = Registry.open(store_uri, LINE)
    for i in range(1, 6):
        reg.register(make_run(tmp_path / f"run{i}", zoo, {"a": 0.9, "b": 0.9}, 0.8, seed=i))
    reg.promote(1)
    epoch = reg.head().epoch
    if processes:
        results = _race_processes(store_uri, [2, 3, 4, 5], epoch, tmp_path / "go")
    else:
        results = _race_threads(store_uri, [2, 3, 4, 5], epoch)
    winners = [v for v, r in results if r == "won"]
    assert len(winners) == 1, results
    for v, r in results:
        if r != "won":
            assert "concurrent retrains cannot both become champion" in r and "\n" not in r
    assert reg.head().version == winners[0] and len(reg.history()) == 2
    assert reg.champion_pointer() == reg.head()


def test_concurrent_registrations_get_distinct_versions(store_uri, zoo, tmp_path):
    runs = [make_run(tmp_path / f"run{i}", zoo, {"a": 0.9, "b": 0.9}, 0.8, seed=i) for i in range(4)]
    reg = Registry.open(store_uri, LINE)
    got: list[int] = []
    start = threading.Barrier(len(runs))

    def go(run: Path) -> None:
        start.wait()
        got.append(Registry.open(store_uri, LINE).register(run).version)

    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2, 3, 4]
    assert {r.run_dir for r in reg.records()} == {str(r.resolve()) for r in runs}


def test_challenge_promotes_better_rejects_regression_and_dropped_classes(store_uri, zoo, tmp_path):
    reg = Registry.open(store_uri, LINE)
    reg.register(make_run(tmp_path / "r1", zoo, {"a": 0.90, "b": 0.80}, 0.70, seed=1))
    reg.register(make_run(tmp_path / "r2", zoo, {"a": 0.895, "b": 0.86}, 0.75, seed=2))
    reg.register(make_run(tmp_path / "r3", zoo, {"a": 0.95, "b": 0.70}, 0.76, seed=3))
    reg.register(make_run(tmp_path / "r4", zoo, {"a": 0.99}, 0.99, seed=4, teachers=[("a", A)]))
    assert reg.challenge(1, 0.01) == Decision(True, "no champion yet")
    assert reg.challenge(2, 0.01).promote and reg.head().version == 2
    d3 = reg.challenge(3, 0.01)
    assert d3 == Decision(False, "sub-task b: task-aware 0.7000 < champion 0.8600 - tolerance 0.01")
    rec3 = reg.record(3)
    assert (rec3.status, rec3.reason) == ("rejected", d3.reason)
    assert not reg.challenge(4, 0.5).promote and reg.head().version == 2
    assert reg.head().reason.startswith("judged against v1: every shared sub-task within tolerance 0.01")


# ------------------------------------------------------------------------------------- failures

def test_corrupt_or_missing_record_is_one_line_naming_the_file(store_uri, zoo, tmp_path, monkeypatch, capsys):
    reg = Registry.open(store_uri, LINE)
    reg.register(make_run(tmp_path / "r1", zoo, {"a": 0.9, "b": 0.9}, 0.8))
    loc = open_store(store_uri)
    rec = f"registry/{LINE}/versions/000001/record.json"
    good = loc.read_bytes(rec)
    loc.write_bytes(rec, b"{not json")
    assert cli(monkeypatch, "show", "1", "--store", store_uri, "--name", LINE) == 2
    assert one_line_error(capsys) == f"amalgam: error: {store_uri}/{rec}: line 1 malformed JSON"
    bad = json.loads(good)
    bad["params"] = "many"
    loc.write_bytes(rec, json.dumps(bad).encode())
    assert cli(monkeypatch, "list", "--store", store_uri) == 2  # the only line: --name may be omitted
    err = one_line_error(capsys)
    assert f"{store_uri}/{rec}: field params:" in err
    loc.fs.delete_file(loc.path(rec))  # claimed, never committed: listed as uncommitted, not shown
    assert cli(monkeypatch, "list", "--store", store_uri, "--name", LINE) == 0
    assert "1 uncommitted" in capsys.readouterr().out
    assert cli(monkeypatch, "show", "1", "--store", store_uri, "--name", LINE) == 2
    assert one_line_error(capsys) == (f"amalgam: error: {store_uri}/{rec}: missing; version 1 was never committed "
                                      "(registration interrupted or in progress)")
    assert cli(monkeypatch, "show", "7", "--store", store_uri, "--name", LINE) == 2
    assert one_line_error(capsys) == f"amalgam: error: {store_uri}/registry/{LINE}: no version 7"


def test_register_refuses_tampered_weights_and_foreign_zoo(tmp_path, zoo):
    run = make_run(tmp_path / "r1", zoo, {"a": 0.9, "b": 0.9}, 0.8)
    reg = Registry.open(str(tmp_path / "store"), LINE)
    other = make_tiny_zoo(tmp_path / "other", [("a", A, [4, 8]), ("c", B, [6, 8])])
    with pytest.raises(AmalgamError, match=r"teacher 'b' is not in zoo .*other/zoo\.yaml"):
        reg.register(run, zoo=other)
    w = run / "student.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AmalgamError, match=rf"{w}: sha256 is [0-9a-f]{{12}}\.\.\., student\.json says"):
        reg.register(run)
    assert reg.committed_versions() == ([], [])  # refused before claiming a number


def test_s3_endpoint_without_conditional_writes_is_refused(tmp_path, monkeypatch):
    loc = open_store(str(tmp_path / "s"))
    loc._is_s3 = True  # pretend; the probe only goes through _put_if_absent
    w = ExclusiveWriter(loc)
    monkeypatch.setattr(w, "_put_if_absent", lambda rel, data: True)  # an endpoint that ignores If-None-Match
    monkeypatch.setattr(loc, "retry", lambda what, fn: None)
    with pytest.raises(AmalgamError, match="ignores conditional writes"):
        w.create("registry/x/history/000001.json", b"{}")


# ------------------------------------------------------------------------------------------- CLI

def test_cli_register_list_show_promote_rollback(store_uri, zoo, tmp_path, monkeypatch, capsys):
    r1 = make_run(tmp_path / "r1", zoo, {"a": 0.9, "b": 0.8}, 0.7, seed=1)
    r2 = make_run(tmp_path / "r2", zoo, {"a": 0.95, "b": 0.85}, 0.75, seed=2)
    s = ["--store", store_uri]
    assert cli(monkeypatch, "register", str(r1), *s, "--judge") == 0  # name from the run's job
    out = capsys.readouterr().out
    assert f"registered v1 from {r1.resolve()}" in out and "promoted v1: no champion yet" in out
    assert cli(monkeypatch, "register", str(r2), *s, "--zoo", str(zoo)) == 0
    capsys.readouterr()
    assert cli(monkeypatch, "list", *s) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{store_uri}/registry/{LINE}: 2 versions, champion v1 (epoch 1)"
    assert out[1].split() == ["VERSION", "STATUS", "COMPREHENSIVE", "PARAMS", "CREATED", "LINEAGE"]
    assert out[2].split()[:4] == ["*", "v1", "champion", "0.7000"] and out[2].split()[-1] == "-"
    assert out[3].split()[:3] == ["v2", "candidate", "0.7500"] and out[3].split()[-1] == "v1"
    assert cli(monkeypatch, "promote", "v2", *s, "--reason", "better b") == 0
    assert "champion is now v2 (was v1, epoch 2)" in capsys.readouterr().out
    assert cli(monkeypatch, "show", "champion", *s) == 0
    out = capsys.readouterr().out
    assert "version: v2  (champion)" in out and "lineage: v2 <- v1" in out
    assert "teacher b: 2 classes" in out and "task-aware 0.8500" in out
    assert "epoch 2: promote v2 (was v1)" in out and "better b" in out
    assert cli(monkeypatch, "rollback", *s) == 0
    assert "champion is now v1 (epoch 3)" in capsys.readouterr().out
    assert cli(monkeypatch, "rollback", *s) == 2
    assert one_line_error(capsys).endswith("v1 has no earlier champion to roll back to")
    assert cli(monkeypatch, "promote", "1", *s) == 2
    assert one_line_error(capsys).endswith("v1 is already the champion")


def test_cli_needs_name_when_store_has_several_lines(tmp_path, zoo, monkeypatch, capsys):
    store = str(tmp_path / "store")
    for name in ("x", "y"):
        Registry.open(store, name).register(make_run(tmp_path / name, zoo, {"a": 0.9}, 0.9))
    assert cli(monkeypatch, "list", "--store", store) == 2
    assert one_line_error(capsys) == f"amalgam: error: {store}/registry: pass --name (the student line); it holds x, y"
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    assert cli(monkeypatch, "list") == 2  # default store: $AMALGAM_HOME/store, empty
    assert one_line_error(capsys).endswith("registry: pass --name (the student line); it holds none")
