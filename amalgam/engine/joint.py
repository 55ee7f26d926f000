"""Joint stage: train the assembled student end to end against the teachers' outputs.

``mse``  regresses the concatenated teacher logits (the paper's choice).
``kd``   minimises KL(softmax(t / T) || softmax(s / T)) * T^2 on the concatenated,
         calibrated teacher logits (Hinton-style distillation over the union of classes).

Optionally (``features``, job field ``joint.feature_weight``) the loss adds the
compact-feature terms: the student's hidden taps against the amalgamated codes, through
the fold (:mod:`amalgam.engine.features`).

Optionally (``slices``, job field ``joint.slices``) the loss adds per-teacher KD inside each
teacher's classes, weighted by the target's mass on them (:func:`slice_loss`): the task-aware
part of the target, taught directly rather than through the tempered mixture.

Optionally (``augment``, job field ``joint.augment``) every batch is an augmented view of
the pool rows and the target is recomputed on it ("function matching",
:mod:`amalgam.engine.augment`); ``targets`` is then unused.

The same function trains the baselines (multi-teacher KD from scratch, the supervised
student), so every method gets the same data, student size and budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amalgam.data.datasets import to_float
from amalgam.engine.augment import AugmentTerm
from amalgam.engine.features import FeatureTerm, feature_loss, student_capture

Loss = Literal["mse", "kd", "ce"]


def distill_loss(student_logits: torch.Tensor, target: torch.Tensor, loss: Loss, temperature: float) -> torch.Tensor:
    if loss == "mse":
        return F.mse_loss(student_logits, target)
    if loss == "kd":
        t = temperature
        return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(target / t, 1), log_target=True,
                        reduction="batchmean") * t * t
    if loss == "ce":  # target holds class indices (supervised baseline only)
        return F.cross_entropy(student_logits, target)
    raise ValueError(f"unknown joint loss {loss!r}")


Group = slice | tuple[int, ...]


def as_index(group: Group) -> slice | list[int]:
    """A teacher's output positions as an index: a slice when they are contiguous (every disjoint zoo)."""
    if isinstance(group, slice):
        return group
    if list(group) == list(range(group[0], group[0] + len(group))):
        return slice(group[0], group[0] + len(group))
    return list(group)


@dataclass(frozen=True)
class SliceTerm:
    """``weight * slice_loss(..., groups, temperature)`` added to the joint loss (job field ``joint.slices``).

    ``groups[i]``: teacher ``i``'s output positions in the student's classes
    (``ClassSpace.positions``; contiguous blocks unless teachers share classes)."""

    weight: float
    temperature: float
    groups: tuple[Group, ...]


def slice_loss(student_logits: torch.Tensor, target: torch.Tensor, groups: tuple[Group, ...],
               temperature: float) -> torch.Tensor:
    """Per-teacher KD inside each teacher's classes, weighted by the target's mass on them.

    Task-aware accuracy is the argmax inside a teacher's classes, on that teacher's images; the
    joint KD over all classes teaches it only through the tempered mixture, where a teacher's
    within-block distribution is scaled by the gate's belief in it. This term matches, per
    teacher ``k``, ``softmax(target_k / T)`` against ``softmax(student_k / T)`` (shift-invariant:
    it constrains the ranking inside the block, never the level between blocks, which the main
    term sets), weighted per image by the target's probability mass on block ``k``, so each
    teacher teaches mostly its own images. ``target`` is logits or log-probabilities (gated
    targets): ``log_softmax`` gives the same within-block distributions and masses either way.
    With shared classes a block's mass counts a shared class for every teacher that knows it.
    """
    logp = F.log_softmax(target, 1)
    t = temperature
    total = student_logits.new_zeros(())
    for g in groups:
        i = as_index(g)
        mass = logp[:, i].logsumexp(1).exp().detach()
        kl = F.kl_div(F.log_softmax(student_logits[:, i] / t, 1), F.log_softmax(logp[:, i] / t, 1), log_target=True,
                      reduction="none").sum(1)
        total = total + (mass * kl).mean()
    return total * t * t


def joint_loss(student_logits: torch.Tensor, target: torch.Tensor, loss: Loss, temperature: float,
               slices: SliceTerm | None = None) -> torch.Tensor:
    """The joint stage's logit loss: :func:`distill_loss`, plus the slice term when asked for
    (the local path and the Ray Train DDP workers both call this)."""
    out = distill_loss(student_logits, target, loss, temperature)
    if slices is not None and slices.weight > 0:
        out = out + slices.weight * slice_loss(student_logits, target, slices.groups, slices.temperature)
    return out


def describe_loss(loss: Loss, temperature: float, slices: SliceTerm | None = None) -> str:
    """One line for the logs: which joint loss runs (so a run's log says whether the slice term was on)."""
    out = f"{loss} (T {temperature:g})" if loss == "kd" else loss
    if slices is not None and slices.weight > 0:
        out += f" + {slices.weight:g} x per-teacher slices (T {slices.temperature:g})"
    return out


def set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """``model.train()``, optionally keeping every BatchNorm in eval mode.

    The assembled student's BatchNorm layers hold the statistics the FAM fold was exact
    for (``amalgam.zoo.resnet``); re-estimating them from joint-stage batches would change
    the function the stages built before the first gradient step. Students from scratch
    (the KD and supervised baselines) train their BatchNorm normally.
    """
    model.train()
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_end_to_end(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss: Loss,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    temperature: float = 4.0,
    seed: int = 0,
    desc: str = "joint",
    log: Callable[[str], None] = print,
    epoch_end: Callable[[int, float], None] | None = None,
    freeze_batchnorm: bool = False,
    features: FeatureTerm | None = None,
    augment: AugmentTerm | None = None,
    slices: SliceTerm | None = None,
) -> list[float]:
    """Train ``model`` (images in [0, 1] -> logits) on uint8 ``images`` against ``targets``.

    Returns the mean loss per epoch (with ``features``: the distillation loss plus
    ``features.weight`` times the feature loss; with ``slices``: plus its term). ``epoch_end(epoch, loss)`` lets a caller
    report (for example to Ray Tune) after every epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(images) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    curve = []
    capture = student_capture(model, list(features.targets)) if features is not None and features.weight > 0 else None
    for epoch in range(epochs):
        set_train_mode(model, freeze_batchnorm)
        order = torch.randperm(len(images), generator=gen)
        total, feat_total, n = 0.0, 0.0, 0
        bar = tqdm(range(0, len(order), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False)
        for i in bar:
            idx = order[i : i + batch_size]
            x, aug_codes = to_float(images[idx]), None
            if augment is not None:  # consistent views: the target is recomputed on the image the student sees
                x = augment.view(x)
                target, aug_codes = augment.teachers(x)
            else:
                target = targets[idx]
            if capture is None:
                out = model(x)
                l = joint_loss(out, target, loss, temperature, slices)
            else:
                with capture:
                    out, taps = capture.run(model, x)
                if aug_codes is None:
                    with torch.no_grad():
                        aug_codes = features.codes(idx)
                fl = feature_loss(taps, aug_codes, features.targets)
                l = joint_loss(out, target, loss, temperature, slices) + features.weight * fl
                feat_total += fl.item()
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            sched.step()
            total += l.item()
            n += 1
        bar.close()
        curve.append(total / max(1, n))
        extra = f" (feature loss {feat_total / max(1, n):.4f})" if capture is not None else ""
        log(f"[{desc}] epoch {epoch + 1}/{epochs}: loss {curve[-1]:.4f}{extra}")
        if epoch_end is not None:
            epoch_end(epoch, curve[-1])
    model.eval()
    return curve
