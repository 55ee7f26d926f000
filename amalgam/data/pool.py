"""The unlabeled transfer pool: which images the amalgamation sees, each with a stable id.

A sample id (``mnist:train:12345``) names the dataset, split and index, so features of
different teachers, extracted at different times or on different workers, align by id.
Labels ride along only for evaluation and the supervised baseline; the amalgamation
path never reads ``Pool.labels``.

A source is one of (``PoolSpec.sources``, told apart by their key):

- ``{dataset: mnist|fashion, split, count}``: a fetched dataset;
- ``{images: FOLDER | s3://BUCKET/PREFIX, labels: folder|none, name, count, s3}``: every image
  file below it (any depth), id ``img:RELATIVE/PATH``; with ``labels: folder`` the first folder
  under the root is the class (ImageFolder), qualified as ``NAME/CLASS`` when ``name`` is set;
- ``{files: [PATH, ...] | LIST.txt, labels: none|folder, root, name, count}``: listed local files,
  ids relative to ``root`` (default: the list file's folder, or the job file's for an inline
  list); ``labels: folder`` = each file's parent folder.

Image files are decoded to the teachers' input shape (:mod:`amalgam.data.images`); an
unreadable one is skipped and listed in ``Pool.skipped``, never fatal. Unlabelled images have
label -1 (excluded from accuracy).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WrapValidator, field_validator

from amalgam.data.datasets import DatasetName, Split, load_split
from amalgam.errors import AmalgamError
from amalgam.store.location import CREDENTIALS_IN_URI, S3Options, credentials_in_uri

if TYPE_CHECKING:  # torch is imported where pools are built: parsing a job (PoolSpec) needs none of it
    import torch


class PoolSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: DatasetName
    split: Split = "train"
    count: int | None = Field(default=None, gt=0, description="images drawn; all when omitted")


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ImageFolderSource(BaseModel):
    """Every image file below a folder or an S3 prefix (any depth)."""

    model_config = ConfigDict(extra="forbid")
    images: str = Field(min_length=1, description="a folder (searched recursively) or s3://BUCKET/PREFIX")
    labels: Literal["folder", "none"] = Field(
        "folder", description="folder: the first folder under the root is the class (evaluation only); none: unlabelled"
    )
    name: str | None = Field(None, pattern=_NAME, description="qualifies class names (NAME/CLASS) and ids (img:NAME/...)")
    count: int | None = Field(default=None, gt=0, description="files drawn; all when omitted")
    s3: S3Options | None = Field(None, description="S3 endpoint/region (default: the job's store.s3, then the environment)")

    @field_validator("images")
    @classmethod
    def _where(cls, v: str) -> str:
        if credentials_in_uri(v):
            raise ValueError(CREDENTIALS_IN_URI)
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"{v}: use a folder, file://FOLDER or s3://BUCKET/PREFIX")
        if v.startswith("s3://") and (len(v) == len("s3://") or v[len("s3://")] == "/"):
            raise ValueError(f"{v}: an S3 image source is s3://BUCKET[/PREFIX]")
        return v


class FileListSource(BaseModel):
    """Local image files, listed inline or in a text file (one path a line)."""

    model_config = ConfigDict(extra="forbid")
    files: list[str] | str = Field(description="paths, or a text file listing one path a line (relative to it)")
    labels: Literal["folder", "none"] = Field("none", description="folder: each file's parent folder is its class")
    root: str | None = Field(None, description="folder that relative paths and the ids are relative to "
                                               "(default: the list file's folder; an inline list's: the job file's)")
    name: str | None = Field(None, pattern=_NAME, description="qualifies class names (NAME/CLASS) and ids (img:NAME/...)")
    count: int | None = Field(default=None, gt=0, description="files drawn; all when omitted")

    @field_validator("files")
    @classmethod
    def _some(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("list at least one file")
        if isinstance(v, str) and not v.strip():
            raise ValueError("name a text file listing the images, or give a list")
        return v


_KINDS: dict[str, type[BaseModel]] = {"dataset": PoolSource, "images": ImageFolderSource, "files": FileListSource}


def _pick_source(v: Any, handler) -> Any:
    """Tell the kinds apart by their key; the chosen model's own errors keep their field path
    (``pool.sources.0.count``), as a tagged union's would not."""
    if isinstance(v, tuple(_KINDS.values())):
        return v
    if isinstance(v, dict):
        kinds = [k for k in _KINDS if k in v]
        if len(kinds) > 1:
            raise ValueError(f"a pool source has one of dataset, images or files, not {' and '.join(kinds)}")
        if not kinds:
            raise ValueError("a pool source needs one of dataset (mnist, fashion), images (a folder or s3:// prefix) "
                             "or files (a list)")
        return _KINDS[kinds[0]].model_validate(v)
    return PoolSource.model_validate(v)


AnySource = Annotated[Union[PoolSource, ImageFolderSource, FileListSource], WrapValidator(_pick_source)]


class PoolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[AnySource] = Field(min_length=1)
    seed: int = 0

    def has_images(self) -> bool:
        return any(not isinstance(s, PoolSource) for s in self.sources)

    def resolved(self, resolve: Callable[[str], Path], s3: S3Options | None = None) -> "PoolSpec":
        """Local image paths made absolute with ``resolve`` (a job's: relative to the job file,
        ``$AMALGAM_HOME``, ``~``), and S3 image sources given ``s3`` (the job's ``store.s3``) when
        they name none; a spec without image sources comes back as is."""
        if not self.has_images():
            return self
        out: list[Any] = []
        for src in self.sources:
            if isinstance(src, ImageFolderSource):
                if src.images.startswith("s3://"):
                    if src.s3 is None and s3 is not None and (s3.endpoint_url or s3.region):
                        src = src.model_copy(update={"s3": s3})
                else:
                    src = src.model_copy(update={"images": str(resolve(src.images.removeprefix("file://")))})
            elif isinstance(src, FileListSource):
                inline = isinstance(src.files, list)
                files = [str(resolve(f.removeprefix("file://"))) for f in src.files] if inline \
                    else str(resolve(src.files.removeprefix("file://")))  # type: ignore[union-attr]
                root = str(resolve(src.root)) if src.root else (str(resolve(".")) if inline else None)
                src = src.model_copy(update={"files": files, "root": root})
            out.append(src)
        return self.model_copy(update={"sources": out})


@dataclass
class Pool:
    ids: list[str]
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N] into class_names (-1: unlabelled); evaluation only
    class_names: list[str]  # qualified names of every source's classes
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable image files

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: torch.Tensor | slice) -> "Pool":
        import torch

        idx = torch.arange(len(self.ids))[index]
        return Pool([self.ids[i] for i in idx.tolist()], self.images[idx], self.labels[idx], self.class_names,
                    list(self.skipped))

    def fingerprint(self) -> str:
        """Content hash of the ids and pixels: two pools with equal fingerprints are the same data."""
        h = hashlib.sha256()
        h.update("\n".join(self.ids).encode())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()


def convert_images(images: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` to ``shape`` = ``[C', H', W']``: grey <-> RGB (Pillow's ``L``
    weights), bilinear antialiased resize. Used when a dataset's images are not the teachers' shape."""
    import torch
    import torch.nn.functional as F

    c, h, w = (int(x) for x in shape)
    x = images.float()
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise AmalgamError(f"cannot convert {x.shape[1]}-channel images to the teachers' {c} channels")
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def _source_where(src: BaseModel) -> str:
    if isinstance(src, ImageFolderSource):
        return src.images
    files = src.files  # type: ignore[attr-defined]
    return files if isinstance(files, str) else f"files ({len(files)} listed)"


def _listing(src: BaseModel):
    from amalgam.data.images import list_files, list_folder

    if isinstance(src, ImageFolderSource):
        return list_folder(src.images, src.s3.model_dump() if src.s3 else None)
    return list_files(src.files, src.root)  # type: ignore[attr-defined]


def _class_of(src: BaseModel, rel: str, root: str) -> str | None:
    """An image's class name from its path (before qualification), None when unlabelled."""
    if src.labels == "none":  # type: ignore[attr-defined]
        return None
    parts = rel.split("/")
    if isinstance(src, ImageFolderSource):
        return parts[0] if len(parts) > 1 else None  # a file right under the root has no class folder
    return parts[-2] if len(parts) > 1 else (Path(root).name or None)  # a listed file's parent folder


def check_sources(spec: PoolSpec, root: Path | str | None = None) -> None:
    """What ``amalgam validate`` checks: datasets are fetched, image folders and lists hold images."""
    for src in spec.sources:
        if isinstance(src, PoolSource):
            load_split(src.dataset, src.split, root)
        else:
            _listing(src)


def _image_source(src: BaseModel, shape: list[int] | None, gen, reader: str, log) -> dict:
    """ids, images, class names per image (None: unlabelled) and skipped files of one image source."""
    import numpy as np
    import torch

    from amalgam.data.images import check_shape, read_images

    if shape is None:
        raise AmalgamError(f"{_source_where(src)}: an image source needs the teachers' input shape (build the pool "
                           "with the zoo's input.shape)")
    shape = check_shape(shape)
    listing = _listing(src)
    rels = listing.rels
    if src.count is not None and src.count < len(rels):  # type: ignore[attr-defined]
        pick = torch.randperm(len(rels), generator=gen)[: src.count].sort().values  # type: ignore[attr-defined]
        rels = [rels[i] for i in pick.tolist()]
    images, errors, by_ray = read_images(listing, rels, shape, reader)
    ok = [i for i, e in enumerate(errors) if not e]
    skipped = [(listing.where(rels[i]), errors[i]) for i, e in enumerate(errors) if e]
    if not ok:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise AmalgamError(f"{listing.root}: none of the {len(rels)} image files could be read{first}")
    prefix = f"img:{src.name}/" if src.name else "img:"  # type: ignore[attr-defined]
    classes = [_class_of(src, r, listing.root) for r in rels]
    if log is not None:
        how = "Ray Data" if by_ray else "in-process"
        msg = f"[pool] {listing.root}: {len(ok)} images read ({how}), shape {list(shape)}"
        if skipped:
            msg += f"; skipped {len(skipped)} unreadable images (see report)"
        log(msg)
    return {
        "ids": [prefix + rels[i] for i in ok],
        "images": torch.from_numpy(np.ascontiguousarray(images[ok])),
        "classes": [classes[i] for i in ok],
        "all_classes": sorted({c for c in classes if c is not None}),
        "skipped": skipped,
    }


def build_pool(spec: PoolSpec, root: Path | str | None = None, input_shape: list[int] | None = None,
               log: Callable[[str], None] | None = None, reader: Literal["auto", "ray", "local"] = "auto") -> Pool:
    """The pool of ``spec``; ``root``: where the datasets are. ``input_shape`` (the zoo's
    ``[C, H, W]``) is what image files are decoded to (required for image sources), and what
    dataset images are converted to when they differ. ``reader``: who decodes image files
    (``auto``: Ray Data when Ray is up in this process, else a thread pool here)."""
    import torch

    ids: list[str] = []
    images, labels, class_names = [], [], []
    skipped: list[tuple[str, str]] = []
    index: dict[str, int] = {}

    def positions(names: list[str]) -> torch.Tensor:
        for n in names:
            if n not in index:
                index[n] = len(class_names)
                class_names.append(n)
        return torch.tensor([index[n] for n in names], dtype=torch.long)

    shape = [int(x) for x in input_shape] if input_shape is not None else None
    gen = torch.Generator().manual_seed(spec.seed)
    for src in spec.sources:
        if isinstance(src, PoolSource):
            data = load_split(src.dataset, src.split, root)
            lut = positions(data.class_names)
            n = len(data) if src.count is None else min(src.count, len(data))
            idx = torch.randperm(len(data), generator=gen)[:n].sort().values
            ids.extend(f"{src.dataset}:{src.split}:{i}" for i in idx.tolist())
            x = data.images[idx]
            images.append(convert_images(x, shape) if shape is not None and list(x.shape[1:]) != shape else x)
            labels.append(lut[data.labels[idx]])
            continue
        part = _image_source(src, shape, gen, reader, log)
        qualify = (lambda c: f"{src.name}/{c}") if src.name else (lambda c: c)
        lut = dict(zip(part["all_classes"], positions([qualify(c) for c in part["all_classes"]]).tolist()))
        ids.extend(part["ids"])
        images.append(part["images"])
        labels.append(torch.tensor([lut[c] if c is not None else -1 for c in part["classes"]], dtype=torch.long))
        skipped.extend(part["skipped"])
    shapes = sorted({tuple(x.shape[1:]) for x in images})
    if len(shapes) > 1:
        raise AmalgamError(f"pool sources have images of different shapes {[list(s) for s in shapes]}; "
                           "build the pool with the teachers' input shape")
    if spec.has_images() and len(set(ids)) != len(ids):  # (dataset-only pools: checked nowhere, as before)
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise AmalgamError(f"sample id {i!r} occurs twice in the pool (two image sources hold the same relative "
                                   "path); give them distinct `name`s")
            seen.add(i)
    return Pool(ids, torch.cat(images), torch.cat(labels), class_names, skipped)
