"""Differentiable Gaussian rasterizer: `rasterize()` with backends "gsplat" (CUDA), "cpu" and "torch"
(`RenderBackend` objects in `BACKENDS`), and layered rendering (`render_part`: a frozen set cached per
view, a changing set composited over it)."""

from .backends import BACKENDS, RenderBackend, get_backend, select_backend
from .layered import RestCache, render_part
from .projection import project_gaussians
from .rasterize import RENDER_MODES, rasterize
from .sh import eval_sh
from .torch_backend import rasterize_to_pixels_torch, tile_intersections

__all__ = [
    "BACKENDS",
    "RENDER_MODES",
    "RenderBackend",
    "RestCache",
    "eval_sh",
    "get_backend",
    "project_gaussians",
    "rasterize",
    "rasterize_to_pixels_torch",
    "render_part",
    "select_backend",
    "tile_intersections",
]
