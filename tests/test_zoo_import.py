"""``amalgam zoo import``: teachers trained elsewhere become a verified zoo, or are refused in one line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from amalgam.cli import main
from amalgam.errors import AmalgamError
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.importer import INPUT_PRESETS, import_architectures, import_zoo
from amalgam.zoo.manifest import load_zoo, read_manifest

PETS = ["pets/cat", "pets/dog", "pets/bird"]
DIGITS = ["digits/0", "digits/1"]
SMALL_IMAGENET = {"preset": "imagenet", "shape": [3, 64, 64]}  # torchvision ResNets take any size >= 32


def _spec(tmp: Path, teachers: list[dict], name: str = "ext") -> Path:
    path = tmp / "import.yaml"
    path.write_text(yaml.safe_dump({"name": name, "teachers": teachers}, sort_keys=False))
    return path


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its hash (to prove nothing changed)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cnn(num_classes: int = 2, seed: int = 0) -> TappedCNN:
    torch.manual_seed(seed)
    return TappedCNN(CNNConfig(conv_widths=[4, 6], fc_widths=[8], num_classes=num_classes)).eval()


def _cnn_teacher(tmp: Path, name: str = "digits", classes=DIGITS, file: str | None = None, seed: int = 0, **extra) -> dict:
    net = _cnn(len(classes), seed)
    path = tmp / (file or f"{name}-src.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return {"name": name, "weights": path.name, "arch": "tapped_cnn", "classes": list(classes), "input": "mnist", **extra}


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A torchvision ResNet-18 (3 classes, random init: no download) saved as a plain state_dict."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN really is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / "resnet18-pets.pth"
    torch.save(model.state_dict(), path)
    return path, model


# --- (a) torchvision ResNet state_dict --------------------------------------------------------


def test_torchvision_resnet18_state_dict_imports_with_identical_logits(tmp_path: Path, resnet18_file):
    src, model = resnet18_file
    spec = _spec(tmp_path, [{"name": "pets", "weights": str(src), "arch": "resnet18", "classes": PETS,
                             "input": SMALL_IMAGENET, "metrics": {"test_accuracy": 0.91}}])
    manifest, rows = import_zoo(spec, tmp_path / "zoo", log=lambda _m: None)
    assert sorted(os.listdir(tmp_path / "zoo")) == ["pets.safetensors", "zoo.yaml"]  # no staging left behind

    manifest, (teacher,) = load_zoo(tmp_path / "zoo" / "zoo.yaml")  # hash, shapes, taps, input verified
    entry = manifest.teachers[0]
    assert entry.arch == "resnet" and entry.arch_args["blocks"] == [2, 2, 2, 2] and entry.arch_args["image_size"] == 64
    assert entry.input.mean == INPUT_PRESETS["imagenet"]["mean"] and entry.input.shape == [3, 64, 64]
    assert entry.classes == PETS and entry.metrics == {"test_accuracy": 0.91}
    assert [t.name for t in entry.taps] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert rows[0]["params"] == sum(p.numel() for p in model.parameters())

    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(INPUT_PRESETS["imagenet"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_PRESETS["imagenet"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(teacher(x), model((x - mean) / std))


def test_checkpoint_wrappers_and_prefixes_are_unwrapped(tmp_path: Path):
    net = _cnn()
    state = net.state_dict()
    torch.save({"epoch": 7, "state_dict": {f"model.{k}": v for k, v in state.items()}, "optimizer": {"lr": 0.1}},
               tmp_path / "lightning.ckpt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    spec = _spec(tmp_path, [
        {"name": "a", "weights": "lightning.ckpt", "arch": "tapped_cnn", "classes": DIGITS, "input": "mnist",
         "key_prefix": "model."},
        {"name": "b", "weights": "ddp.pt", "arch": "tapped_cnn", "classes": ["digits/2", "digits/3"], "input": "mnist"},
    ])
    import_zoo(spec, tmp_path / "zoo", log=lambda _m: None)
    _, teachers = load_zoo(tmp_path / "zoo" / "zoo.yaml")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        for t in teachers:
            assert torch.equal(t.net(x), net(x))


# --- (b) safetensors of our own CNN -----------------------------------------------------------


def test_safetensors_tapped_cnn_imports_with_widths_read_from_the_tensors(tmp_path: Path):
    (tmp_path / "classes.txt").write_text("# one class a line\ndigits/0\n\ndigits/1\n")
    teacher = _cnn_teacher(tmp_path, classes=DIGITS)
    teacher["classes"] = "classes.txt"
    spec = _spec(tmp_path, [teacher])
    import_zoo(spec, tmp_path / "zoo", log=lambda _m: None)
    manifest, (t,) = load_zoo(tmp_path / "zoo" / "zoo.yaml")
    args = manifest.teachers[0].arch_args
    assert (args["conv_widths"], args["fc_widths"], args["image_size"], args["in_channels"]) == ([4, 6], [8], 28, 1)
    assert manifest.teachers[0].classes == DIGITS
    assert manifest.teachers[0].input.mean == INPUT_PRESETS["mnist"]["mean"]
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(t.net(x), _cnn().eval()(x))


# --- (c) pickles ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a file: proof that the pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_module_is_refused_in_one_line_naming_the_teacher(tmp_path: Path):
    torch.save(_cnn(), tmp_path / "whole-model.pt")  # a pickled nn.Module, not a state_dict
    spec = _spec(tmp_path, [{"name": "digits", "weights": "whole-model.pt", "arch": "tapped_cnn",
                             "classes": DIGITS, "input": "mnist"}])
    with pytest.raises(AmalgamError) as info:
        import_zoo(spec, tmp_path / "zoo")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("teacher digits: whole-model.pt is not a plain state_dict: it pickles "
                          "amalgam.zoo.arch.TappedCNN, which is never unpickled")
    assert not (tmp_path / "zoo").exists()


def test_state_dict_with_a_payload_is_refused_and_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    torch.save({**_cnn().state_dict(), "_extra": _Payload(str(marker))}, tmp_path / "evil.pth")
    spec = _spec(tmp_path, [{"name": "digits", "weights": "evil.pth", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": "mnist"}])
    with pytest.raises(AmalgamError, match=r"^teacher digits: evil\.pth is not a plain state_dict: it pickles "):
        import_zoo(spec, tmp_path / "zoo")
    assert not marker.exists()


def test_pickle_named_safetensors_and_non_state_dicts_are_refused(tmp_path: Path):
    torch.save(_cnn().state_dict(), tmp_path / "fake.safetensors")
    spec = _spec(tmp_path, [{"name": "digits", "weights": "fake.safetensors", "arch": "tapped_cnn",
                             "classes": DIGITS, "input": "mnist"}])
    with pytest.raises(AmalgamError, match=r"^teacher digits: fake\.safetensors is not a valid safetensors file \("):
        import_zoo(spec, tmp_path / "zoo")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "ckpt.pt")
    spec = _spec(tmp_path, [{"name": "digits", "weights": "ckpt.pt", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": "mnist"}])
    with pytest.raises(AmalgamError, match=r"^teacher digits: ckpt\.pt is not a flat state_dict: entry 'epoch' is a int"):
        import_zoo(spec, tmp_path / "zoo")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    spec = _spec(tmp_path, [{"name": "digits", "weights": "junk.pt", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": "mnist"}])
    with pytest.raises(AmalgamError, match=r"^teacher digits: junk\.pt is not a readable torch state_dict"):
        import_zoo(spec, tmp_path / "zoo")


# --- (d) shapes and classes, checked before anything is written -------------------------------


def test_wrong_class_count_names_teacher_and_tensor(tmp_path: Path, resnet18_file):
    src, _ = resnet18_file
    spec = _spec(tmp_path, [{"name": "pets", "weights": str(src), "arch": "resnet18", "classes": PETS[:2],
                             "input": SMALL_IMAGENET}])
    with pytest.raises(AmalgamError, match=r"^teacher pets: the weights have 3 classes \(tensor fc\.weight "
                                           r"\(layers\.head\.weight\) has shape \(3, 512\)\), classes lists 2$"):
        import_zoo(spec, tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


def test_wrong_architecture_names_teacher_and_tensor(tmp_path: Path, resnet18_file):
    src, _ = resnet18_file
    spec = _spec(tmp_path, [{"name": "pets", "weights": str(src), "arch": "resnet34", "classes": PETS,
                             "input": SMALL_IMAGENET}])
    with pytest.raises(AmalgamError, match=r"^teacher pets: tensor layers\.layer1\.2\.conv1\.weight missing from "
                                           r"resnet18-pets\.pth \(resnet34\)$"):
        import_zoo(spec, tmp_path / "zoo")


def test_wrong_shape_missing_and_unexpected_tensors(tmp_path: Path):
    state = {k: v.clone() for k, v in _cnn().state_dict().items()}
    spec = _spec(tmp_path, [{"name": "digits", "weights": "w.safetensors", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": "mnist", "arch_args": {"conv_widths": [4, 5], "fc_widths": [8]}}])
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(AmalgamError, match=r"^teacher digits: tensor layers\.conv2\.weight has shape \(6, 4, 3, 3\), "
                                           r"tapped_cnn expects \(5, 4, 3, 3\)$"):
        import_zoo(spec, tmp_path / "zoo")

    spec = _spec(tmp_path, [{"name": "digits", "weights": "w.safetensors", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": {"preset": "mnist", "shape": [1, 32, 32]}}])
    with pytest.raises(AmalgamError, match=r"^teacher digits: tensor layers\.fc1\.weight has shape \(8, 294\), "
                                           r"tapped_cnn expects \(8, 384\)$"):
        import_zoo(spec, tmp_path / "zoo")

    spec = _spec(tmp_path, [{"name": "digits", "weights": "w.safetensors", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": "mnist"}])
    save_file({k: v for k, v in state.items() if k != "layers.fc1.bias"}, str(tmp_path / "w.safetensors"))
    with pytest.raises(AmalgamError, match=r"^teacher digits: tensor layers\.fc1\.bias missing from w\.safetensors"):
        import_zoo(spec, tmp_path / "zoo")

    save_file({**state, "layers.extra.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(AmalgamError, match=r"^teacher digits: unexpected tensor layers\.extra\.weight in w\.safetensors"):
        import_zoo(spec, tmp_path / "zoo")

    save_file({**state, "layers.fc1.bias": torch.zeros(8, dtype=torch.int64)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(AmalgamError, match=r"^teacher digits: tensor layers\.fc1\.bias has dtype torch\.int64"):
        import_zoo(spec, tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


def test_spec_errors_are_one_line(tmp_path: Path):
    good = _cnn_teacher(tmp_path)
    cases = [
        ({**good, "classes": ["digits/0", "digits/0"]}, r"^teacher digits: class 'digits/0' listed twice$"),
        ({**good, "classes": ["cat", "pets/dog"]}, r"^teacher digits: class name 'cat' is not qualified as DATASET/CLASS"),
        ({**good, "input": "cifar"}, r"^teacher digits: unknown input preset 'cifar'; known: imagenet, "),
        ({**good, "input": {"shape": [1, 28, 28], "mean": [0.5]}}, r"^teacher digits: input needs std "),
        ({**good, "input": {"preset": "imagenet", "shape": [1, 28, 28]}},
         r"^teacher digits: input mean/std need 1 value\(s\) each"),
        ({**good, "arch": "vgg16"}, r"^teacher digits: unknown architecture 'vgg16'; known: tapped_cnn, resnet, resnet18"),
        ({**good, "weights": "absent.pt"}, r"^teacher digits: weights file .*absent\.pt not found$"),
        ({**good, "arch_args": {"image_size": 32}},
         r"^teacher digits: arch_args\.image_size = 32 disagrees with input shape \[1, 28, 28\] \(28\)$"),
        ({**good, "bogus": 1}, r"import\.yaml: field teachers\.0\.bogus: Extra inputs are not permitted$"),
    ]
    for teacher, pattern in cases:
        with pytest.raises(AmalgamError, match=pattern):
            import_zoo(_spec(tmp_path, [teacher]), tmp_path / "zoo")
    with pytest.raises(AmalgamError, match=r"import\.yaml: teacher name 'digits' used twice$"):
        import_zoo(_spec(tmp_path, [good, good]), tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


def test_efficientnet_lite0_is_listed_or_explained():
    table, unavailable = import_architectures()
    assert {"tapped_cnn", "resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(table)
    assert "efficientnet_lite0" in table or "efficientnet_lite0" in unavailable


def _to_reference_keys(state: dict, repeats: list[int]) -> dict:
    """Our EfficientNet-Lite keys -> efficientnet-lite-pytorch's (the inverse of its converter)."""
    fixed = {"layers.stem.conv.": "_conv_stem.", "layers.stem.bn.": "_bn0.", "layers.conv_head.conv.": "_conv_head.",
             "layers.conv_head.bn.": "_bn1.", "layers.head.": "_fc."}
    first = [sum(repeats[:g]) for g in range(len(repeats))]
    out = {}
    for k, v in state.items():
        new = next((ref + k[len(ours):] for ours, ref in fixed.items() if k.startswith(ours)), None)
        if new is None:  # layers.stageG.B.module.param
            _, stage, block, module, param = k.split(".")
            new = f"_blocks.{first[int(stage[len('stage'):]) - 1] + int(block)}._{module}.{param}"
        out[new] = v
    return out


def test_efficientnet_lite0_reference_state_dict_imports_with_identical_logits(tmp_path: Path):
    table, _ = import_architectures()
    if "efficientnet_lite0" not in table:
        pytest.skip("amalgam.zoo.efficientnet_lite is not in this checkout")
    from amalgam.zoo.arch import build_net
    from amalgam.zoo.efficientnet_lite import lite_config

    torch.manual_seed(0)
    net = build_net(lite_config("efficientnet_lite0", num_classes=3, image_size=64)).eval()
    torch.save(_to_reference_keys(net.state_dict(), net.config.repeats), tmp_path / "lite0.pth")
    spec = _spec(tmp_path, [{"name": "pets", "weights": "lite0.pth", "arch": "efficientnet_lite0", "classes": PETS,
                             "input": SMALL_IMAGENET}])
    import_zoo(spec, tmp_path / "zoo", log=lambda _m: None)
    manifest, (teacher,) = load_zoo(tmp_path / "zoo" / "zoo.yaml")
    assert manifest.teachers[0].arch == "efficientnet_lite"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher.net(x), net(x))

    state = _to_reference_keys(net.state_dict(), net.config.repeats)
    state["_blocks.3._project_conv.weight"] = state["_blocks.3._project_conv.weight"][:-1]
    torch.save(state, tmp_path / "lite0-bad.pth")
    spec = _spec(tmp_path, [{"name": "pets", "weights": "lite0-bad.pth", "arch": "efficientnet_lite0",
                             "classes": PETS, "input": SMALL_IMAGENET}])
    with pytest.raises(AmalgamError, match=r"^teacher pets: tensor _blocks\.3\._project_conv\.weight "
                                           r"\(layers\.stage3\.0\.project_conv\.weight\) has shape \(39, "):
        import_zoo(spec, tmp_path / "zoo2")


def test_unavailable_architecture_is_a_clear_error(tmp_path: Path, monkeypatch):
    import amalgam.zoo.importer as importer

    real = importer.import_architectures
    monkeypatch.setattr(importer, "import_architectures",
                        lambda: (real()[0], {"efficientnet_lite0": "needs amalgam/zoo/efficientnet_lite.py"}))
    teacher = {**_cnn_teacher(tmp_path), "arch": "efficientnet_lite0"}
    with pytest.raises(AmalgamError, match=r"^teacher digits: architecture efficientnet_lite0 is unavailable: needs "):
        importer.import_zoo(_spec(tmp_path, [teacher]), tmp_path / "zoo")


# --- (e) an existing zoo; failures leave no half zoo ------------------------------------------


def test_existing_zoo_is_not_overwritten_without_force(tmp_path: Path):
    zoo = tmp_path / "zoo"
    spec = _spec(tmp_path, [_cnn_teacher(tmp_path, seed=0)])
    import_zoo(spec, zoo, log=lambda _m: None)
    (zoo / "notes.txt").write_text("mine")
    before = _tree(zoo)

    spec = _spec(tmp_path, [_cnn_teacher(tmp_path, seed=1)])
    with pytest.raises(AmalgamError, match=rf"^{zoo / 'zoo.yaml'} already exists; pass --force to overwrite it$"):
        import_zoo(spec, zoo)
    assert _tree(zoo) == before
    (zoo / "zoo.yaml").unlink()  # a stray weights file alone is protected too
    with pytest.raises(AmalgamError, match=rf"^{zoo / 'digits.safetensors'} already exists"):
        import_zoo(spec, zoo)

    import_zoo(spec, zoo, force=True, log=lambda _m: None)
    after = _tree(zoo)
    assert after["notes.txt"] == before["notes.txt"] and after["digits.safetensors"] != before["digits.safetensors"]
    load_zoo(zoo / "zoo.yaml")


def test_failure_while_writing_leaves_no_half_zoo(tmp_path: Path):
    good = _cnn_teacher(tmp_path, name="a")
    net = _cnn(seed=2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["layers.head.bias"][0] = float("nan")  # caught only once the data is read, after teacher a is written
    save_file(state, str(tmp_path / "b.safetensors"))
    bad = {"name": "b", "weights": "b.safetensors", "arch": "tapped_cnn", "classes": ["digits/2", "digits/3"],
           "input": "mnist"}
    with pytest.raises(AmalgamError, match=r"^teacher b: tensor layers\.head\.bias in b\.safetensors holds NaN"):
        import_zoo(_spec(tmp_path, [good, bad]), tmp_path / "new" / "zoo")
    assert not (tmp_path / "new").exists()  # every directory it created is gone

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(AmalgamError):
        import_zoo(_spec(tmp_path, [good, bad]), existing)
    assert os.listdir(existing) == ["keep.txt"]


# --- (f) the command line ---------------------------------------------------------------------


def test_cli_imports_and_refuses_in_one_line(tmp_path: Path, capsys):
    spec = _spec(tmp_path, [_cnn_teacher(tmp_path, name="digits")], name="cli-zoo")
    out = tmp_path / "zoo"
    assert main(["zoo", "import", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zoo cli-zoo at" in printed
    assert "| digits | tapped_cnn | " in printed and "1x28x28, mean [0.1307], std [0.3081]" in printed
    assert read_manifest(out / "zoo.yaml").teachers[0].name == "digits"

    assert main(["zoo", "import", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("amalgam: error: ") and "already exists; pass --force" in err
    assert main(["zoo", "import", str(spec), "--out", str(out), "--force"]) == 0
    capsys.readouterr()

    torch.save(_cnn(), tmp_path / "module.pt")
    spec = _spec(tmp_path, [{"name": "whole", "weights": "module.pt", "arch": "tapped_cnn", "classes": DIGITS,
                             "input": "mnist"}])
    assert main(["zoo", "import", str(spec), "--out", str(tmp_path / "z2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("amalgam: error: teacher whole: module.pt is not a plain state_dict")
    assert main(["zoo", "show", str(out / "zoo.yaml")]) == 0  # an imported zoo is an ordinary zoo
