"""The tapped CNN family shared by teachers and students.

A network is a chain of *units*. Unit ``l`` computes ``layer_l(pre_l(x))`` where
``pre_l`` is what sits between the previous layer's output and this layer (activation,
pooling, flattening) and ``layer_l`` is one conv or linear layer. Every layer's output
is a *tap*, taken before the activation: this is exactly the paper's decomposition,
so layer-wise stage ``l`` is ``layer_l(pre_l(FAM_l(F^{l-1})))`` with ``pre_l`` reused
verbatim from this module.

Activations are never in-place (``nn.ReLU(inplace=False)``), so a tap captured by a
forward hook is never overwritten by the next op.

Like timm's ``FeatureInfo``, :meth:`TappedCNN.feature_info` describes every tap (module
path, kind, channels, stride), which is what the zoo manifest stores and what the
engine uses to build a student of the same topology at compact widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

TapKind = Literal["conv", "fc"]


class CNNConfig(BaseModel):
    """Architecture arguments of :class:`TappedCNN` (stored in the zoo manifest)."""

    model_config = ConfigDict(extra="forbid")
    in_channels: int = Field(1, gt=0)
    image_size: int = Field(28, gt=0)
    conv_widths: list[int] = Field(min_length=1)
    fc_widths: list[int] = Field(default_factory=list)
    num_classes: int = Field(gt=0)
    kernel_size: int = 3

    def widths(self) -> list[int]:
        """Output width of every layer, last = num_classes."""
        return [*self.conv_widths, *self.fc_widths, self.num_classes]

    def with_widths(self, widths: list[int]) -> "CNNConfig":
        """Same topology, other layer widths (the student at compact widths)."""
        nc, nf = len(self.conv_widths), len(self.fc_widths)
        if len(widths) != nc + nf + 1:
            raise ValueError(f"expected {nc + nf + 1} widths, got {len(widths)}")
        return self.model_copy(
            update={"conv_widths": list(widths[:nc]), "fc_widths": list(widths[nc : nc + nf]), "num_classes": widths[-1]}
        )


@dataclass(frozen=True)
class TapInfo:
    """One tap: ``path`` is the module path a forward hook attaches to."""

    name: str
    path: str
    kind: TapKind
    channels: int
    stride: int  # spatial reduction w.r.t. the input; 0 for FC taps

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "kind": self.kind, "channels": self.channels, "stride": self.stride}


class Pre(nn.Module):
    """What sits between layer ``l-1``'s tap and layer ``l``: act, then pool, then flatten."""

    def __init__(self, act: bool, pool: bool, flatten: bool):
        super().__init__()
        self.act = nn.ReLU(inplace=False) if act else nn.Identity()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.flatten = nn.Flatten() if flatten else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.act(x)))


class TappedCNN(nn.Module):
    """conv(3x3, pad 1) -> [relu, maxpool2] -> conv ... -> flatten -> fc ... -> logits.

    Unit names are ``conv1..convN``, ``fc1..fcM``, ``head``; taps are ``layers.<name>``.
    """

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c = config
        names, pres, layers, kinds, strides = [], [], [], [], []
        in_ch, size, stride = c.in_channels, c.image_size, 1
        for i, w in enumerate(c.conv_widths):
            first = i == 0
            if not first:
                size, stride = size // 2, stride * 2
            names.append(f"conv{i + 1}")
            pres.append(Pre(act=not first, pool=not first, flatten=False))
            layers.append(nn.Conv2d(in_ch, w, c.kernel_size, padding=c.kernel_size // 2))
            kinds.append("conv")
            strides.append(stride)
            in_ch = w
        size = size // 2
        flat = in_ch * size * size
        if size < 1:
            raise ValueError(f"image_size {c.image_size} too small for {len(c.conv_widths)} pooled conv layers")
        fc_in = flat
        for j, w in enumerate([*c.fc_widths, c.num_classes]):
            first_fc = j == 0
            names.append(f"fc{j + 1}" if j < len(c.fc_widths) else "head")
            pres.append(Pre(act=True, pool=first_fc, flatten=first_fc))
            layers.append(nn.Linear(fc_in, w))
            kinds.append("fc")
            strides.append(0)
            fc_in = w
        self.unit_names: list[str] = names
        self.pres = nn.ModuleDict(dict(zip(names, pres)))
        self.layers = nn.ModuleDict(dict(zip(names, layers)))
        self._kinds = kinds
        self._strides = strides
        self.flat_spatial = size * size  # positions per channel entering the first FC layer

    def feature_info(self) -> list[TapInfo]:
        return [
            TapInfo(n, f"layers.{n}", k, self.config.widths()[i], s)
            for i, (n, k, s) in enumerate(zip(self.unit_names, self._kinds, self._strides))
        ]

    def forward_unit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.layers[name](self.pres[name](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in self.unit_names:
            x = self.forward_unit(n, x)
        return x


def build_model(arch: str, args: dict) -> TappedCNN:
    """Architecture registry: names in the manifest map to constructors here."""
    if arch != "tapped_cnn":
        raise ValueError(f"unknown architecture {arch!r}; known: tapped_cnn")
    return TappedCNN(CNNConfig(**args))
