"""The "gsplat" backend: a thin call into `gsplat.rasterization` (CUDA only).

gsplat is imported only when this backend runs, and only for CUDA tensors: its CUDA path on CPU
tensors would start a JIT build that fails, so CPU tensors are refused with a clear error first.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    render_mode: str = "RGB",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict]:
    """`gsplat.rasterization` in its classic, pinhole, unpacked form; same arguments as `rasterize`."""
    if means.device.type != "cuda":
        raise ValueError(
            f"backend 'gsplat' needs CUDA tensors, got tensors on {means.device}; "
            "use backend='cpu' or 'torch' (or 'auto') for CPU tensors"
        )
    if means.dtype != torch.float32:
        raise ValueError(f"backend 'gsplat' supports float32 only, got {means.dtype}; use backend='torch'")
    from gsplat.rendering import rasterization  # lazy: never touch gsplat's CUDA module at import time

    return rasterization(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmats,
        Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        radius_clip=radius_clip,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=False,
        tile_size=tile_size,
        backgrounds=backgrounds,
        render_mode=render_mode,
        rasterize_mode="classic",
        camera_model="pinhole",
    )
