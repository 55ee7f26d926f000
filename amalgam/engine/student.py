"""The student: the teachers' topology with each unit at its tap's compact width.

The last layer's width is the total number of classes, in the class-space order
``[teacher 1 classes | teacher 2 classes | ...]``. Any registered architecture family
works (``amalgam.zoo.arch``): the tapped CNN, ResNets, EfficientNet-Lite. Teachers of one
family may differ in width; teachers that differ in topology (another family, another
number of stages or blocks, another input size) have no one-to-one taps, so the
layer-wise method refuses them (README, "Real backbones", says what a CFL-style
extension would need).
"""

from __future__ import annotations

from torch import nn

from amalgam.errors import AmalgamError
from amalgam.zoo.arch import build_net


def _describe(cfg) -> str:
    return cfg.describe() if hasattr(cfg, "describe") else f"{type(cfg).arch_name} {cfg.topology()}"


def common_topology(names: list[str], configs: list) -> object:
    """Check that all teachers share one topology (widths may differ); return the first's config."""
    ref = configs[0]
    for name, cfg in zip(names[1:], configs[1:]):
        if type(cfg) is not type(ref) or cfg.topology() != ref.topology():
            raise AmalgamError(
                f"teacher {name} has a different topology from teacher {names[0]} "
                f"({_describe(cfg)} vs {_describe(ref)}); the layer-wise method needs matching taps"
            )
    return ref


def student_config(teacher_config, widths: dict[str, int], num_classes: int):
    """``widths`` maps every non-head unit name (``conv1``, ``layer2`` ...) to its compact width."""
    names = teacher_config.unit_names()[:-1]
    missing = [n for n in names if n not in widths]
    if missing:
        raise AmalgamError(f"no compact width for tap {missing[0]}")
    return teacher_config.for_student([widths[n] for n in names] + [num_classes])


def build_student(config) -> nn.Module:
    return build_net(config)
