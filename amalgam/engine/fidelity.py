"""Label-free fidelity of a student to its teachers: the sweep's default objective.

With no labels, the best available judge of a student is how well it reproduces the
(calibrated) teachers it was amalgamated from, on pool images it never trained on:
``agreement`` is the fraction of images where the student's argmax over all classes equals
the teachers' (the comprehensive decision the student will make in production), ``kl`` is
KL(teachers || student) of the softmax over all classes, averaged over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Fidelity:
    agreement: float
    kl: float
    n: int


@torch.no_grad()
def fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> Fidelity:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher logits {tuple(teacher_logits.shape)}")
    s, t = student_logits.float(), teacher_logits.float()
    agreement = (s.argmax(1) == t.argmax(1)).float().mean().item() if len(s) else float("nan")
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean").item()
    return Fidelity(agreement, kl, len(s))
