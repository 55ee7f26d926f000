import pytest
import torch

from amalgam.classes import ClassSpace
from amalgam.errors import AmalgamError


def test_concatenation_order_and_slices():
    cs = ClassSpace.from_teachers([("t1", ["mnist/5", "mnist/6"]), ("t2", ["fashion/Bag", "mnist/0", "mnist/1"])])
    assert cs.names == ("mnist/5", "mnist/6", "fashion/Bag", "mnist/0", "mnist/1")
    assert cs.slices == (slice(0, 2), slice(2, 5))
    assert cs.teacher_of().tolist() == [0, 0, 1, 1, 1]


def test_remap_by_name_not_position():
    cs = ClassSpace.from_teachers([("t1", ["mnist/5", "mnist/6"]), ("t2", ["mnist/1", "mnist/0"])])
    local = [f"mnist/{i}" for i in range(10)]
    got = cs.remap(local, torch.tensor([0, 1, 5, 6, 9]))
    assert got.tolist() == [3, 2, 0, 1, -1]


def test_overlap_is_the_union_in_first_seen_order():
    # Issue 11: teachers may share classes (this refused them before); tests/test_overlap.py has the rest.
    cs = ClassSpace.from_teachers([("t1", ["mnist/0", "mnist/1"]), ("t2", ["mnist/1", "mnist/2"])])
    assert cs.names == ("mnist/0", "mnist/1", "mnist/2")
    assert cs.positions == ((0, 1), (1, 2)) and cs.blocks == (slice(0, 2), slice(2, 4))
    assert cs.shared == ("mnist/1",) and cs.overlapping
    with pytest.raises(AmalgamError, match=r"teachers share classes \(mnist/1\)"):
        cs.slices


def test_duplicate_within_teacher_is_refused():
    with pytest.raises(AmalgamError, match=r"teacher t1: class 'mnist/0' listed twice"):
        ClassSpace.from_teachers([("t1", ["mnist/0", "mnist/0"])])
