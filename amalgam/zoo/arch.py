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

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer
from torch import nn

from amalgam.zoo.taps import TapInfo, TapKind  # noqa: F401  (re-exported)
from amalgam.zoo.units import TappedUnits


class CNNConfig(BaseModel):
    """Architecture arguments of :class:`TappedCNN` (stored in the zoo manifest)."""

    model_config = ConfigDict(extra="forbid")
    arch_name: ClassVar[str] = "tapped_cnn"
    in_channels: int = Field(1, gt=0)
    image_size: int = Field(28, gt=0)
    conv_widths: list[int] = Field(min_length=1)
    fc_widths: list[int] = Field(default_factory=list)
    num_classes: int = Field(gt=0)
    kernel_size: int = 3
    # Convs per conv unit: depth - 1 extra 3x3-style convs (ReLU after each) before the tapped
    # one, at the unit's width. Taps and their shapes do not change, only the teacher's cost
    # (bench/pipeline.py --depth). A student is always one conv per unit (for_student).
    depth: int = Field(1, ge=1)

    @model_serializer(mode="wrap")
    def _omit_default_depth(self, handler):
        # Manifests (and the zoo fingerprints over them) written before depth existed stay as they were.
        out = handler(self)
        if self.depth == 1:
            out.pop("depth", None)
        return out

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

    def for_student(self, widths: list[int]) -> "CNNConfig":
        """The student of this topology at ``widths`` (last = the class-space size): one conv per
        unit whatever the teachers' depth, as the layer-wise stages train one layer each."""
        return self.with_widths(widths).model_copy(update={"depth": 1})

    def unit_names(self) -> list[str]:
        return [*(f"conv{i + 1}" for i in range(len(self.conv_widths))),
                *(f"fc{j + 1}" for j in range(len(self.fc_widths))), "head"]

    def describe(self) -> str:
        """The topology in a few words, for error messages."""
        return f"{len(self.conv_widths)} conv + {len(self.fc_widths)} fc at {self.image_size}px"

    def topology(self) -> dict:
        """Everything but the widths: teachers of one family must agree on it."""
        return {"conv layers": len(self.conv_widths), "fc layers": len(self.fc_widths), "image_size": self.image_size,
                "in_channels": self.in_channels, "kernel_size": self.kernel_size}


class Pre(nn.Module):
    """What sits between layer ``l-1``'s tap and layer ``l``: act, then pool, then flatten."""

    def __init__(self, act: bool, pool: bool, flatten: bool):
        super().__init__()
        self.act = nn.ReLU(inplace=False) if act else nn.Identity()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.flatten = nn.Flatten() if flatten else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.act(x)))


class TappedCNN(TappedUnits):
    """conv(3x3, pad 1) -> [relu, maxpool2] -> conv ... -> flatten -> fc ... -> logits.

    Unit names are ``conv1..convN``, ``fc1..fcM``, ``head``; taps are ``layers.<name>``.
    """

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c = config
        names, pres, layers, kinds, strides = [], [], [], [], []
        deep: dict[str, nn.Module] = {}
        in_ch, size, stride = c.in_channels, c.image_size, 1
        for i, w in enumerate(c.conv_widths):
            first = i == 0
            if not first:
                size, stride = size // 2, stride * 2
            names.append(f"conv{i + 1}")
            pres.append(Pre(act=not first, pool=not first, flatten=False))
            if c.depth > 1:  # the extra convs, then the tapped one at the unit's width
                extra: list[nn.Module] = []
                for _ in range(c.depth - 1):
                    extra += [nn.Conv2d(in_ch, w, c.kernel_size, padding=c.kernel_size // 2), nn.ReLU(inplace=False)]
                    in_ch = w
                deep[names[-1]] = nn.Sequential(*extra)
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
        self.set_units(names, pres, layers, kinds, strides)
        if deep:  # absent at depth 1: the state dict is the one of before
            self.deep = nn.ModuleDict(deep)
        self.flat_spatial = size * size  # positions per channel entering the first FC layer

    def forward_unit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = self.pres[name](x)
        if self.config.depth > 1 and name in self.deep:
            x = self.deep[name](x)
        return self.layers[name](x)


# --- the architecture registry ----------------------------------------------------------------
# A manifest or student file names an architecture and its arguments; these map them to a
# config class and a network class. Every network is a ``TappedUnits`` (amalgam/zoo/units.py):
# the tapped-unit interface the engine's stages, FAMs and fold rely on, and nothing more.


def _registry() -> dict[str, tuple[type, type]]:
    from amalgam.zoo.resnet import ResNetConfig, TappedResNet

    archs: dict[str, tuple[type, type]] = {"tapped_cnn": (CNNConfig, TappedCNN), "resnet": (ResNetConfig, TappedResNet)}
    try:
        from amalgam.zoo.efficientnet_lite import EfficientNetLiteConfig, TappedEfficientNetLite
    except ImportError:  # not written yet in this checkout
        pass
    else:
        archs["efficientnet_lite"] = (EfficientNetLiteConfig, TappedEfficientNetLite)
    return archs


def known_architectures() -> list[str]:
    return list(_registry())


def build_config(arch: str, args: dict):
    """The validated config of architecture ``arch`` (ValueError naming the arch when unknown)."""
    archs = _registry()
    if arch not in archs:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(archs)}")
    return archs[arch][0](**args)


def build_net(config) -> nn.Module:
    """The network of a config object (any registered architecture)."""
    for cfg_cls, net_cls in _registry().values():
        if isinstance(config, cfg_cls):
            return net_cls(config)
    raise TypeError(f"no architecture for config {type(config).__name__}")


def config_to_dict(config) -> dict:
    """``{"arch": name, "args": {...}}``: how configs travel to Ray workers and into files."""
    return {"arch": type(config).arch_name, "args": config.model_dump()}


def config_from_dict(d: dict):
    return build_config(d["arch"], d["args"])


def build_model(arch: str, args: dict) -> nn.Module:
    """Architecture registry: names in the manifest map to constructors here."""
    return build_net(build_config(arch, args))
