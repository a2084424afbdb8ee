"""gsplat `simple_trainer` checkpoints: `ckpt_<step>_rank<r>.pt` holding {"step", "splats": {...}}.

`splats` is the trainer's ParameterDict: means [N,3], quats [N,4] (wxyz), scales [N,3] (logs),
opacities [N] (logits), sh0 [N,1,3] and shN [N,K-1,3] (colour SH), the INRIA raw parameters.
A checkpoint trained with appearance features (`features`, `colors`) instead of SH has no
view-independent colour to read: refused. Loaded with `weights_only=True` (no code runs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gendistill.core.scene import GaussianScene, SceneFormatError

__all__ = ["read_gsplat_ckpt", "is_torch_zip"]


def is_torch_zip(head: bytes) -> bool:
    """A zip archive whose first entry is torch.save's `<name>/data.pkl` (not, e.g., a SOG's WebP images)."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return False
    name_len = int.from_bytes(head[26:28], "little")
    return head[30:30 + name_len].endswith(b"data.pkl")


def read_gsplat_ckpt(path: Path) -> tuple[GaussianScene, list[str]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a damaged archive or a foreign pickle
        if isinstance(err, MemoryError):
            raise
        raise SceneFormatError(f"{path}: unreadable torch checkpoint ({type(err).__name__}: {err})") from None
    splats = ckpt.get("splats") if isinstance(ckpt, dict) else None
    if not isinstance(splats, dict):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SceneFormatError(f"{path}: not a gsplat checkpoint (no 'splats' dict; found {keys})")
    if "sh0" not in splats:
        raise SceneFormatError(f"{path}: the splats hold no 'sh0' (found {', '.join(sorted(splats))}); a model "
                               "trained with appearance features has no SH colour to export")
    missing = [k for k in ("means", "quats", "scales", "opacities") if k not in splats]
    if missing:
        raise SceneFormatError(f"{path}: the splats lack {', '.join(missing)}")
    t = {k: v.detach().float() for k, v in splats.items() if torch.is_tensor(v)}
    n = t["means"].shape[0]
    sh0 = t["sh0"].reshape(n, -1, 3)
    sh = torch.cat([sh0, t["shN"].reshape(n, -1, 3)], dim=1) if "shN" in t and t["shN"].numel() else sh0
    try:
        scene = GaussianScene(means=t["means"], quats=t["quats"], log_scales=t["scales"],
                              opacity_logits=t["opacities"].reshape(-1), sh=sh)
    except ValueError as err:
        raise SceneFormatError(f"{path}: {err}") from None
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        bad = int((~torch.isfinite(getattr(scene, name))).sum())
        if bad:
            raise SceneFormatError(f"{path}: {bad} NaN/Inf value(s) in {name}")
    return scene, []  # the raw parameters themselves: nothing approximated
