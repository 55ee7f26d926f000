"""Compact-feature terms of the joint loss: the assembled student's taps against the amalgamated codes.

Issue 4's "optionally plus the compact-feature terms": besides the logits, the joint stage
can keep every hidden layer of the student close to the teachers' compact code ``F_a^l``,
as the layer-wise stages were. The fold changes what "close" means. Stage ``l`` learnt
``layer_l(pre_l(FAM_l(F_a^{l-1}))) ~ F_a^l``; assembling folds ``FAM_{l+1}`` into layer ``l``
(:func:`amalgam.engine.stages.assemble`), so the folded layer ``l`` outputs
``FAM_{l+1}(original output)``. Its target is therefore ``FAM_{l+1}(F_a^l) = A F_a^l + c``, an
affine map of the stored code, not ``F_a^l`` itself. With that target the teacher-forced
student (each unit fed its predecessor's target) reproduces the stages exactly, so the
feature term starts at what the stages reached and only penalises drift from it.

The last layer (the logits) is the distillation loss's business and has no feature term.

Each tap's term is the MSE divided by the target's mean per-channel variance (as in the
stages, :func:`amalgam.engine.stages.normalised_mse`), so taps of any width and scale
weigh alike. The variance is exact: the code is ``E x + e`` with ``x``'s covariance in
the tap statistics, so ``Var(A code) = diag(A E Cov E^T A^T)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from amalgam.engine.amalgamate import LinearCodec, TapStats
from amalgam.engine.capture import TapCapture
from amalgam.engine.fold import fam_matrix
from amalgam.engine.stages import normalised_mse


@dataclass
class TapTarget:
    """The folded student's target at one tap: ``A code + c`` (per position for conv taps)."""

    weight: torch.Tensor  # [k, k] A of FAM_{l+1}
    bias: torch.Tensor  # [k] c of FAM_{l+1}
    var: float  # mean per-channel variance of the target over the pool (the loss's normaliser)

    def __call__(self, code: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(code.device, code.dtype), self.bias.to(code.device, code.dtype)
        if code.dim() == 4:
            return F.conv2d(code, w[:, :, None, None], b)
        return F.linear(code, w, b)


def affine_code_variance(codec: LinearCodec, stats: TapStats, a: torch.Tensor) -> torch.Tensor:
    """Per-channel variance of ``A code`` over the data ``stats`` describe (float64, exact)."""
    e = codec.enc_w.double()
    m = a.double() @ e
    return torch.einsum("kc,cd,kd->k", m, stats.cov(), m)


@torch.no_grad()
def feature_targets(unit_names: list[str], fams: Mapping[str, nn.Module | None], codecs: Mapping[str, LinearCodec],
                    stats: Mapping[str, TapStats]) -> dict[str, TapTarget]:
    """The per-tap targets of the folded student, from the stages' FAMs (``fams[unit]`` is ``FAM_unit``).

    Every unit but the last gets ``FAM_{next unit}(code)``; a unit whose successor has no FAM
    (there is none in the method: only the image-input stage lacks one) keeps the code itself.
    """
    out = {}
    for i, name in enumerate(unit_names[:-1]):
        if name not in codecs:
            continue
        k = codecs[name].width
        fam = fams.get(unit_names[i + 1])
        if fam is None:
            a, c = torch.eye(k), torch.zeros(k)
        else:
            a, c = (t.detach().float().clone() for t in fam_matrix(fam))
            if a.shape != (k, k):
                raise ValueError(f"FAM after tap {name} is {tuple(a.shape)}, the code has {k} channels")
        var = float(affine_code_variance(codecs[name], stats[name], a).mean())
        out[name] = TapTarget(a, c, var)
    return out


def feature_loss(outputs: Mapping[str, torch.Tensor], codes: Mapping[str, torch.Tensor],
                 targets: Mapping[str, TapTarget]) -> torch.Tensor:
    """Mean over taps of the normalised MSE between the student's tap output and ``targets[tap](code)``."""
    if not targets:
        raise ValueError("no feature targets")
    terms = [normalised_mse(outputs[t], tt(codes[t]), tt.var) for t, tt in targets.items()]
    return torch.stack(terms).mean()


class StudentCapture(TapCapture):
    """Forward hooks on the student's tapped layers; ``run`` returns the taps by name (``conv1`` ...).

    Hooks, not a re-implemented forward: under DDP the forward must go through the wrapper."""

    def __init__(self, model: nn.Module, taps: list[str]):
        net = getattr(model, "net", model)  # a DeployedStudent or a bare net
        prefix = "net." if net is not model else ""
        paths = {i.name: i.path for i in net.feature_info()}
        unknown = [t for t in taps if t not in paths]
        if unknown:
            raise ValueError(f"the student has no tap {unknown[0]!r}")
        super().__init__(model, [f"{prefix}{paths[t]}" for t in taps], owner="student")
        self._names = {f"{prefix}{paths[t]}": t for t in taps}

    def run(self, forward, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, feats = super().run(forward, x)
        return out, {self._names[p]: f for p, f in feats.items()}


def student_capture(model: nn.Module, taps: list[str]) -> StudentCapture:
    return StudentCapture(model, taps)


@dataclass
class FeatureTerm:
    """What :func:`amalgam.engine.joint.train_end_to_end` needs for the feature terms.

    ``codes(rows)`` gives the compact codes (tap -> tensor) of the pool rows ``rows`` (an index
    tensor into the images the joint stage trains on): the local path runs the teachers on
    them, a store-backed path would read them.
    """

    weight: float
    targets: dict[str, TapTarget]
    codes: Callable[[torch.Tensor], dict[str, torch.Tensor]]
