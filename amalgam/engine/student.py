"""The student: the teachers' topology with each layer at its tap's compact width.

The last layer's width is the total number of classes, in the class-space order
``[teacher 1 classes | teacher 2 classes | ...]``.
"""

from __future__ import annotations

from amalgam.errors import AmalgamError
from amalgam.zoo.arch import CNNConfig, TappedCNN


def common_topology(names: list[str], configs: list[CNNConfig]) -> CNNConfig:
    """Check that all teachers share one topology (widths may differ); return the first's config."""
    ref = configs[0]
    for name, cfg in zip(names[1:], configs[1:]):
        if (
            len(cfg.conv_widths) != len(ref.conv_widths)
            or len(cfg.fc_widths) != len(ref.fc_widths)
            or cfg.image_size != ref.image_size
            or cfg.in_channels != ref.in_channels
            or cfg.kernel_size != ref.kernel_size
        ):
            raise AmalgamError(
                f"teacher {name} has a different topology from teacher {names[0]} "
                f"({len(cfg.conv_widths)} conv + {len(cfg.fc_widths)} fc at {cfg.image_size}px vs "
                f"{len(ref.conv_widths)} conv + {len(ref.fc_widths)} fc at {ref.image_size}px); "
                "the layer-wise method needs matching taps"
            )
    return ref


def student_config(teacher_config: CNNConfig, widths: dict[str, int], num_classes: int) -> CNNConfig:
    """``widths`` maps every non-head unit name (``conv1`` ...) to its compact width."""
    names = TappedCNN(teacher_config).unit_names[:-1]
    missing = [n for n in names if n not in widths]
    if missing:
        raise AmalgamError(f"no compact width for tap {missing[0]}")
    return teacher_config.with_widths([widths[n] for n in names] + [num_classes])


def build_student(config: CNNConfig) -> TappedCNN:
    return TappedCNN(config)
