"""The quantised formats of viewers and capture apps, read and written through gsply.

- **compressed PLY** (SuperSplat / PlayCanvas): chunks of 256 Gaussians, each with its own bounds;
  position and scale 11/10/11 bits within them, rotation smallest-three 2+10+10+10 bits, colour
  and opacity 8 bits each, higher SH orders 8 bits.
- **SPZ** (Niantic; Scaniverse and other capture apps): positions 24-bit fixed point, scales 8-bit
  logs, rotations 8 bits per component (smallest-three from v3), colour 8 bits, SH 5 bits (degree
  1) and 4 bits (degrees 2-3) as Niantic's library writes them (gsply, our writer, keeps 8), the
  whole gzip (v1-v3) or zstd (v4) compressed. SPZ stores its
  Gaussians in RUB axes (x right, y up, z back: the Niantic spec, and what its reference library
  and PlayCanvas's splat-transform write and read), the INRIA PLY in RDF (x right, y down, z
  forward); gsply converts no axes, so `_flip_yz` turns them here, on reading and on writing.

Both are tested against files of PlayCanvas's splat-transform, in both directions
(`tests/test_formats.py`, fixtures by `tools/make_format_fixtures.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gendistill.core.io import atomic_path
from gendistill.core.scene import GaussianScene, SceneFormatError

__all__ = ["read_compressed_ply", "write_compressed_ply", "read_spz", "write_spz", "read_sog",
           "is_compressed_ply", "is_spz", "is_sog"]

_SPZ_MAGIC = b"NGSP"  # v4 starts with it; v1-v3 are one gzip stream (1f 8b) holding it
_GZIP_MAGIC = b"\x1f\x8b"


def is_compressed_ply(head: bytes) -> bool:
    """Whether the first bytes of a file are a PLY header with PlayCanvas's `chunk` element."""
    return head.startswith(b"ply") and b"element chunk " in head.split(b"end_header", 1)[0]


def is_spz(head: bytes) -> bool:
    return head.startswith(_SPZ_MAGIC) or head.startswith(_GZIP_MAGIC)


# RDF <-> RUB is the half turn about x, (x, y, z) -> (x, -y, -z), its own inverse. A wxyz quaternion
# becomes (w, x, -y, -z); a real SH basis function changes sign when it is odd in y + z, per
# coefficient in the INRIA order (as Niantic's spz `CoordinateConverter.flipSh`):
_FLIP_YZ_MEANS = np.array([1, -1, -1], np.float32)
_FLIP_YZ_QUATS = np.array([1, 1, -1, -1], np.float32)
_FLIP_YZ_SH = np.array([1,                                  # degree 0
                        -1, -1, 1,                          # degree 1: y, z, x
                        -1, 1, 1, -1, 1,                    # degree 2: xy, yz, 3z2-1, xz, x2-y2
                        -1, 1, -1, -1, 1, -1, 1], np.float32)  # degree 3


def _flip_yz(means: np.ndarray, quats: np.ndarray, sh: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussians between the INRIA PLY's RDF axes and SPZ's RUB axes (either way).

    means [N, 3], quats [N, 4] (wxyz), sh [N, K, 3] -> the same shapes."""
    return means * _FLIP_YZ_MEANS, quats * _FLIP_YZ_QUATS, sh * _FLIP_YZ_SH[: sh.shape[1], None]


def _to_scene(data, path: Path, flip_yz: bool = False) -> GaussianScene:
    """gsply's GSData (PLY conventions: log scales, logit opacities, SH) -> GaussianScene;
    `flip_yz`: the data is in RUB axes (SPZ), turned to RDF. gsply's arrays are taken over as they
    are (float32, contiguous: no copy; the flip is done in place), only the SH are put together anew."""
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    means, quats = f32(data.means), f32(data.quats)
    n, rest = len(means), (np.asarray(data.shN).reshape(len(means), -1, 3) if data.shN is not None
                           and np.size(data.shN) else np.empty((len(means), 0, 3), np.float32))
    sh = np.empty((n, 1 + rest.shape[1], 3), np.float32)
    sh[:, 0], sh[:, 1:] = data.sh0, rest
    if flip_yz:
        means *= _FLIP_YZ_MEANS
        quats *= _FLIP_YZ_QUATS
        sh *= _FLIP_YZ_SH[: sh.shape[1], None]
    out = {"means": means, "quats": quats, "log_scales": f32(data.scales), "opacity_logits": f32(data.opacities),
           "sh": sh}
    out = {k: torch.from_numpy(v) for k, v in out.items()}
    for name, t in out.items():
        if not torch.isfinite(t.sum(dim=0, dtype=torch.float64)).all():  # float64: finite floats never overflow
            raise SceneFormatError(f"{path}: {int((~torch.isfinite(t)).sum())} NaN/Inf value(s) in {name}")
    return GaussianScene(**out)


def _to_gsdata(scene: GaussianScene, flip_yz: bool = False):
    """GaussianScene -> gsply's GSData; `flip_yz`: turned from RDF to RUB axes (SPZ)."""
    import gsply

    f32 = lambda t: t.detach().to("cpu", torch.float32).numpy()  # noqa: E731
    means, quats, sh = f32(scene.means), f32(scene.normalized_quats()), f32(scene.sh)
    if flip_yz:
        means, quats, sh = _flip_yz(means, quats, sh)
    c = np.ascontiguousarray
    return gsply.GSData(means=c(means), scales=c(f32(scene.log_scales)), quats=c(quats),
                        opacities=c(f32(scene.opacity_logits)), sh0=c(sh[:, 0]), shN=c(sh[:, 1:]))


def _dropped(scene: GaussianScene, what: str) -> list[str]:
    kept = [name for name in ("label_sh", "certainty") if getattr(scene, name) is not None] + list(scene.extras)
    return [f"{what} holds no {', '.join(kept)}: not written"] if kept else []


def read_compressed_ply(path: Path) -> tuple[GaussianScene, list[str]]:
    import gsply

    from gendistill.core.formats.ply import check_ply_header

    check_ply_header(path)  # gsply loops forever on a header without end_header, and trusts its counts
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
    scene = _to_scene(data, path, flip_yz=True)
    return scene, [f"SPZ: positions 24-bit fixed point, scales, rotations and colours 8 bits, SH 4-5 bits "
                   f"(SH degree {scene.sh_degree})"]


def write_spz(scene: GaussianScene, path: Path) -> list[str]:
    import gsply

    with atomic_path(path) as tmp:
        gsply.write_spz(str(tmp), _to_gsdata(scene, flip_yz=True), version=3)
    return ["SPZ (v3): positions, scales, rotations, colours and SH quantised"] + _dropped(scene, "SPZ")


def is_sog(head: bytes) -> bool:
    """PlayCanvas SOG: a zip archive of WebP images and meta.json (not a torch checkpoint)."""
    from gendistill.core.formats.gsplat_ckpt import is_torch_zip

    return head.startswith(b"PK\x03\x04") and not is_torch_zip(head)


def read_sog(path: Path) -> tuple[GaussianScene, list[str]]:
    """PlayCanvas SOG, through gsply when the WebP decoder it needs (`imagecodecs`) is installed."""
    import gsply

    try:
        data = gsply.sogread(str(path))
    except ImportError:
        raise SceneFormatError(f"{path}: a SOG file needs `pip install imagecodecs` to be read; or convert it "
                               "with PlayCanvas's splat-transform to .spz or .ply") from None
    except Exception as err:
        raise SceneFormatError(f"{path}: unreadable SOG ({type(err).__name__}: {err})") from None
    scene = _to_scene(data, path)
    return scene, ["SOG: positions 16 bits, scales, colours and SH from 256-entry k-means codebooks"]
