"""The tapped-unit network every zoo architecture is: a chain of ``pre -> layer`` units.

A unit's ``layer`` output (pre-activation) is its tap; its ``pre`` (activation, pooling,
padding, flattening) belongs to the next unit so that the tap is captured before anything
in-place touches it. The engine's stages, FAMs and fold rely only on this interface
(``unit_names``, ``pres``, ``layers``, ``feature_info()``, ``forward_unit``, ``config``), so
each architecture builds its units and hands them to :meth:`TappedUnits.set_units`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from amalgam.zoo.taps import TapInfo, TapKind


class TappedUnits(nn.Module):
    """Base of the zoo's networks: units in order, their taps (timm's ``FeatureInfo``) and the forward."""

    config: object  # the architecture's pydantic config; ``widths()`` gives each unit's channels
    unit_names: list[str]

    def set_units(self, names: list[str], pres: list[nn.Module], layers: list[nn.Module], kinds: list[TapKind],
                  strides: list[int]) -> None:
        """Register the units (``pres.<name>``, ``layers.<name>``: the state-dict keys) and their tap facts."""
        self.unit_names = names
        self.pres = nn.ModuleDict(dict(zip(names, pres)))
        self.layers = nn.ModuleDict(dict(zip(names, layers)))
        self._kinds, self._strides = kinds, strides

    def feature_info(self) -> list[TapInfo]:
        return [
            TapInfo(n, f"layers.{n}", k, w, s)
            for n, k, s, w in zip(self.unit_names, self._kinds, self._strides, self.config.widths())
        ]

    def forward_unit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.layers[name](self.pres[name](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in self.unit_names:
            x = self.forward_unit(n, x)
        return x


@dataclass(frozen=True)
class StateMismatch:
    """The first way a state dict fails to fit a network (untrusted weights are checked before loading)."""

    kind: Literal["missing", "shape", "unexpected"]
    key: str
    got: tuple[int, ...] | None = None
    want: tuple[int, ...] | None = None

    def message(self, file: str | None = None, expects: str = "architecture expects") -> str:
        """One line; ``file`` names where the tensors come from, ``expects`` who expects the shape."""
        if self.kind == "missing":
            return f"tensor {self.key} missing" + (f" from {file}" if file else "")
        if self.kind == "shape":
            return f"tensor {self.key} has shape {self.got}, {expects} {self.want}"
        return f"unexpected tensor {self.key}" + (f" in {file}" if file else "")


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> StateMismatch | None:
    """The first tensor of ``expected`` missing from ``given`` or of another shape, else the first
    extra one of ``given``; None when every key and shape agree."""
    for key, tensor in expected.items():
        if key not in given:
            return StateMismatch("missing", key)
        if tuple(given[key].shape) != tuple(tensor.shape):
            return StateMismatch("shape", key, tuple(given[key].shape), tuple(tensor.shape))
    extra = sorted(set(given) - set(expected))
    return StateMismatch("unexpected", extra[0]) if extra else None
