"""``amalgam zoo import``: a zoo manifest from teachers trained elsewhere.

An import spec (YAML) names, per teacher, a weights file, an architecture name from
:func:`import_architectures` (``tapped_cnn``, torchvision's ``resnet18`` .. ``resnet152``, a
custom ``resnet``, ``efficientnet_lite0``), its class names and its preprocessing::

    name: my-zoo
    teachers:
      - name: cats-dogs
        weights: resnet18-catsdogs.pth      # .safetensors, or a state_dict saved with torch.save
        arch: resnet18
        classes: [pets/cat, pets/dog]       # or a text file, one class a line
        input: imagenet                     # a preset, or {shape: [3, 224, 224], mean: [...], std: [...]}

Weights are untrusted input. A ``.safetensors`` file is read with safetensors; anything else
with ``torch.load(weights_only=True)``, which unpickles tensors and containers only: a pickled
``nn.Module`` (or any other object) is refused, never executed. The loaded mapping must be a
flat ``{name: tensor}`` state_dict, optionally under a ``state_dict``/``model`` key.

Every check that needs no weight data runs first, for all teachers: the spec, the class
names (:class:`~amalgam.classes.ClassSpace` rules), the output directory, and every tensor's
name, shape and dtype against the architecture (built on the ``meta`` device, so a
ResNet-152 costs nothing). Only then are weights read, loaded into the real network,
written as ``<teacher>.safetensors`` and the manifest as ``zoo.yaml``, all in a staging
directory that is verified with :func:`~amalgam.zoo.manifest.load_zoo` before anything is
moved into the zoo directory (the manifest last). A failure leaves the zoo directory as it
was. Every refusal is one line naming the teacher and, where one is at fault, the tensor.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from amalgam.classes import ClassSpace
from amalgam.errors import AmalgamError, read_yaml_mapping, validate_as
from amalgam.zoo.manifest import (
    InputSpec,
    TapSpec,
    TeacherEntry,
    ZooManifest,
    load_zoo,
    save_weights,
    write_manifest,
)

MANIFEST_NAME = "zoo.yaml"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")

INPUT_PRESETS: dict[str, dict] = {
    "imagenet": {"shape": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "mnist": {"shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081]},
    "fashion": {"shape": [1, 28, 28], "mean": [0.2860], "std": [0.3530]},
}

State = dict[str, torch.Tensor]


# --- the import spec --------------------------------------------------------------------------


class InputImport(BaseModel):
    """``input:`` as a mapping: a preset and/or explicit shape, mean, std (explicit wins)."""

    model_config = ConfigDict(extra="forbid")
    preset: str | None = None
    shape: list[int] | None = Field(None, min_length=3, max_length=3)
    mean: list[float] | None = None
    std: list[float] | None = None


class TeacherImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    weights: str
    arch: str
    arch_args: dict = Field(default_factory=dict)
    classes: list[str] | str
    input: str | InputImport
    key_prefix: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class ImportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    teachers: list[TeacherImport] = Field(min_length=1)


def read_import_spec(path: Path | str) -> ImportSpec:
    path = Path(path)
    raw = read_yaml_mapping(path, "zoo import spec")
    spec = validate_as(ImportSpec, raw, path)
    names = [t.name for t in spec.teachers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AmalgamError(f"{path}: teacher name {dup[0]!r} used twice")
    return spec


# --- the architecture table -------------------------------------------------------------------


@dataclass(frozen=True)
class ImportArch:
    """How one architecture name becomes a registry config and our state_dict.

    ``args(state, arch_args)`` returns the architecture arguments the name implies (everything
    but ``in_channels``, ``image_size`` and ``num_classes``, which come from the input spec and
    the class list; ``arch_args`` from the spec override them); ``convert(state)`` renames a
    foreign state_dict's keys to ours (identity for our own files).
    """

    arch: str  # the registry architecture (amalgam.zoo.arch)
    args: Callable[[State, dict], dict]
    convert: Callable[[State], State]
    about: str


def _no_args(state: State, arch_args: dict) -> dict:
    return {}


def _identity(state: State) -> State:
    return dict(state)


def _tapped_cnn_args(state: State, arch_args: dict) -> dict:
    """Our CNN's widths, read off its tensors unless ``arch_args`` gives them."""
    if "conv_widths" in arch_args:
        return {}
    convs, fcs, i = [], [], 1
    while f"layers.conv{i}.weight" in state:
        convs.append(int(state[f"layers.conv{i}.weight"].shape[0]))
        i += 1
    j = 1
    while f"layers.fc{j}.weight" in state:
        fcs.append(int(state[f"layers.fc{j}.weight"].shape[0]))
        j += 1
    if not convs:
        raise ValueError("no tensor layers.conv1.weight to read the widths from; give arch_args.conv_widths")
    kernel = state["layers.conv1.weight"].shape
    return {"conv_widths": convs, "fc_widths": fcs, **({"kernel_size": int(kernel[-1])} if len(kernel) == 4 else {})}


def _resnet_keys(state: State) -> State:
    """torchvision's ResNet keys -> ours; a state_dict already in our layout passes unchanged."""
    from amalgam.zoo.resnet import from_torchvision_state_dict

    if any(k.startswith("layers.") for k in state):
        return dict(state)
    return from_torchvision_state_dict(state)


def _torchvision_resnet(name: str) -> ImportArch:
    def args(state: State, arch_args: dict) -> dict:
        from amalgam.zoo.resnet import torchvision_config

        out = torchvision_config(name, num_classes=1).model_dump()
        for k in ("num_classes", "in_channels", "image_size"):
            out.pop(k)
        return out

    return ImportArch("resnet", args, _resnet_keys, f"torchvision {name} (state_dict keys renamed)")


def _efficientnet_lite(name: str) -> ImportArch | str:
    """The EfficientNet-Lite entry, or why it is unavailable (imported lazily: an optional module)."""
    try:
        from amalgam.zoo.efficientnet_lite import from_efficientnet_lite_state_dict, lite_config
    except ImportError as exc:
        return f"amalgam.zoo.efficientnet_lite cannot be imported ({_first_line(exc)})"

    def args(state: State, arch_args: dict) -> dict:
        out = lite_config(name, num_classes=1).model_dump()
        for k in ("num_classes", "in_channels", "image_size"):
            out.pop(k, None)
        return out

    def convert(state: State) -> State:
        if any(k.startswith("layers.") for k in state):  # already in our layout
            return dict(state)
        return from_efficientnet_lite_state_dict(state)  # efficientnet-lite-pytorch's keys (Lite0 repeats)

    return ImportArch("efficientnet_lite", args, convert, f"{name} (efficientnet-lite-pytorch state_dict, renamed)")


def import_architectures() -> tuple[dict[str, ImportArch], dict[str, str]]:
    """(available architecture names, {unavailable name: why})."""
    from amalgam.zoo.resnet import TORCHVISION_RESNETS

    table: dict[str, ImportArch] = {
        "tapped_cnn": ImportArch("tapped_cnn", _tapped_cnn_args, _identity, "amalgam's tapped CNN (widths read from the tensors)"),
        "resnet": ImportArch("resnet", _no_args, _resnet_keys, "a custom ResNet (arch_args: block, blocks, stage_widths, ...)"),
    }
    for name in TORCHVISION_RESNETS:
        table[name] = _torchvision_resnet(name)
    unavailable: dict[str, str] = {}
    for name in ("efficientnet_lite0",):
        got = _efficientnet_lite(name)
        if isinstance(got, str):
            unavailable[name] = got
        else:
            table[name] = got
    return table, unavailable


# --- reading weight files ---------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_refusal(exc: BaseException, path: Path, teacher: str) -> AmalgamError:
    """torch's many-line weights_only refusal, reduced to one line saying what was refused."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.Y" / "unsupported GLOBAL os.system ..."
    if m:
        return AmalgamError(
            f"teacher {teacher}: {path.name} is not a plain state_dict: it pickles {m.group(1)}, which is never "
            "unpickled (save model.state_dict() instead of the model)"
        )
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if m:
        reason = m.group(1).strip()
    else:  # torch's boilerplate first and last; the reason in between
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        middle = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)"))]
        reason = middle[0] if middle else _first_line(exc)
    return AmalgamError(f"teacher {teacher}: {path.name} is not a readable torch state_dict (weights_only: {reason})")


def _safetensors_meta(path: Path, teacher: str) -> State:
    """The file's tensors as meta tensors (header only: no weight data read)."""
    from safetensors import safe_open

    try:
        out: State = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise AmalgamError(f"teacher {teacher}: tensor {key} in {path.name} has unsupported dtype {sl.get_dtype()}")
                out[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        return out
    except AmalgamError:
        raise
    except Exception as exc:  # SafetensorError, OSError, ...: the file is not what it claims
        raise AmalgamError(f"teacher {teacher}: {path.name} is not a valid safetensors file ({_first_line(exc)})") from None


def _torch_state(path: Path, teacher: str) -> State:
    """A state_dict saved with torch.save, loaded with weights_only=True (memory-mapped when possible)."""
    import pickle

    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = load(False)  # the legacy (non-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        raise _weights_only_refusal(exc, path, teacher) from None
    except Exception as exc:  # truncated or not a torch file at all
        raise AmalgamError(f"teacher {teacher}: {path.name} is not a readable torch state_dict ({_first_line(exc)})") from None
    return _flat_state(obj, path, teacher)


def _is_tensor_map(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _flat_state(obj: object, path: Path, teacher: str) -> State:
    if _is_tensor_map(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:  # checkpoints: {"state_dict": {...}, "epoch": ..., "optimizer": ...}
            if _is_tensor_map(obj.get(key)):
                return dict(obj[key])
        if not obj:
            raise AmalgamError(f"teacher {teacher}: {path.name} holds an empty mapping, not a state_dict")
        bad = next(k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
        raise AmalgamError(
            f"teacher {teacher}: {path.name} is not a flat state_dict: entry {bad!r} is a {type(obj[bad]).__name__}, "
            f"not a tensor (and no {'/'.join(WRAPPER_KEYS)} key holds one)"
        )
    raise AmalgamError(f"teacher {teacher}: {path.name} holds a {type(obj).__name__}, not a state_dict")


def _strip_prefix(state: State, prefix: str | None, path: Path, teacher: str) -> State:
    if prefix:
        kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise AmalgamError(f"teacher {teacher}: no tensor in {path.name} starts with key_prefix {prefix!r}")
        return kept
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        return {k[len("module."):]: v for k, v in state.items()}
    return state


# --- one teacher ------------------------------------------------------------------------------


@dataclass
class _Planned:
    spec: TeacherImport
    path: Path
    recipe: ImportArch
    config: object
    input: InputSpec
    classes: list[str]
    state: State  # converted to our keys; meta tensors for safetensors files (read again when written)
    source_names: dict[str, str]  # our key -> the key in the file, where they differ


def _resolve_input(t: TeacherImport) -> InputSpec:
    raw = InputImport(preset=t.input) if isinstance(t.input, str) else t.input
    values: dict = {}
    if raw.preset is not None:
        if raw.preset not in INPUT_PRESETS:
            raise AmalgamError(f"teacher {t.name}: unknown input preset {raw.preset!r}; known: {', '.join(INPUT_PRESETS)}")
        values.update(INPUT_PRESETS[raw.preset])
    values.update({k: v for k, v in raw.model_dump().items() if k != "preset" and v is not None})
    missing = [k for k in ("shape", "mean", "std") if k not in values]
    if missing:
        raise AmalgamError(f"teacher {t.name}: input needs {missing[0]} (or a preset: {', '.join(INPUT_PRESETS)})")
    try:
        spec = InputSpec(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise AmalgamError(f"teacher {t.name}: input.{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}") from None
    c, h, w = spec.shape
    if min(spec.shape) < 1 or h != w:
        raise AmalgamError(f"teacher {t.name}: input shape {spec.shape} must be [C, S, S] with positive sizes")
    if not (len(spec.mean) == len(spec.std) == c):
        raise AmalgamError(f"teacher {t.name}: input mean/std need {c} value(s) each, one per channel")
    return spec


def _resolve_classes(t: TeacherImport, base: Path) -> list[str]:
    if isinstance(t.classes, list):
        classes = t.classes
    else:
        path = (base / t.classes).expanduser()
        if not path.is_file():
            raise AmalgamError(f"teacher {t.name}: classes file {path} not found")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AmalgamError(f"teacher {t.name}: classes file {path} unreadable ({_first_line(exc)})") from None
        classes = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    bad = next((c for c in classes if not isinstance(c, str) or not c.strip() or c != c.strip()), None)
    if bad is not None:
        raise AmalgamError(f"teacher {t.name}: class name {bad!r} is empty or has surrounding spaces")
    unqualified = next((c for c in classes if c.startswith("/") or c.endswith("/") or "/" not in c), None)
    if unqualified is not None:  # the class space's convention: one qualified name per class
        raise AmalgamError(f"teacher {t.name}: class name {unqualified!r} is not qualified as DATASET/CLASS (e.g. pets/cat)")
    if len(classes) < 2:
        raise AmalgamError(f"teacher {t.name}: needs at least 2 classes, got {len(classes)}")
    ClassSpace.from_teachers([(t.name, classes)])  # no duplicates within the teacher
    return classes


def _resolve_weights(t: TeacherImport, base: Path) -> Path:
    path = (base / t.weights).expanduser()
    if not path.is_file():
        raise AmalgamError(f"teacher {t.name}: weights file {path} not found")
    if not path.name.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
        raise AmalgamError(
            f"teacher {t.name}: weights {path.name}: unknown format; use .safetensors or a torch.save'd state_dict "
            f"({', '.join(TORCH_SUFFIXES)})"
        )
    return path


def _source_names(convert: Callable[[State], State], state: State) -> dict[str, str]:
    """Our key -> the file's key, for converters that rename key by key (for error messages)."""
    out = {}
    for key, value in state.items():
        try:
            got = convert({key: value})
        except Exception:
            continue
        if len(got) == 1:
            ours = next(iter(got))
            if ours != key:
                out[ours] = key
    return out


def _meta_net(config) -> torch.nn.Module:
    from amalgam.zoo.arch import build_net

    with torch.device("meta"):
        return build_net(config)


def _build_config(recipe: ImportArch, t: TeacherImport, arch_name: str, state: State, inp: InputSpec, num_classes: int):
    from amalgam.zoo.arch import build_config

    c, s, _ = inp.shape
    derived = {"in_channels": c, "image_size": s, "num_classes": num_classes}
    for key, value in derived.items():
        if key in t.arch_args and t.arch_args[key] != value:
            what = "the class list's length" if key == "num_classes" else f"input shape {inp.shape}"
            raise AmalgamError(f"teacher {t.name}: arch_args.{key} = {t.arch_args[key]!r} disagrees with {what} ({value})")
    try:
        args = {**recipe.args(state, t.arch_args), **derived, **t.arch_args}
        return build_config(recipe.arch, args)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "(top level)"
        raise AmalgamError(f"teacher {t.name}: bad {arch_name} arguments: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    except (ValueError, TypeError) as exc:
        raise AmalgamError(f"teacher {t.name}: bad {arch_name} arguments: {_first_line(exc)}") from None


def _plan_teacher(t: TeacherImport, base: Path, table: dict[str, ImportArch], unavailable: dict[str, str]) -> _Planned:
    """Every check that needs no weight data: spec, classes, input, tensor names/shapes/dtypes."""
    if t.arch in unavailable:
        raise AmalgamError(f"teacher {t.name}: architecture {t.arch} is unavailable: {unavailable[t.arch]}")
    if t.arch not in table:
        raise AmalgamError(f"teacher {t.name}: unknown architecture {t.arch!r}; known: {', '.join(table)}")
    recipe = table[t.arch]
    classes = _resolve_classes(t, base)
    inp = _resolve_input(t)
    path = _resolve_weights(t, base)

    raw = _safetensors_meta(path, t.name) if path.name.endswith(SAFETENSORS_SUFFIXES) else _torch_state(path, t.name)
    raw = _strip_prefix(raw, t.key_prefix, path, t.name)
    try:
        state = recipe.convert(raw)
    except Exception as exc:
        raise AmalgamError(f"teacher {t.name}: cannot convert {path.name} to {t.arch}: {_first_line(exc)}") from None
    names = _source_names(recipe.convert, raw)

    def named(key: str) -> str:
        return f"{names[key]} ({key})" if key in names else key

    n = len(classes)
    config = _build_config(recipe, t, t.arch, state, inp, n)
    # The classifier: the tensors whose shapes change with the class count.
    plus_one = _build_config(recipe, t.model_copy(update={"arch_args": {k: v for k, v in t.arch_args.items() if k != "num_classes"}}),
                             t.arch, state, inp, n + 1)
    expected = _meta_net(config).state_dict()
    expected_plus = _meta_net(plus_one).state_dict()
    for key, ref in expected.items():
        other = expected_plus[key].shape
        if tuple(other) == tuple(ref.shape) or key not in state or state[key].dim() != ref.dim():
            continue
        axis = next(i for i, (a, b) in enumerate(zip(ref.shape, other)) if a != b)
        got = int(state[key].shape[axis])
        if got != n:
            raise AmalgamError(
                f"teacher {t.name}: the weights have {got} classes (tensor {named(key)} has shape {tuple(state[key].shape)}), "
                f"classes lists {n}"
            )
    for key, ref in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue  # older checkpoints lack it; it does not affect eval-mode outputs
            raise AmalgamError(f"teacher {t.name}: tensor {key} missing from {path.name} ({t.arch})")
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise AmalgamError(
                f"teacher {t.name}: tensor {named(key)} has shape {tuple(got.shape)}, {t.arch} expects {tuple(ref.shape)}"
            )
        if ref.is_floating_point() and not got.is_floating_point():
            raise AmalgamError(f"teacher {t.name}: tensor {named(key)} has dtype {got.dtype}, {t.arch} expects floating point")
    extra = [k for k in state if k not in expected]
    if extra:
        raise AmalgamError(f"teacher {t.name}: unexpected tensor {named(extra[0])} in {path.name} (not part of {t.arch})")
    return _Planned(t, path, recipe, config, inp, classes, state, names)


def _materialize(p: _Planned, staging: Path) -> tuple[TeacherEntry, int]:
    """Load the real weights into the network and write them, as safetensors, into ``staging``."""
    from safetensors.torch import load_file

    from amalgam.zoo.arch import build_net

    t = p.spec
    state = p.state
    if any(v.is_meta for v in state.values()):
        try:
            raw = load_file(str(p.path))
        except Exception as exc:
            raise AmalgamError(f"teacher {t.name}: {p.path.name} is not a valid safetensors file ({_first_line(exc)})") from None
        state = p.recipe.convert(_strip_prefix(raw, t.key_prefix, p.path, t.name))
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            shown = f"{p.source_names[key]} ({key})" if key in p.source_names else key
            raise AmalgamError(f"teacher {t.name}: tensor {shown} in {p.path.name} holds NaN or infinite values")
    net = build_net(p.config)
    own = net.state_dict()
    for key in own:
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(own[key])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # only if the file changed since it was checked
        raise AmalgamError(f"teacher {t.name}: {p.path.name} changed while importing ({_first_line(exc)})") from None
    net.eval()
    weights = f"{t.name}.safetensors"
    digest = save_weights(net, staging / weights)
    entry = TeacherEntry(
        name=t.name, arch=type(p.config).arch_name, arch_args=p.config.model_dump(), weights=weights,
        sha256=digest, classes=p.classes, input=p.input, taps=[TapSpec(**tap.as_dict()) for tap in net.feature_info()],
        metrics=t.metrics,
    )
    return entry, sum(x.numel() for x in net.parameters())


# --- the zoo ----------------------------------------------------------------------------------


def _conflicts(out: Path, spec: ImportSpec) -> list[Path]:
    targets = [out / MANIFEST_NAME, *(out / f"{t.name}.safetensors" for t in spec.teachers)]
    return [p for p in targets if p.exists() or p.is_symlink()]


def import_zoo(spec_path: Path | str, out: Path | str, force: bool = False, log: Callable[[str], None] = print) -> tuple[ZooManifest, list[dict]]:
    """Import the teachers of ``spec_path`` into the zoo directory ``out``; returns (manifest, table rows)."""
    spec_path, out = Path(spec_path), Path(out)
    spec = read_import_spec(spec_path)
    base = spec_path.resolve().parent
    if out.exists() and not out.is_dir():
        raise AmalgamError(f"{out}: the zoo directory is a file")
    existing = _conflicts(out, spec)
    if existing and not force:
        raise AmalgamError(f"{existing[0]} already exists; pass --force to overwrite it")

    table, unavailable = import_architectures()
    planned = [_plan_teacher(t, base, table, unavailable) for t in spec.teachers]
    ClassSpace.from_teachers([(p.spec.name, p.classes) for p in planned])  # the zoo's class-space rules

    top = out.absolute()  # the first directory this import creates: removed again on failure
    while not top.parent.exists():
        top = top.parent
    created = not top.exists()
    staging: Path | None = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=out))
        entries, rows = [], []
        for p in planned:
            entry, params = _materialize(p, staging)
            entries.append(entry)
            rows.append({"teacher": entry.name, "arch": p.spec.arch, "params": params, "classes": entry.classes,
                         "input": entry.input})
            log(f"[zoo import] {entry.name}: {p.spec.arch}, {params:,} parameters, {len(entry.classes)} classes")
        manifest = ZooManifest(name=spec.name, teachers=entries)
        write_manifest(manifest, staging / MANIFEST_NAME)
        load_zoo(staging / MANIFEST_NAME)  # hashes, shapes, taps and input as every later reader sees them
        for entry in entries:
            os.replace(staging / entry.weights, out / entry.weights)
        os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)  # last: the zoo exists only once complete
    except OSError as exc:
        raise AmalgamError(f"{out}: cannot write the zoo ({exc.strerror or _first_line(exc)})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created and not (out / MANIFEST_NAME).is_file():
            shutil.rmtree(top, ignore_errors=True)
    return manifest, rows


def import_table(rows: list[dict]) -> str:
    lines = ["| teacher | arch | params | classes | input |", "|---|---|---:|---|---|"]
    for r in rows:
        cls = r["classes"]
        shown = f"{cls[0]} .. {cls[-1]} ({len(cls)})" if len(cls) > 2 else ", ".join(cls)
        inp: InputSpec = r["input"]
        mean = ", ".join(f"{m:g}" for m in inp.mean)
        std = ", ".join(f"{s:g}" for s in inp.std)
        lines.append(f"| {r['teacher']} | {r['arch']} | {r['params']:,} | {shown} | {'x'.join(map(str, inp.shape))}, "
                     f"mean [{mean}], std [{std}] |")
    return "\n".join(lines)
