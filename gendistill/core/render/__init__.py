"""Differentiable Gaussian rasterizer: `rasterize()` with backends "gsplat" (CUDA), "cpu" and "torch"."""

from .projection import project_gaussians
from .rasterize import BACKENDS, RENDER_MODES, rasterize, select_backend
from .sh import eval_sh
from .torch_backend import rasterize_to_pixels_torch, tile_intersections

__all__ = [
    "BACKENDS",
    "RENDER_MODES",
    "eval_sh",
    "project_gaussians",
    "rasterize",
    "rasterize_to_pixels_torch",
    "select_backend",
    "tile_intersections",
]
