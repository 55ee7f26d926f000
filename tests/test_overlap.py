"""Teachers whose class sets overlap (issue 11, part 5).

The student's class space is the union of the teachers' classes in first-seen order; a
shared class's target combines the teachers that know it (``ClassSpace.to_union``: the mean
of their calibrated logits, or for the gated mixture the sum of its probability), and the
report adds comprehensive accuracy on shared and on unshared classes.

The end-to-end test trains two small MNIST teachers, digits 0-5 and 4-9 (shared: 4 and 5),
2 epochs on 3000 images each, and amalgamates them (``amalgam run --local``) on a 3000-image
pool; test: 2000 MNIST test images. Measured with one torch thread (zoo 4-6 s, each run 8-16 s):

    teachers task-aware 0.964 / 0.931; ensemble (standardize) comprehensive 0.906
    (shared 0.960, unshared 0.893); student (kd, calibrated) comprehensive 0.872,
    shared 0.947, unshared 0.854; gated ensemble shared 0.995, unshared 0.608;
    student (kd, gated, 1 joint epoch) shared 0.989, unshared 0.528
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from amalgam.classes import ClassSpace
from amalgam.engine.evaluate import Metrics, evaluate_logits
from amalgam.engine.gating import gated_targets
from amalgam.engine.report import MethodResult, format_table, write_report
from amalgam.errors import AmalgamError

# a knows x/0 x/1 x/2, b knows x/2 x/3: x/2 is shared. Concatenated columns: [a0 a1 a2 | b2 b3].
SPACE = ClassSpace.from_teachers([("a", ["x/0", "x/1", "x/2"]), ("b", ["x/2", "x/3"])])
DISJOINT = ClassSpace.from_teachers([("a", ["x/0", "x/1"]), ("b", ["x/2", "x/3", "x/4"])])


# ------------------------------------------------------------------------------ the class space


def test_union_in_first_seen_order_with_blocks_and_positions():
    assert SPACE.names == ("x/0", "x/1", "x/2", "x/3") and len(SPACE) == 4
    assert SPACE.blocks == (slice(0, 3), slice(3, 5)) and SPACE.width == 5
    assert SPACE.positions == ((0, 1, 2), (2, 3))
    assert SPACE.column_class().tolist() == [0, 1, 2, 2, 3]
    assert SPACE.known().tolist() == [[True, True, True, False], [False, False, True, True]]
    assert SPACE.shared == ("x/2",) and SPACE.overlapping
    # A later teacher's order does not move a class already placed; its new classes follow.
    cs = ClassSpace.from_teachers([("a", ["x/1", "x/0"]), ("b", ["x/5", "x/0", "x/4"]), ("c", ["x/4", "x/1"])])
    assert cs.names == ("x/1", "x/0", "x/5", "x/4")
    assert cs.positions == ((0, 1), (2, 1, 3), (3, 0))
    assert cs.shared == ("x/1", "x/0", "x/4")


def test_a_disjoint_zoo_is_exactly_the_concatenation():
    assert DISJOINT.names == ("x/0", "x/1", "x/2", "x/3", "x/4")
    assert DISJOINT.slices == DISJOINT.blocks == (slice(0, 2), slice(2, 5))
    assert DISJOINT.positions == ((0, 1), (2, 3, 4))
    assert DISJOINT.shared == () and not DISJOINT.overlapping
    assert DISJOINT.teacher_of().tolist() == [0, 0, 1, 1, 1]
    z = torch.randn(3, 5)
    for how in ("mean", "logsumexp"):
        assert DISJOINT.to_union(z, how) is z  # untouched: the disjoint pipeline is bit for bit the same


def test_slices_and_single_owner_are_refused_when_teachers_share_classes():
    with pytest.raises(AmalgamError, match=r"teachers share classes \(x/2\): .*ClassSpace.positions"):
        SPACE.slices
    with pytest.raises(AmalgamError, match=r"teachers share classes"):
        SPACE.teacher_of()


def test_a_class_twice_in_one_teacher_is_still_refused():
    with pytest.raises(AmalgamError, match=r"teacher b: class 'x/2' listed twice"):
        ClassSpace.from_teachers([("a", ["x/0", "x/2"]), ("b", ["x/2", "x/2"])])


# ------------------------------------------------------------------------------ the combination rule


def test_mean_rule_averages_the_teachers_that_know_a_shared_class():
    concat = torch.tensor([[1.0, 2.0, 3.0, 5.0, 7.0], [0.0, -1.0, -2.0, 4.0, 0.5]])
    union = SPACE.to_union(concat)  # "mean" is the default: logits
    assert union.tolist() == [[1.0, 2.0, 4.0, 7.0], [0.0, -1.0, 1.0, 0.5]]


def test_mean_rule_outvotes_a_teacher_confident_outside_its_domain():
    # An image of x/3 (only b knows it): a, which never saw x/3, is sure it is x/2; b says x/3.
    # max would make x/2 win; the mean of a's and b's x/2 logits lets b's x/3 win.
    concat = torch.tensor([[-1.0, -1.0, 3.0, -1.0, 2.5]])
    assert SPACE.to_union(concat).argmax(1).item() == 3
    assert max(concat[0, 2], concat[0, 3]) > concat[0, 4]  # what max would have done


def test_logsumexp_rule_sums_a_mixtures_probability():
    p = torch.tensor([[0.10, 0.20, 0.30, 0.25, 0.15]])
    union = SPACE.to_union(p.log(), "logsumexp").exp()
    assert torch.allclose(union, torch.tensor([[0.10, 0.20, 0.55, 0.15]]))
    assert torch.allclose(union.sum(1), torch.ones(1))


def test_to_union_refuses_the_wrong_width_and_rule():
    with pytest.raises(AmalgamError, match=r"expected \[N, 5\]"):
        SPACE.to_union(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown combination"):
        SPACE.to_union(torch.zeros(2, 5), "max")


def test_gated_mixture_over_shared_classes_is_normalised():
    gate = torch.tensor([[math.log(0.75), math.log(0.25)]])
    cal = torch.tensor([[0.0, 0.0, math.log(2.0), math.log(3.0), 0.0]])  # a: [.25 .25 .5]  b: [.75 .25]
    p = gated_targets(gate, cal, SPACE).exp()
    # x/2: 0.75 * 0.5 (a) + 0.25 * 0.75 (b); x/3: 0.25 * 0.25 (b only)
    assert torch.allclose(p, torch.tensor([[0.1875, 0.1875, 0.5625, 0.0625]]))
    # Given the teachers' blocks instead of the space, the mixture stays concatenated (disjoint callers).
    assert gated_targets(gate, cal, SPACE.blocks).shape == (1, 5)


# ------------------------------------------------------------------------------ evaluation and report

# (true label in the union, student logits over [x/0 x/1 x/2 x/3])
ROWS = [
    (2, [0, 0, 5, 1]),  # shared, right
    (2, [0, 0, 1, 4]),  # shared, wrong overall (x/3), right within a's classes
    (0, [3, 1, 0, 4]),  # a only: wrong overall, right within a
    (3, [0, 0, 2, 6]),  # b only: right
    (1, [0, 2, 0, 0]),  # a only: right
]
LABELS = torch.tensor([r[0] for r in ROWS])
LOGITS = torch.tensor([r[1] for r in ROWS], dtype=torch.float)


def test_evaluation_with_shared_classes():
    m = evaluate_logits(LOGITS, LABELS, SPACE)
    # a's samples: every label in {x/0, x/1, x/2} (rows 0, 1, 2, 4): argmax within x/0..x/2 right on all 4.
    # b's samples: labels in {x/2, x/3} (rows 0, 1, 3): within x/2..x/3: right, wrong, right.
    assert m.task_aware == pytest.approx({"a": 1.0, "b": 2 / 3})
    assert m.comprehensive == pytest.approx(3 / 5)
    assert m.comprehensive_per_task == pytest.approx({"a": 2 / 4, "b": 2 / 3})
    assert m.shared == pytest.approx(1 / 2) and m.unshared == pytest.approx(2 / 3)
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["shared"] == pytest.approx(0.5) and d["unshared"] == pytest.approx(2 / 3)
    assert Metrics.from_dict(d).to_dict() == m.to_dict()
    # No shared-class sample: null, not a number.
    only_b = evaluate_logits(LOGITS[3:4], LABELS[3:4], SPACE)
    assert math.isnan(only_b.shared) and only_b.to_dict()["shared"] is None


def test_disjoint_metrics_carry_no_sharing_keys():
    m = evaluate_logits(torch.randn(4, 5), torch.tensor([0, 1, 2, 4]), DISJOINT)
    assert m.shared is None and m.unshared is None
    assert "shared" not in m.to_dict() and Metrics.from_dict(m.to_dict()).shared is None


def test_report_shows_shared_and_unshared_accuracy(tmp_path):
    m = evaluate_logits(LOGITS, LABELS, SPACE)
    results = [MethodResult("student", m, 10, 100, None, None)]
    table = format_table(SPACE, results)
    assert table.splitlines()[0].startswith("| method | a | b | comprehensive | shared | unshared | params")
    assert "| student | 1.0000 | 0.6667 | 0.6000 | 0.5000 | 0.6667 | 10 |" in table
    write_report(tmp_path, "overlap", SPACE, results, main="student")
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["classes"] == ["x/0", "x/1", "x/2", "x/3"] and doc["shared_classes"] == ["x/2"]
    assert doc["teachers"] == [{"name": "a", "classes": ["x/0", "x/1", "x/2"]}, {"name": "b", "classes": ["x/2", "x/3"]}]
    assert doc["methods"][0]["metrics"]["shared"] == 0.5
    assert "Shared classes (known by several teachers): x/2." in (tmp_path / "report.md").read_text()
    # A disjoint zoo's report is as before: no sharing columns or keys.
    dm = evaluate_logits(torch.randn(4, 5), torch.tensor([0, 1, 2, 4]), DISJOINT)
    assert "shared" not in format_table(DISJOINT, [MethodResult("s", dm, 1, 1, None, None)])
    write_report(tmp_path / "d", "disjoint", DISJOINT, [MethodResult("s", dm, 1, 1, None, None)], main="s")
    assert "shared_classes" not in json.loads((tmp_path / "d" / "report.json").read_text())


def test_a_student_of_overlapping_teachers_saves_and_loads(tmp_path):
    from amalgam.student_io import load_student, save_student
    from amalgam.zoo.arch import CNNConfig, TappedCNN
    from amalgam.zoo.manifest import InputSpec

    net = TappedCNN(CNNConfig(conv_widths=[2, 2], fc_widths=[4], num_classes=4))
    spec = InputSpec(shape=[1, 28, 28], mean=[0.5], std=[0.25])
    teachers = [("a", ["x/0", "x/1", "x/2"]), ("b", ["x/2", "x/3"])]
    save_student(tmp_path, net, list(SPACE.names), teachers, spec)
    _, classes, _ = load_student(tmp_path)
    assert classes == ["x/0", "x/1", "x/2", "x/3"]
    with pytest.raises(AmalgamError, match="not the union of the teachers' classes"):
        save_student(tmp_path / "bad", net, ["x/0", "x/2", "x/1", "x/3"], teachers, spec)


# ------------------------------------------------------------------------------ end to end

OVERLAP_JOB = {
    "version": 1,
    "name": "overlap",
    "zoo": "zoo/zoo.yaml",
    "pool": {"sources": [{"dataset": "mnist", "count": 3000}]},
    "calibration": "standardize",
    "amalgamation": {"mode": "pca", "strategy": "dfa", "balance": True, "widths": {"default": 0.4}},
    "stages": {"epochs": 2, "lr": 0.01},
    "joint": {"epochs": 2, "loss": "kd"},
    "baselines": {"kd": False, "supervised": False},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 2000}]}, "latency": False},
}
MAIN = "amalgamated (pca/dfa, kd, standardize)"


@pytest.fixture(scope="module")
def overlap_zoo(tmp_path_factory, data_root) -> Path:
    """Two MNIST teachers, digits 0-5 and 4-9, trained here by the zoo trainer (2 epochs, 3000 images)."""
    from amalgam.zoo.manifest import ZooManifest, write_manifest
    from amalgam.zoo.train import SMALL, TeacherRecipe, train_teacher

    d = tmp_path_factory.mktemp("overlap")
    (d / "zoo").mkdir()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        entries = [
            train_teacher(TeacherRecipe(name, "mnist", digits, SMALL, epochs=2, target_accuracy=0.9), d / "zoo",
                          data_root, limit=3000, seed=i)
            for i, (name, digits) in enumerate([("mnist-0-5", [0, 1, 2, 3, 4, 5]), ("mnist-4-9", [4, 5, 6, 7, 8, 9])])
        ]
    finally:
        torch.set_num_threads(before)
    write_manifest(ZooManifest(name="overlap", teachers=entries), d / "zoo" / "zoo.yaml")
    return d


def _run(workdir: Path, job: dict, out: str) -> dict:
    from amalgam.cli import main

    before = torch.get_num_threads()
    path = workdir / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    try:
        assert main(["run", str(path), "--local", "--out", str(workdir / out), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)  # `--threads 1` sets it process-wide
    return json.loads((workdir / out / "report.json").read_text())


def test_overlapping_zoo_end_to_end_learns_the_shared_classes(overlap_zoo):
    report = _run(overlap_zoo, OVERLAP_JOB, "run")
    assert report["classes"] == [f"mnist/{i}" for i in range(10)]  # the union: 0-5, then 6-9
    assert report["shared_classes"] == ["mnist/4", "mnist/5"]
    assert [t["classes"] for t in report["teachers"]] == [[f"mnist/{i}" for i in range(6)],
                                                          [f"mnist/{i}" for i in range(4, 10)]]
    methods = {m["name"]: m["metrics"] for m in report["methods"]}
    main_m = methods[MAIN]
    # Shared classes learnt: chance is 0.1 over 10 classes. Measured 0.947 (unshared 0.854).
    assert main_m["shared"] > 0.85 and main_m["unshared"] > 0.75 and main_m["comprehensive"] > 0.8
    confusion = torch.tensor(main_m["confusion"])
    for c in (4, 5):  # each shared digit on its own
        assert confusion[c, c] / confusion[c].sum() > 0.8, c
    assert main_m["task_aware"]["mnist-0-5"] > 0.9 and main_m["task_aware"]["mnist-4-9"] > 0.8
    # The calibrated ensemble combines shared classes as the targets do (measured shared 0.960).
    assert methods["ensemble (standardize)"]["shared"] > 0.9
    # Single teachers answer only their own task; the sharing columns are null for them.
    assert methods["teacher mnist-0-5"]["shared"] is None and methods["teacher mnist-0-5"]["task_aware"]["mnist-0-5"] > 0.9
    md = (overlap_zoo / "run" / "report.md").read_text()
    assert "| comprehensive | shared | unshared |" in md and "Shared classes (known by several teachers): mnist/4, mnist/5." in md
    student = json.loads((overlap_zoo / "run" / "student.json").read_text())
    assert student["classes"] == report["classes"]


def test_overlapping_zoo_gated_mixture_runs(overlap_zoo):
    job = {**OVERLAP_JOB, "name": "overlap-gated",
           "joint": {"epochs": 1, "loss": "kd", "target": "gated", "gate": {"epochs": 1, "keep": 0.7}}}
    report = _run(overlap_zoo, job, "run-gated")
    methods = {m["name"]: m["metrics"] for m in report["methods"]}
    gated = methods["ensemble (gated, label-free)"]
    # The mixture sums the mass of both experts on a shared class (measured shared 0.99); its weak
    # point on this zoo is the gate itself (both teachers see digits; unshared measured 0.61).
    assert gated["shared"] > 0.9 and gated["unshared"] > 0.3
    assert methods["amalgamated (pca/dfa, kd, gated)"]["shared"] > 0.85
