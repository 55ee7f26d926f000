"""The unlabeled transfer pool: which images the amalgamation sees, each with a stable id.

A sample id (``mnist:train:12345``) names the dataset, split and index, so features of
different teachers, extracted at different times or on different workers, align by id.
Labels ride along only for evaluation and the supervised baseline; the amalgamation
path never reads ``Pool.labels``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from amalgam.data.datasets import DatasetName, Split, load_split

if TYPE_CHECKING:  # torch is imported where pools are built: parsing a job (PoolSpec) needs none of it
    import torch


class PoolSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: DatasetName
    split: Split = "train"
    count: int | None = Field(default=None, gt=0, description="images drawn; all when omitted")


class PoolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[PoolSource] = Field(min_length=1)
    seed: int = 0


@dataclass
class Pool:
    ids: list[str]
    images: torch.Tensor  # uint8 [N, 1, H, W]
    labels: torch.Tensor  # int64 [N] into class_names; evaluation only
    class_names: list[str]  # qualified names of every source dataset's classes

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: torch.Tensor | slice) -> "Pool":
        import torch

        idx = torch.arange(len(self.ids))[index]
        return Pool([self.ids[i] for i in idx.tolist()], self.images[idx], self.labels[idx], self.class_names)

    def fingerprint(self) -> str:
        """Content hash of the ids and pixels: two pools with equal fingerprints are the same data."""
        h = hashlib.sha256()
        h.update("\n".join(self.ids).encode())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()


def build_pool(spec: PoolSpec, root: Path | str | None = None) -> Pool:
    import torch

    ids: list[str] = []
    images, labels, class_names = [], [], []
    offsets: dict[str, int] = {}
    gen = torch.Generator().manual_seed(spec.seed)
    for src in spec.sources:
        data = load_split(src.dataset, src.split, root)
        if src.dataset not in offsets:
            offsets[src.dataset] = len(class_names)
            class_names.extend(data.class_names)
        n = len(data) if src.count is None else min(src.count, len(data))
        idx = torch.randperm(len(data), generator=gen)[:n].sort().values
        ids.extend(f"{src.dataset}:{src.split}:{i}" for i in idx.tolist())
        images.append(data.images[idx])
        labels.append(data.labels[idx] + offsets[src.dataset])
    return Pool(ids, torch.cat(images), torch.cat(labels), class_names)
