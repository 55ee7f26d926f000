"""Function matching in the joint stage (Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent"): train on augmented pool images, with the target
recomputed on exactly the image the student sees.

Distilling fixed targets on the pool lets the student reproduce the teachers on those
images only (the joint loss on the pool keeps falling while test accuracy stalls). With
consistent views every batch is a fresh set of inputs: the teachers (and the domain gate,
for the gated target) are re-run on the augmented batch, so the student matches the
teachers' *function*, not a table of pool outputs. The calibration, fitted once on the
clean pool, stays fixed; so does the gate.

Views, both optional (job field ``joint.augment``):

``shift``  each image translated by a random integer offset in ``[-shift, shift]`` pixels
           on both axes, the uncovered border filled with 0 (the black background of
           MNIST / Fashion-MNIST; images are in [0, 1]).
``mixup``  each image blended with another image of the batch, ``lam x_i + (1 - lam) x_j``,
           ``lam ~ Beta(mixup, mixup)`` per image (mixup's alpha; 0 = off). No labels are
           mixed: the target is the teachers' output on the blended image.

Random draws come from their own generators seeded by the job seed, so a run is
deterministic and the batch order is the same as without augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x`` [B, C, H, W] by its own offset in [-shift, shift]^2, zero fill."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    off = torch.randint(0, 2 * shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off.tolist())])


def mix(x: torch.Tensor, alpha: float, gen: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    """Blend each image with a random other image of the batch, weight ``Beta(alpha, alpha)``."""
    if alpha <= 0 or len(x) < 2:
        return x
    partner = torch.randperm(len(x), generator=gen)
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=len(x))).to(x.dtype).view(-1, 1, 1, 1)
    return lam * x + (1 - lam) * x[partner]


@dataclass
class AugmentTerm:
    """What :func:`amalgam.engine.joint.train_end_to_end` needs for function matching.

    ``teachers(x)`` maps an augmented float batch in [0, 1] to ``(target, codes)``: the joint
    target on exactly those images (teachers, fixed calibration, gate; eval, no_grad) and,
    when the feature terms are on, the compact codes from the same teacher forward
    (else ``{}``)."""

    shift: int
    mixup: float
    teachers: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    seed: int = 0

    def __post_init__(self) -> None:
        # Own streams: the batch order (the trainer's generator) is the same as without augmentation.
        self.gen = torch.Generator().manual_seed(self.seed + 7919)
        self.rng = np.random.default_rng(self.seed + 7919)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The augmented batch the student (and the teachers) see."""
        return mix(random_shift(x, self.shift, self.gen), self.mixup, self.gen, self.rng)
