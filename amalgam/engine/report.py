"""A run's report, written from plain data: JSON for machines, markdown and PNGs for people.

No training code lives here, so a report can be (re)written from stored results alone.
Every file is written atomically (temp file in the same folder, then ``os.replace``):
a crash or a concurrent reader never sees half a report.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amalgam.classes import ClassSpace
from amalgam.engine.evaluate import Metrics


def _pyplot():
    """matplotlib, imported when a plot is drawn: importing it writes a font cache under
    ``$HOME``, which a run refused before it produced anything must not do."""
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written on servers and in workers
    import matplotlib.pyplot as plt

    return plt


@dataclass
class MethodResult:
    """One row of the report: a method (student, teachers, baseline) and what it costs.

    ``metrics`` may be None for rows that only report size or speed.
    """

    name: str
    metrics: Metrics | None
    params: int | None
    macs: int | None
    latency_ms_b1: float | None
    latency_ms_b256: float | None
    labels_used: bool = False  # did the method see ground-truth labels? (amalgamation should not)
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metrics": self.metrics.to_dict() if self.metrics is not None else None,
            "params": self.params,
            "macs": self.macs,
            "latency_ms_b1": self.latency_ms_b1,
            "latency_ms_b256": self.latency_ms_b256,
            "labels_used": self.labels_used,
            "notes": self.notes,
        }


# --- writing -------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    # A unique name opened with "xb" (not mkstemp, which forces mode 0600): the report
    # gets the usual umask-based permissions and concurrent writers never collide.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become null, paths and other objects become strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)  # pyplot keeps figures alive until closed
    _atomic_write(path, buf.getvalue())


# --- markdown ------------------------------------------------------------------------


def _acc(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _int(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _ms(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def format_table(space: ClassSpace, results: list[MethodResult]) -> str:
    """The markdown results table alone; teacher columns hold task-aware accuracy. When teachers
    share classes, ``shared`` / ``unshared`` follow comprehensive (its accuracy on the test
    samples of shared / unshared classes)."""
    sharing = ["shared", "unshared"] if space.overlapping else []
    header = [*space.teachers, "comprehensive", *sharing, "params", "MACs", "latency b1 (ms)", "latency b256 (ms)",
              "labels used"]
    lines = [
        "| " + " | ".join(["method", *map(_cell, header)]) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1) + "---|",
    ]
    for r in results:
        m = r.metrics
        accs = [_acc(m.task_aware.get(t) if m else None) for t in space.teachers]
        accs += [_acc(m.comprehensive if m else None)] + [_acc(getattr(m, k) if m else None) for k in sharing]
        row = [
            _cell(r.name), *accs, _int(r.params), _int(r.macs),
            _ms(r.latency_ms_b1), _ms(r.latency_ms_b256), "yes" if r.labels_used else "no",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _markdown(title: str, space: ClassSpace, results: list[MethodResult], extra: dict | None) -> str:
    parts = [
        f"# {title}",
        "",
        format_table(space, results),
        "",
        "Teacher columns: task-aware accuracy (argmax within that teacher's classes, on its test samples). "
        "comprehensive: argmax over all classes. MACs: one sample.",
    ]
    if space.overlapping:
        parts += [
            "",
            f"Shared classes (known by several teachers): {', '.join(space.shared)}. shared / unshared: "
            "comprehensive accuracy on the test samples of shared / unshared classes. A shared class's target "
            "is the average of the calibrated logits of the teachers that know it (the gated mixture: their "
            "summed probability); ensembles combine them the same way.",
        ]
    notes = [f"- **{r.name}**: {r.notes}" for r in results if r.notes]
    if notes:
        parts += ["", "## Notes", "", *notes]
    if extra:
        parts += ["", "## Details", "", *(f"- {k}: {v}" for k, v in extra.items() if k != "skipped_images")]
    skipped = (extra or {}).get("skipped_images") or []
    if skipped:  # unreadable image files of an image-folder pool or test set (report.json lists them all)
        sets = ", ".join(f"{s} {sum(1 for x in skipped if x['set'] == s)}" for s in dict.fromkeys(x["set"] for x in skipped))
        parts += ["", "## Skipped images", "", f"{len(skipped)} unreadable image files were skipped ({sets}):", "",
                  *(f"- {x['set']}: `{x['path']}`: {x['reason']}" for x in skipped[:50])]
        if len(skipped) > 50:
            parts.append(f"- ... and {len(skipped) - 50} more (report.json, extra.skipped_images, lists them all)")
    return "\n".join(parts) + "\n"


# --- plots ---------------------------------------------------------------------------


def _plot_stage_losses(curves: dict[str, list[float]], path: Path) -> None:
    """Each curve divided by its first epoch, so stages of very different scale share one axis."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for stage, losses in curves.items():
        y = np.asarray(losses, dtype=float)
        first = y[0] if y.size and math.isfinite(y[0]) and y[0] > 0 else 1.0
        ax.plot(np.arange(1, y.size + 1), y / first, marker="o", markersize=3, label=stage)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss / first-epoch loss")
    ax.set_title("Stage losses (normalised)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 6 else 1)
    _save_figure(fig, path)


def _plot_accuracy(space: ClassSpace, results: list[MethodResult], path: Path) -> None:
    scored = [r for r in results if r.metrics is not None]
    series = [*space.teachers, "comprehensive", *(["shared", "unshared"] if space.overlapping else [])]
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 1.2 * len(scored) * len(series) / 3 + 2), 4.5))
    width = 0.8 / len(series)
    x = np.arange(len(scored))
    for j, s in enumerate(series):
        if j >= len(space.teachers):  # comprehensive, shared, unshared: Metrics attributes
            vals = [getattr(r.metrics, s) if getattr(r.metrics, s) is not None else math.nan for r in scored]
        else:
            vals = [r.metrics.task_aware.get(s, math.nan) for r in scored]
        ax.bar(x + (j - (len(series) - 1) / 2) * width, np.nan_to_num(vals), width, label=s,
               hatch="//" if j >= len(space.teachers) else None)
    ax.set_xticks(x, [r.name for r in scored], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Task-aware accuracy per sub-task, and comprehensive")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
    _save_figure(fig, path)


def _plot_confusion(space: ClassSpace, result: MethodResult, path: Path) -> None:
    """Row-normalised, so each row reads as "where this class's samples went"; lines mark teachers."""
    cm = result.metrics.confusion.double().numpy()
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    c = len(space)
    side = max(5.0, 0.42 * c + 2.5)
    fig, ax = _pyplot().subplots(figsize=(side, side))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(c), space.names, rotation=90, fontsize=8)
    ax.set_yticks(range(c), space.names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    # Where each later teacher's new classes start (its slice, for a disjoint zoo).
    seen: set[int] = set()
    for i, pos in enumerate(space.positions):
        new = [p for p in pos if p not in seen]
        seen.update(pos)
        if i and new:
            ax.axhline(min(new) - 0.5, color="tab:red", lw=0.8)
            ax.axvline(min(new) - 0.5, color="tab:red", lw=0.8)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(f"Confusion of {result.name} (row %, n={result.metrics.n})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save_figure(fig, path)


# --- entry point ---------------------------------------------------------------------


def write_report(
    run_dir: Path,
    title: str,
    space: ClassSpace,
    results: list[MethodResult],
    main: str,
    stage_curves: dict[str, list[float]] | None = None,
    extra: dict | None = None,
) -> None:
    """Write report.json, report.md, accuracy.png, confusion.png (of ``main``) and stage_losses.png.

    ``stage_losses.png`` is written only when there are curves; a stale one from an
    earlier run in the same folder is removed so the folder never mixes two runs.
    """
    by_name = {r.name: r for r in results}
    if main not in by_name:
        raise ValueError(f"main method {main!r} is not among the results {list(by_name)}")
    if by_name[main].metrics is None:
        raise ValueError(f"main method {main!r} has no metrics, so there is no confusion matrix to draw")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    doc = {
        "title": title,
        "main": main,
        "classes": list(space.names),
        "teachers": [{"name": t, "classes": [space.names[p] for p in pos]} for t, pos in zip(space.teachers, space.positions)],
        **({"shared_classes": list(space.shared)} if space.overlapping else {}),
        "methods": [r.to_dict() for r in results],
        "stage_curves": stage_curves,
        "extra": extra,
    }
    _atomic_write(run_dir / "report.json", json.dumps(_jsonable(doc), indent=2, allow_nan=False).encode())
    _atomic_write(run_dir / "report.md", _markdown(title, space, results, extra).encode())

    curves = {k: v for k, v in (stage_curves or {}).items() if len(v)}
    if curves:
        _plot_stage_losses(curves, run_dir / "stage_losses.png")
    else:
        (run_dir / "stage_losses.png").unlink(missing_ok=True)
    _plot_accuracy(space, results, run_dir / "accuracy.png")
    _plot_confusion(space, by_name[main], run_dir / "confusion.png")
