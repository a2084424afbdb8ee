"""antimatter15's `.splat`: 32 bytes a Gaussian, no header, no higher SH orders.

Each record: position 3 x float32, linear scale 3 x float32, RGBA 4 x uint8 (colour of the SH DC
term, opacity), rotation 4 x uint8 (a unit wxyz quaternion mapped from [-1, 1] to [0, 255]).

Written with gsplat's `export_splats`, which sorts the Gaussians along a Morton curve and drops
non-finite ones. Read by hand: no maintained Python package reads the format (gsply and gsplat
only write it or skip it), and its layout is a fixed record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gendistill.core.io import atomic_path
from gendistill.core.render.sh import rgb_to_sh
from gendistill.core.scene import GaussianScene, SceneFormatError

__all__ = ["read_splat", "write_splat", "SPLAT_RECORD"]

SPLAT_RECORD = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rotation", "u1", 4)])


def read_splat(path: Path) -> tuple[GaussianScene, list[str]]:
    size = path.stat().st_size
    if size == 0 or size % SPLAT_RECORD.itemsize:
        raise SceneFormatError(f"{path}: {size} bytes is not a whole number of {SPLAT_RECORD.itemsize}-byte "
                               ".splat records (truncated, or not a .splat file)")
    rec = np.fromfile(path, dtype=SPLAT_RECORD)
    means, scales = rec["position"].astype(np.float32), rec["scale"].astype(np.float32)
    for name, arr in (("position", means), ("scale", scales)):
        if not np.isfinite(arr).all():
            raise SceneFormatError(f"{path}: {int((~np.isfinite(arr)).any(1).sum())} record(s) with a NaN/Inf {name}")
    if (scales <= 0).any():
        raise SceneFormatError(f"{path}: {int((scales <= 0).any(1).sum())} record(s) with a scale <= 0")
    quats = (rec["rotation"].astype(np.float32) - 128.0) / 128.0  # all 128: zero, made the identity by read_scene
    rgba = rec["rgba"].astype(np.float32) / 255.0  # as viewers read it
    alpha = torch.from_numpy(rgba[:, 3]).clamp(0.5 / 255, 1 - 0.5 / 255)  # a finite logit
    scene = GaussianScene(
        means=torch.from_numpy(means), quats=torch.from_numpy(quats), log_scales=torch.from_numpy(np.log(scales)),
        opacity_logits=torch.logit(alpha), sh=rgb_to_sh(torch.from_numpy(rgba[:, :3]))[:, None])
    notes = [".splat: colour and opacity 8 bits, rotations 8 bits per component; no higher SH orders "
             "(view-dependent colour is lost: degree 0)"]
    return scene, notes


def write_splat(scene: GaussianScene, path: Path) -> list[str]:
    from gsplat import export_splats

    s = scene.detach().to("cpu", torch.float32)
    blob = export_splats(s.means, s.log_scales, s.quats, s.opacity_logits, s.sh[:, :1], s.sh[:, 1:], format="splat")
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    notes = [".splat: colour, opacity and rotations quantised to 8 bits; Gaussians reordered (Morton curve)"]
    if scene.sh_degree > 0:
        notes.append(f".splat: SH degree {scene.sh_degree} written as degree 0 (view-dependent colour dropped)")
    return notes
