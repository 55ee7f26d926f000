import json

import pytest
import torch

from amalgam.classes import ClassSpace
from amalgam.engine.evaluate import Metrics, evaluate_logits
from amalgam.engine.report import MethodResult, format_table, write_report

SPACE = ClassSpace.from_teachers([("digits", [f"mnist/{i}" for i in range(5)]), ("fashion", ["fashion/Bag", "fashion/Coat", "fashion/Shirt"])])
FILES = ["report.json", "report.md", "stage_losses.png", "accuracy.png", "confusion.png"]


def _metrics(seed: int) -> Metrics:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SPACE), (200,), generator=g)
    logits = torch.randn(200, len(SPACE), generator=g)
    logits[torch.arange(200), labels] += 1.5  # better than chance, not perfect
    return evaluate_logits(logits, labels, SPACE)


def _results() -> list[MethodResult]:
    return [
        MethodResult("teachers", _metrics(0), 200_000, 3_000_000, 0.8, 20.5, notes="upper bound"),
        MethodResult("student", _metrics(1), 50_000, 900_000, 0.3, 6.25),
        MethodResult("supervised", _metrics(2), 50_000, 900_000, None, None, labels_used=True),
    ]


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_all_files(tmp_path):
    results = _results()
    curves = {"conv1": [2.0, 1.0, 0.5], "conv2": [40.0, 10.0, 5.0, 4.0], "head": [0.3, 0.1]}
    extra = {"seed": 0, "fam": "pca", "zoo": tmp_path / "zoo.yaml"}
    write_report(tmp_path / "run", "Amalgamation test", SPACE, results, main="student", stage_curves=curves, extra=extra)
    run = tmp_path / "run"
    for f in FILES:
        assert (run / f).is_file(), f
    assert not [p.name for p in run.iterdir() if p.name not in FILES]  # no temp files left behind
    for f in FILES[2:]:
        assert _is_png(run / f), f
        assert (run / f).stat().st_size > 1024, f

    doc = json.loads((run / "report.json").read_text())
    assert doc["main"] == "student" and doc["extra"]["seed"] == 0 and doc["extra"]["fam"] == "pca"
    assert doc["stage_curves"] == curves
    assert [t["name"] for t in doc["teachers"]] == ["digits", "fashion"]
    for r, d in zip(results, doc["methods"]):
        assert d["name"] == r.name and d["params"] == r.params and d["macs"] == r.macs
        assert d["latency_ms_b1"] == r.latency_ms_b1 and d["labels_used"] == r.labels_used
        assert Metrics.from_dict(d["metrics"]).to_dict() == r.metrics.to_dict()

    md = (run / "report.md").read_text()
    assert md.startswith("# Amalgamation test\n")
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "| digits |" in header and "| fashion |" in header and "comprehensive" in header
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["teachers", "student", "supervised"]
    student = results[1].metrics
    assert f"{student.task_aware['digits']:.4f}" in rows[1] and f"{student.comprehensive:.4f}" in rows[1]
    assert "50,000" in rows[1] and rows[2].rstrip().endswith("yes |")
    assert "- seed: 0" in md and "- fam: pca" in md


def test_format_table_handles_rows_without_metrics():
    results = [*_results(), MethodResult("size only", None, 123, None, 1.0, None)]
    table = format_table(SPACE, results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert lines[-1].startswith("| size only | - | - | - | 123 | - | 1.00 | - | no |")


def test_no_curves_skips_stage_plot_and_removes_stale_one(tmp_path):
    (tmp_path / "stage_losses.png").write_bytes(b"stale")
    write_report(tmp_path, "t", SPACE, _results(), main="teachers")
    assert not (tmp_path / "stage_losses.png").exists()
    assert _is_png(tmp_path / "confusion.png")


def test_main_must_be_a_scored_method(tmp_path):
    with pytest.raises(ValueError, match="not among the results"):
        write_report(tmp_path, "t", SPACE, _results(), main="nope")
    results = [*_results(), MethodResult("size only", None, 1, None, None, None)]
    with pytest.raises(ValueError, match="has no metrics"):
        write_report(tmp_path, "t", SPACE, results, main="size only")
