"""Recipe for the binary files of the bad-input corpus (``tests/robustness/bad_inputs``).

The corpus is committed: tests read these files, they never regenerate them. This script
is how they were made, so a reviewer can see what each binary is, and so they can be
made again after a format change::

    .venv/bin/python -m tests.robustness.make_bad_inputs            # every generated case
    .venv/bin/python -m tests.robustness.make_bad_inputs zoo_truncated_safetensors

It writes every file of the cases listed in ``CASES`` except their ``case.yaml`` (which
is written by hand: the command and the expected line). Cases that are plain text only
(a malformed job file, ...) are not made here. Weights are deterministic (no RNG):
safetensors files come out byte-identical on every run; ``torch.save`` archives (a random
serialization id) and Parquet shards (the writer's version in the footer) differ in a
few bytes, so regenerating changes them and their hashes together.

The malicious payloads run ``touch "${AMALGAM_TEST_PWNED:-PWNED}"`` when unpickled, and
nothing else. ``test_bad_inputs.py`` checks that they are armed (unpickling them in a
scratch directory does create the marker) and that amalgam never sets them off.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import yaml

HERE = Path(__file__).resolve().parent / "bad_inputs"
PAYLOAD = 'touch "${AMALGAM_TEST_PWNED:-PWNED}"'
CLASSES = {"a": ["mnist/0", "mnist/1", "mnist/2"], "b": ["fashion/Bag", "fashion/Sneaker"]}
JOB = {
    "version": 1,
    "name": "bad-inputs",
    "zoo": "zoo/zoo.yaml",
    "pool": {"sources": [{"dataset": "mnist", "count": 100}]},
    "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 50}]}, "latency": False},
}
GOOD_KEY, BAD_KEY = "outputs/zoo0/pool0", "codes/codec0/pool0"

CASES: dict[str, Callable[[Path], None]] = {}


def case(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    CASES[fn.__name__] = fn
    return fn


class Payload:
    """Unpickling this runs a shell command that creates a marker file: proof that the pickle ran."""

    def __reduce__(self):
        return (os.system, (PAYLOAD,))


# --------------------------------------------------------------------------- builders


def tiny_net(num_classes: int, conv_widths=(2, 2), image_size: int = 28, scale: float = 0.1):
    """A two-conv tapped CNN of a few hundred parameters with fixed (not random) weights."""
    from amalgam.zoo.arch import CNNConfig, TappedCNN

    net = TappedCNN(CNNConfig(conv_widths=list(conv_widths), fc_widths=[4], num_classes=num_classes,
                              image_size=image_size))
    with torch.no_grad():
        for i, t in enumerate(net.state_dict().values()):
            t.copy_(torch.linspace(-1.0, 1.0, t.numel()).view_as(t) * scale * (i + 1))
    return net


def save_safetensors(net, path: Path) -> str:
    from amalgam.zoo.manifest import save_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(net, path)


def save_malicious_checkpoint(net, path: Path) -> str:
    """A torch checkpoint that looks like a state_dict and carries a payload."""
    from amalgam.data.fetch import sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**net.state_dict(), "_metadata_": Payload()}, path)
    return sha256_file(path)


def sha(path: Path) -> str:
    from amalgam.data.fetch import sha256_file

    return sha256_file(path)


def entry(name: str, net, weights: str, digest: str, classes: list[str] | None = None) -> dict:
    cfg = net.config
    return {
        "name": name,
        "arch": "tapped_cnn",
        "arch_args": cfg.model_dump(),
        "weights": weights,
        "sha256": digest,
        "classes": classes or CLASSES[name],
        "input": {"shape": [cfg.in_channels, cfg.image_size, cfg.image_size], "mean": [0.5], "std": [0.25]},
        "taps": [t.as_dict() for t in net.feature_info()],
    }


def teacher(zoo: Path, name: str, **arch) -> dict:
    """A valid teacher ``name`` with its weights in ``zoo``."""
    net = tiny_net(len(CLASSES[name]), **arch)
    return entry(name, net, f"{name}.safetensors", save_safetensors(net, zoo / f"{name}.safetensors"))


def write_zoo(zoo: Path, teachers: list[dict], note: str) -> str:
    zoo.mkdir(parents=True, exist_ok=True)
    text = f"# {note}\n" + yaml.safe_dump({"version": 1, "name": "tiny", "teachers": teachers}, sort_keys=False)
    (zoo / "zoo.yaml").write_text(text)
    return text


def write_job(case_dir: Path) -> None:
    (case_dir / "job.yaml").write_text(yaml.safe_dump(JOB, sort_keys=False))


def write_student(run: Path, weights_dir: Path | None = None, weights: str = "student.safetensors") -> None:
    """A valid saved student in ``run`` (weights elsewhere if ``weights`` says so)."""
    from amalgam.student_io import save_student
    from amalgam.zoo.manifest import InputSpec

    net = tiny_net(5)
    save_student(run, net, CLASSES["a"] + CLASSES["b"], [("a", CLASSES["a"]), ("b", CLASSES["b"])],
                 InputSpec(shape=[1, 28, 28], mean=[0.5], std=[0.25]), metrics={}, job={"zoo": "tiny"})
    if weights_dir is not None:
        weights_dir.mkdir(parents=True, exist_ok=True)
        (run / "student.safetensors").rename(weights_dir / "student.safetensors")
        edit_json(run / "student.json", lambda m: m.update(weights=weights))


def edit_json(path: Path, fn) -> None:
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw, indent=2) + "\n")


def write_digit(path: Path) -> None:
    from PIL import Image

    img = np.zeros((28, 28), dtype=np.uint8)
    img[6:22, 12:16] = 255  # a "1"
    Image.fromarray(img, mode="L").save(path)


def write_store(store: Path) -> None:
    """A store with two committed datasets: ``GOOD_KEY`` (left alone) and ``BAD_KEY`` (the one a case breaks)."""
    from amalgam.store.dataset import DatasetWriter, tensor_column
    from amalgam.store.location import open_store

    loc = open_store(str(store))
    for key, side in ((GOOD_KEY, False), (BAD_KEY, True)):
        n = 8
        w = DatasetWriter(loc, key, key.split("/")[0], {"pool": "p" * 64}, n, 4)
        for i in range(w.num_shards):
            rows = w.shard_rows(i)
            idx = np.arange(rows.start, rows.stop)
            table = pa.table({
                "index": pa.array(idx.astype(np.int64)),
                "sample_id": pa.array([f"mnist:train:{3 * j + 1}" for j in idx]),
                "logits": tensor_column(np.linspace(-1, 1, len(idx) * 5, dtype=np.float32).reshape(len(idx), 5)),
            })
            w.write_shard(i, table, {"stats.bin": f"stats of shard {i}\n".encode()} if side else None)
        w.commit(["stats.bin"] if side else [])
        # No host, user or time of whoever ran this script in a committed file.
        edit_json(store / key / "manifest.json",
                  lambda m: m.update(created_at="2020-01-01T00:00:00Z", created_by={"host": "fixture", "user": "fixture", "pid": "0"}))


def manifest_of(store: Path) -> Path:
    return store / BAD_KEY / "manifest.json"


def shard(store: Path, i: int) -> Path:
    return store / BAD_KEY / "shards" / f"shard-{i:05d}.parquet"


# --------------------------------------------------------------------------- zoo cases


@case
def zoo_malformed_yaml(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    text = write_zoo(d / "zoo", [a, b], "a tab where YAML needs spaces (in teacher b's classes)")
    lines = text.splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith("  - fashion/Bag"))
    lines[i] = "\t- fashion/Bag\n"
    (d / "zoo" / "zoo.yaml").write_text("".join(lines))


@case
def zoo_unknown_field(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    b["input"]["scale"] = 255
    write_zoo(d / "zoo", [a, b], "teacher b's input has a field the manifest does not know")


@case
def zoo_mistyped_field(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    a["taps"][1]["channels"] = "two"
    write_zoo(d / "zoo", [a, b], "a tap's channel count is a word, not an int")


@case
def zoo_missing_weights(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    (d / "zoo" / "b.safetensors").unlink()
    write_zoo(d / "zoo", [a, b], "teacher b's weights file is absent")


@case
def zoo_pickled_checkpoint(d: Path) -> None:
    net = tiny_net(3)
    a = entry("a", net, "a.pt", save_malicious_checkpoint(net, d / "zoo" / "a.pt"))
    write_zoo(d / "zoo", [a, teacher(d / "zoo", "b")], "teacher a's weights are a torch pickle with a payload")


@case
def zoo_pickle_disguised_as_safetensors(d: Path) -> None:
    net = tiny_net(3)
    a = entry("a", net, "a.safetensors", save_malicious_checkpoint(net, d / "zoo" / "a.safetensors"))
    write_zoo(d / "zoo", [a, teacher(d / "zoo", "b")],
              "teacher a's a.safetensors is a torch pickle with a payload (its sha256 is right)")


@case
def zoo_truncated_safetensors(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    path = d / "zoo" / "b.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    b["sha256"] = sha(path)
    write_zoo(d / "zoo", [a, b], "teacher b's weights are cut in half (the manifest hashes the cut file)")


@case
def zoo_weights_hash_mismatch(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    save_safetensors(tiny_net(2, scale=0.2), d / "zoo" / "b.safetensors")  # retrained, manifest not updated
    write_zoo(d / "zoo", [a, b], "teacher b's weights changed after the manifest hashed them")


@case
def zoo_weights_outside_zoo_dir(d: Path) -> None:
    a = teacher(d / "elsewhere", "a")
    a["weights"] = "../elsewhere/a.safetensors"  # a real, valid file: only the path is wrong
    write_zoo(d / "zoo", [a, teacher(d / "zoo", "b")], "teacher a's weights path leaves the zoo directory")


@case
def zoo_tap_stride_mismatch(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    b["taps"][1]["stride"] = 4
    write_zoo(d / "zoo", [a, b], "teacher b declares conv2 at stride 4 (7x7); the architecture has stride 2 (14x14)")


@case
def zoo_tensor_shape_mismatch(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    a["arch_args"]["conv_widths"] = [3, 2]
    a["taps"][0]["channels"] = 3
    write_zoo(d / "zoo", [a, b], "teacher a declares 3 conv1 channels; its weights have 2")


@case
def zoo_input_shape_disagrees_with_arch(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b", image_size=14)
    b["input"]["shape"] = [1, 28, 28]
    write_zoo(d / "zoo", [a, b], "teacher b is a 14x14 network that claims a 28x28 input")


@case
def zoo_incompatible_topologies(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b", conv_widths=(2, 2, 2))
    write_zoo(d / "zoo", [a, b], "teacher b has three conv taps, teacher a two")
    write_job(d)


@case
def zoo_incompatible_spatial_sizes(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b", image_size=14)
    write_zoo(d / "zoo", [a, b], "teacher b takes 14x14 images, teacher a 28x28: their taps differ in size")
    write_job(d)


@case
def zoo_overlapping_class_names(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    b["classes"] = ["mnist/2", "mnist/2"]
    write_zoo(d / "zoo", [a, b], "teacher b lists mnist/2 twice (teachers may share classes; one teacher may not repeat one)")


@case
def zoo_duplicate_teacher_names(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    b["name"] = "a"
    write_zoo(d / "zoo", [a, b], "two teachers called a")


# --------------------------------------------------------------------------- run / retrain cases


def write_job_with(case_dir: Path, note: str, **fields) -> None:
    """``JOB`` with ``fields`` replaced, and a comment saying what is wrong."""
    raw = {**JOB, **fields}
    (case_dir / "job.yaml").write_text(f"# {note}\n" + yaml.safe_dump(raw, sort_keys=False))


@case
def run_refused_after_parsing(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    save_safetensors(tiny_net(2, scale=0.2), d / "zoo" / "b.safetensors")  # retrained, manifest not updated
    write_zoo(d / "zoo", [a, b], "teacher b's weights changed after the manifest hashed them")
    write_job_with(d, "a valid job: `amalgam run` refuses it only once it loads the zoo (teacher b's hash)")


@case
def retrain_store_uri_var_expands_to_credentials(d: Path) -> None:
    write_zoo(d / "zoo", [teacher(d / "zoo", "a"), teacher(d / "zoo", "b")], "a valid zoo")
    write_job_with(d, "store.uri names a variable; case.yaml sets it to an s3:// URI with a key and secret in it",
                   store={"uri": "$BAD_INPUTS_STORE_URI"})


# --------------------------------------------------------------------------- zoo import cases


def write_import_spec(d: Path, teachers: list[dict], note: str) -> None:
    """An ``amalgam zoo import`` spec at ``d/import.yaml`` (weights paths relative to it)."""
    text = f"# {note}\n" + yaml.safe_dump({"name": "imported", "teachers": teachers}, sort_keys=False)
    (d / "import.yaml").write_text(text)


def import_teacher(name: str, weights: str, **extra) -> dict:
    return {"name": name, "weights": weights, "arch": "tapped_cnn", "classes": CLASSES[name],
            "input": {"shape": [1, 28, 28], "mean": [0.5], "std": [0.25]}, **extra}


@case
def zoo_import_malicious_checkpoint(d: Path) -> None:
    save_safetensors(tiny_net(len(CLASSES["b"])), d / "b.safetensors")
    save_malicious_checkpoint(tiny_net(len(CLASSES["a"])), d / "a.pt")
    write_import_spec(d, [import_teacher("b", "b.safetensors"), import_teacher("a", "a.pt")],
                      "teacher a's state_dict carries a pickled payload")


@case
def zoo_import_tensor_shape_mismatch(d: Path) -> None:
    save_safetensors(tiny_net(len(CLASSES["a"])), d / "a.safetensors")
    save_safetensors(tiny_net(len(CLASSES["b"])), d / "b.safetensors")
    write_import_spec(d, [import_teacher("a", "a.safetensors"),
                          import_teacher("b", "b.safetensors", arch_args={"conv_widths": [2, 3], "fc_widths": [4]})],
                      "teacher b declares 3 conv2 channels; its weights have 2")


@case
def zoo_import_over_existing_zoo(d: Path) -> None:
    a, b = teacher(d / "zoo", "a"), teacher(d / "zoo", "b")
    write_zoo(d / "zoo", [a, b], "a zoo that an import without --force must leave alone")
    save_safetensors(tiny_net(len(CLASSES["a"]), scale=0.2), d / "a-retrained.safetensors")
    write_import_spec(d, [import_teacher("a", "a-retrained.safetensors")], "would replace zoo/zoo.yaml and zoo/a.safetensors")


# --------------------------------------------------------------------------- student cases


@case
def student_pickle_as_safetensors(d: Path) -> None:
    write_student(d / "run")
    path = d / "run" / "student.safetensors"
    digest = save_malicious_checkpoint(tiny_net(5), path)
    edit_json(d / "run" / "student.json", lambda m: m.update(sha256=digest))
    write_digit(d / "digit.png")


@case
def student_weights_escape_run_dir(d: Path) -> None:
    write_student(d / "run", weights_dir=d / "elsewhere", weights="../elsewhere/student.safetensors")


@case
def student_weights_hash_mismatch(d: Path) -> None:
    write_student(d / "run")
    save_safetensors(tiny_net(5, scale=0.3), d / "run" / "student.safetensors")


@case
def student_malformed_json(d: Path) -> None:
    write_student(d / "run")
    text = (d / "run" / "student.json").read_text()
    (d / "run" / "student.json").write_text(text.replace('"arch": "tapped_cnn",', '"arch": "tapped_cnn",,', 1))
    write_digit(d / "digit.png")


@case
def predict_corrupt_image(d: Path) -> None:
    write_student(d / "run")
    write_digit(d / "digit.png")
    (d / "scan.png").write_bytes(b"this is not an image, whatever its name says\n")


@case
def predict_truncated_image(d: Path) -> None:
    write_student(d / "run")
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8), mode="L").save(buf, "PNG")
    (d / "digit.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


# --------------------------------------------------------------------------- store cases


@case
def store_corrupt_parquet_shard(d: Path) -> None:
    write_store(d / "store")
    path = shard(d / "store", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@case
def store_unreadable_parquet_shard(d: Path) -> None:
    write_store(d / "store")
    path = shard(d / "store", 0)
    path.write_bytes(path.read_bytes()[:100])
    edit_json(manifest_of(d / "store"), lambda m: m["shards"][0].update(sha256=sha(path)))


@case
def store_missing_side_file(d: Path) -> None:
    write_store(d / "store")
    (d / "store" / BAD_KEY / "shards" / "shard-00001.stats.bin").unlink()


@case
def store_manifest_outside_store(d: Path) -> None:
    write_store(d / "store")
    shutil.copy(shard(d / "store", 1), d / "outside.parquet")  # the target exists: only the path is wrong
    edit_json(manifest_of(d / "store"), lambda m: m["shards"][1].update(file="../../../../outside.parquet"))


@case
def store_manifest_malformed_json(d: Path) -> None:
    write_store(d / "store")
    path = manifest_of(d / "store")
    path.write_text(path.read_text()[:-40])


@case
def store_manifest_unknown_field(d: Path) -> None:
    write_store(d / "store")
    edit_json(manifest_of(d / "store"), lambda m: m["shards"][0].update(compression="zstd"))


def main(names: list[str]) -> None:
    for name in names or list(CASES):
        d = HERE / name
        d.mkdir(parents=True, exist_ok=True)
        for child in d.iterdir():  # everything but the hand-written case.yaml is regenerated
            if child.name != "case.yaml":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        CASES[name](d)
        print(f"wrote {d.relative_to(HERE.parent.parent.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
