"""Train a demo teacher zoo: experts on disjoint class subsets, with unequal widths.

Each teacher sees only the training images of its own classes (a held-out validation
split is kept aside), is evaluated on the test images of its own classes, and is
written as one safetensors file plus an entry in ``zoo.yaml``. Different teachers use
different normalisations on purpose: teams train models separately, and the engine
must not assume one preprocessing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from amalgam.data.datasets import load_split, to_float
from amalgam.data.pool import convert_images  # the pool's own conversion: teachers train on the pixels a pool shows them
from amalgam.errors import AmalgamError
from amalgam.zoo.arch import build_config, build_net
from amalgam.zoo.manifest import (
    InputSpec,
    TapSpec,
    TeacherEntry,
    ZooManifest,
    load_zoo,
    save_weights,
    write_manifest,
)

DATASET_NORM = {"mnist": ([0.1307], [0.3081]), "fashion": ([0.2860], [0.3530])}

SMALL = {"conv_widths": [16, 32, 64], "fc_widths": [128]}
WIDE = {"conv_widths": [24, 48, 96], "fc_widths": [192]}
RESNET_SMALL = {"stem": "small", "stem_width": 8, "blocks": [1, 1], "stage_widths": [16, 32]}
RESNET_WIDE = {"stem": "small", "stem_width": 12, "blocks": [1, 1], "stage_widths": [24, 48]}
IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# EfficientNet-Lite0 fine-tuned from ImageNet on 3-channel 32 px Fashion-MNIST (README,
# "Pretrained backbones"): Lite0's own topology and widths, the config's defaults.
EFFNET_LITE0 = {"dropout": 0.2}
EFFNET_TRAIN_IMAGES = 12000
EFFNET_32PX = dict(arch="efficientnet_lite", in_channels=3, image_size=32, norm=IMAGENET_NORM, pretrained="imagenet")


@dataclass(frozen=True)
class TeacherRecipe:
    name: str
    dataset: str
    local_classes: list[int]
    widths: dict  # architecture arguments beyond input shape and class count
    epochs: int
    target_accuracy: float  # quality bar for its own test classes
    lr: float = 2e-3
    arch: str = "tapped_cnn"
    # Input conversion and initialisation (pretrained backbones): grey images repeated to
    # ``in_channels`` and resized (bilinear) to ``image_size`` (None: the dataset's size), as
    # uint8, exactly as a pool is converted to the teachers' input shape
    # (:func:`amalgam.data.pool.convert_images`), normalised by ``norm`` = (mean, std) per channel
    # (None: the dataset's own statistics); ``pretrained`` names weights of the family to
    # start from (``imagenet``), with a fresh classifier. ``train_images`` caps the images
    # one epoch sees (CPU budget); ``None``: all of the teacher's classes.
    in_channels: int = 1
    image_size: int | None = None
    norm: tuple[list[float], list[float]] | None = None
    pretrained: str | None = None
    train_images: int | None = None
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class ZooPreset:
    name: str
    teachers: list[TeacherRecipe] = field(default_factory=list)


PRESETS: dict[str, ZooPreset] = {
    "mnist-fashion-4": ZooPreset(
        "mnist-fashion-4",
        [
            TeacherRecipe("mnist-0-4", "mnist", [0, 1, 2, 3, 4], SMALL, epochs=3, target_accuracy=0.99),
            TeacherRecipe("mnist-5-9", "mnist", [5, 6, 7, 8, 9], WIDE, epochs=3, target_accuracy=0.99),
            TeacherRecipe("fashion-0-4", "fashion", [0, 1, 2, 3, 4], WIDE, epochs=6, target_accuracy=0.90),
            TeacherRecipe("fashion-5-9", "fashion", [5, 6, 7, 8, 9], SMALL, epochs=4, target_accuracy=0.90),
        ],
    ),
    # Two small ResNets (3x3 stem, two stages), for tests of the residual family.
    "resnet-mnist-2": ZooPreset(
        "resnet-mnist-2",
        [
            TeacherRecipe("mnist-0-4", "mnist", [0, 1, 2, 3, 4], RESNET_SMALL, epochs=2, target_accuracy=0.97, arch="resnet", lr=1e-2),
            TeacherRecipe("mnist-5-9", "mnist", [5, 6, 7, 8, 9], RESNET_WIDE, epochs=2, target_accuracy=0.97, arch="resnet", lr=1e-2),
        ],
    ),
    # Two ImageNet-pretrained EfficientNet-Lite0s fine-tuned on the Fashion-MNIST halves at 32 px.
    "effnet-fashion-2": ZooPreset(
        "effnet-fashion-2",
        [
            TeacherRecipe("fashion-0-4", "fashion", [0, 1, 2, 3, 4], EFFNET_LITE0, epochs=1, target_accuracy=0.85,
                          lr=1e-3, train_images=EFFNET_TRAIN_IMAGES, **EFFNET_32PX),
            TeacherRecipe("fashion-5-9", "fashion", [5, 6, 7, 8, 9], EFFNET_LITE0, epochs=1, target_accuracy=0.85,
                          lr=1e-3, train_images=EFFNET_TRAIN_IMAGES, **EFFNET_32PX),
        ],
    ),
    # Two teachers, for tests and quick experiments.
    "mnist-2": ZooPreset(
        "mnist-2",
        [
            TeacherRecipe("mnist-0-4", "mnist", [0, 1, 2, 3, 4], SMALL, epochs=2, target_accuracy=0.97),
            TeacherRecipe("mnist-5-9", "mnist", [5, 6, 7, 8, 9], WIDE, epochs=2, target_accuracy=0.97),
        ],
    ),
}


def _select(images: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lut = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    local = lut[labels]
    keep = local >= 0
    return images[keep], local[keep]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(to_float(images[i : i + batch]))
        correct += (logits.argmax(1) == labels[i : i + batch]).sum().item()
    return correct / max(1, len(images))


def init_pretrained(net: torch.nn.Module, arch: str, weights: str) -> None:
    """Initialise ``net`` from named pretrained weights of its family; the classifier stays fresh."""
    if (arch, weights) == ("efficientnet_lite", "imagenet"):
        from amalgam.zoo.efficientnet_lite import load_imagenet_lite0

        load_imagenet_lite0(net, classifier=False)
        return
    raise AmalgamError(f"no pretrained weights {weights!r} for architecture {arch}; known: efficientnet_lite/imagenet")


class _Normalized(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def train_teacher(
    recipe: TeacherRecipe,
    out_dir: Path,
    data_root: Path | None = None,
    limit: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
) -> TeacherEntry:
    """Train one teacher on its own classes; return its manifest entry (weights written)."""
    torch.manual_seed(seed)
    train = load_split(recipe.dataset, "train", data_root)
    test = load_split(recipe.dataset, "test", data_root)
    x, y = _select(train.images, train.labels, recipe.local_classes)
    xt, yt = _select(test.images, test.labels, recipe.local_classes)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = len(x) // 10
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if recipe.train_images is not None:
        train_idx = train_idx[: recipe.train_images]
    if limit is not None:
        train_idx = train_idx[:limit]
        val_idx = val_idx[: max(1, limit // 5)]
        xt, yt = xt[: max(1, limit // 2)], yt[: max(1, limit // 2)]
    if recipe.in_channels != x.shape[1] or recipe.image_size not in (None, x.shape[-1]):
        # Convert only the images used (3 x 32 x 32 is 4x the bytes), re-indexed in place.
        used = torch.cat([train_idx, val_idx])
        shape = [recipe.in_channels, recipe.image_size or x.shape[-2], recipe.image_size or x.shape[-1]]
        x, y = convert_images(x[used], shape), y[used]
        train_idx, val_idx = torch.arange(len(train_idx)), torch.arange(len(train_idx), len(used))
        xt = convert_images(xt, shape)
    mean, std = recipe.norm or DATASET_NORM[recipe.dataset]
    config = build_config(
        recipe.arch,
        {"in_channels": x.shape[1], "image_size": x.shape[-1], "num_classes": len(recipe.local_classes), **recipe.widths},
    )
    net = build_net(config)
    if recipe.pretrained:
        init_pretrained(net, recipe.arch, recipe.pretrained)
    model = _Normalized(net, mean, std)
    n_epochs = epochs or recipe.epochs
    steps = n_epochs * math.ceil(len(train_idx) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(total=steps, desc=f"train {recipe.name}", unit="step", leave=False)
    for epoch in range(n_epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(to_float(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    val_acc = accuracy(model, x[val_idx], y[val_idx])
    test_acc = accuracy(model, xt, yt)
    weights = out_dir / f"{recipe.name}.safetensors"
    digest = save_weights(net, weights)
    class_names = train.class_names
    return TeacherEntry(
        name=recipe.name,
        arch=recipe.arch,
        arch_args=config.model_dump(),
        weights=weights.name,
        sha256=digest,
        classes=[class_names[c] for c in recipe.local_classes],
        input=InputSpec(shape=list(x.shape[1:]), mean=list(mean), std=list(std)),
        taps=[TapSpec(**t.as_dict()) for t in net.feature_info()],
        metrics={
            "val_accuracy": round(val_acc, 5),
            "test_accuracy": round(test_acc, 5),
            "target_accuracy": recipe.target_accuracy,
            "train_images": float(len(train_idx)),
            "test_images": float(len(xt)),
            "epochs": float(n_epochs),
        },
    )


def train_zoo(
    preset: str,
    out_dir: Path,
    data_root: Path | None = None,
    limit: int | None = None,
    epochs: int | None = None,
    force: bool = False,
    seed: int = 0,
) -> ZooManifest:
    """Train every teacher of a preset into ``out_dir``; reuse a verified existing zoo unless ``force``."""
    if preset not in PRESETS:
        raise AmalgamError(f"unknown zoo preset {preset!r}; known: {', '.join(PRESETS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "zoo.yaml"
    if manifest_path.exists() and not force:
        manifest, _ = load_zoo(manifest_path)  # verifies hashes and shapes
        if [t.name for t in manifest.teachers] == [r.name for r in PRESETS[preset].teachers]:
            print(f"[zoo] reusing verified zoo at {manifest_path} (--force retrains)")
            return manifest
    entries = []
    for i, recipe in enumerate(PRESETS[preset].teachers):
        t0 = time.perf_counter()
        entry = train_teacher(recipe, out_dir, data_root, limit=limit, epochs=epochs, seed=seed + i)
        print(
            f"[zoo] {recipe.name}: test accuracy {entry.metrics['test_accuracy']:.4f} on its own classes "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        entries.append(entry)
    manifest = ZooManifest(name=preset, teachers=entries)
    write_manifest(manifest, manifest_path)
    return manifest


def zoo_table(manifest: ZooManifest) -> str:
    """Markdown table of the zoo: widths, params, accuracies against their targets."""
    rows = [
        "| teacher | classes | widths | params | val acc | test acc | target | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in manifest.teachers:
        cfg = build_config(t.arch, t.arch_args)
        params = sum(p.numel() for p in build_net(cfg).parameters())
        m = t.metrics
        ok = "yes" if m.get("test_accuracy", 0) >= m.get("target_accuracy", 1) else "NO"
        rows.append(
            f"| {t.name} | {t.classes[0]}..{t.classes[-1].split('/', 1)[1]} | {'-'.join(map(str, cfg.widths()[:-1]))} "
            f"| {params:,} | {m.get('val_accuracy', float('nan')):.4f} | {m.get('test_accuracy', float('nan')):.4f} "
            f"| {m.get('target_accuracy', float('nan')):.2f} | {ok} |"
        )
    return "\n".join(rows)
