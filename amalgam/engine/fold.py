"""Fold each stage's FAM into the layer before it, exactly.

Stage ``l`` learnt ``layer_l(pre_l(FAM_l(z)))`` where ``z`` stands for layer ``l-1``'s output.
FAM is affine (``A z + c``, a 1x1 conv or a linear map) and acts on layer ``l-1``'s output
before its activation, so ``FAM_l(layer_{l-1}(h)) = (A W) h + (A b + c)``: replacing layer
``l-1``'s weight and bias by ``A W`` and ``A b + c`` gives the same function with no adapter.
Units made of several layers (ResNet stages) end in affine ops too and fold the same way.
"""

from __future__ import annotations

import torch
from torch import nn


def fam_matrix(fam: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, c) of a 1x1 conv or linear FAM."""
    if isinstance(fam, nn.Conv2d):
        if fam.kernel_size != (1, 1):
            raise ValueError("a FAM must be a 1x1 convolution")
        a = fam.weight[:, :, 0, 0]
    elif isinstance(fam, nn.Linear):
        a = fam.weight
    else:
        raise TypeError(f"cannot fold a {type(fam).__name__}")
    c = fam.bias if fam.bias is not None else torch.zeros(a.shape[0])
    return a, c


@torch.no_grad()
def fold_into(layer: nn.Module, fam: nn.Module) -> None:
    """In place: ``layer`` becomes ``fam o layer``.

    A conv or linear layer absorbs the FAM directly; a composite unit (a ResNet stem or
    stage, an EfficientNet block group) ends in affine ops before its tap and implements
    ``fold_output_affine(A, c)`` itself (BatchNorm folded first, see ``amalgam.zoo.resnet``).
    """
    if hasattr(layer, "fold_output_affine"):
        a, c = fam_matrix(fam)
        layer.fold_output_affine(a, c)
        return
    if layer.bias is None:
        raise ValueError("folding needs a layer with a bias")
    a, c = fam_matrix(fam)
    a64, c64 = a.double(), c.double()
    w = layer.weight.double()
    new_w = torch.einsum("oj,j...->o...", a64, w)
    new_b = a64 @ layer.bias.double() + c64
    layer.weight.copy_(new_w.to(layer.weight.dtype))
    layer.bias.copy_(new_b.to(layer.bias.dtype))
