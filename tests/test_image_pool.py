"""Pools from your own images: an image folder, a list of files, an S3 prefix (issue 11, part 4).

Real files written here with Pillow: real MNIST digits as PNG (lossless, so pixels compare
exactly) and JPEG, in class folders at several depths, plus a truncated PNG and a text file
named ``.jpg`` (both must be skipped, counted and listed, never fatal), a non-image file and a
hidden one (both ignored). S3 is moto's standalone server on loopback. The Ray tests run an
embedded local Ray of 2 CPUs: Ray Data reads and decodes the files, then the store pipeline
extracts features from the image pool; an ``amalgam run --local`` on the folder covers the
report.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from amalgam.classes import ClassSpace
from amalgam.cli import main
from amalgam.data.datasets import load_split
from amalgam.data.images import decode_image
from amalgam.data.pool import FileListSource, ImageFolderSource, PoolSource, PoolSpec, build_pool
from amalgam.errors import AmalgamError
from amalgam.job import load_job
from tests.conftest import make_tiny_zoo
from tests.test_store import _bucket, _free_port, _moto

SHAPE = [1, 28, 28]
CLASSES = [0, 1, 2, 3, 4]
PER_CLASS = 6  # readable images per class; 30 in all
CORRUPT = ["3/truncated.png", "4/deep/er/text.jpg"]


def _digits(data_root) -> dict[int, list[np.ndarray]]:
    data = load_split("mnist", "train", data_root)
    out: dict[int, list[np.ndarray]] = {c: [] for c in CLASSES}
    for img, lab in zip(data.images[:400], data.labels[:400].tolist()):
        if lab in out and len(out[lab]) < PER_CLASS:
            out[lab].append(img[0].numpy())
    return out


def write_folder(root: Path, data_root) -> dict[str, np.ndarray]:
    """Class folders 0..4 (some images nested deeper, some JPEG), two corrupt files, two ignored.
    Returns the exact pixels of every PNG by relative path."""
    pngs: dict[str, np.ndarray] = {}
    for c, imgs in _digits(data_root).items():
        for k, arr in enumerate(imgs):
            sub = f"{c}/batch{k % 2}/" if k >= 3 else f"{c}/"
            if k == 5:
                rel = f"{sub}d{k}.jpg"
                (root / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr, "L").save(root / rel, quality=95)
            else:
                rel = f"{sub}d{k}.png"
                (root / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr, "L").save(root / rel)
                pngs[rel] = arr
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8), "L").save(buf, "PNG")
    (root / CORRUPT[0]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # cut in the middle of IDAT
    (root / CORRUPT[1]).parent.mkdir(parents=True, exist_ok=True)
    (root / CORRUPT[1]).write_text("this is not a JPEG\n")
    (root / "README.txt").write_text("not an image: ignored, not counted")
    (root / "2" / ".hidden.png").write_bytes(b"ignored: hidden")
    return pngs


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_root) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("images") / "digits"
    root.mkdir()
    return root, write_folder(root, data_root)


def _spec(**src) -> PoolSpec:
    return PoolSpec.model_validate({"sources": [src]})


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# --- folders, without Ray -------------------------------------------------------------------


def test_image_folder_pool_skips_and_lists_corrupt_files(folder):
    root, pngs = folder
    logs: list[str] = []
    pool = build_pool(_spec(images=str(root), name="mnist"), input_shape=SHAPE, log=logs.append, reader="local")
    n = len(CLASSES) * PER_CLASS
    assert len(pool) == n and pool.images.shape == (n, *SHAPE) and pool.images.dtype == torch.uint8
    # the corrupt files: skipped, counted, each listed with a one-line reason
    assert [Path(p).relative_to(root).as_posix() for p, _ in pool.skipped] == CORRUPT
    reasons = dict((Path(p).name, why) for p, why in pool.skipped)
    assert "truncated" in reasons["truncated.png"] and "not an image" in reasons["text.jpg"]
    assert all("\n" not in why and "BytesIO" not in why for _, why in pool.skipped)
    assert any("skipped 2 unreadable images (see report)" in line for line in logs), logs
    # ids: the relative path (qualified by the source's name), in sorted order; ignored files absent
    assert pool.ids == sorted(pool.ids) and all(i.startswith("img:mnist/") for i in pool.ids)
    assert "img:mnist/0/batch1/d3.png" in pool.ids and not any("README" in i or "hidden" in i for i in pool.ids)
    # labels from the first folder under the root, named as the zoo names MNIST's classes
    assert pool.class_names == [f"mnist/{c}" for c in CLASSES]
    for i, lab in zip(pool.ids, pool.labels.tolist()):
        assert pool.class_names[lab] == f"mnist/{i.split('/')[1]}"
    # PNGs are lossless: the pool holds the very pixels written
    for rel, arr in pngs.items():
        k = pool.ids.index(f"img:mnist/{rel}")
        assert torch.equal(pool.images[k, 0], torch.from_numpy(arr)), rel


def test_ids_and_fingerprint_are_stable_across_builds(folder):
    root, _ = folder
    a = build_pool(_spec(images=str(root)), input_shape=SHAPE, reader="local")
    b = build_pool(_spec(images=str(root)), input_shape=SHAPE, reader="local")
    assert a.ids == b.ids and a.fingerprint() == b.fingerprint() and torch.equal(a.labels, b.labels)
    assert a.ids[0] == "img:0/batch0/d4.png"  # no name: bare relative paths, bare class names
    assert a.class_names == [str(c) for c in CLASSES]
    # count draws files with the spec's seed; the same seed draws the same files
    c1 = build_pool(_spec(images=str(root), count=7), input_shape=SHAPE, reader="local")
    c2 = build_pool(_spec(images=str(root), count=7), input_shape=SHAPE, reader="local")
    assert c1.ids == c2.ids and len(c1) + len(c1.skipped) == 7 and set(c1.ids) <= set(a.ids)


def test_channel_and_size_conversion(folder, tmp_path):
    root, pngs = folder
    rgb = build_pool(_spec(images=str(root)), input_shape=[3, 32, 32], reader="local")
    assert rgb.images.shape == (len(CLASSES) * PER_CLASS, 3, 32, 32) and rgb.images.dtype == torch.uint8
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 1]) and torch.equal(rgb.images[:, 1], rgb.images[:, 2])
    rel, arr = next(iter(pngs.items()))
    want = np.asarray(Image.fromarray(arr, "L").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(rgb.images[rgb.ids.index(f"img:{rel}")], torch.from_numpy(want.transpose(2, 0, 1).copy()))
    # colour files (RGB, RGBA, palette) to the teachers' grey 28x28
    colour = tmp_path / "colour"
    colour.mkdir()
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pix, "RGB").save(colour / "rgb.png")
    Image.fromarray(np.dstack([pix, np.full((40, 30), 255, np.uint8)]), "RGBA").save(colour / "rgba.png")
    Image.fromarray(pix, "RGB").convert("P").save(colour / "pal.gif")
    Image.fromarray(pix, "RGB").save(colour / "photo.webp", lossless=True)
    grey = build_pool(_spec(images=str(colour), labels="none"), input_shape=SHAPE, reader="local")
    assert grey.images.shape == (4, *SHAPE) and not grey.skipped
    assert grey.labels.tolist() == [-1] * 4 and grey.class_names == []
    ref = np.asarray(Image.fromarray(pix, "RGB").convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    for name in ("rgb.png", "rgba.png", "photo.webp"):
        assert torch.equal(grey.images[grey.ids.index(f"img:{name}"), 0], torch.from_numpy(ref.copy())), name
    assert decode_image((colour / "rgb.png").read_bytes(), [3, 40, 30]).transpose(1, 2, 0).tolist() == pix.tolist()


def test_dataset_sources_are_unchanged_and_mix_with_images(folder, data_root):
    root, _ = folder
    old = PoolSpec(sources=[PoolSource(dataset="mnist", count=50)], seed=2)
    assert old.model_dump() == {"sources": [{"dataset": "mnist", "split": "train", "count": 50}], "seed": 2}
    plain = build_pool(old, data_root)
    shaped = build_pool(old, data_root, input_shape=SHAPE)  # the teachers' shape is MNIST's: nothing converted
    assert plain.ids == shaped.ids and plain.fingerprint() == shaped.fingerprint() and plain.skipped == []
    mixed = build_pool(PoolSpec.model_validate({"sources": [{"dataset": "mnist", "count": 50},
                                                            {"images": str(root), "name": "mnist"}], "seed": 2}),
                       data_root, input_shape=SHAPE, reader="local")
    assert mixed.ids[:50] == plain.ids and mixed.ids[50:][0].startswith("img:mnist/")
    assert mixed.class_names == [f"mnist/{i}" for i in range(10)]  # the folder's classes are the dataset's
    assert torch.equal(mixed.labels[:50], plain.labels)
    k = mixed.ids.index("img:mnist/3/d0.png")
    assert mixed.class_names[int(mixed.labels[k])] == "mnist/3"
    # a dataset converted to other teachers' shape, grey to RGB
    rgb = build_pool(old, data_root, input_shape=[3, 14, 14])
    assert rgb.images.shape == (50, 3, 14, 14) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_unreadable_everything_is_one_line_naming_the_path(tmp_path):
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (bad / "b.jpg").write_text("text")
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(images=str(bad)), input_shape=SHAPE, reader="local")
    text = _one_line(exc)
    assert text.startswith(f"{bad}: none of the 2 image files could be read (first: {bad}/b.jpg: ")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images")
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(images=str(empty)), input_shape=SHAPE)
    assert _one_line(exc).startswith(f"{empty}: no image files (png, jpg, jpeg")
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(images=str(tmp_path / "missing")), input_shape=SHAPE)
    assert _one_line(exc) == f"{tmp_path / 'missing'}: image folder not found"
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(images=str(empty)))  # no teachers' shape to decode to
    assert "needs the teachers' input shape" in _one_line(exc)
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(images=str(empty)), input_shape=[2, 28, 28])
    assert "1 (grey) or 3 (RGB) channels" in _one_line(exc)


def test_file_lists_inline_and_in_a_text_file(folder, tmp_path):
    root, pngs = folder
    rels = sorted(pngs)[:4]
    listed = [str(root / r) for r in rels] + [str(root / CORRUPT[1]), str(root / "4" / "gone.png")]
    pool = build_pool(_spec(files=listed, labels="folder", root=str(root)), input_shape=SHAPE, reader="local")
    assert pool.ids == [f"img:{r}" for r in rels]  # relative to root
    assert [Path(p).name for p, _ in pool.skipped] == ["text.jpg", "gone.png"]
    assert "not found" in pool.skipped[1][1]
    assert [pool.class_names[i] for i in pool.labels.tolist()] == [Path(r).parent.name for r in rels]
    lst = root / "list.txt"
    lst.write_text("# pool images\n\n" + "\n".join(rels) + "\n" + rels[0] + "\n")  # relative to the list; a repeat
    again = build_pool(_spec(files=str(lst)), input_shape=SHAPE, reader="local")
    assert again.ids == pool.ids and torch.equal(again.images, pool.images)
    assert again.labels.tolist() == [-1] * 4  # lists are unlabelled unless labels: folder
    outside = build_pool(_spec(files=[str(root / rels[0])], root=str(tmp_path)), input_shape=SHAPE, reader="local")
    assert outside.ids == [f"img:{(root / rels[0]).as_posix()}"]  # outside root: the absolute path
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(files=str(tmp_path / "nope.txt")), input_shape=SHAPE)
    assert _one_line(exc) == f"{tmp_path / 'nope.txt'}: file list not found"


def test_spec_errors_are_one_line_naming_the_field(tmp_path, folder):
    root, _ = folder
    base = {"version": 1, "name": "imgs", "zoo": "zoo.yaml"}
    cases = [
        ({"images": "x", "cnt": 2}, "pool.sources.0.cnt", "Extra inputs are not permitted"),
        ({"images": "x", "count": 0}, "pool.sources.0.count", "greater than 0"),
        ({"images": "x", "labels": "dirs"}, "pool.sources.0.labels", "'folder' or 'none'"),
        ({"images": "x", "split": "test"}, "pool.sources.0.split", "Extra inputs"),
        ({"files": []}, "pool.sources.0.files", "list at least one file"),
        ({"dataset": "mnist", "images": "x"}, "pool.sources.0", "one of dataset, images or files, not dataset and images"),
        ({"count": 3}, "pool.sources.0", "needs one of dataset"),
        ({"images": "s3://AKIA:secret@bucket/p"}, "pool.sources.0.images", "credentials in a URI are refused"),
        ({"images": "http://host/x"}, "pool.sources.0.images", "use a folder, file://FOLDER or s3://BUCKET/PREFIX"),
        ({"dataset": "cifar"}, "pool.sources.0.dataset", "'mnist' or 'fashion'"),
    ]
    for src, field, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, "pool": {"sources": [src]}}))
        with pytest.raises(AmalgamError) as exc:
            load_job(path)
        text = _one_line(exc)
        assert text.startswith(f"{path}: field {field}: ") and message in text, text
        assert "AKIA" not in text and "secret" not in text
    # Relative image paths resolve from the job file, like the zoo; S3 sources get the store's endpoint.
    (tmp_path / "jobs").mkdir()
    job_path = tmp_path / "jobs" / "ok.yaml"
    absolute = root / "0" / "d0.png"  # an absolute path stays as it is
    job_path.write_text(yaml.safe_dump({
        **base, "pool": {"sources": [{"images": "../pics", "name": "mnist"}, {"images": "s3://b/p"},
                                     {"files": ["a.png", str(absolute)]}]},
        "store": {"uri": "s3://b/store", "s3": {"endpoint_url": "http://127.0.0.1:9"}},
    }))
    job = load_job(job_path)
    folder_src, s3_src, files_src = job.pool.sources
    assert isinstance(folder_src, ImageFolderSource) and folder_src.images == str(tmp_path / "pics")
    assert s3_src.images == "s3://b/p" and s3_src.s3.endpoint_url == "http://127.0.0.1:9"
    assert isinstance(files_src, FileListSource) and files_src.files == [str(tmp_path / "jobs" / "a.png"), str(absolute)]
    assert files_src.root == str(tmp_path / "jobs")  # an inline list's ids are relative to the job file
    assert load_job(job_path).pool == job.pool


def test_unlabelled_images_stay_out_of_accuracy():
    space = ClassSpace.from_teachers([("a", ["mnist/0", "mnist/1"]), ("b", ["mnist/2"])])
    got = space.remap(["cat", "mnist/2", "mnist/0"], torch.tensor([-1, 0, 1, 2, -1]))
    assert got.tolist() == [-1, -1, 2, 0, -1]
    assert space.remap([], torch.full((3,), -1)).tolist() == [-1, -1, -1]


def test_validate_checks_image_sources(tmp_path, folder, data_root):
    root, _ = folder
    make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = {"version": 1, "name": "v", "zoo": "zoo/zoo.yaml", "pool": {"sources": [{"images": str(root)}]},
           "evaluation": {"test": {"sources": [{"dataset": "mnist", "split": "test", "count": 10}]}}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "ok.yaml")]) == 0
    job["pool"] = {"sources": [{"images": str(tmp_path / "nowhere")}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "bad.yaml")]) != 0


# --- a whole local run on the folder: the report lists the skipped files ----------------------


def test_local_run_on_an_image_folder_reports_skipped_files(tmp_path, folder, capsys):
    root, _ = folder
    make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = {
        "version": 1, "name": "own-images", "zoo": "zoo/zoo.yaml",
        "pool": {"sources": [{"images": str(root), "labels": "none"}]},
        "calibration": "standardize",
        "amalgamation": {"widths": {"default": 0.5}},
        "stages": {"epochs": 1, "batch_size": 16},
        "joint": {"epochs": 1, "batch_size": 16},
        "baselines": {"kd": False, "supervised": False},
        "evaluation": {"test": {"sources": [{"images": str(root), "name": "mnist"}]}, "latency": False},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "job.yaml"), "--local", "--out", str(out), "--threads", "1"]) == 0
    logs = capsys.readouterr().out
    assert "skipped 2 unreadable images (see report)" in logs
    report = json.loads((out / "report.json").read_text())
    skipped = report["extra"]["skipped_images"]
    assert [(s["set"], Path(s["path"]).relative_to(root).as_posix()) for s in skipped] == \
        [("pool", c) for c in CORRUPT] + [("test", c) for c in CORRUPT]
    assert report["extra"]["pool_size"] == report["extra"]["test_size"] == len(CLASSES) * PER_CLASS
    final = report["methods"][-1]["metrics"]
    assert final["n"] == len(CLASSES) * PER_CLASS  # the folder's labels scored the test set
    md = (out / "report.md").read_text()
    assert "## Skipped images" in md and "4 unreadable image files were skipped (pool 2, test 2)" in md
    assert f"`{root / CORRUPT[0]}`" in md and "skipped_images" not in md
    assert load_job(out / "job.yaml").pool == load_job(tmp_path / "job.yaml").pool  # reruns on the same images


# --- S3 and Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_ray(folder):
    """moto on loopback holding the folder under a prefix, and an embedded Ray (2 CPUs) whose
    workers got the (fake) credentials from their environment, as a deployment gives them."""
    import ray

    from amalgam.distributed.extract import ensure_ray

    root, _ = folder
    mp = pytest.MonkeyPatch()
    port = _free_port()
    server = _moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    mp.setenv("AWS_ACCESS_KEY_ID", "amalgam-test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "amalgam-test-secret")
    mp.setenv("AWS_REGION", "us-east-1")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
        mp.delenv(var, raising=False)
    import boto3

    bucket = _bucket(endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=f"own/{f.relative_to(root).as_posix()}", Body=f.read_bytes())
    if ray.is_initialized():  # started by another module without these variables
        ray.shutdown()
    ensure_ray(num_cpus=2)
    yield endpoint, bucket
    ray.shutdown()
    server.stop()
    mp.undo()


def test_s3_prefix_pool_equals_the_folder_pool(folder, s3_ray):
    root, _ = folder
    endpoint, bucket = s3_ray
    local = build_pool(_spec(images=str(root), name="mnist"), input_shape=SHAPE, reader="local")
    for reader in ("local", "ray"):
        pool = build_pool(_spec(images=f"s3://{bucket}/own/", name="mnist", s3={"endpoint_url": endpoint}),
                          input_shape=SHAPE, reader=reader)
        # the same ids and pixels, so the same fingerprint: the store reuses features across the move
        assert pool.ids == local.ids and torch.equal(pool.images, local.images), reader
        assert pool.fingerprint() == local.fingerprint() and torch.equal(pool.labels, local.labels)
        assert [p for p, _ in pool.skipped] == [f"s3://{bucket}/own/{c}" for c in CORRUPT]
        assert [w for _, w in pool.skipped] == [w for _, w in local.skipped]
    with pytest.raises(AmalgamError) as exc:
        build_pool(_spec(images=f"s3://{bucket}/nothing-here", s3={"endpoint_url": endpoint}), input_shape=SHAPE)
    assert _one_line(exc).startswith(f"s3://{bucket}/nothing-here: no image files")


def test_ray_data_reads_the_folder_like_the_local_reader(folder, s3_ray):
    root, _ = folder
    logs: list[str] = []
    local = build_pool(_spec(images=str(root)), input_shape=[3, 20, 20], reader="local")
    by_ray = build_pool(_spec(images=str(root)), input_shape=[3, 20, 20], log=logs.append)  # auto: Ray is up
    assert any("(Ray Data)" in line and "skipped 2 unreadable images" in line for line in logs), logs
    assert by_ray.ids == local.ids and torch.equal(by_ray.images, local.images) and by_ray.skipped == local.skipped


def test_extraction_on_ray_from_an_image_folder_pool(tmp_path, folder, s3_ray):
    """The store pipeline (Ray Data actors, Parquet store) on the image pool: every id stored once, in
    order, with the pool's pixels; a second pass reuses the store."""
    from amalgam.distributed.store_source import StoreSource
    from amalgam.store.reader import iter_aligned
    from amalgam.zoo.manifest import load_zoo

    root, _ = folder
    zoo = make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]),
                                           ("b", ["mnist/3", "mnist/4"], [6, 8])])
    raw = {"version": 1, "name": "img-extract", "zoo": str(zoo), "pool": {"sources": [{"images": str(root)}]},
           "amalgamation": {"widths": {"default": 0.5}}, "store": {"uri": str(tmp_path / "store")},
           "extraction": {"actors": 1, "batch_size": 16, "shard_size": 8}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    job = load_job(tmp_path / "job.yaml")
    _, teachers = load_zoo(zoo)
    pool = build_pool(job.pool, input_shape=teachers[0].entry.input.shape)
    src = StoreSource(job, teachers, pool, log=lambda _m: None)
    tp = src.teacher_pass()
    src.fit(tp.stats)
    assert src.teacher_forwards == 2 * len(pool) * 2
    batches = list(iter_aligned(src.codes, ["fc1"], 100))
    assert [i for b in batches for i in b["sample_id"]] == pool.ids
    assert torch.equal(torch.cat([b["image"] for b in batches]), pool.images)
    again = StoreSource(job, teachers, build_pool(job.pool, input_shape=SHAPE), log=lambda _m: None)
    again.fit(again.teacher_pass().stats)
    assert again.teacher_forwards == 0  # same ids and pixels: the same pool fingerprint


@pytest.mark.slow
def test_ray_run_on_an_image_folder_pool(tmp_path, folder, s3_ray, capsys):
    """`amalgam run JOB` (the Ray pipeline: Ray Data reads the images, actors extract, Ray Train fits)
    on an image-folder pool and test set; the report lists the skipped files."""
    root, _ = folder
    make_tiny_zoo(tmp_path / "zoo", [("a", ["mnist/0", "mnist/1", "mnist/2"], [4, 8]), ("b", ["mnist/3", "mnist/4"], [6, 8])])
    job = {
        "version": 1, "name": "own-images-ray", "zoo": "zoo/zoo.yaml",
        "pool": {"sources": [{"images": str(root), "labels": "none"}]},
        "amalgamation": {"widths": {"default": 0.5}},
        "stages": {"epochs": 1, "batch_size": 16},
        "joint": {"epochs": 1, "batch_size": 16},
        "baselines": {"kd": False, "supervised": False},
        "evaluation": {"test": {"sources": [{"images": str(root), "name": "mnist"}]}, "latency": False},
        "store": {"uri": str(tmp_path / "store")},
        "extraction": {"actors": 1, "batch_size": 16, "shard_size": 8},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "job.yaml"), "--out", str(out), "--threads", "1"]) == 0
    logs = capsys.readouterr().out
    assert "(Ray Data)" in logs and "skipped 2 unreadable images (see report)" in logs
    report = json.loads((out / "report.json").read_text())
    assert len(report["extra"]["skipped_images"]) == 4 and report["extra"]["feature_source"] != "online"
    assert "## Skipped images" in (out / "report.md").read_text()
