"""The zoo manifest (``zoo.yaml``) and safe teacher loading.

Teacher weights are untrusted input: they are read only from safetensors (no pickle is
ever executed), they must lie inside the zoo directory, their SHA-256 must match the
manifest, and their tensor shapes, taps (channels, kind, stride) and input shape must match
the declared architecture. Every refusal is one line naming the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from amalgam.classes import ClassSpace
from amalgam.data.fetch import sha256_file
from amalgam.errors import AmalgamError, read_yaml_mapping, validate_as
from amalgam.zoo.arch import TapInfo, TappedCNN, build_model
from amalgam.zoo.units import state_mismatch

MANIFEST_VERSION = 1


class InputSpec(BaseModel):
    """What a model expects: images in [0, 1] of ``shape``, normalised by mean/std per channel."""

    model_config = ConfigDict(extra="forbid")
    shape: list[int] = Field(min_length=3, max_length=3)
    mean: list[float]
    std: list[float]

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("std must be positive")
        return v


class TapSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    kind: Literal["conv", "fc"]
    channels: int
    stride: int


class TeacherEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    arch: str
    arch_args: dict
    weights: str  # path relative to the manifest's directory, and inside it
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    taps: list[TapSpec] = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict)

    @field_validator("weights")
    @classmethod
    def _inside_the_zoo(cls, v: str) -> str:
        # A manifest names files of its own zoo only: a path out of it could make loading
        # read (and hash) any file on the machine.
        parts = v.replace("\\", "/").split("/")
        if not v or v.startswith("/") or ".." in parts or "://" in v:
            raise ValueError(f"must be a path inside the zoo directory, got {v!r}")
        return v


class ZooManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = MANIFEST_VERSION
    name: str
    teachers: list[TeacherEntry] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {v}; this amalgam reads version {MANIFEST_VERSION}")
        return v

    def class_space(self) -> ClassSpace:
        return ClassSpace.from_teachers([(t.name, t.classes) for t in self.teachers])

    def teacher(self, name: str) -> TeacherEntry:
        for t in self.teachers:
            if t.name == name:
                return t
        raise AmalgamError(f"zoo {self.name} has no teacher {name!r}")


def read_manifest(path: Path | str) -> ZooManifest:
    path = Path(path)
    raw = read_yaml_mapping(path, "zoo manifest")
    manifest = validate_as(ZooManifest, raw, path)
    names = [t.name for t in manifest.teachers]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AmalgamError(f"{path}: teacher name {sorted(dup)[0]!r} used twice")
    try:
        manifest.class_space()
    except AmalgamError as exc:
        raise AmalgamError(f"{path}: {exc}") from None
    return manifest


def write_manifest(manifest: ZooManifest, path: Path | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Teacher(nn.Module):
    """A frozen teacher: its own normalisation, then the network. Input: images in [0, 1]."""

    def __init__(self, entry: TeacherEntry, net: TappedCNN):
        super().__init__()
        self.entry = entry
        self.name = entry.name
        self.normalize = Normalize(entry.input.mean, entry.input.std)
        self.net = net
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher is frozen: it never leaves eval mode, whatever a caller asks.
        return super().train(False)

    def taps(self) -> list[TapInfo]:
        return self.net.feature_info()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def check_taps(entry: TeacherEntry, net: TappedCNN) -> None:
    actual = {t.path: t for t in net.feature_info()}
    modules = dict(net.named_modules())
    for tap in entry.taps:
        if tap.path not in modules:
            raise AmalgamError(f"teacher {entry.name}: tap {tap.path!r} is not a module of {entry.arch}")
        info = actual.get(tap.path)
        if info is None or info.channels != tap.channels or info.kind != tap.kind:
            raise AmalgamError(
                f"teacher {entry.name}: tap {tap.path} declared {tap.kind}/{tap.channels} channels, "
                f"architecture has {info.kind + '/' + str(info.channels) if info else 'no such tap'}"
            )
        if info.stride != tap.stride:  # the tap's spatial size: stages and codecs are built from it
            raise AmalgamError(
                f"teacher {entry.name}: tap {tap.path} declared stride {tap.stride}, architecture has stride {info.stride}"
            )
        if info.name != tap.name:
            raise AmalgamError(f"teacher {entry.name}: tap {tap.path} declared as {tap.name!r}, architecture calls it {info.name!r}")


def check_input(entry: TeacherEntry, net: TappedCNN) -> None:
    """The declared input spec must be what the architecture takes: the pool is resized to it."""
    cfg = net.config
    expected = [cfg.in_channels, cfg.image_size, cfg.image_size]
    if entry.input.shape != expected:
        raise AmalgamError(f"teacher {entry.name}: input shape {entry.input.shape}, architecture expects {expected}")
    if not (len(entry.input.mean) == len(entry.input.std) == cfg.in_channels):
        raise AmalgamError(f"teacher {entry.name}: input mean/std need {cfg.in_channels} value(s) each, one per channel")


def load_teacher(entry: TeacherEntry, base_dir: Path | str) -> Teacher:
    """Build, verify and load one teacher; refuse anything that does not match the manifest."""
    path = Path(base_dir) / entry.weights
    if not path.is_file():
        raise AmalgamError(f"teacher {entry.name}: weights file {path} not found")
    if path.suffix != ".safetensors":
        raise AmalgamError(
            f"teacher {entry.name}: weights {path.name} are not safetensors (pickled checkpoints are never loaded); "
            "save the state_dict with safetensors.torch.save_file and update sha256"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise AmalgamError(f"teacher {entry.name}: sha256 of {path.name} is {digest[:12]}..., manifest says {entry.sha256[:12]}...")
    try:
        net = build_model(entry.arch, entry.arch_args)
    except (ValueError, TypeError, ValidationError) as exc:
        raise AmalgamError(f"teacher {entry.name}: bad architecture {entry.arch} {entry.arch_args}: {str(exc).splitlines()[0]}") from None
    if net.config.num_classes != len(entry.classes):
        raise AmalgamError(f"teacher {entry.name}: {len(entry.classes)} classes listed, architecture outputs {net.config.num_classes}")
    check_input(entry, net)
    check_taps(entry, net)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AmalgamError(f"teacher {entry.name}: {path.name} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    bad = state_mismatch(net.state_dict(), state)
    if bad:
        raise AmalgamError(f"teacher {entry.name}: " + bad.message(file=path.name))
    net.load_state_dict(state)
    return Teacher(entry, net)


def load_zoo(manifest_path: Path | str) -> tuple[ZooManifest, list[Teacher]]:
    manifest = read_manifest(manifest_path)
    base = Path(manifest_path).parent
    return manifest, [load_teacher(t, base) for t in manifest.teachers]


def save_weights(net: nn.Module, path: Path) -> str:
    """Write a state_dict as safetensors (atomically) and return its SHA-256."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return sha256_file(path)
