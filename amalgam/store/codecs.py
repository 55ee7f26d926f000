"""Fitted auto-encoders in the store: one safetensors file + a JSON of tap kinds and widths."""

from __future__ import annotations

import json

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from amalgam.engine.amalgamate import LinearCodec, TapStats
from amalgam.store.fingerprint import tensors_fingerprint
from amalgam.store.location import StoreLocation

FIELDS = ("enc_w", "enc_b", "dec_w", "dec_b")


def codec_tensors(codecs: dict[str, LinearCodec]) -> dict:
    return {f"{tap}.{f}": getattr(c, f).contiguous() for tap, c in codecs.items() for f in FIELDS}


def codecs_fingerprint(codecs: dict[str, LinearCodec], meta: dict) -> str:
    return tensors_fingerprint(codec_tensors(codecs), meta)


def save_codecs(loc: StoreLocation, key: str, codecs: dict[str, LinearCodec], meta: dict) -> None:
    """Never replaces: two jobs fitting the same codecs at once (values equal up to the last
    bit) keep the first file, and each then reloads what is stored (see ``StoreSource.fit``),
    so every code in the store was encoded by the codecs stored next to it."""
    loc.create_bytes(f"{key}/codecs.safetensors", st_save(codec_tensors(codecs)))
    info = {"taps": {tap: {"kind": c.kind, "width": c.width, "in_channels": c.in_channels} for tap, c in codecs.items()},
            **meta}
    loc.create_bytes(f"{key}/codecs.json", json.dumps(info, indent=1).encode())  # written last: the commit


def load_codecs(loc: StoreLocation, key: str) -> tuple[dict[str, LinearCodec], dict]:
    info = json.loads(loc.read_bytes(f"{key}/codecs.json"))
    tensors = st_load(loc.read_bytes(f"{key}/codecs.safetensors"))
    codecs = {
        tap: LinearCodec(*(tensors[f"{tap}.{f}"] for f in FIELDS), kind=spec["kind"])
        for tap, spec in info["taps"].items()
    }
    return codecs, info


def stats_to_bytes(stats: dict[str, TapStats]) -> bytes:
    return st_save({f"{tap}.{k}": v.contiguous() for tap, s in stats.items() for k, v in s.state_dict().items()})


def stats_from_bytes(data: bytes) -> dict[str, TapStats]:
    flat = st_load(data)
    taps = sorted({k.rsplit(".", 1)[0] for k in flat})
    return {tap: TapStats.from_state_dict({f: flat[f"{tap}.{f}"] for f in ("blocks", "kind", "count", "sum", "gram")})
            for tap in taps}
