"""The deployable student: ``student.json`` + ``student.safetensors`` in a run directory.

A trained student has to outlive the run that made it. Other people load it later,
maybe from a directory someone else copied. So it is stored the same way as a zoo
teacher: safetensors only (no pickle is ever run), a SHA-256 in the manifest, and a
check of every tensor shape against the declared architecture. Every refusal is one
line that names the file at fault.

The manifest also records the output class order and the teachers it came from, so
``classes[i]`` names logit ``i`` without any other file. It also records the input
spec, so the deployed module normalises its own input and callers pass images in
[0, 1], as they do to teachers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from amalgam.data.fetch import sha256_file
from amalgam.errors import AmalgamError, parse_json_object, validate_as
from amalgam.zoo.arch import build_model
from amalgam.zoo.manifest import InputSpec, Normalize, save_weights
from amalgam.zoo.units import state_mismatch

STUDENT_VERSION = 1
STUDENT_JSON = "student.json"
STUDENT_WEIGHTS = "student.safetensors"


class StudentManifest(BaseModel):
    """What ``student.json`` holds. ``classes`` is the output order of the logits."""

    model_config = ConfigDict(extra="forbid")
    version: int = STUDENT_VERSION
    arch: str = "tapped_cnn"
    arch_args: dict
    classes: list[str] = Field(min_length=1)
    teachers: list[dict]  # [{"name": str, "classes": [str, ...]}, ...] in amalgamation order
    input: InputSpec
    # Only a plain file name in the manifest's own directory. A path here could make
    # loading read any file on the machine.
    weights: str = Field(STUDENT_WEIGHTS, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict = Field(default_factory=dict)
    job: dict = Field(default_factory=dict)  # free-form provenance (zoo, config, commit, ...)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != STUDENT_VERSION:
            raise ValueError(f"unsupported student version {v}; this amalgam reads version {STUDENT_VERSION}")
        return v

    @field_validator("teachers")
    @classmethod
    def _teacher_shape(cls, v: list[dict]) -> list[dict]:
        for t in v:
            names_ok = isinstance(t.get("name"), str)
            classes_ok = isinstance(t.get("classes"), list) and all(isinstance(c, str) for c in t["classes"])
            if set(t) != {"name", "classes"} or not names_ok or not classes_ok:
                raise ValueError('each teacher must be {"name": str, "classes": [str, ...]}')
        return v


class DeployedStudent(nn.Module):
    """Normalise, then run the student. It takes images in [0, 1] and returns logits in ``classes`` order.

    The normalisation is part of the module, so an exported file (TorchScript, ONNX)
    is the whole model and callers need no input spec.
    """

    def __init__(self, net: nn.Module, input_spec: InputSpec):
        super().__init__()
        self.normalize = Normalize(input_spec.mean, input_spec.std)
        self.net = net
        self.spec = input_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _check_consistency(where: Path, m: StudentManifest, net: nn.Module) -> None:
    """Check that classes, teachers and input spec agree with the architecture.

    A mismatch would give logits labelled with the wrong names, or wrongly scaled
    inputs, and nothing would fail later to show it.
    """
    cfg = net.config
    if len(m.classes) != cfg.num_classes:
        raise AmalgamError(f"{where}: {len(m.classes)} classes listed, architecture outputs {cfg.num_classes}")
    dup = sorted({c for c in m.classes if m.classes.count(c) > 1})
    if dup:
        raise AmalgamError(f"{where}: class {dup[0]!r} listed twice")
    # The union of the teachers' classes in first-seen order (amalgam.classes): for teachers
    # with disjoint classes, their concatenation.
    from_teachers = list(dict.fromkeys(c for t in m.teachers for c in t["classes"]))
    if m.teachers and from_teachers != m.classes:
        raise AmalgamError(f"{where}: classes are not the union of the teachers' classes in first-seen order")
    expected_shape = [cfg.in_channels, cfg.image_size, cfg.image_size]
    if m.input.shape != expected_shape:
        raise AmalgamError(f"{where}: input shape {m.input.shape}, architecture expects {expected_shape}")
    if not (len(m.input.mean) == len(m.input.std) == cfg.in_channels):
        raise AmalgamError(f"{where}: input mean/std need {cfg.in_channels} value(s) per list, one per channel")


def _build(where: Path, arch: str, arch_args: dict) -> nn.Module:
    try:
        return build_model(arch, arch_args)
    except (ValueError, TypeError, ValidationError) as exc:
        raise AmalgamError(f"{where}: bad architecture {arch} {arch_args}: {str(exc).splitlines()[0]}") from None


def save_student(
    run_dir: Path,
    net: nn.Module,
    classes: list[str],
    teachers: list[tuple[str, list[str]]],
    input_spec: InputSpec,
    metrics: dict | None = None,
    job: dict | None = None,
) -> Path:
    """Write ``student.safetensors`` and ``student.json`` into ``run_dir``; return the json path.

    The weights are written first and the manifest last, each one atomically. A crash
    can leave weights with no manifest, never a manifest whose weights are missing or
    half written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / STUDENT_JSON
    manifest = validate_as(StudentManifest, dict(
        arch=type(net.config).arch_name,
        arch_args=net.config.model_dump(),
        classes=list(classes),
        teachers=[{"name": name, "classes": list(cs)} for name, cs in teachers],
        input=input_spec,
        weights=STUDENT_WEIGHTS,
        sha256="0" * 64,  # placeholder: check everything before writing anything
        metrics=dict(metrics or {}),
        job=dict(job or {}),
    ), json_path)
    _check_consistency(json_path, manifest, net)
    manifest = manifest.model_copy(update={"sha256": save_weights(net, run_dir / STUDENT_WEIGHTS)})
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(json_path)
    return json_path


def student_json_path(path: Path | str) -> Path:
    """Take a run directory, a ``student.json`` or the weights file beside it and return the manifest path.

    The weights file is what people point at first; it resolves to its manifest (``student.json``
    next to it) rather than failing as "malformed JSON"."""
    path = Path(path)
    if not path.exists():
        raise AmalgamError(f"{path}: no such run directory or student manifest")
    json_path = path / STUDENT_JSON if path.is_dir() else (
        path.with_name(STUDENT_JSON) if path.suffix == ".safetensors" else path)
    if not json_path.is_file():
        raise AmalgamError(f"{json_path}: student manifest not found")
    return json_path


def read_student_manifest(path: Path | str) -> tuple[StudentManifest, Path]:
    """Parse and validate ``student.json`` (run directory or file); return it with its path."""
    json_path = student_json_path(path)
    raw = parse_json_object(json_path.read_bytes(), json_path, "student manifest")
    return validate_as(StudentManifest, raw, json_path), json_path


def load_student(path: Path | str) -> tuple[nn.Module, list[str], InputSpec]:
    """Load a saved student and verify it. Return ``(module, classes, input_spec)``.

    The module is a :class:`DeployedStudent` in eval mode. It takes images in [0, 1]
    and returns logits in ``classes`` order. The weights are untrusted: they are read
    only as safetensors, after the hash check, and every tensor shape is checked
    against ``arch_args``.
    """
    m, json_path = read_student_manifest(path)
    weights = json_path.parent / m.weights
    if not weights.is_file():
        raise AmalgamError(f"{json_path}: weights file {weights} not found")
    digest = sha256_file(weights)
    if digest != m.sha256:
        raise AmalgamError(f"{weights}: sha256 is {digest[:12]}..., {json_path.name} says {m.sha256[:12]}...")
    net = _build(json_path, m.arch, m.arch_args)
    _check_consistency(json_path, m, net)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AmalgamError(f"{weights}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    bad = state_mismatch(net.state_dict(), state)
    if bad:
        raise AmalgamError(f"{weights}: " + bad.message(expects=f"{json_path.name} arch_args expect"))
    net.load_state_dict(state)
    return DeployedStudent(net, m.input).eval(), list(m.classes), m.input


def preprocess_image(path: Path | str, input_spec: InputSpec) -> torch.Tensor:
    """Read one image file into a ``[1, C, H, W]`` float tensor in [0, 1].

    It converts to the student's channel count and size. It does not normalise,
    because the deployed student does that itself.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    c, h, w = input_spec.shape
    modes = {1: "L", 3: "RGB"}
    if c not in modes:
        raise AmalgamError(f"{path}: cannot feed a {c}-channel student from an image file (1 or 3 channels only)")
    try:
        with Image.open(path) as img:
            img = img.convert(modes[c]).resize((w, h), Image.Resampling.BILINEAR)
    except (FileNotFoundError, IsADirectoryError):
        raise AmalgamError(f"{path}: image not found") from None
    except UnidentifiedImageError:
        raise AmalgamError(f"{path}: not an image format PIL can read") from None
    except (OSError, ValueError) as exc:  # truncated or corrupt file, unreadable directory entry
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AmalgamError(f"{path}: unreadable image ({detail})") from None
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.copy())
    x = x.unsqueeze(0) if c == 1 else x.permute(2, 0, 1)  # HW -> 1HW, HWC -> CHW
    return x.unsqueeze(0).contiguous()
