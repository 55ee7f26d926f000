"""The ResNet family as a chain of tapped units: the layer-wise method's unit is a *stage*.

Units are ``stem`` (conv + BN), ``layer1`` .. ``layerN`` (a residual stage each) and
``head`` (the classifier). Unit ``l`` computes ``layers[l](pres[l](x))``, exactly like
:class:`amalgam.zoo.arch.TappedCNN`, so the engine's stages, FAMs and fold work unchanged:

- ``stem``: input -> ``bn1(conv1(x))``. Tap: the BN output, **before** the ReLU.
- ``layerK``: ``pre`` = ReLU (plus the 3x3/2 max-pool before ``layer1`` with the ImageNet
  stem); the stage's blocks follow. Tap: the last block's residual **sum** ``branch(h) +
  shortcut(h)``, **before** the block's final ReLU. Our blocks return that sum and the
  consumer applies the ReLU (the next block inside the stage, or the next unit's ``pre``),
  which is the same function as torchvision's block (``relu(branch + shortcut)``) with the
  pre-activation sum reachable by a forward hook on the stage module. Why this tensor: it is
  the last affine output of the stage (the paper taps pre-activation features), so a FAM
  acting on it folds exactly into the stage's last convolutions; a post-ReLU tap could not
  be folded anywhere (the ReLU sits between the adapter and every later layer).
- ``head``: ReLU, global average pool, flatten, ``fc``. Tap: the logits.

Folding a FAM ``z -> A z + c`` into a stage: the output is ``BN(conv(h)) + S(h)``. BN (eval
statistics) is folded into its conv first, then ``A`` multiplies both the branch's last
conv and the shortcut; ``c`` joins the branch's bias. The result is written back as conv +
BN with unit statistics, so the module structure (and state_dict keys) never change. An
identity shortcut cannot absorb ``A``: students are built with ``project_stage_output``,
which gives every stage's last block a 1x1 conv + BN shortcut (He et al.'s option C on
that block), so the fold always has somewhere to go. Teachers keep torchvision's layout and
load torchvision ``state_dict``s after a key rename (:func:`from_torchvision_state_dict`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from amalgam.zoo.units import TappedUnits


class ResNetConfig(BaseModel):
    """Architecture arguments of :class:`TappedResNet` (stored in the zoo manifest)."""

    model_config = ConfigDict(extra="forbid")
    arch_name: ClassVar[str] = "resnet"
    block: Literal["basic", "bottleneck"] = "basic"
    blocks: list[int] = Field(min_length=1, description="residual blocks per stage, e.g. [2, 2, 2, 2] for ResNet-18")
    stem_width: int = Field(64, gt=0)
    stage_widths: list[int] = Field(min_length=1, description="output channels of each stage")
    inner_ratio: float = Field(1.0, gt=0, le=1, description="block inner width / stage width (bottleneck: 0.25)")
    num_classes: int = Field(gt=0)
    in_channels: int = Field(3, gt=0)
    image_size: int = Field(224, gt=0)
    stem: Literal["imagenet", "small"] = Field(
        "imagenet", description="imagenet: 7x7/2 conv + 3x3/2 max-pool; small: 3x3/1 conv, no pool (28-64 px inputs)"
    )
    project_stage_output: bool = Field(
        False, description="every stage's last block gets a 1x1 conv shortcut (students: so a FAM folds into it)"
    )

    @model_validator(mode="after")
    def _lengths(self) -> "ResNetConfig":
        if len(self.blocks) != len(self.stage_widths):
            raise ValueError(f"blocks has {len(self.blocks)} stages, stage_widths {len(self.stage_widths)}")
        if any(b < 1 for b in self.blocks) or any(w < 1 for w in self.stage_widths):
            raise ValueError("every stage needs at least one block and one channel")
        return self

    def unit_names(self) -> list[str]:
        return ["stem", *[f"layer{i + 1}" for i in range(len(self.blocks))], "head"]

    def widths(self) -> list[int]:
        return [self.stem_width, *self.stage_widths, self.num_classes]

    def with_widths(self, widths: list[int]) -> "ResNetConfig":
        n = len(self.stage_widths)
        if len(widths) != n + 2:
            raise ValueError(f"expected {n + 2} widths, got {len(widths)}")
        return self.model_copy(
            update={"stem_width": widths[0], "stage_widths": list(widths[1:-1]), "num_classes": widths[-1]}
        )

    def for_student(self, widths: list[int]) -> "ResNetConfig":
        return self.with_widths(widths).model_copy(update={"project_stage_output": True})

    def describe(self) -> str:
        """The topology in a few words, for error messages."""
        return f"resnet ({self.block} blocks {self.blocks}, {self.stem} stem) at {self.image_size}px"

    def topology(self) -> dict:
        """Everything but the widths: teachers of one family must agree on it."""
        return {k: getattr(self, k) for k in ("block", "blocks", "stem", "in_channels", "image_size")}

    def inner_width(self, stage: int) -> int:
        return max(1, round(self.stage_widths[stage] * self.inner_ratio))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class Block(nn.Module):
    """Residual block returning the **pre-activation** sum ``branch(h) + shortcut(h)``.

    ``activate_input``: apply the ReLU the previous block left to its consumer (every block
    but a stage's first, whose input the unit's ``pre`` already activated).
    """

    def __init__(self, kind: str, cin: int, inner: int, cout: int, stride: int, activate_input: bool, project: bool):
        super().__init__()
        self.kind = kind
        self.activate_input = activate_input
        self.relu = nn.ReLU(inplace=False)
        if kind == "basic":
            self.conv1, self.bn1 = _conv_bn(cin, inner, 3, stride)
            self.conv2, self.bn2 = _conv_bn(inner, cout, 3)
        else:  # torchvision v1.5: the stride sits on the 3x3 conv
            self.conv1, self.bn1 = _conv_bn(cin, inner, 1)
            self.conv2, self.bn2 = _conv_bn(inner, inner, 3, stride)
            self.conv3, self.bn3 = _conv_bn(inner, cout, 1)
        if project or stride != 1 or cin != cout:
            conv, bn = _conv_bn(cin, cout, 1, stride)
            conv.padding = (0, 0)
            self.downsample = nn.Sequential(conv, bn)
        else:
            self.downsample = None

    def last_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        return (self.conv2, self.bn2) if self.kind == "basic" else (self.conv3, self.bn3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(x) if self.activate_input else x
        y = self.relu(self.bn1(self.conv1(h)))
        if self.kind == "basic":
            y = self.bn2(self.conv2(y))
        else:
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        return y + (h if self.downsample is None else self.downsample(h))


class ConvBNUnit(nn.Module):
    """A unit that is one conv followed by BN (``self.conv``, ``self.bn``), tapped at the BN output:
    the ResNet stem here, EfficientNet-Lite's stem and ``conv_head``. Everything the engine asks of
    a unit (fold, closed-form fit, output-statistics init) is the same for all of them."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fold_output_affine(self, a: torch.Tensor, c: torch.Tensor) -> None:
        """In place: the output ``z`` becomes ``A z + c`` (exact in eval mode)."""
        fold_affine_into_conv_bn(self.conv, self.bn, a, c)

    def affine_layer(self) -> nn.Conv2d:
        """The conv whose input patches a closed-form (least-squares) fit of this unit uses."""
        return self.conv

    @torch.no_grad()
    def load_affine(self, w: torch.Tensor, b: torch.Tensor) -> None:
        """Become exactly ``x -> conv_w(x) + b`` (BN with unit statistics carries ``b``)."""
        _write_conv_bn(self.conv, self.bn, w.double(), b.double())

    @torch.no_grad()
    def init_output_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Start with the output's per-channel mean/std at ``mean``/``std`` (BN's affine)."""
        self.bn.weight.copy_(std)
        self.bn.bias.copy_(mean)


class Stem(ConvBNUnit):
    def __init__(self, cin: int, cout: int, kind: str):
        super().__init__()
        k, s = (7, 2) if kind == "imagenet" else (3, 1)
        self.conv, self.bn = _conv_bn(cin, cout, k, s)


class Stage(nn.Sequential):
    """One residual stage; its output (the tap) is the last block's pre-activation sum."""

    def fold_output_affine(self, a: torch.Tensor, c: torch.Tensor) -> None:
        """In place: the output ``z`` becomes ``A z + c`` (exact in eval mode)."""
        last = self[-1]
        if last.downsample is None:
            raise ValueError(
                "cannot fold a FAM into a stage whose last block has an identity shortcut; "
                "build the student with project_stage_output=True"
            )
        conv, bn = last.last_conv_bn()
        fold_affine_into_conv_bn(conv, bn, a, c)
        fold_affine_into_conv_bn(last.downsample[0], last.downsample[1], a, None)

    @torch.no_grad()
    def init_output_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Start with the output's per-channel mean/std near ``mean``/``std``: branch and
        projected shortcut (roughly independent at init) share the variance equally."""
        last = self[-1]
        _, bn = last.last_conv_bn()
        share = std / (2**0.5) if last.downsample is not None else std
        bn.weight.copy_(share)
        bn.bias.copy_(mean)
        if last.downsample is not None:
            last.downsample[1].weight.copy_(share)
            last.downsample[1].bias.zero_()


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.act(x)))


class StagePre(nn.Module):
    """ReLU (+ the ImageNet stem's 3x3/2 max-pool before ``layer1``)."""

    def __init__(self, pool: bool):
        super().__init__()
        self.act = nn.ReLU(inplace=False)
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(x))


class TappedResNet(TappedUnits):
    """ResNet as ``stem, layer1..layerN, head`` units (see the module docstring for the taps)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = c = config
        names = c.unit_names()
        pres: list[nn.Module] = [nn.Identity()]
        layers: list[nn.Module] = [Stem(c.in_channels, c.stem_width, c.stem)]
        kinds, strides = ["conv"], [2 if c.stem == "imagenet" else 1]
        stride = strides[0] * (2 if c.stem == "imagenet" else 1)
        cin = c.stem_width
        for i, (n_blocks, cout) in enumerate(zip(c.blocks, c.stage_widths)):
            s = 1 if i == 0 else 2
            stride *= s
            inner = c.inner_width(i)
            blocks = [
                Block(c.block, cin if b == 0 else cout, inner, cout, s if b == 0 else 1,
                      activate_input=b > 0, project=c.project_stage_output and b == n_blocks - 1)
                for b in range(n_blocks)
            ]
            pres.append(StagePre(pool=i == 0 and c.stem == "imagenet"))
            layers.append(Stage(*blocks))
            kinds.append("conv")
            strides.append(stride)
            cin = cout
        if c.image_size // stride < 1:
            raise ValueError(f"image_size {c.image_size} too small for {len(c.blocks)} stages (stride {stride})")
        pres.append(Head())
        layers.append(nn.Linear(cin, c.num_classes))
        kinds.append("fc")
        strides.append(0)
        self.set_units(names, pres, layers, kinds, strides)


# --- exact folding ------------------------------------------------------------------------


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


@torch.no_grad()
def _write_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, w: torch.Tensor, b: torch.Tensor) -> None:
    """Store the affine map ``x -> conv_w(x) + b`` as conv (no bias) + BN with unit statistics.

    Each output filter is scaled to unit RMS and BN's weight carries its scale, so the
    conv weights stay at the scale a fresh layer has: the joint stage's optimiser (a
    per-parameter step of about ``lr``) then moves every filter by a similar relative
    amount (with the raw folded weights, lr 2e-3 undid the stages: 0.69 -> 0.53).
    """
    w = w.double()
    rms = w.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    conv.weight.copy_((w / rms.view(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype))
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    unit = torch.sqrt(torch.tensor(1.0 + bn.eps, dtype=torch.float64))
    bn.weight.copy_((rms * unit).to(bn.weight.dtype))
    bn.bias.copy_(b.to(bn.bias.dtype))


@torch.no_grad()
def fold_affine_into_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, a: torch.Tensor, c: torch.Tensor | None) -> None:
    """``conv + bn`` becomes ``A (bn(conv(x))) + c`` (BN folded into the conv first)."""
    scale, shift = bn_affine(bn)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    a64 = a.double()
    new_w = torch.einsum("oj,j...->o...", a64, w)
    new_b = a64 @ shift + (c.double() if c is not None else 0.0)
    _write_conv_bn(conv, bn, new_w, new_b)


# --- torchvision ------------------------------------------------------------------------------

TORCHVISION_RESNETS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}


def torchvision_config(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224) -> ResNetConfig:
    """The :class:`ResNetConfig` of torchvision's ``resnetNN`` (same tensors, renamed keys)."""
    if name not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(TORCHVISION_RESNETS)}")
    block, blocks = TORCHVISION_RESNETS[name]
    expansion = 4 if block == "bottleneck" else 1
    return ResNetConfig(
        block=block, blocks=blocks, stem_width=64, stage_widths=[64 * expansion * 2**i for i in range(4)],
        inner_ratio=1.0 / expansion, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
    )


def from_torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision ResNet keys to :class:`TappedResNet`'s (tensors untouched)."""
    out = {}
    for k, v in state.items():
        if k.startswith("conv1."):
            k = "layers.stem.conv." + k[len("conv1."):]
        elif k.startswith("bn1."):
            k = "layers.stem.bn." + k[len("bn1."):]
        elif k.startswith("fc."):
            k = "layers.head." + k[len("fc."):]
        elif k.startswith("layer"):
            k = "layers." + k
        out[k] = v
    return out
