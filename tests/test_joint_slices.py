"""The per-teacher slice term of the joint loss (engine/joint.py ``slice_loss``): a golden value,
shift invariance inside each block, the weighting by the target's mass on each block, non-contiguous
positions (shared classes), the joint stage with it off (bit-identical) and on, and the job field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from amalgam.engine.joint import SliceTerm, as_index, slice_loss, train_end_to_end
from amalgam.errors import AmalgamError
from amalgam.job import load_job
from amalgam.zoo.arch import CNNConfig, TappedCNN

BLOCKS = (slice(0, 2), slice(2, 5))


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(x: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in x]
    return [v / sum(e) for v in e]


def test_golden_value_by_hand():
    target = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    student = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    t = 2.0
    # Block masses of softmax(target) over all five classes (temperature 1).
    full = _softmax(target[0].tolist(), 1.0)
    masses = [sum(full[0:2]), sum(full[2:5])]
    want = sum(m * _kl(_softmax(target[0, s].tolist(), t), _softmax(student[0, s].tolist(), t))
               for m, s in zip(masses, BLOCKS)) * t * t
    got = slice_loss(student, target, BLOCKS, t)
    assert math.isclose(got.item(), want, rel_tol=1e-5), (got.item(), want)
    # The golden number (block masses 0.6392 / 0.3608), so a change to the reference above shows too.
    assert math.isclose(got.item(), 0.762947, rel_tol=1e-5)


def test_shift_inside_a_block_costs_nothing_and_log_probs_equal_logits():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(16, 5, generator=g) * 3
    shifted = target.clone()
    shifted[:, 0:2] += 7.0
    shifted[:, 2:5] -= 4.0
    assert slice_loss(shifted, target, BLOCKS, 3.0).item() < 1e-6
    # A gated target arrives as log-probabilities: the same within-block distributions and masses.
    assert torch.allclose(slice_loss(torch.zeros(16, 5), target, BLOCKS, 3.0),
                          slice_loss(torch.zeros(16, 5), target.log_softmax(1), BLOCKS, 3.0), atol=1e-6)


def test_each_teacher_teaches_its_own_images():
    """All the target's mass on block 0: a student wrong inside block 1 costs (almost) nothing."""
    target = torch.tensor([[5.0, 0.0, -30.0, -31.0, -32.0]])
    right_in_0 = torch.tensor([[6.0, 1.0, 0.0, 0.0, 9.0]])  # block 0 as the target (shifted), block 1 reversed
    wrong_in_0 = torch.tensor([[0.0, 3.0, -1.0, -2.0, -3.0]])  # block 1 right
    assert slice_loss(right_in_0, target, BLOCKS, 1.0).item() < 1e-6 * 40
    assert slice_loss(wrong_in_0, target, BLOCKS, 1.0).item() > 1.0
    student = torch.randn(1, 5, requires_grad=True)
    slice_loss(student, target, BLOCKS, 2.0).backward()
    assert student.grad[0, 2:].abs().max().item() < 1e-9 * 40  # no gradient into block 1


def test_non_contiguous_positions_equal_the_same_block_laid_out_contiguously():
    """Teachers that share classes have non-contiguous positions: the term is the same function of them."""
    g = torch.Generator().manual_seed(1)
    target, student = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    perm = [0, 2, 1, 3, 4]  # teacher 0 owns columns 0 and 2 of the permuted layout
    got = slice_loss(student[:, perm], target[:, perm], ((0, 2), (1, 3, 4)), 2.0)
    assert torch.allclose(got, slice_loss(student, target, BLOCKS, 2.0), atol=1e-6)
    assert as_index((2, 3, 4)) == slice(2, 5) and as_index((0, 2)) == [0, 2]


def _tiny_training(slices: SliceTerm | None) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    net = TappedCNN(CNNConfig(conv_widths=[4], fc_widths=[8], num_classes=5, image_size=8))
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g)
    target = torch.randn(64, 5, generator=g) * 2
    curve = train_end_to_end(net, images, target, "kd", 2, 1e-2, batch_size=16, temperature=2.0, log=lambda _m: None,
                             slices=slices)
    return curve, torch.cat([p.detach().flatten() for p in net.parameters()])


def test_joint_stage_with_the_term_off_is_bit_identical_and_on_adds_it():
    off, w_off = _tiny_training(None)
    zero, w_zero = _tiny_training(SliceTerm(0.0, 4.0, BLOCKS))
    assert off == zero and torch.equal(w_off, w_zero)
    on, w_on = _tiny_training(SliceTerm(1.0, 4.0, BLOCKS))
    assert on[0] > off[0] and not torch.equal(w_on, w_off)  # the term is in the loss and in the gradients


def test_job_field_defaults_and_errors(tmp_path: Path):
    from amalgam.classes import ClassSpace
    from amalgam.engine.run_local import joint_slices
    from tests.test_job import _with, _write

    job = load_job(_write(tmp_path / "j.yaml", _with(joint__slices={"weight": 2.0})))
    assert job.joint.slices.weight == 2.0 and job.joint.slices.temperature == 4.0
    space = ClassSpace.from_teachers([("a", ["x/0", "x/1"]), ("b", ["x/1", "y/0", "y/1"])])  # x/1 shared
    term = joint_slices(job, space)
    assert term == SliceTerm(2.0, 4.0, ((0, 1), (1, 2, 3)))
    assert joint_slices(load_job(_write(tmp_path / "k.yaml", _with())), space) is None  # off by default
    with pytest.raises(AmalgamError, match=r"j2\.yaml.*joint\.slices\.temprature") as exc:
        load_job(_write(tmp_path / "j2.yaml", _with(joint__slices={"temprature": 2.0})))
    assert "\n" not in str(exc.value)
    with pytest.raises(AmalgamError, match=r"joint\.slices\.weight"):
        load_job(_write(tmp_path / "j3.yaml", _with(joint__slices={"weight": -1})))
