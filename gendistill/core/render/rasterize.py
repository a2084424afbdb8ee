"""`rasterize()`: one signature for every backend ("gsplat" on CUDA, "cpu" compiled, "torch" anywhere).

A backend entry in `BACKENDS` takes `rasterize`'s arguments (without `backend`) and returns
(render, alphas, meta). "torch" and "cpu" share the projection / colour / render-mode pipeline
here and differ only in their compositor (`rasterize_to_pixels_torch` / `_cpu`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from gendistill.registry import Registry

from .gsplat_backend import rasterize_gsplat
from .projection import project_gaussians
from .sh import num_sh_bases, sh_colors
from .torch_backend import rasterize_to_pixels_torch

BACKENDS = Registry("render backend")
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")

Compositor = Callable[..., tuple[Tensor, Tensor]]


def rasterize(
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
    backend: str = "auto",
    radius_clip: float = 0.0,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict]:
    """Render N 3D Gaussians into C pinhole cameras, as `gsplat.rasterization` (classic, unpacked).

    Args:
        means: [N, 3] world positions. quats: [N, 4] wxyz (normalized inside).
        scales: [N, 3] and opacities: [N], both already activated.
        colors: [N, D] or [C, N, D] features (any D); with `sh_degree`, [N, K, 3] or [C, N, K, 3]
            SH coefficients, K >= (sh_degree + 1)^2, turned into clamp_min(SH(dir) + 0.5, 0) with
            dir = mean - camera centre.
        viewmats: [C, 4, 4] world-to-camera (OpenCV). Ks: [C, 3, 3]. width, height: pixels.
        backgrounds: [C, D] (or [D]) colour behind the Gaussians; the depth channel gets 0.
        render_mode: "RGB", "D" (accumulated depth), "ED" (depth / alpha), "RGB+D", "RGB+ED";
            depth modes append (or are) one channel.
        near_plane, far_plane: depth range kept. eps2d: 2D dilation on the covariance diagonal.
        backend: "auto" (gsplat for float32 CUDA tensors, cpu for CPU tensors, torch otherwise) or
            a name in `BACKENDS`.
        radius_clip: Gaussians whose both pixel radii are <= this are culled. tile_size: pixels.
    Returns:
        render [C, H, W, D'], alphas [C, H, W, 1], meta with radii [C, N, 2] int32, means2d
        [C, N, 2] (the graph tensor: `meta["means2d"].retain_grad()` works), depths [C, N], conics
        [C, N, 3], opacities [C, N], width, height, n_cameras, n_batches, tile_size, tile_width,
        tile_height, and gaussian_ids / camera_ids / batch_ids None (unpacked).
    """
    n_cams, _ = _validate(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                          backgrounds, render_mode)  # fmt: skip
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0:
        raise ValueError(f"rasterize: tile_size must be a positive int, got {tile_size!r}")
    if backgrounds is not None and backgrounds.dim() == 1:
        backgrounds = backgrounds.expand(n_cams, -1)
    name = select_backend(backend, means)
    fn = BACKENDS.get_entry(name)
    return fn(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode, near_plane=near_plane,
        far_plane=far_plane, eps2d=eps2d, radius_clip=radius_clip, tile_size=tile_size,
    )  # fmt: skip


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


def project_features(
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
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    project: Callable = project_gaussians,
    colorize: Callable = sh_colors,
) -> dict[str, Tensor]:
    """The 2D Gaussians a compositor takes, per camera (arguments as `rasterize`; `project` is the
    projection, `projector(backend)`, and `colorize` the SH colours, `colorizer(backend)`).

    Returns {"radii": [C, N, 2] int32, "means2d": [C, N, 2], "depths": [C, N], "conics": [C, N, 3],
    "opacities": [C, N], "colors": [C, N, D]} (with `sh_degree`, clamp_min(SH(dir) + 0.5, 0)).
    Gaussians are independent here: projecting two sets apart and concatenating them along N
    gives what projecting them together does.
    """
    n_cams, n = viewmats.shape[0], means.shape[0]
    radii, means2d, depths, conics = project(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d, radius_clip
    )
    if sh_degree is None:
        feats = colors if colors.dim() == 3 else colors[None].expand(n_cams, -1, -1)
    else:
        feats = colorize(sh_degree, colors, means, viewmats)
    return {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics,
            "opacities": opacities[None, :].expand(n_cams, n), "colors": feats}


def compositor(backend: str) -> Compositor | None:
    """The `rasterize_to_pixels_*` function of a backend name ("cpu", "torch"); None for "gsplat",
    whose kernels fuse projection and compositing."""
    if backend == "torch":
        return rasterize_to_pixels_torch
    if backend == "cpu":
        from .cpu_backend import rasterize_to_pixels_cpu  # lazy: numba compiles on first use

        return rasterize_to_pixels_cpu
    return None


def colorizer(backend: str) -> Callable:
    """The SH colours (`sh_colors`' signature) of a backend name: compiled for "cpu", torch otherwise."""
    if backend == "cpu":
        from .cpu_sh import sh_colors_cpu  # lazy: numba compiles on first use

        return sh_colors_cpu
    return sh_colors


def projector(backend: str) -> Callable:
    """The projection of a backend name: compiled for "cpu", `project_gaussians` (torch) otherwise."""
    if backend == "cpu":
        from .cpu_projection import project_gaussians_cpu  # lazy: numba compiles on first use

        return project_gaussians_cpu
    return project_gaussians


def composite_pipeline(
    compositor: Compositor,
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
    project: Callable = project_gaussians,
    colorize: Callable = sh_colors,
) -> tuple[Tensor, Tensor, dict]:
    """Projection (`project`), colours and render mode around `compositor` (a `rasterize_to_pixels_*`
    function)."""
    n_cams = viewmats.shape[0]
    g = project_features(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=sh_degree,
                         near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, radius_clip=radius_clip,
                         project=project, colorize=colorize)
    radii, means2d, depths, conics, feats = g["radii"], g["means2d"], g["depths"], g["conics"], g["colors"]
    opacities_c = g["opacities"]

    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cams, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depths[..., None]
        if backgrounds is not None:
            backgrounds = means.new_zeros(n_cams, 1)

    render, alphas = compositor(
        means2d, conics, feats, opacities_c, depths, radii, width, height, backgrounds, tile_size
    )
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)

    tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
    meta = {
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities_c,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "tile_width": tiles_x,
        "tile_height": tiles_y,
        "n_batches": 1,
        "n_cameras": n_cams,
    }
    return render, alphas, meta


@BACKENDS.register("torch")
def rasterize_torch(*args, **kwargs) -> tuple[Tensor, Tensor, dict]:
    """The pure-PyTorch backend: any device, float32 or float64, autograd."""
    return composite_pipeline(rasterize_to_pixels_torch, *args, **kwargs)


@BACKENDS.register("cpu")
def rasterize_cpu(*args, **kwargs) -> tuple[Tensor, Tensor, dict]:
    """The compiled CPU backend (numba compositor with its own backward)."""
    return composite_pipeline(compositor("cpu"), *args, project=projector("cpu"), colorize=colorizer("cpu"),
                              **kwargs)


BACKENDS.register("gsplat")(rasterize_gsplat)


def _shape_error(name: str, expected: str, t) -> ValueError:
    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    return ValueError(f"rasterize: {name} must be {expected}, got {got}")


def _validate(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
              render_mode) -> tuple[int, int]:  # fmt: skip
    """Check shapes, dtypes and devices; return (C, N). Raises ValueError naming the argument."""
    if not isinstance(means, Tensor) or means.dim() != 2 or means.shape[-1] != 3:
        raise _shape_error("means", "a [N, 3] tensor", means)
    n = means.shape[0]
    if not isinstance(viewmats, Tensor) or viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise _shape_error("viewmats", "a [C, 4, 4] tensor", viewmats)
    n_cams = viewmats.shape[0]
    if n_cams == 0:
        raise ValueError("rasterize: viewmats must hold at least one camera, got [0, 4, 4]")
    expect = {
        "quats": (quats, (n, 4), f"[N, 4] = [{n}, 4]"),
        "scales": (scales, (n, 3), f"[N, 3] = [{n}, 3]"),
        "opacities": (opacities, (n,), f"[N] = [{n}]"),
        "Ks": (Ks, (n_cams, 3, 3), f"[C, 3, 3] = [{n_cams}, 3, 3]"),
    }
    for name, (t, shape, text) in expect.items():
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise _shape_error(name, text, t)
    if not isinstance(colors, Tensor):
        raise _shape_error("colors", "a tensor", colors)
    if sh_degree is None:
        ok = (colors.dim() == 2 and colors.shape[0] == n) or (colors.dim() == 3 and colors.shape[:2] == (n_cams, n))
        if not ok or colors.shape[-1] == 0:
            raise _shape_error(
                "colors", f"[N, D] or [C, N, D] features with N={n}, C={n_cams} (pass sh_degree for SH)", colors
            )
    else:
        if sh_degree not in (0, 1, 2, 3):
            raise ValueError(f"rasterize: sh_degree must be None or 0..3, got {sh_degree!r}")
        ok = (colors.dim() == 3 and colors.shape[0] == n) or (colors.dim() == 4 and colors.shape[:2] == (n_cams, n))
        if not ok or colors.shape[-1] != 3:
            raise _shape_error("colors", f"[N, K, 3] or [C, N, K, 3] SH coefficients with N={n}", colors)
        if colors.shape[-2] < num_sh_bases(sh_degree):
            raise ValueError(
                f"rasterize: sh_degree={sh_degree} needs K >= {num_sh_bases(sh_degree)} coefficients, "
                f"colors has K={colors.shape[-2]}"
            )
    if render_mode not in RENDER_MODES:
        raise ValueError(f"rasterize: render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"rasterize: {name} must be a positive int, got {v!r}")
    n_channels = 3 if sh_degree is not None else colors.shape[-1]
    if backgrounds is not None:
        ok = isinstance(backgrounds, Tensor) and (
            tuple(backgrounds.shape) in ((n_cams, n_channels), (n_channels,))
            or (render_mode in ("D", "ED") and backgrounds.dim() == 2 and backgrounds.shape[0] == n_cams)
        )
        if not ok:
            raise _shape_error("backgrounds", f"[C, D] = [{n_cams}, {n_channels}] (or [D])", backgrounds)
    floats = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
              "viewmats": viewmats, "Ks": Ks}  # fmt: skip
    if backgrounds is not None:
        floats["backgrounds"] = backgrounds
    for name, t in floats.items():
        if not t.is_floating_point():
            raise ValueError(f"rasterize: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != means.dtype or t.device != means.device:
            raise ValueError(
                f"rasterize: {name} is {t.dtype} on {t.device} but means is {means.dtype} on {means.device}; "
                "all tensors must share one dtype and device"
            )
    return n_cams, n
