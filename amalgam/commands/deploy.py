"""``amalgam predict`` and ``amalgam export``: use a saved student outside amalgam.

An export is checked before it is put in place. The exported file is written under a
temporary name, loaded back with its own runtime and run on a random batch, and its
outputs are compared with the student's. Only then is it renamed to its final path.
So an export that runs but computes something else never ships without notice.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from amalgam.errors import AmalgamError

EXPORT_TOLERANCE = 1e-4
VERIFY_BATCH = 5  # not the batch of 2 used for tracing, so a batch size baked into the export shows up
ONNX_OPSET = 18
DEFAULT_NAMES = {"torchscript": "student.torchscript.pt", "onnx": "student.onnx"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _predict(args: argparse.Namespace) -> None:
    import torch

    from amalgam.student_io import load_student, preprocess_image

    student, classes, spec = load_student(args.run_dir)
    batch = torch.cat([preprocess_image(p, spec) for p in args.images])
    with torch.inference_mode():
        probs = student(batch).softmax(dim=1)
    top = probs.topk(min(args.top, len(classes)), dim=1)
    for image, values, indices in zip(args.images, top.values.tolist(), top.indices.tolist()):
        print(f"{image}: " + ", ".join(f"{classes[i]} {p:.3f}" for p, i in zip(values, indices)))


def _export_torchscript(student, example, path: Path):
    """Trace and save. Return a callable that runs the saved file."""
    import torch

    # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
    # C++/mobile runtimes load. Silence the notice so the command prints only its result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(student, example).save(str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x)


def _export_onnx(student, example, path: Path):
    """Export with the torch.export-based exporter and return a callable that runs the file.

    The file is run with onnx's reference evaluator. It is slow, but students are
    small, and it needs no runtime beyond the ``onnx`` package the export already uses.
    """
    import numpy as np
    import torch

    try:
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
        from onnx.reference import ReferenceEvaluator
    except ImportError:
        raise AmalgamError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    torch.onnx.export(
        student, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
        input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,  # one self-contained file; a compact student is far below protobuf's 2 GB limit
        verbose=False,
    )
    evaluator = ReferenceEvaluator(onnx.load(str(path)))
    return lambda x: torch.from_numpy(np.asarray(evaluator.run(None, {"images": x.numpy()})[0]))


def _export(args: argparse.Namespace) -> None:
    import torch

    from amalgam.student_io import load_student, student_json_path

    student, _, spec = load_student(args.run_dir)
    out = Path(args.out) if args.out else student_json_path(args.run_dir).parent / DEFAULT_NAMES[args.format]
    if out.is_dir():
        raise AmalgamError(f"{out}: is a directory; --out takes a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, *spec.shape, generator=gen)
    batch = torch.rand(VERIFY_BATCH, *spec.shape, generator=gen)
    try:
        exporter = _export_torchscript if args.format == "torchscript" else _export_onnx
        run_exported = exporter(student, example, tmp)
        with torch.inference_mode():
            diff = (run_exported(batch).float() - student(batch)).abs().max().item()
        if not diff <= EXPORT_TOLERANCE:  # also catches NaN
            raise AmalgamError(
                f"{out}: exported {args.format} outputs differ from the student by {diff:.2e} "
                f"(tolerance {EXPORT_TOLERANCE:.0e}); nothing written"
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {args.format} to {out} (max abs diff vs student on a batch of {VERIFY_BATCH}: {diff:.2e})")


def register(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="classify image files with a saved student")
    predict.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding student.json (or the json itself)")
    predict.add_argument("images", metavar="IMAGE", nargs="+")
    predict.add_argument("--top", type=_positive_int, default=3, help="classes shown per image (default 3)")
    predict.set_defaults(func=_predict)

    export = sub.add_parser("export", help="export a saved student to TorchScript or ONNX (checked against it)")
    export.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding student.json (or the json itself)")
    export.add_argument("--format", required=True, choices=sorted(DEFAULT_NAMES))
    export.add_argument("--out", help="output file (default RUN_DIR/student.torchscript.pt or RUN_DIR/student.onnx)")
    export.set_defaults(func=_export)
