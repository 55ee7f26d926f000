"""Label-free domain gating: which teacher's domain does an image come from?

Independent teachers are overconfident on the other teachers' images, so even calibrated
logits pick the wrong teacher for a share of the pool (about 13 % on the demo zoo), and
that, not within-domain accuracy, is most of the comprehensive error. The gate is a small
CNN trained on the pool with pseudo-labels: the teacher whose calibrated logits win, kept
only where that win is clear (the top ``keep`` fraction by margin). Trained on many
images, it generalises past the per-image mistakes it was taught with.

The gated target is a mixture of experts over the union of classes:
``log p(c | x) = log p(t(c) | x) + log softmax_{c in t}(calibrated logits of teacher t)``,
which the joint stage distils into the student. No label is read.

``calibrated`` is always the teachers' concatenated outputs (teacher ``i`` in its block, see
:mod:`amalgam.classes`). When teachers share classes the mixture is mapped to the union by
``ClassSpace.to_union(..., "logsumexp")``: a shared class gets the summed mass of every teacher
that knows it, ``log p(c | x) = logsumexp_{t knows c} [log p(t | x) + log softmax_t(c)]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amalgam.classes import ClassSpace
from amalgam.engine.evaluate import predict_logits
from amalgam.engine.joint import train_end_to_end
from amalgam.student_io import DeployedStudent
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.manifest import InputSpec


def teacher_margins(calibrated: torch.Tensor, slices: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the winning teacher (by its best calibrated logit) and its margin over the runner-up."""
    best = torch.stack([calibrated[:, s].max(1).values for s in slices], 1)
    top2 = best.topk(min(2, len(slices)), 1)
    margin = top2.values[:, 0] - (top2.values[:, 1] if len(slices) > 1 else 0)
    return top2.indices[:, 0], margin


def fit_gate(
    images: torch.Tensor,
    calibrated: torch.Tensor,
    slices: tuple[slice, ...],
    input_spec: InputSpec,
    epochs: int = 2,
    keep: float = 0.7,
    lr: float = 2e-3,
    seed: int = 0,
    log=print,
) -> DeployedStudent:
    """Train the gate on the confident part of the pool's pseudo-labels."""
    torch.manual_seed(seed)
    pseudo, margin = teacher_margins(calibrated, slices)
    chosen = margin >= margin.quantile(1 - keep)
    size = input_spec.shape[-1]
    gate = DeployedStudent(
        TappedCNN(CNNConfig(in_channels=input_spec.shape[0], image_size=size, conv_widths=[8, 16, 32],
                            fc_widths=[32], num_classes=len(slices))),
        input_spec,
    )
    train_end_to_end(gate, images[chosen], pseudo[chosen], "ce", epochs, lr, seed=seed, desc="gate", log=log)
    return gate


def gated_targets(gate_logits: torch.Tensor, calibrated: torch.Tensor,
                  space: ClassSpace | tuple[slice, ...]) -> torch.Tensor:
    """Mixture-of-experts log-probabilities over the union of classes [N, C].

    ``space`` is the class space (the result is in its output order, shared classes combined)
    or just the teachers' blocks (the result is then in the concatenated order)."""
    blocks = space.blocks if isinstance(space, ClassSpace) else space
    log_gate = F.log_softmax(gate_logits, 1)
    mixed = torch.cat([log_gate[:, i : i + 1] + F.log_softmax(calibrated[:, s], 1) for i, s in enumerate(blocks)], 1)
    return space.to_union(mixed, "logsumexp") if isinstance(space, ClassSpace) else mixed


def gate_and_target(gate: DeployedStudent, images: torch.Tensor, calibrated: torch.Tensor,
                    space: ClassSpace | tuple[slice, ...]) -> torch.Tensor:
    return gated_targets(predict_logits(gate, images), calibrated, space)
