"""Your own images: list a folder, an S3 prefix or a list of files, and decode them into a pool.

Every image is decoded with Pillow, EXIF-rotated, converted to the teachers' channels (``L``
for 1, ``RGB`` for 3) and resized to their ``[C, H, W]`` (bilinear, antialiased), as uint8:
the same kind of array a dataset pool holds, so the teachers' own normalisation applies
unchanged. A file that cannot be read or decoded is skipped with a one-line reason, never
fatal.

When Ray is up in this process the files are read and decoded by Ray Data (``from_items`` of
the relative paths, then ``map_batches`` of read + decode; each task opens the folder or the
S3 prefix itself, so S3 credentials stay in the workers' environment as for the store).
``ray.data.read_images`` is not used: it raises on the first corrupt file and fails the whole
dataset, and ``read_binary_files`` fails it on the first unreadable one (a permission error,
an object deleted since the listing); a read inside the map is caught per file. A local
folder is read by Ray only when every Ray node is this machine (a remote cluster's workers
cannot see the driver's disk); otherwise, and without Ray (``amalgam run --local``), a thread
pool in this process runs the same decode, so both give the same pixels.
"""

from __future__ import annotations

import io
import os
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from amalgam.errors import AmalgamError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
Reader = Literal["auto", "ray", "local"]
_MODES = {1: "L", 3: "RGB"}
_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


@dataclass(frozen=True)
class Listing:
    """Image files under one root: ``root`` is a local directory or ``s3://BUCKET/PREFIX``."""

    root: str
    rels: list[str]  # posix paths relative to root, in listing order
    s3: dict | None = None  # S3Options fields, for an S3 root

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def where(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.is_s3 else str(Path(self.root) / rel)


def list_folder(uri: str, s3: dict | None = None) -> Listing:
    """Every image file under ``uri`` (any depth; hidden files and folders left out), sorted."""
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    if uri.startswith("s3://"):
        import pyarrow.fs as pafs

        from amalgam.store.location import S3Options, open_store

        loc = open_store(uri, S3Options(**(s3 or {})))
        infos = loc.list_dir("", recursive=True)
        prefix = loc.root.rstrip("/") + "/"
        rels = sorted(i.path[len(prefix):] for i in infos
                      if i.type == pafs.FileType.File and i.path.startswith(prefix)
                      and is_image_name(i.path) and not _hidden(i.path[len(prefix):]))
        if not rels:
            raise AmalgamError(f"{loc.uri}: no image files ({exts}) under this S3 prefix")
        return Listing(loc.uri, rels, s3)
    root = Path(uri.removeprefix("file://")).expanduser().resolve()
    if not root.exists():
        raise AmalgamError(f"{root}: image folder not found")
    if not root.is_dir():
        raise AmalgamError(f"{root}: not a folder (an image source's `images` names a folder or s3://BUCKET/PREFIX)")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(root).as_posix()
        rels.extend(f if base == "." else f"{base}/{f}" for f in filenames if not f.startswith(".") and is_image_name(f))
    if not rels:
        raise AmalgamError(f"{root}: no image files ({exts}) in this folder or below it")
    return Listing(str(root), sorted(rels))


def list_files(files: list[str] | str, root: str | None = None) -> Listing:
    """Local files named in a list, or in a text file (one path a line; blank and ``#`` lines
    ignored). Relative paths, and the ids, are relative to ``root``: by default the list file's
    folder, or the working directory for an inline list (a job sets its own folder). A file
    outside ``root`` keeps its absolute path as its id. Repeats count once."""
    if isinstance(files, str):
        path = Path(files).expanduser().resolve()
        if not path.is_file():
            raise AmalgamError(f"{path}: file list not found")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AmalgamError(f"{path}: cannot read the file list ({type(exc).__name__})") from None
        entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        base, where = (Path(root).expanduser().resolve() if root else path.parent), str(path)
    else:
        entries, where = list(files), "files"
        base = Path(root).expanduser().resolve() if root else Path.cwd()
    if not entries:
        raise AmalgamError(f"{where}: no files listed")
    for e in entries:
        if "://" in e and not e.startswith("file://"):
            raise AmalgamError(f"{where}: {e}: a file list names local files (use an `images: s3://...` source for S3)")
    rels: list[str] = []
    for e in entries:
        p = Path(e.removeprefix("file://")).expanduser()
        p = Path(os.path.normpath(p if p.is_absolute() else base / p))
        rel = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()
        if rel not in rels:
            rels.append(rel)
    return Listing(str(base), rels)


def decode_image(data: bytes, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Image file bytes to uint8 ``[C, H, W]``: EXIF orientation, channels, size."""
    from PIL import Image, ImageOps

    c, h, w = shape
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes the whole image: a truncated or corrupt file fails here, not later
        im = ImageOps.exif_transpose(im)
        im = im.convert(_MODES[c])  # as torchvision's ImageFolder loader does: alpha dropped
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None].copy() if c == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def failure_reason(exc: BaseException) -> str:
    """One line saying why a file was skipped."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    if isinstance(exc, FileNotFoundError):
        return "not found (removed since the listing?)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    msg = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
    msg = _BYTESIO.sub("the data", msg)
    if isinstance(exc, AmalgamError):
        return msg[:300]
    what = "corrupt or truncated image" if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)) else "unreadable"
    return f"{what} ({type(exc).__name__}: {msg})"[:300] if msg else f"{what} ({type(exc).__name__})"


def _read_one(loc, root: str, rel: str, shape) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, reason); never raises for a bad file."""
    try:
        data = loc.read_bytes(rel) if loc is not None else (Path(root) / rel).read_bytes()
        return decode_image(data, shape), ""
    except Exception as exc:  # noqa: BLE001 - one bad file must never end the pool
        return None, failure_reason(exc)


def _open(root: str, s3: dict | None):
    if not root.startswith("s3://"):
        return None
    from amalgam.store.location import S3Options, open_store

    return open_store(root, S3Options(**(s3 or {})))


def _decode_batch(batch: dict, root: str, s3: dict | None, shape: list[int]) -> dict:
    """Ray Data map: read and decode one batch of files (rows ``i``, ``rel``)."""
    rels = [str(r) for r in batch["rel"]]
    try:
        loc = _open(root, s3)
    except Exception as exc:  # noqa: BLE001 - e.g. no S3 credentials on this worker: every file says so
        loc, opened = None, failure_reason(exc)
    else:
        opened = ""
    out = np.zeros((len(rels), *shape), dtype=np.uint8)
    errors = []
    for k, rel in enumerate(rels):
        if opened:
            errors.append(opened)
            continue
        img, why = _read_one(loc, root, rel, shape)
        if img is not None:
            out[k] = img
        errors.append(why)
    return {"i": np.asarray(batch["i"], dtype=np.int64), "image": out, "error": np.asarray(errors, dtype=object)}


def _ray_is_this_machine() -> bool:
    """Whether every alive Ray node runs on this machine (so a worker sees this machine's files)."""
    import ray

    here = {"127.0.0.1", "localhost", "::1"}
    try:
        here.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:
        here.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - best effort
        pass
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") in here for n in nodes)


def check_shape(shape) -> list[int]:
    shape = [int(s) for s in shape]
    if len(shape) != 3 or shape[0] not in _MODES or shape[1] < 1 or shape[2] < 1:
        raise AmalgamError(f"image sources support teachers taking 1 (grey) or 3 (RGB) channels; the zoo takes {shape}")
    return shape


def use_ray(reader: Reader, listing: Listing) -> bool:
    if reader == "local":
        return False
    if reader == "ray":
        return True
    if "ray" not in sys.modules:  # nothing started Ray in this process: read here, never start it for this
        return False
    import ray

    return ray.is_initialized() and (listing.is_s3 or _ray_is_this_machine())


def read_images(listing: Listing, rels: list[str], shape: list[int], reader: Reader = "auto",
                threads: int | None = None) -> tuple[np.ndarray, list[str], bool]:
    """Decode ``rels`` (of ``listing``): uint8 ``[n, C, H, W]`` (zeros where a file failed), one
    reason per file (``""`` when it was read) and whether Ray Data did it."""
    shape = check_shape(shape)
    n = len(rels)
    images = np.zeros((n, *shape), dtype=np.uint8)
    errors = [""] * n
    if n == 0:
        return images, errors, False
    if use_ray(reader, listing):
        from amalgam.distributed.extract import ensure_ray

        ensure_ray()  # no-op when Ray is up (the ``auto`` case)
        import ray.data

        ds = ray.data.from_items([{"i": i, "rel": r} for i, r in enumerate(rels)],
                                 override_num_blocks=max(1, min(-(-n // 128), 256)))
        ds = ds.map_batches(_decode_batch, batch_size=64, batch_format="numpy",
                            fn_kwargs={"root": listing.root, "s3": listing.s3, "shape": shape})
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            idx = np.asarray(b["i"], dtype=np.int64)
            images[idx] = b["image"]
            for i, e in zip(idx.tolist(), b["error"]):
                errors[i] = str(e) if e is not None else ""
        return images, errors, True
    loc = _open(listing.root, listing.s3)
    workers = threads or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i, (img, why) in enumerate(ex.map(lambda r: _read_one(loc, listing.root, r, shape), rels)):
            if img is not None:
                images[i] = img
            errors[i] = why
    return images, errors, False
