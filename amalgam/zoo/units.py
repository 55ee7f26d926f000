"""The tapped-unit network every zoo architecture is: a chain of ``pre -> layer`` units.

A unit's ``layer`` output (pre-activation) is its tap; its ``pre`` (activation, pooling,
padding, flattening) belongs to the next unit so that the tap is captured before anything
in-place touches it. The engine's stages, FAMs and fold rely only on this interface
(``unit_names``, ``pres``, ``layers``, ``feature_info()``, ``forward_unit``, ``config``), so
each architecture builds its units and hands them to :meth:`TappedUnits.set_units`.
"""

from __future__ import annotations

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
