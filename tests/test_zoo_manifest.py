import pickle
from pathlib import Path

import pytest
import torch
import yaml

from amalgam.cli import main
from amalgam.errors import AmalgamError
from amalgam.zoo.manifest import load_zoo, read_manifest
from tests.conftest import make_tiny_zoo


def _edit(manifest: Path, fn) -> None:
    raw = yaml.safe_load(manifest.read_text())
    fn(raw)
    manifest.write_text(yaml.safe_dump(raw))


def test_valid_zoo_loads_frozen_teachers(tiny_zoo: Path):
    manifest, teachers = load_zoo(tiny_zoo)
    assert [t.name for t in teachers] == ["a", "b"]
    assert manifest.class_space().names == ("mnist/0", "mnist/1", "mnist/2", "mnist/3", "mnist/4")
    for t in teachers:
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        t.train()  # a frozen teacher refuses to leave eval mode
        assert not t.training


def test_wrong_hash_names_the_teacher(tiny_zoo: Path):
    _edit(tiny_zoo, lambda r: r["teachers"][1].update(sha256="f" * 64))
    with pytest.raises(AmalgamError, match=r"^teacher b: sha256 of b.safetensors is .* manifest says ffffffffffff"):
        load_zoo(tiny_zoo)


def test_unknown_tap_names_the_teacher(tiny_zoo: Path):
    _edit(tiny_zoo, lambda r: r["teachers"][0]["taps"].append(
        {"name": "conv9", "path": "layers.conv9", "kind": "conv", "channels": 4, "stride": 1}))
    with pytest.raises(AmalgamError, match=r"^teacher a: tap 'layers.conv9' is not a module of tapped_cnn"):
        load_zoo(tiny_zoo)


def test_tap_channel_mismatch(tiny_zoo: Path):
    _edit(tiny_zoo, lambda r: r["teachers"][0]["taps"][0].update(channels=5))
    with pytest.raises(AmalgamError, match=r"^teacher a: tap layers.conv1 declared conv/5 channels"):
        load_zoo(tiny_zoo)


class _Payload:
    """Unpickling this would create a file: proof that the pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_checkpoint_is_refused_and_never_executed(tiny_zoo: Path):
    marker = tiny_zoo.parent / "pwned"
    with open(tiny_zoo.parent / "a.pt", "wb") as f:
        pickle.dump({"state": _Payload(str(marker))}, f)
    _edit(tiny_zoo, lambda r: r["teachers"][0].update(weights="a.pt"))
    with pytest.raises(AmalgamError, match=r"^teacher a: weights a.pt are not safetensors"):
        load_zoo(tiny_zoo)
    # A pickle disguised with the right extension is not executed either.
    (tiny_zoo.parent / "a.pt").rename(tiny_zoo.parent / "evil.safetensors")
    from amalgam.data.fetch import sha256_file

    digest = sha256_file(tiny_zoo.parent / "evil.safetensors")
    _edit(tiny_zoo, lambda r: r["teachers"][0].update(weights="evil.safetensors", sha256=digest))
    with pytest.raises(AmalgamError, match=r"^teacher a: evil.safetensors is not a valid safetensors file"):
        load_zoo(tiny_zoo)
    assert not marker.exists()


def test_shape_mismatch_names_teacher_and_tensor(tmp_path: Path):
    zoo = make_tiny_zoo(tmp_path / "z", [("a", ["mnist/0", "mnist/1"], [4, 8])])
    # Declare wider conv1 than the weights hold.
    def widen(r):
        r["teachers"][0]["arch_args"]["conv_widths"] = [5, 8]
        r["teachers"][0]["taps"][0]["channels"] = 5
    _edit(zoo, widen)
    with pytest.raises(AmalgamError, match=r"^teacher a: tensor layers.conv1.weight has shape \(4, 1, 3, 3\), architecture expects \(5, 1, 3, 3\)"):
        load_zoo(zoo)


def test_overlapping_classes_accepted_a_class_twice_in_one_teacher_refused(tiny_zoo: Path):
    # Issue 11: teachers may share classes (the student's space is the union); this was refused before.
    _edit(tiny_zoo, lambda r: r["teachers"][1].update(classes=["mnist/2", "mnist/9"]))
    space = read_manifest(tiny_zoo).class_space()
    assert space.names == ("mnist/0", "mnist/1", "mnist/2", "mnist/9") and space.shared == ("mnist/2",)
    _edit(tiny_zoo, lambda r: r["teachers"][1].update(classes=["mnist/9", "mnist/9"]))
    with pytest.raises(AmalgamError, match=r"zoo.yaml: teacher b: class 'mnist/9' listed twice"):
        read_manifest(tiny_zoo)


def test_unknown_field_and_malformed_yaml(tiny_zoo: Path, capsys):
    _edit(tiny_zoo, lambda r: r["teachers"][0].update(colour="red"))
    with pytest.raises(AmalgamError, match=r"zoo.yaml: field teachers.0.colour: Extra inputs are not permitted"):
        read_manifest(tiny_zoo)
    tiny_zoo.write_text("teachers: [\n")
    assert main(["zoo", "show", str(tiny_zoo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amalgam: error: ") and "malformed YAML" in err and "\n" not in err
