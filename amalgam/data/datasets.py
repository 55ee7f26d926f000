"""Labelled image datasets, loaded by torchvision from the verified files of ``amalgam data fetch``.

Images are kept as uint8 tensors ``[N, 1, H, W]`` in memory (MNIST-sized data is tens of
MB), converted to float in ``[0, 1]`` at batch time; each model applies its own
normalisation, so one pool serves teachers with different preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from amalgam.errors import AmalgamError
from amalgam.paths import default_data_root

if TYPE_CHECKING:  # annotations only: the tensors come from torchvision
    import torch

DatasetName = Literal["mnist", "fashion"]
Split = Literal["train", "test"]

# torchvision dataset class per name. torchvision is imported only when a split is loaded:
# importing it costs about a second (it pulls in torch._dynamo), which every CLI command
# that merely parses a job would otherwise pay.
_TORCHVISION = {"mnist": "MNIST", "fashion": "FashionMNIST"}
CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(i) for i in range(10)],
    # = torchvision.datasets.FashionMNIST.classes (tests/test_data.py checks they agree)
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


@dataclass(frozen=True)
class LabeledImages:
    dataset: str
    split: str
    images: torch.Tensor  # uint8 [N, 1, H, W]
    labels: torch.Tensor  # int64 [N], local to the dataset

    @property
    def class_names(self) -> list[str]:
        """Globally qualified names (``mnist/3``), index = local label."""
        return [f"{self.dataset}/{c}" for c in CLASS_NAMES[self.dataset]]

    def __len__(self) -> int:
        return len(self.labels)


@lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str) -> LabeledImages:
    from torchvision import datasets as tvd

    cls = getattr(tvd, _TORCHVISION[name])
    try:
        ds = cls(root, train=(split == "train"), download=False)
    except RuntimeError as exc:
        raise AmalgamError(
            f"dataset {name} not found under {root} ({exc}); run `amalgam data fetch --root {root}`"
        ) from None
    images = ds.data.unsqueeze(1).contiguous()  # torchvision keeps [N, H, W] uint8
    return LabeledImages(name, split, images, ds.targets.clone().long())


def load_split(name: str, split: str = "train", root: Path | str | None = None) -> LabeledImages:
    if name not in _TORCHVISION:
        raise AmalgamError(f"unknown dataset {name!r}; known: {', '.join(_TORCHVISION)}")
    if split not in ("train", "test"):
        raise AmalgamError(f"unknown split {split!r} for dataset {name}; use train or test")
    return _load_cached(name, split, str(Path(root or default_data_root()).expanduser().resolve()))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]."""
    return images.float().div_(255.0)
