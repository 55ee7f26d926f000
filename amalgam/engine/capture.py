"""Feature capture: pre-activation outputs of every teacher at its taps, by module path.

Teachers are frozen (``eval()``, ``no_grad``). Hooks record each tapped module's output.
A captured tensor must not be modified by anything that runs after the hook (an
in-place activation would silently turn a pre-activation tap into a post-activation
one), so the capture records each tensor's version counter at hook time and fails
loudly if it has changed by the end of the forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from amalgam.engine import counters
from amalgam.errors import AmalgamError


class TapCapture:
    """Context manager: registers forward hooks on ``paths`` of ``model``; read ``.features`` after a forward."""

    def __init__(self, model: nn.Module, paths: list[str], owner: str = "model"):
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules]
        if missing:
            raise AmalgamError(f"{owner}: no module at tap path {missing[0]!r}")
        self.owner = owner
        self.paths = list(paths)
        self._modules = [modules[p] for p in paths]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}

    def _hook(self, path: str):
        def hook(_module: nn.Module, _inp, out: torch.Tensor) -> None:
            self.features[path] = out
            self._versions[path] = out._version

        return hook

    def __enter__(self) -> "TapCapture":
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in zip(self.paths, self._modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def check_unmodified(self) -> None:
        """Raise if an in-place op after a tap altered a captured tensor."""
        for path, t in self.features.items():
            if t._version != self._versions[path]:
                raise AmalgamError(
                    f"{self.owner}: tap {path} was modified in place after capture "
                    "(an in-place activation follows it); use non-inplace activations"
                )

    def run(self, forward, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.features = {}
        out = forward(x)
        self.check_unmodified()
        missing = [p for p in self.paths if p not in self.features]
        if missing:
            raise AmalgamError(f"{self.owner}: tap {missing[0]} was not reached by the forward pass")
        return out, dict(self.features)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """eval() + no_grad for the duration, restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def capture_teachers(teachers: list, x: torch.Tensor) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Run every teacher on images ``x`` (float in [0, 1]).

    Returns per teacher its logits and a ``{tap name: pre-activation feature}`` dict,
    with tap names taken from the teacher's feature info (``conv1``, ..., ``head``).
    """
    counters.add(counters.TEACHER_FORWARDS, x.shape[0] * len(teachers))
    all_logits, all_feats = [], []
    for t in teachers:
        counters.teacher_batch(t.name)
        infos = t.taps()
        paths = [f"net.{i.path}" for i in infos]
        with frozen(t), TapCapture(t, paths, owner=f"teacher {t.name}") as cap:
            logits, feats = cap.run(t, x)
        all_logits.append(logits)
        all_feats.append({i.name: feats[f"net.{i.path}"] for i in infos})
    return all_logits, all_feats
