"""The job spec: the shipped jobs parse, every mistake is one line naming the file and field, `amalgam validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from amalgam.cli import main
from amalgam.errors import AmalgamError
from amalgam.job import Job, dump_job, load_job, parse_job
from tests.conftest import make_tiny_zoo

JOBS = Path(__file__).resolve().parent.parent / "jobs"

MINIMAL = {
    "version": 1,
    "name": "tiny",
    "zoo": "zoo/zoo.yaml",
    "pool": {"sources": [{"dataset": "mnist", "count": 100}]},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 50}]}, "latency": False},
}


def _write(path: Path, raw: dict | str) -> Path:
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def _with(**changes) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))  # deep copy
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def test_shipped_improved_job_parses(monkeypatch, tmp_path):
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    job = load_job(JOBS / "mnist-fashion-4.yaml")
    assert job.name == "mnist-fashion-4" and job.version == 1 and job.seed == 0
    assert [(s.dataset, s.split, s.count) for s in job.pool.sources] == [("mnist", "train", 15000), ("fashion", "train", 15000)]
    assert job.calibration == "standardize"
    a = job.amalgamation
    assert (a.mode, a.strategy, a.balance, a.widths, a.max_energy) == ("pca", "dfa", True, {"default": 0.38}, 0.9999)
    assert job.stages.closed_form_first and job.stages.epochs == 3
    assert (job.joint.loss, job.joint.epochs, job.joint.temperature) == ("kd", 5, 2.0)
    assert job.baselines.kd and job.baselines.supervised
    # Defaults fill what the file leaves out: evaluation on both test sets, latency measured.
    assert [(s.dataset, s.split) for s in job.evaluation.test.sources] == [("mnist", "test"), ("fashion", "test")]
    assert job.evaluation.latency
    # $AMALGAM_HOME in the zoo path follows the environment.
    assert job.zoo_path() == tmp_path / "home" / "zoos" / "mnist-fashion-4" / "zoo.yaml"
    # widths: a ratio of the concatenated width (rounded, at least 1, at most all channels).
    assert a.width_for("conv1", 80) == 30 and a.width_for("fc1", 640) == 243 and a.width_for("conv1", 1) == 1


def test_shipped_paper_job_parses():
    job = load_job(JOBS / "mnist-fashion-4-paper.yaml")
    assert job.name == "mnist-fashion-4-paper"
    assert job.calibration == "none"
    a = job.amalgamation
    assert (a.mode, a.strategy, a.balance, a.widths, a.max_energy) == ("sgd", "dfa", False, {"default": 0.55}, None)
    assert (a.sgd.epochs, a.sgd.lr) == (2, 0.001)
    assert job.stages.closed_form_first is False
    assert job.joint.loss == "mse"


def test_dump_job_round_trips(tmp_path):
    job = load_job(JOBS / "mnist-fashion-4.yaml")
    again = load_job(_write(tmp_path / "again.yaml", dump_job(job)))
    assert again.model_dump() == job.model_dump()


def test_widths_int_or_ratio(tmp_path):
    job = load_job(_write(tmp_path / "j.yaml", _with(amalgamation={"widths": {"conv1": 12, "fc1": 1.0, "default": 0.25}})))
    w = job.amalgamation
    assert w.width_for("conv1", 80) == 12  # an int is a channel count
    assert w.width_for("conv1", 10) == 10  # ... capped at the concatenated width
    assert w.width_for("fc1", 320) == 320  # 1.0 is a ratio: everything
    assert w.width_for("conv2", 160) == 40  # default
    assert load_job(_write(tmp_path / "k.yaml", _with(amalgamation={"widths": {"default": 1}}))).amalgamation.width_for("conv1", 80) == 1


def test_relative_zoo_path_resolves_from_the_job_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    job = load_job(_write(tmp_path / "sub" / "job.yaml", MINIMAL))
    monkeypatch.chdir(tmp_path)
    assert job.zoo_path() == (tmp_path / "sub" / "zoo" / "zoo.yaml").resolve()


@pytest.mark.parametrize(
    "raw, field, message",
    [
        (_with(colour="blue"), "colour", "Extra inputs are not permitted"),
        (_with(stages={"epoch": 3}), "stages.epoch", "Extra inputs are not permitted"),
        (_with(amalgamation={"sgd": {"epochs": 2, "learning_rate": 0.1}}), "amalgamation.sgd.learning_rate", "Extra inputs"),
        (_with(stages={"epochs": "many"}), "stages.epochs", "valid integer"),
        (_with(joint={"loss": "kl"}), "joint.loss", "'kd' or 'mse'"),
        (_with(calibration="softmax"), "calibration", "'none', 'standardize' or 'temperature'"),
        (_with(stages={"epochs": 0}), "stages.epochs", "greater than or equal to 1"),
        (_with(amalgamation={"widths": {"default": 1.5}}), "amalgamation.widths", "width of default must be an int >= 1 or a ratio in (0, 1], got 1.5"),
        (_with(amalgamation={"widths": {"conv2": 0}}), "amalgamation.widths", "width of conv2 must be"),
        (_with(amalgamation={"widths": {"conv2": -3}}), "amalgamation.widths", "got -3"),
        (_with(amalgamation={"max_energy": 1.5}), "amalgamation.max_energy", "less than or equal to 1"),
        (_with(amalgamation={"mode": "sgd", "strategy": "ifa"}), "amalgamation", "strategy ifa is implemented for mode pca only"),
        (_with(version=2), "version", "unsupported job version 2; this amalgam reads version 1"),
        (_with(name="has space"), "name", "should match pattern"),
        (_with(pool={"sources": [{"dataset": "cifar"}]}), "pool.sources.0.dataset", "'mnist' or 'fashion'"),
        (_with(pool={"sources": []}), "pool.sources", "at least 1 item"),
        ({k: v for k, v in MINIMAL.items() if k != "zoo"}, "zoo", "Field required"),
    ],
)
def test_invalid_jobs_are_one_line_naming_file_and_field(tmp_path, raw, field, message):
    path = _write(tmp_path / "bad.yaml", raw)
    with pytest.raises(AmalgamError) as exc:
        load_job(path)
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: field {field}: "), text
    assert message in text, text
    assert "Value error," not in text  # pydantic's prefix is stripped


def test_file_level_errors_are_one_line(tmp_path):
    cases = [
        (tmp_path / "missing.yaml", None, "job file not found"),
        (tmp_path / "list.yaml", "- a\n- b\n", "a job file must be a YAML mapping"),
        (tmp_path / "broken.yaml", "name: x\npool: [unclosed\n", "malformed YAML"),
    ]
    for path, text, message in cases:
        if text is not None:
            path.write_text(text)
        with pytest.raises(AmalgamError) as exc:
            load_job(path)
        assert "\n" not in str(exc.value) and str(exc.value).startswith(str(path)) and message in str(exc.value)
    with pytest.raises(AmalgamError, match=r"broken\.yaml: line \d+ malformed YAML"):
        load_job(tmp_path / "broken.yaml")
    with pytest.raises(AmalgamError, match="x.yaml: a job file must be a YAML mapping"):
        parse_job(None, Path("x.yaml"))


def test_defaults_are_the_documented_ones():
    job = Job.model_validate({"name": "d", "zoo": "z.yaml", "pool": MINIMAL["pool"]})
    assert job.calibration == "standardize" and job.amalgamation.mode == "pca" and job.amalgamation.strategy == "dfa"
    assert job.amalgamation.balance and job.amalgamation.widths == {"default": 0.4}
    assert job.stages.closed_form_first and job.joint.loss == "kd" and job.batch_size == 256


# --- amalgam validate ---------------------------------------------------------------------


def test_validate_ok_on_a_tiny_zoo(tmp_path, data_root, capsys):
    make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = _write(tmp_path / "job.yaml", MINIMAL)
    assert main(["validate", str(job)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip() == f"{job}: ok (job tiny; zoo tiny: 2 teachers, 5 classes; amalgamation pca/dfa)"


def test_validate_missing_zoo_is_exit_2_with_one_line(tmp_path, capsys):
    job = _write(tmp_path / "job.yaml", _with(zoo="nowhere/zoo.yaml"))
    assert main(["validate", str(job)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("amalgam: error: ")
    assert f"{tmp_path / 'nowhere' / 'zoo.yaml'}: zoo manifest not found" in captured.err


def test_validate_bad_job_is_exit_2_naming_the_field(tmp_path, capsys):
    job = _write(tmp_path / "job.yaml", _with(stages={"epochs": "many"}))
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{job}: field stages.epochs: " in err


def test_validate_expands_the_store_uri_like_run(tmp_path, capsys, monkeypatch):
    """`store.uri: $VAR` is expanded by validate too: a variable holding credentials is refused
    before any run (it used to pass validate and fail only at `amalgam run`)."""
    monkeypatch.setenv("AMALGAM_TEST_STORE", "s3://AKIAEXAMPLE:notasecret@bucket/prefix")
    job = _write(tmp_path / "job.yaml", _with(store={"uri": "$AMALGAM_TEST_STORE"}))
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{job}: field store.uri: $AMALGAM_TEST_STORE expands to a URI with credentials" in err
    assert "notasecret" not in err


def test_validate_refuses_teachers_of_different_topologies(tmp_path, capsys):
    make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8, 8])])
    job = _write(tmp_path / "job.yaml", MINIMAL)
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher b has a different topology from teacher a" in err


def test_store_uri_follows_amalgam_store_uri_and_expands_before_choosing_s3(tmp_path, monkeypatch):
    """The KubeRay overlays set AMALGAM_STORE_URI=s3://...; a job with no store: section must use it."""
    from amalgam.job import parse_job

    raw = {"version": 1, "name": "x", "zoo": "z.yaml", "pool": {"sources": [{"dataset": "mnist"}]}}
    monkeypatch.delenv("AMALGAM_STORE_URI", raising=False)
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    assert parse_job(dict(raw), tmp_path / "j.yaml").store_uri() == str(tmp_path / "home" / "store")
    monkeypatch.setenv("AMALGAM_STORE_URI", "s3://bucket/store")
    assert parse_job(dict(raw), tmp_path / "j.yaml").store_uri() == "s3://bucket/store"
    monkeypatch.delenv("AMALGAM_STORE_URI")
    monkeypatch.setenv("MY_STORE", "s3://other/prefix")
    assert parse_job({**raw, "store": {"uri": "$MY_STORE"}}, tmp_path / "j.yaml").store_uri() == "s3://other/prefix"
    monkeypatch.setenv("MY_STORE", "s3://AKIA:secret@bucket/p")
    with pytest.raises(AmalgamError, match="expands to a URI with credentials"):
        parse_job({**raw, "store": {"uri": "$MY_STORE"}}, tmp_path / "j.yaml").store_uri()
