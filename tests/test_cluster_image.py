"""cluster/Dockerfile: no container engine here, so check what can go wrong without one.

The base image must be the official Ray image of exactly the Ray that pyproject.toml pins
(a client and its cluster must run the same Ray) and of the Python the package is tested on
(Ray requires the driver's and workers' Python minor versions to match).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def pinned() -> tuple[str, str, str]:
    """(package version, pinned Ray version, requires-python) from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [ray] = [d for d in project["dependencies"] if re.match(r"ray\b", d)]
    m = re.fullmatch(r"ray(\[[^\]]*\])?==(\d+\.\d+\.\d+)", ray)
    assert m, f"Ray must be pinned exactly in pyproject.toml, got {ray!r}"
    return project["version"], m.group(2), project["requires-python"]


def base_image() -> str:
    text = DOCKERFILE.read_text()
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert m and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), "Dockerfile must build FROM ${BASE_IMAGE}"
    return m.group(1)


def test_base_image_is_the_official_ray_image_of_our_ray_and_python():
    _, ray, requires = pinned()
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", base_image())
    assert m, f"base {base_image()!r} is not an official rayproject/ray:VERSION-pyXY tag"
    assert m.group(1) == ray
    py = f"{m.group(2)}.{m.group(3)}"
    assert py in SpecifierSet(requires), f"image Python {py} does not satisfy requires-python {requires}"
    assert py == f"{sys.version_info.major}.{sys.version_info.minor}", "image Python differs from the tested one"


def test_every_ray_image_mentioned_agrees():
    """The GPU variant, the build's own check and the docs name the same Ray and Python."""
    _, ray, _ = pinned()
    base = base_image()
    text = DOCKERFILE.read_text()
    assert f"ray.__version__ == '{ray}'" in text  # the build fails if pip moved Ray
    for path in [DOCKERFILE, ROOT / "cluster" / "README.md", *sorted((ROOT / "k8s").rglob("kustomization.yaml"))]:
        for tag in re.findall(r"rayproject/ray:[\w.-]+", path.read_text()):
            assert tag in (base, f"{base}-gpu"), f"{path.relative_to(ROOT)} names {tag}, the image is built on {base}"


def test_image_installs_this_package_and_ships_only_what_it_needs():
    text = DOCKERFILE.read_text()
    assert "COPY --chown=ray:users amalgam /home/ray/amalgam/amalgam" in text
    assert "pip install --no-cache-dir --no-deps /home/ray/amalgam" in text
    assert re.search(r"^USER ray$", text, re.M), "the image must not run as root"
    ignore = [ln for ln in (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
              if ln and not ln.startswith("#")]
    assert ignore[:4] == ["*", "!pyproject.toml", "!README.md", "!amalgam"]  # no .venv, data or runs
