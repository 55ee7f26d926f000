"""What a tap is: the module path a hook attaches to, its kind, channels and stride (timm's FeatureInfo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TapKind = Literal["conv", "fc"]


@dataclass(frozen=True)
class TapInfo:
    """One tap: ``path`` is the module path a forward hook attaches to."""

    name: str
    path: str
    kind: TapKind
    channels: int
    stride: int  # spatial reduction w.r.t. the input; 0 for FC taps

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "kind": self.kind, "channels": self.channels, "stride": self.stride}
