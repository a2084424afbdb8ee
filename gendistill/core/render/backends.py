"""Render backends as objects, and their registry: "torch" (any device), "cpu" (compiled), "gsplat" (CUDA).

A backend is a `RenderBackend`: `project` (3D Gaussians -> 2D), `colorize` (SH -> colours),
`composite` (2D Gaussians -> pixels), and `rasterize`, which runs the three (`composite_pipeline`) unless
the backend fuses them (gsplat). A backend that can cache a frozen set of Gaussians per view also has
`frozen_layer` / `composite_with_layer` (the compiled CPU one); `core.render.layered` uses them.
A plugin adds one from outside the package:

    from gendistill.core.render import BACKENDS, RenderBackend

    class MyBackend(RenderBackend):
        def composite(self, means2d, conics, colors, opacities, depths, radii, width, height,
                      backgrounds=None, tile_size=16, pixel_mask=None): ...

    BACKENDS.register("mine")(MyBackend())    # rasterize(..., backend="mine"), EditConfig backend=mine
"""

from __future__ import annotations

import torch
from torch import Tensor

from gendistill.registry import Registry

from .gsplat_backend import rasterize_gsplat
from .projection import project_gaussians
from .sh import sh_colors
from .torch_backend import rasterize_to_pixels_torch

__all__ = ["BACKENDS", "RenderBackend", "select_backend", "get_backend", "project_features", "composite_pipeline"]

BACKENDS = Registry("render backend")


class RenderBackend:
    """One way to render Gaussians; see the module docstring. Shapes: C cameras, N Gaussians.

    project(means [N,3], quats [N,4], scales [N,3], opacities [N], viewmats [C,4,4], Ks [C,3,3], width,
        height, near_plane, far_plane, eps2d, radius_clip) -> radii [C,N,2] int32, means2d [C,N,2],
        depths [C,N], conics [C,N,3] (default: `project_gaussians`, torch).
    colorize(sh_degree, sh [N|C,N,K,3], means [N,3], viewmats [C,4,4]) -> colours [C,N,3]
        (default: `sh_colors`, torch).
    composite(means2d, conics, colors [C,N,D], opacities, depths, radii, width, height, backgrounds [C,D]
        or None, tile_size, pixel_mask [C,H,W] bool or None) -> render [C,H,W,D], alphas [C,H,W,1];
        None for a backend that only rasterizes whole (gsplat).
    frozen_layer / composite_with_layer: None, or as `cpu_layer.frozen_layer` /
        `cpu_layer.composite_with_layers` (they decide in float64).
    """

    composite = None
    frozen_layer = None
    composite_with_layer = None

    def project(self, means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
                radius_clip):
        return project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane,
                                 far_plane, eps2d, radius_clip)

    def colorize(self, sh_degree: int, sh: Tensor, means: Tensor, viewmats: Tensor) -> Tensor:
        return sh_colors(sh_degree, sh, means, viewmats)

    def rasterize(self, *args, **kwargs) -> tuple[Tensor, Tensor, dict]:
        """`rasterize`'s arguments (without `backend`), validated -> (render, alphas, meta)."""
        if self.composite is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither rasterize nor composite")
        return composite_pipeline(self, *args, **kwargs)


class TorchBackend(RenderBackend):
    """Pure PyTorch: any device, float32 or float64, autograd (`rasterize_to_pixels_torch`)."""

    def composite(self, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return rasterize_to_pixels_torch(*args, **kwargs)


class CPUBackend(RenderBackend):
    """The compiled CPU backend: numba projection, SH colours and compositor with their own backward,
    and frozen layers. Its modules are imported on first use (numba compiles then)."""

    def project(self, *args):
        from .cpu_projection import project_gaussians_cpu

        return project_gaussians_cpu(*args)

    def colorize(self, sh_degree, sh, means, viewmats):
        from .cpu_sh import sh_colors_cpu

        return sh_colors_cpu(sh_degree, sh, means, viewmats)

    def composite(self, *args, **kwargs):
        from .cpu_backend import rasterize_to_pixels_cpu

        return rasterize_to_pixels_cpu(*args, **kwargs)

    def frozen_layer(self, *args, **kwargs):
        from .cpu_layer import frozen_layer

        return frozen_layer(*args, **kwargs)

    def composite_with_layer(self, *args, **kwargs):
        from .cpu_layer import composite_with_layers

        return composite_with_layers(*args, **kwargs)


class GsplatBackend(RenderBackend):
    """`gsplat.rasterization` on CUDA float32 tensors: projection and compositing fused in its kernels."""

    def rasterize(self, *args, **kwargs):
        return rasterize_gsplat(*args, **kwargs)


BACKENDS.register("torch")(TorchBackend())
BACKENDS.register("cpu")(CPUBackend())
BACKENDS.register("gsplat")(GsplatBackend())


def select_backend(backend: str, means: Tensor) -> str:
    """Resolve "auto" for `means`: gsplat for float32 CUDA tensors (torch for other CUDA dtypes,
    which gsplat lacks), cpu for CPU tensors, torch elsewhere. Other names are checked against `BACKENDS`."""
    if backend == "auto":
        if means.device.type == "cuda":
            return "gsplat" if means.dtype == torch.float32 else "torch"
        return "cpu" if means.device.type == "cpu" else "torch"
    if backend not in BACKENDS:
        BACKENDS.get_entry(backend)  # loads plugins; raises naming the known backends
    return backend


def get_backend(backend: str, means: Tensor) -> RenderBackend:
    """The `RenderBackend` that `backend` ("auto" or a registered name) means for `means`."""
    return BACKENDS.get_entry(select_backend(backend, means))


def project_features(backend: RenderBackend, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                     colors: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int, *,
                     sh_degree: int | None = None, near_plane: float = 0.01, far_plane: float = 1e10,
                     eps2d: float = 0.3, radius_clip: float = 0.0) -> dict[str, Tensor]:
    """The 2D Gaussians a compositor takes, per camera, by `backend`'s projection and colours
    (arguments as `rasterize`).

    Returns {"radii": [C, N, 2] int32, "means2d": [C, N, 2], "depths": [C, N], "conics": [C, N, 3],
    "opacities": [C, N], "colors": [C, N, D]} (with `sh_degree`, clamp_min(SH(dir) + 0.5, 0)).
    Gaussians are independent here: projecting two sets apart and concatenating them along N
    gives what projecting them together does.
    """
    n_cams, n = viewmats.shape[0], means.shape[0]
    radii, means2d, depths, conics = backend.project(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d, radius_clip
    )
    if sh_degree is None:
        feats = colors if colors.dim() == 3 else colors[None].expand(n_cams, -1, -1)
    else:
        feats = backend.colorize(sh_degree, colors, means, viewmats)
    return {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics,
            "opacities": opacities[None, :].expand(n_cams, n), "colors": feats}


def composite_pipeline(backend: RenderBackend, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                       colors: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int, *,
                       sh_degree: int | None = None, backgrounds: Tensor | None = None, render_mode: str = "RGB",
                       near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
                       radius_clip: float = 0.0, tile_size: int = 16) -> tuple[Tensor, Tensor, dict]:
    """`rasterize` by `backend`'s projection, colours and compositor, with the render modes around them."""
    n_cams = viewmats.shape[0]
    g = project_features(backend, means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                         sh_degree=sh_degree, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
                         radius_clip=radius_clip)
    feats, depths = g["colors"], g["depths"]
    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cams, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depths[..., None]
        if backgrounds is not None:
            backgrounds = means.new_zeros(n_cams, 1)

    render, alphas = backend.composite(g["means2d"], g["conics"], feats, g["opacities"], depths, g["radii"], width,
                                       height, backgrounds, tile_size)
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)
    meta = {"batch_ids": None, "camera_ids": None, "gaussian_ids": None, "radii": g["radii"],
            "means2d": g["means2d"], "depths": depths, "conics": g["conics"], "opacities": g["opacities"],
            "width": width, "height": height, "tile_size": tile_size, "tile_width": -(-width // tile_size),
            "tile_height": -(-height // tile_size), "n_batches": 1, "n_cameras": n_cams}
    return render, alphas, meta
