"""Label-free calibration of independent teachers' logits, on a small trained zoo and real MNIST.

Teacher A's head is rescaled so its logits are ``10 * logits + 5``: the raw concatenated
argmax then goes to A almost always, and calibration estimated on unlabeled pool logits
must undo it. Numbers asserted below were measured on this setup (2 teachers trained on
2000 images for 2 epochs; pool of 2000 MNIST train images; 2000 MNIST test images).
"""

from __future__ import annotations

import copy

import pytest
import torch

from amalgam.classes import ClassSpace
from amalgam.data.pool import PoolSpec, build_pool
from amalgam.engine.calibrate import fit_calibration
from amalgam.engine.evaluate import evaluate_logits, predict_logits
from amalgam.zoo.manifest import load_zoo

A, B = "mnist-0-4", "mnist-5-9"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: avoids OpenMP oversubscription on a busy 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def logits(mnist2_zoo, data_root) -> dict:
    out = mnist2_zoo  # read only
    manifest, teachers = load_zoo(out / "zoo.yaml")
    space = ClassSpace.from_teachers([(t.name, t.classes) for t in manifest.teachers])
    assert list(space.teachers) == [A, B]
    pool = build_pool(PoolSpec.model_validate({"sources": [{"dataset": "mnist", "count": 2000}], "seed": 0}), data_root)
    test = build_pool(PoolSpec.model_validate({"sources": [{"dataset": "mnist", "split": "test", "count": 2000}]}), data_root)
    loud = copy.deepcopy(teachers[0])
    with torch.no_grad():  # the same teacher, with logits 10 * z + 5
        head = loud.net.layers["head"]
        head.weight.mul_(10)
        head.bias.mul_(10).add_(5)
    out = {"space": space, "labels": space.remap(test.class_names, test.labels)}
    for name, pair in (("quiet", teachers), ("loud", [loud, teachers[1]])):
        out[name] = {
            "pool": torch.cat([predict_logits(t, pool.images) for t in pair], 1),
            "test": torch.cat([predict_logits(t, test.images) for t in pair], 1),
        }
    return out


def _metrics(d: dict, which: str, method: str):
    calib = fit_calibration(d[which]["pool"], d["space"].slices, method)
    return calib, evaluate_logits(calib(d[which]["test"]), d["labels"], d["space"])


def test_the_loud_teacher_really_is_the_same_teacher_times_ten_plus_five(logits):
    q, l = logits["quiet"]["test"], logits["loud"]["test"]
    assert torch.allclose(l[:, :5], 10 * q[:, :5] + 5, rtol=1e-4, atol=1e-3)
    assert torch.equal(l[:, 5:], q[:, 5:])


def test_raw_concatenation_is_dominated_by_the_loud_teacher(logits):
    space = logits["space"]
    _, raw = _metrics(logits, "loud", "none")
    _, quiet_raw = _metrics(logits, "quiet", "none")
    # Each teacher is good at its own sub-task: measured task-aware 0.951 (A) and 0.915 (B).
    assert raw.task_aware[A] > 0.85 and raw.task_aware[B] > 0.8
    # But the argmax over all classes almost never picks B's classes: measured 0.0 of B's samples right,
    # comprehensive 0.4765 (A's samples only), against 0.7175 for the unscaled teachers.
    assert raw.comprehensive_per_task[B] < 0.02
    assert raw.comprehensive < 0.55
    assert quiet_raw.comprehensive > raw.comprehensive + 0.1
    preds = logits["loud"]["test"].argmax(1)
    assert float((preds < space.slices[1].start).float().mean()) > 0.95


def test_standardize_restores_comprehensive_accuracy(logits):
    _, raw = _metrics(logits, "loud", "none")
    calib, std = _metrics(logits, "loud", "standardize")
    # Measured: 0.82 comprehensive (0.79 on A's samples, 0.85 on B's).
    assert std.comprehensive > 0.75
    assert std.comprehensive > raw.comprehensive + 0.25
    assert std.comprehensive_per_task[A] > 0.65 and std.comprehensive_per_task[B] > 0.65
    # Calibration is per-teacher monotone: the within-task argmax never changes.
    assert std.task_aware == pytest.approx(raw.task_aware)
    # Standardising is invariant to a teacher's positive affine rescaling: the loud teacher
    # gets exactly the predictions the unscaled one gets.
    calib_q, _ = _metrics(logits, "quiet", "standardize")
    p_loud = calib(logits["loud"]["test"]).argmax(1)
    p_quiet = calib_q(logits["quiet"]["test"]).argmax(1)
    assert float((p_loud == p_quiet).float().mean()) >= 0.999
    # What was estimated: per teacher, one shift and one scale from the pool (no labels).
    pool = logits["loud"]["pool"]
    for s in logits["space"].slices:
        block = pool[:, s].double()
        assert torch.allclose(calib.shift[s], torch.full((s.stop - s.start,), float(block.mean())), rtol=1e-5)
        assert torch.allclose(calib.scale[s], torch.full((s.stop - s.start,), float(block.std())), rtol=1e-5)
        z = calib(pool)[:, s].double()
        assert float(z.mean()) == pytest.approx(0.0, abs=1e-4) and float(z.std()) == pytest.approx(1.0, abs=1e-4)
    d = calib.to_dict()
    assert d["method"] == "standardize" and len(d["shift"]) == len(d["scale"]) == 10


def test_temperature_undoes_scale_but_keeps_shift(logits):
    slices = logits["space"].slices
    calib_q, quiet = _metrics(logits, "quiet", "temperature")
    # A pure x10 teacher: temperature calibration gives the same logits as for the unscaled teacher.
    scaled_pool = logits["quiet"]["pool"].clone()
    scaled_test = logits["quiet"]["test"].clone()
    scaled_pool[:, slices[0]] *= 10
    scaled_test[:, slices[0]] *= 10
    calib_s = fit_calibration(scaled_pool, slices, "temperature")
    assert torch.equal(calib_s.shift, torch.zeros(10))
    assert torch.allclose(calib_s(scaled_test), calib_q(logits["quiet"]["test"]), rtol=1e-4, atol=1e-4)
    scaled = evaluate_logits(calib_s(scaled_test), logits["labels"], logits["space"])
    # Measured: 0.824 comprehensive, against 0.4765 for the raw x10 logits.
    assert scaled.comprehensive == pytest.approx(quiet.comprehensive, abs=1e-3)
    assert scaled.comprehensive > 0.75
    assert evaluate_logits(scaled_test, logits["labels"], logits["space"]).comprehensive < 0.55
    # With +5 on top, temperature keeps the shift (divided by the scale): a constant offset on A's slice.
    calib_l = fit_calibration(logits["loud"]["pool"], slices, "temperature")
    diff = calib_l(logits["loud"]["test"]) - calib_q(logits["quiet"]["test"])
    offset = 5 / float(calib_l.scale[0])
    assert torch.allclose(diff[:, slices[0]], torch.full_like(diff[:, slices[0]], offset), atol=1e-3)
    assert torch.allclose(diff[:, slices[1]], torch.zeros_like(diff[:, slices[1]]), atol=1e-6)


def test_none_is_the_identity(logits):
    calib = fit_calibration(logits["loud"]["pool"], logits["space"].slices, "none")
    assert torch.equal(calib(logits["loud"]["test"]), logits["loud"]["test"])
    assert calib.to_dict()["method"] == "none"


def test_unknown_calibration_method_is_refused():
    logits = torch.randn(50, 4)
    with pytest.raises(ValueError, match="unknown calibration"):
        fit_calibration(logits, [slice(0, 2), slice(2, 4)], "standardise")  # type: ignore[arg-type]
