"""Put independent teachers' logits on one scale, without labels.

Teachers trained separately produce logits of different offsets and spreads, and each is
overconfident on images from the other teachers' domains. Concatenating raw logits lets
the loudest teacher win the argmax. Calibration is estimated on the unlabeled pool only:

``standardize``
    per teacher, subtract the mean and divide by the standard deviation of all its logits
    on the pool (one affine map per teacher).
``temperature``
    per teacher, divide by the standard deviation only (a per-teacher temperature: keeps
    each teacher's softmax ranking, equalises its sharpness).
``none``
    raw logits (the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["none", "standardize", "temperature"]


@dataclass
class Calibration:
    method: Method
    shift: torch.Tensor  # [W] per column of the concatenated teacher outputs (constant within a teacher's block)
    scale: torch.Tensor  # [C]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits - self.shift) / self.scale

    def to_dict(self) -> dict:
        return {"method": self.method, "shift": self.shift.tolist(), "scale": self.scale.tolist()}


def fit_calibration(pool_logits: torch.Tensor, slices: tuple[slice, ...] | list[slice], method: Method) -> Calibration:
    """Estimate per-teacher shift/scale from concatenated teacher logits on the pool [N, W].

    ``slices`` are the teachers' blocks of those columns (``ClassSpace.blocks``). Calibration
    works per teacher, before shared classes are combined (``ClassSpace.to_union``)."""
    if method not in ("none", "standardize", "temperature"):
        raise ValueError(f"unknown calibration {method!r}; use none, standardize or temperature")
    c = pool_logits.shape[1]
    shift, scale = torch.zeros(c), torch.ones(c)
    if method != "none":
        for s in slices:
            block = pool_logits[:, s].double()
            if method == "standardize":
                shift[s] = float(block.mean())
            scale[s] = float(block.std().clamp_min(1e-6))
    return Calibration(method, shift, scale)
