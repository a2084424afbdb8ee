"""Brute-force float64 oracle for `gendistill.core.render.rasterize` (small images only).

Written independently of the package (NumPy, one Gaussian and one camera at a time): its own
projection, and every Gaussian tested against every pixel with gsplat 1.5's tile-coverage rule,
composited front to back sequentially. Importable by other tests:

    from render_reference import reference_rasterize, reference_project
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gsplat.cuda._torch_impl import _spherical_harmonics  # gsplat's pure-torch SH: an oracle outside our code

ALPHA_MIN = 1.0 / 255.0


def _rotation(q: np.ndarray) -> np.ndarray:
    """wxyz quaternion (any norm) -> 3x3 rotation."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
        ]
    )


def reference_project(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane=0.01,
                      far_plane=1e10, eps2d=0.3, radius_clip=0.0):  # fmt: skip
    """Per camera, per Gaussian: dict arrays radii [C,N,2] int, means2d [C,N,2], depths [C,N], conics [C,N,3].

    Culled entries have radii 0 and zeros elsewhere. Inputs are anything np.asarray takes.
    """
    means, quats, scales = (np.asarray(a, np.float64) for a in (means, quats, scales))
    opacities, viewmats, Ks = (np.asarray(a, np.float64) for a in (opacities, viewmats, Ks))
    n_cams, n = viewmats.shape[0], means.shape[0]
    radii = np.zeros((n_cams, n, 2), np.int64)
    means2d = np.zeros((n_cams, n, 2))
    depths = np.zeros((n_cams, n))
    conics = np.zeros((n_cams, n, 3))
    for ci in range(n_cams):
        rot, trans = viewmats[ci, :3, :3], viewmats[ci, :3, 3]
        fx, fy, cx, cy = Ks[ci, 0, 0], Ks[ci, 1, 1], Ks[ci, 0, 2], Ks[ci, 1, 2]
        for gi in range(n):
            p = rot @ means[gi] + trans
            if not near_plane <= p[2] <= far_plane:
                continue
            m = _rotation(quats[gi]) @ np.diag(scales[gi])
            cov_cam = rot @ (m @ m.T) @ rot.T
            # Jacobian of (fx x/z + cx, fy y/z + cy), evaluated at x/z, y/z clamped to 1.3x the FOV
            u = np.clip(p[0] / p[2], -(cx / fx + 0.15 * width / fx), (width - cx) / fx + 0.15 * width / fx)
            v = np.clip(p[1] / p[2], -(cy / fy + 0.15 * height / fy), (height - cy) / fy + 0.15 * height / fy)
            jac = np.array([[fx / p[2], 0.0, -fx * u / p[2]], [0.0, fy / p[2], -fy * v / p[2]]])
            cov2 = jac @ cov_cam @ jac.T + eps2d * np.eye(2)
            if np.linalg.det(cov2) <= 0:
                continue
            if opacities[gi] < ALPHA_MIN:
                continue
            k = min(3.33, math.sqrt(2.0 * math.log(opacities[gi] * 255.0)))
            r = np.ceil(k * np.sqrt(np.diag(cov2)))
            if r[0] <= radius_clip and r[1] <= radius_clip:
                continue
            mu = np.array([fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy])
            if mu[0] + r[0] <= 0 or mu[0] - r[0] >= width or mu[1] + r[1] <= 0 or mu[1] - r[1] >= height:
                continue
            inv = np.linalg.inv(cov2)
            radii[ci, gi] = r
            means2d[ci, gi] = mu
            depths[ci, gi] = p[2]
            conics[ci, gi] = inv[0, 0], inv[0, 1], inv[1, 1]
    return {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics}


def reference_composite(means2d, conics, colors, opacities, depths, radii, width, height, backgrounds=None,
                        tile_size=16, stats=None):  # fmt: skip
    """Sequential front-to-back compositing of every Gaussian over every pixel of its tiles.

    Args: arrays shaped as `rasterize_to_pixels_torch`'s ([C,N,2], [C,N,3], [C,N,D], [C,N], [C,N], [C,N,2]);
        stats: optional dict, gets counts "ended_pixels", "capped_fragments", "skipped_fragments"; with
        "values" [C,H,W,V] in it also "counts" [C,N] (pixels each Gaussian composites into), "ends"
        [C,N] (pixels it ends) and "sums" [C,N,V] (of the values over the composited pixels).
    Returns: render [C,H,W,D], alphas [C,H,W,1] as float64 arrays.
    """
    stats = {} if stats is None else stats
    for key in ("ended_pixels", "capped_fragments", "skipped_fragments"):
        stats.setdefault(key, 0)
    n_cams, n, d = np.shape(colors)
    render = np.zeros((n_cams, height, width, d))
    values = stats.get("values")
    if values is not None:
        stats["counts"] = np.zeros((n_cams, n))
        stats["ends"] = np.zeros((n_cams, n))
        stats["sums"] = np.zeros((n_cams, n, values.shape[-1]))
    alphas = np.zeros((n_cams, height, width, 1))
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))  # [H, W]
    px, py = cols + 0.5, rows + 0.5
    tile_x, tile_y = cols // tile_size, rows // tile_size
    n_tx, n_ty = math.ceil(width / tile_size), math.ceil(height / tile_size)
    for ci in range(n_cams):
        trans = np.ones((height, width))
        finished = np.zeros((height, width), bool)
        acc = np.zeros((height, width, d))
        for gi in np.argsort(np.asarray(depths[ci]), kind="stable"):
            rx, ry = radii[ci][gi]
            if rx <= 0 or ry <= 0:
                continue
            x, y = means2d[ci][gi]
            tx0 = min(max(math.floor(x / tile_size - rx / tile_size), 0), n_tx)
            tx1 = min(max(math.ceil(x / tile_size + rx / tile_size), 0), n_tx)
            ty0 = min(max(math.floor(y / tile_size - ry / tile_size), 0), n_ty)
            ty1 = min(max(math.ceil(y / tile_size + ry / tile_size), 0), n_ty)
            covered = (tile_x >= tx0) & (tile_x < tx1) & (tile_y >= ty0) & (tile_y < ty1) & ~finished
            a, b, c = conics[ci][gi]
            dx, dy = x - px, y - py
            sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
            with np.errstate(over="ignore"):
                raw = opacities[ci][gi] * np.exp(-sigma)
            alpha = np.minimum(0.999, raw)
            hit = covered & (sigma >= 0) & (alpha >= ALPHA_MIN)
            stats["capped_fragments"] += int((hit & (raw > 0.999)).sum())
            stats["skipped_fragments"] += int((covered & ~hit).sum())
            next_t = trans * (1.0 - alpha)
            stop = hit & (next_t <= 1e-4)
            finished |= stop
            stats["ended_pixels"] += int(stop.sum())
            hit &= ~stop
            if values is not None:
                stats["counts"][ci, gi] = hit.sum()
                stats["ends"][ci, gi] = stop.sum()
                stats["sums"][ci, gi] = values[ci][hit].sum(0)
            acc[hit] += (alpha[hit] * trans[hit])[:, None] * np.asarray(colors[ci][gi])[None, :]
            trans = np.where(hit, next_t, trans)
        if backgrounds is not None:
            acc = acc + trans[..., None] * np.asarray(backgrounds[ci])[None, None, :]
        render[ci], alphas[ci, ..., 0] = acc, 1.0 - trans
    return render, alphas


def reference_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None,
                        backgrounds=None, render_mode="RGB", near_plane=0.01, far_plane=1e10, eps2d=0.3,
                        radius_clip=0.0, tile_size=16, stats=None):  # fmt: skip
    """The full pipeline of `rasterize` (projection, SH colours, render modes) in float64 NumPy.

    `stats`: optional dict filled by `reference_composite`.

    Returns render [C,H,W,D'], alphas [C,H,W,1] (float64 arrays) and the projection dict.
    """
    to_np = lambda t: t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, float)  # noqa: E731
    means_np, viewmats_np = to_np(means), to_np(viewmats)
    proj = reference_project(means_np, to_np(quats), to_np(scales), to_np(opacities), viewmats_np, to_np(Ks),
                             width, height, near_plane, far_plane, eps2d, radius_clip)  # fmt: skip
    n_cams, n = viewmats_np.shape[0], means_np.shape[0]
    colors_np = to_np(colors)
    if sh_degree is None:
        feats = colors_np if colors_np.ndim == 3 else np.broadcast_to(colors_np, (n_cams,) + colors_np.shape)
    else:
        feats = np.zeros((n_cams, n, 3))
        for ci in range(n_cams):
            rot, trans = viewmats_np[ci, :3, :3], viewmats_np[ci, :3, 3]
            centre = -rot.T @ trans
            coeffs = colors_np[ci] if colors_np.ndim == 4 else colors_np
            sh = _spherical_harmonics(sh_degree, torch.from_numpy(means_np - centre[None]),
                                      torch.from_numpy(np.ascontiguousarray(coeffs))).numpy()  # fmt: skip
            feats[ci] = np.maximum(sh + 0.5, 0.0)
    bg = None if backgrounds is None else np.broadcast_to(to_np(backgrounds), (n_cams, feats.shape[-1]))
    depth = proj["depths"][..., None]
    if render_mode in ("RGB+D", "RGB+ED"):
        feats = np.concatenate([feats, depth], -1)
        bg = None if bg is None else np.concatenate([bg, np.zeros((n_cams, 1))], -1)
    elif render_mode in ("D", "ED"):
        feats = depth
        bg = None if bg is None else np.zeros((n_cams, 1))
    opac = np.broadcast_to(to_np(opacities), (n_cams, n))
    render, alphas = reference_composite(proj["means2d"], proj["conics"], feats, opac, proj["depths"],
                                         proj["radii"], width, height, bg, tile_size, stats)  # fmt: skip
    if render_mode in ("ED", "RGB+ED"):
        render[..., -1:] = render[..., -1:] / np.maximum(alphas, 1e-10)
    return render, alphas, proj
