from pathlib import Path

import pytest

from amalgam.cli import main
from amalgam.zoo.manifest import load_zoo


@pytest.mark.slow
def test_small_zoo_trains_end_to_end(tmp_path: Path, data_root, capsys):
    out = tmp_path / "zoo"
    rc = main(["zoo", "train", "--preset", "mnist-2", "--out", str(out), "--limit", "3000", "--epochs", "3",
               "--data-root", str(data_root)])
    assert rc == 0
    manifest, teachers = load_zoo(out / "zoo.yaml")  # hashes, taps and shapes verified
    assert [t.name for t in teachers] == ["mnist-0-4", "mnist-5-9"]
    for t in manifest.teachers:
        assert t.metrics["test_accuracy"] > 0.9  # 3000 images, 3 epochs, 5 classes: far above 0.2 chance
        assert (out / t.weights).is_file()
    # Widths differ across the zoo.
    assert manifest.teachers[0].arch_args["conv_widths"] != manifest.teachers[1].arch_args["conv_widths"]
    table = capsys.readouterr().out
    assert "| mnist-0-4 | mnist/0..4 |" in table
    # A second call reuses the verified zoo instead of retraining.
    assert main(["zoo", "train", "--preset", "mnist-2", "--out", str(out), "--limit", "3000", "--epochs", "3"]) == 0
    assert "reusing verified zoo" in capsys.readouterr().out
