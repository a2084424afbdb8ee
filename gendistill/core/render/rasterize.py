"""`rasterize()`: one signature for every render backend (`backends.BACKENDS`: "gsplat" on CUDA, "cpu"
compiled, "torch" anywhere, and any a plugin registers), validated here, dispatched to the backend object.
"""

from __future__ import annotations

from torch import Tensor

from .backends import get_backend
from .sh import num_sh_bases

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")


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
    return get_backend(backend, means).rasterize(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode, near_plane=near_plane,
        far_plane=far_plane, eps2d=eps2d, radius_clip=radius_clip, tile_size=tile_size,
    )  # fmt: skip


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
