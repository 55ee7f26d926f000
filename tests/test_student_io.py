import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amalgam.cli import main
from amalgam.errors import AmalgamError
from amalgam.student_io import STUDENT_JSON, STUDENT_WEIGHTS, load_student, preprocess_image, save_student
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.manifest import InputSpec

CLASSES = ["mnist/0", "mnist/1", "fashion/Bag", "fashion/Sneaker"]
TEACHERS = [("digits", CLASSES[:2]), ("fashion", CLASSES[2:])]
SPEC = InputSpec(shape=[1, 28, 28], mean=[0.5], std=[0.25])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = TappedCNN(CNNConfig(conv_widths=[8, 16], fc_widths=[32], num_classes=4))
    save_student(tmp_path / "run", net, CLASSES, TEACHERS, SPEC, metrics={"test_accuracy": 0.5}, job={"zoo": "tiny"})
    return tmp_path / "run"


def _reference_outputs(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """The student's logits computed by hand from the saved weights: normalise, then the net."""
    from safetensors.torch import load_file

    net = TappedCNN(CNNConfig(conv_widths=[8, 16], fc_widths=[32], num_classes=4))
    net.load_state_dict(load_file(str(run_dir / STUDENT_WEIGHTS)))
    with torch.no_grad():
        return net.eval()((x - 0.5) / 0.25)


def test_round_trip_outputs_equal(run_dir: Path):
    torch.manual_seed(0)
    original = TappedCNN(CNNConfig(conv_widths=[8, 16], fc_widths=[32], num_classes=4)).eval()
    student, classes, spec = load_student(run_dir)
    assert classes == CLASSES and spec == SPEC and not student.training
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(student(x), original((x - 0.5) / 0.25))
    # the json path works as well as the directory, and provenance is kept
    assert load_student(run_dir / STUDENT_JSON)[1] == CLASSES
    # so does the weights file (resolved to the manifest beside it, not parsed as JSON)
    with torch.no_grad():
        assert torch.equal(load_student(run_dir / STUDENT_WEIGHTS)[0](x), original((x - 0.5) / 0.25))
    raw = json.loads((run_dir / STUDENT_JSON).read_text())
    assert raw["teachers"][1] == {"name": "fashion", "classes": CLASSES[2:]}
    assert raw["metrics"] == {"test_accuracy": 0.5} and raw["job"] == {"zoo": "tiny"}


def test_lazy_package_export(run_dir: Path):
    import amalgam

    assert amalgam.load_student is load_student


def test_tampered_weights_are_refused(run_dir: Path):
    weights = run_dir / STUDENT_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AmalgamError, match=r"student\.safetensors: sha256 is [0-9a-f]{12}\.\.\., student\.json says") as exc:
        load_student(run_dir)
    assert "\n" not in str(exc.value) and str(weights) in str(exc.value)


def test_wrong_arch_args_shape_names_the_file(run_dir: Path):
    path = run_dir / STUDENT_JSON
    raw = json.loads(path.read_text())
    raw["arch_args"]["conv_widths"] = [8, 12]
    path.write_text(json.dumps(raw))
    with pytest.raises(AmalgamError, match=r"tensor layers\.conv2\.weight has shape \(16, 8, 3, 3\), student\.json arch_args expect \(12, 8, 3, 3\)") as exc:
        load_student(run_dir)
    assert "\n" not in str(exc.value) and str(run_dir / STUDENT_WEIGHTS) in str(exc.value)


def test_bad_manifest_field_is_one_line(run_dir: Path):
    path = run_dir / STUDENT_JSON
    raw = json.loads(path.read_text())
    raw["weights"] = "../../etc/passwd"
    path.write_text(json.dumps(raw))
    with pytest.raises(AmalgamError, match=r"student\.json: field weights: ") as exc:
        load_student(run_dir)
    assert "\n" not in str(exc.value)


def _write_png(path: Path, digit_like: bool) -> Path:
    rng = np.random.default_rng(1 if digit_like else 2)
    arr = (rng.random((40, 30, 3)) * 255).astype(np.uint8)  # RGB, off-size: predict must convert and resize
    Image.fromarray(arr).save(path)
    return path


def test_preprocess_converts_and_resizes(tmp_path: Path):
    x = preprocess_image(_write_png(tmp_path / "a.png", True), SPEC)
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    rgb = preprocess_image(tmp_path / "a.png", InputSpec(shape=[3, 16, 20], mean=[0, 0, 0], std=[1, 1, 1]))
    assert rgb.shape == (1, 3, 16, 20)
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(AmalgamError, match=r"junk\.png: not an image format"):
        preprocess_image(tmp_path / "junk.png", SPEC)


def test_predict_prints_one_line_per_image(run_dir: Path, tmp_path: Path, capsys):
    images = [_write_png(tmp_path / "one.png", True), _write_png(tmp_path / "two.png", False)]
    assert main(["predict", str(run_dir), *map(str, images), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    batch = torch.cat([preprocess_image(p, SPEC) for p in images])
    probs = _reference_outputs(run_dir, batch).softmax(1)
    for line, image, p in zip(lines, images, probs):
        head, _, rest = line.partition(": ")
        assert head == str(image)
        shown = [item.rsplit(" ", 1) for item in rest.split(", ")]
        assert len(shown) == 2
        top = int(p.argmax())
        assert shown[0] == [CLASSES[top], f"{p[top].item():.3f}"]


def test_predict_missing_image_is_one_line(run_dir: Path, capsys):
    assert main(["predict", str(run_dir), str(run_dir / "nope.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.png: image not found" in err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript(run_dir: Path, capsys):
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    assert "max abs diff" in capsys.readouterr().out
    loaded = torch.jit.load(str(run_dir / "student.torchscript.pt"))
    x = torch.rand(5, 1, 28, 28)
    assert (loaded(x) - _reference_outputs(run_dir, x)).abs().max() <= 1e-4
    assert not list(run_dir.glob(".*.tmp"))


def test_export_onnx(run_dir: Path, tmp_path: Path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert f"exported onnx to {out}" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 28, 28)
    (logits,) = session.run(None, {"images": x.numpy()})
    assert np.abs(logits - _reference_outputs(run_dir, x).numpy()).max() <= 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # one file, no external data, no temp left


def test_export_that_disagrees_is_refused_and_not_written(run_dir: Path, monkeypatch, capsys):
    import amalgam.commands.deploy as deploy

    def broken(student, example, path: Path):
        path.write_bytes(b"half an export")
        return lambda x: student(x) + 1.0

    monkeypatch.setattr(deploy, "_export_torchscript", broken)
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ from the student by 1.00e+00" in err
    assert not (run_dir / "student.torchscript.pt").exists() and not list(run_dir.glob(".*.tmp"))
