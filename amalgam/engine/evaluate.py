"""Task-aware and comprehensive accuracy, confusion, size and latency.

The paper reports two accuracies for an amalgamated student:

- *task-aware*: the task (which teacher's sub-task a sample belongs to) is known, so
  the prediction is the argmax inside that teacher's output slice. This measures how
  well the student inherited each teacher on its own terms.
- *comprehensive*: the argmax over all classes. This is the harder, deployment-like
  number: a sample can be right within its teacher's slice and still lose to a larger
  logit from another teacher's classes (the logit-scale problem ``calibrate`` targets).

When teachers share classes (see :mod:`amalgam.classes`), a teacher's "slice" is its output
positions (``ClassSpace.positions``), its samples are the test samples of any of its classes
(a shared class's samples count for every teacher that knows it), and two more numbers are
reported: comprehensive accuracy on the samples of shared classes and on those of unshared
classes (``shared`` / ``unshared``; ``None`` for a disjoint zoo).

Everything here works on plain logits or on any ``nn.Module``, so the same code scores
a student, one teacher, or all teachers together (wrapped in :class:`Concat`).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from amalgam.classes import ClassSpace
from amalgam.errors import AmalgamError


@dataclass
class Metrics:
    """Accuracies of one model on one test set, in the class space's output order.

    An accuracy over zero samples is ``nan`` (a teacher whose classes are absent from
    the test set); :meth:`to_dict` writes it as ``null`` so the JSON stays strict.
    """

    task_aware: dict[str, float]  # teacher -> argmax within its slice, on its samples
    comprehensive: float  # argmax over all classes, on all samples
    comprehensive_per_task: dict[str, float]  # argmax over all classes, on each teacher's samples
    confusion: torch.Tensor  # int64 [C, C], rows = true class, cols = predicted class
    n: int  # samples scored (labels of -1 excluded)
    # Zoos with shared classes only (None otherwise): argmax over all classes, on the samples of
    # classes several teachers know / of classes one teacher knows.
    shared: float | None = None
    unshared: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "task_aware": {k: _finite_or_none(v) for k, v in self.task_aware.items()},
            "comprehensive": _finite_or_none(self.comprehensive),
            "comprehensive_per_task": {k: _finite_or_none(v) for k, v in self.comprehensive_per_task.items()},
            "confusion": self.confusion.tolist(),
            "n": self.n,
        }
        if self.shared is not None or self.unshared is not None:
            out["shared"] = _finite_or_none(self.shared if self.shared is not None else math.nan)
            out["unshared"] = _finite_or_none(self.unshared if self.unshared is not None else math.nan)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        """Inverse of :meth:`to_dict` (``null`` accuracies come back as ``nan``)."""
        return cls(
            task_aware={k: _none_to_nan(v) for k, v in d["task_aware"].items()},
            comprehensive=_none_to_nan(d["comprehensive"]),
            comprehensive_per_task={k: _none_to_nan(v) for k, v in d["comprehensive_per_task"].items()},
            confusion=torch.tensor(d["confusion"], dtype=torch.long),
            n=int(d["n"]),
            shared=_none_to_nan(d["shared"]) if "shared" in d else None,
            unshared=_none_to_nan(d["unshared"]) if "unshared" in d else None,
        )


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _none_to_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _accuracy(correct: torch.Tensor) -> float:
    return correct.float().mean().item() if correct.numel() else math.nan


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, space: ClassSpace) -> Metrics:
    """Score ``logits`` [N, C] against global class indices ``labels`` [N].

    Labels of -1 (test samples whose class no teacher predicts, see
    :meth:`ClassSpace.remap`) are ignored rather than counted wrong: they are outside
    the amalgamated task by construction.
    """
    c = len(space)
    if logits.dim() != 2 or logits.shape[1] != c:
        raise AmalgamError(f"logits have shape {tuple(logits.shape)}, expected [N, {c}] for the class space")
    if labels.shape != (logits.shape[0],):
        raise AmalgamError(f"labels have shape {tuple(labels.shape)}, expected [{logits.shape[0]}]")
    logits, labels = logits.detach().cpu(), labels.detach().cpu().long()
    if labels.numel() and (labels.min() < -1 or labels.max() >= c):
        raise AmalgamError(f"labels must lie in [-1, {c}); got range [{labels.min()}, {labels.max()}]")

    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    pred = logits.argmax(dim=1)
    known = space.known()  # [T, C]: for a disjoint zoo, exactly one teacher per class

    task_aware, per_task = {}, {}
    for i, (teacher, pos) in enumerate(zip(space.teachers, space.positions)):
        mine = known[i, labels]
        cols = torch.tensor(pos, dtype=torch.long)
        local_pred = cols[logits[mine][:, cols].argmax(dim=1)]
        task_aware[teacher] = _accuracy(local_pred == labels[mine])
        per_task[teacher] = _accuracy(pred[mine] == labels[mine])

    shared = unshared = None
    if space.overlapping:
        is_shared = known.sum(0)[labels] > 1
        shared = _accuracy(pred[is_shared] == labels[is_shared])
        unshared = _accuracy(pred[~is_shared] == labels[~is_shared])
    confusion = torch.bincount(labels * c + pred, minlength=c * c).view(c, c)
    return Metrics(task_aware, _accuracy(pred == labels), per_task, confusion, int(labels.numel()), shared, unshared)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits [N, C] on the CPU for uint8 images [N, 1, H, W].

    Models take images in [0, 1] and normalise themselves, so the only conversion here
    is ``/255``; float input is refused because scaling it again would silently darken
    every image. Batches go to the model's device; its train/eval mode is restored
    afterwards so this can be called mid-training.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"predict_logits expects uint8 images, got {images_uint8.dtype}")
    device, was_training = _device_of(model), model.training
    model.eval()
    try:
        outs = [
            model(images_uint8[i : i + batch].to(device).float() / 255).cpu()
            for i in range(0, images_uint8.shape[0], batch)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, 0)


class Concat(nn.Module):
    """Several models as one: outputs concatenated along dim 1, in the order given.

    With the teachers in zoo order this yields the concatenated teacher outputs: the class
    space's order for a disjoint zoo (``ClassSpace.to_union`` maps them when teachers share
    classes), so "all teachers together" is scored, sized and timed like any student.
    """

    def __init__(self, models: Iterable[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.models], dim=1)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample of shape ``input_shape`` (no batch dim).

    Only Conv2d and Linear are counted (biases, activations and pooling are negligible
    next to them): conv = output elements * in_channels/groups * kh*kw; linear = in*out
    per output row. Measured with hooks on a real forward pass, so any topology works.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += (out.numel() // out.shape[0]) * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += (out.numel() // out.shape[0]) * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=_device_of(model)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def cpu_latency_ms(
    model: nn.Module | Callable[[torch.Tensor], Any],
    input_shape: tuple[int, ...],
    batch: int,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall-clock milliseconds of one forward pass of ``batch`` random inputs on the CPU.

    The median resists the occasional scheduler hiccup. A module living on another
    device is timed on a CPU copy, leaving the caller's model where it is. Uses the
    current ``torch.get_num_threads()``; fix it beforehand to compare numbers.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was_training = None
    if isinstance(model, nn.Module):
        if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
            model = copy.deepcopy(model).cpu()
        was_training = model.training
        model.eval()
    x = torch.rand(batch, *input_shape)
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        if was_training is not None:
            model.train(was_training)
    return statistics.median(times)
