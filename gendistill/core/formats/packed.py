"""The quantised formats of viewers and capture apps, read and written through gsply.

- **compressed PLY** (SuperSplat / PlayCanvas): chunks of 256 Gaussians, each with its own bounds;
  position and scale 11/10/11 bits within them, rotation smallest-three 2+10+10+10 bits, colour
  and opacity 8 bits each, higher SH orders 8 bits.
- **SPZ** (Niantic; Scaniverse and other capture apps): positions 24-bit fixed point, scales 8-bit
  logs, rotations 8 bits per component (smallest-three from v3), colour 8 bits, SH 5 bits (degree
  1) and 4 bits (degrees 2-3), the whole gzip (v1-v3) or zstd (v4) compressed. Read and written
  as they come, in the INRIA PLY's axes: gsply converts no axes (interoperability is tested
  against files of PlayCanvas's splat-transform).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gendistill.core.io import atomic_path
from gendistill.core.scene import GaussianScene, SceneFormatError

__all__ = ["read_compressed_ply", "write_compressed_ply", "read_spz", "write_spz",
           "is_compressed_ply", "is_spz"]

_SPZ_MAGIC = b"NGSP"  # v4 starts with it; v1-v3 are one gzip stream (1f 8b) holding it
_GZIP_MAGIC = b"\x1f\x8b"


def is_compressed_ply(head: bytes) -> bool:
    """Whether the first bytes of a file are a PLY header with PlayCanvas's `chunk` element."""
    return head.startswith(b"ply") and b"element chunk " in head.split(b"end_header", 1)[0]


def is_spz(head: bytes) -> bool:
    return head.startswith(_SPZ_MAGIC) or head.startswith(_GZIP_MAGIC)


def _to_scene(data, path: Path) -> GaussianScene:
    """gsply's GSData (PLY conventions: log scales, logit opacities, SH) -> GaussianScene."""
    arrays = {"means": data.means, "quats": data.quats, "log_scales": data.scales,
              "opacity_logits": data.opacities}
    out = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    sh0 = np.asarray(data.sh0, np.float32)[:, None]
    shn = np.asarray(data.shN, np.float32) if data.shN is not None and np.size(data.shN) else None
    sh = np.concatenate([sh0, shn.reshape(len(sh0), -1, 3)], axis=1) if shn is not None else sh0
    for name, t in list(out.items()) + [("sh", torch.from_numpy(sh))]:
        if not torch.isfinite(t).all():
            raise SceneFormatError(f"{path}: {int((~torch.isfinite(t)).sum())} NaN/Inf value(s) in {name}")
    return GaussianScene(sh=torch.from_numpy(np.ascontiguousarray(sh)), **out)


def _to_gsdata(scene: GaussianScene):
    import gsply

    f32 = lambda t: np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())  # noqa: E731
    return gsply.GSData(means=f32(scene.means), scales=f32(scene.log_scales), quats=f32(scene.normalized_quats()),
                        opacities=f32(scene.opacity_logits), sh0=f32(scene.sh[:, 0]), shN=f32(scene.sh[:, 1:]))


def _dropped(scene: GaussianScene, what: str) -> list[str]:
    kept = [name for name in ("label_sh", "certainty") if getattr(scene, name) is not None] + list(scene.extras)
    return [f"{what} holds no {', '.join(kept)}: not written"] if kept else []


def read_compressed_ply(path: Path) -> tuple[GaussianScene, list[str]]:
    import gsply

    try:
        data = gsply.plyread(str(path))
    except Exception as err:  # gsply raises several types for a damaged file
        raise SceneFormatError(f"{path}: unreadable compressed PLY ({type(err).__name__}: {err})") from None
    scene = _to_scene(data, path)
    return scene, [f"compressed PLY: positions and scales quantised to 11/10/11 bits per chunk of 256, "
                   f"rotations to 10 bits, colours and opacity to 8 bits (SH degree {scene.sh_degree})"]


def write_compressed_ply(scene: GaussianScene, path: Path) -> list[str]:
    import gsply

    blob = gsply.compress_to_bytes(_to_gsdata(scene))
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return ["compressed PLY: positions, scales, rotations, colours and opacity quantised"] + _dropped(scene, "compressed PLY")


def read_spz(path: Path) -> tuple[GaussianScene, list[str]]:
    import gsply

    try:
        data = gsply.read_spz(str(path))
    except Exception as err:
        raise SceneFormatError(f"{path}: unreadable SPZ ({type(err).__name__}: {err})") from None
    scene = _to_scene(data, path)
    return scene, [f"SPZ: positions 24-bit fixed point, scales, rotations and colours 8 bits, SH 4-5 bits "
                   f"(SH degree {scene.sh_degree})"]


def write_spz(scene: GaussianScene, path: Path) -> list[str]:
    import gsply

    with atomic_path(path) as tmp:
        gsply.write_spz(str(tmp), _to_gsdata(scene), version=3)
    return ["SPZ (v3): positions, scales, rotations, colours and SH quantised"] + _dropped(scene, "SPZ")
