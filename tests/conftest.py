"""Shared fixtures. Tests use the real datasets (fetched once into $AMALGAM_HOME by `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("AMALGAM_RAY_DASHBOARD", "0")  # ~1.5 s per embedded Ray start; tests that want it set 1
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_root() -> Path:
    from amalgam.data.fetch import fetch_all
    from amalgam.paths import default_data_root

    root = default_data_root()
    fetch_all(root, log=lambda _msg: None)  # idempotent: verifies hashes, fetches only if absent
    return root


@pytest.fixture(scope="session")
def mnist2_zoo(tmp_path_factory, data_root) -> Path:
    """The 2-teacher MNIST zoo (2000 images, 2 epochs, one thread: trained, so accuracies mean
    something), trained once per session; modules copy it (:func:`copy_zoo`) rather than train
    the same zoo again (about 9 s each)."""
    import torch

    from amalgam.zoo.train import train_zoo

    out = tmp_path_factory.mktemp("mnist2_zoo") / "zoo"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_zoo("mnist-2", out, data_root=data_root, limit=2000, epochs=2)
    finally:
        torch.set_num_threads(before)
    return out


def copy_zoo(zoo: Path, dest: Path) -> Path:
    """A private copy of a session zoo directory at ``dest`` (a test may write beside or into it)."""
    import shutil

    shutil.copytree(zoo, dest)
    return dest


def make_tiny_zoo(out: Path, specs: list[tuple[str, list[str], list[int]]]) -> Path:
    """A zoo of untrained teachers (random weights) for manifest and shape tests."""
    from amalgam.zoo.arch import CNNConfig, TappedCNN
    from amalgam.zoo.manifest import InputSpec, TapSpec, TeacherEntry, ZooManifest, save_weights, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, classes, convs) in enumerate(specs):
        torch.manual_seed(i)
        cfg = CNNConfig(conv_widths=convs, fc_widths=[32], num_classes=len(classes))
        net = TappedCNN(cfg)
        digest = save_weights(net, out / f"{name}.safetensors")
        entries.append(
            TeacherEntry(
                name=name, arch="tapped_cnn", arch_args=cfg.model_dump(), weights=f"{name}.safetensors",
                sha256=digest, classes=classes, input=InputSpec(shape=[1, 28, 28], mean=[0.5], std=[0.25]),
                taps=[TapSpec(**t.as_dict()) for t in net.feature_info()],
            )
        )
    write_manifest(ZooManifest(name="tiny", teachers=entries), out / "zoo.yaml")
    return out / "zoo.yaml"


@pytest.fixture
def tiny_zoo(tmp_path: Path) -> Path:
    return make_tiny_zoo(
        tmp_path / "zoo",
        [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8])],
    )


@pytest.fixture
def one_thread():
    """Tests of many tiny matrix ops: one thread avoids OpenMP overhead on a busy machine and keeps
    float reductions in one fixed order (golden values). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
