"""Compositing a differentiable set of Gaussians with a frozen, pre-sorted layer on the CPU.

A part editor renders the same frozen rest of a scene from a few fixed views, step after step, with a
small set of Gaussians that changes. `frozen_layer` prepares one view of the rest once: its kernel
records sorted front to back, its tile and pixel boxes and its render alone. `composite_with_layers`
then composites the set with one layer per camera, exactly as `rasterize_to_pixels_cpu` composites
the two concatenated (layer first, so depth ties go to the layer), but only at the pixels the set can
reach (its radii boxes grown by one pixel) and with only the layer Gaussians whose boxes reach
those pixels: the layer rows need no sorting, packing or gradients, and every other pixel is the
layer's render alone. Same kernels, same float64 arithmetic, so the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit
from torch import Tensor

from .cpu_backend import _assign, _backward, _bin, _clamp_int, _depth_order, _f64, _forward, _np, _prepare

__all__ = ["FrozenLayer", "frozen_layer", "composite_with_layers"]


@dataclass(frozen=True)
class FrozenLayer:
    """One view of frozen Gaussians for `composite_with_layers` (numpy, R kept rows, front to back)."""

    recs: np.ndarray  # [R, _NP] float64 kernel records
    colors: np.ndarray  # [R, D] float64
    depths: np.ndarray  # [R] sort keys, in the dtype of the set's depths
    tiles: np.ndarray  # [R, 4] int32 tile boxes
    boxes: np.ndarray  # [R, 4] int32 pixel boxes
    image: np.ndarray  # [H, W, D] float64: the layer alone over the background

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.recs, self.colors, self.depths, self.tiles, self.boxes, self.image))


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _pixel_boxes(means2d, radii, width, height):
    """[M, 4] int32 pixel boxes (x0, y0, x1, y1), exclusive ends, of [M, 2] means2d and radii: the
    radii box grown by one pixel, which holds every pixel where a Gaussian with opacity <= 1 can
    composite (alpha >= 1/255 lies within the radii box); empty where a radius is <= 0."""
    boxes = np.zeros((means2d.shape[0], 4), np.int32)
    for g in range(means2d.shape[0]):
        if radii[g, 0] > 0 and radii[g, 1] > 0:
            x, y = np.float64(means2d[g, 0]), np.float64(means2d[g, 1])
            rx, ry = radii[g, 0] + 1.0, radii[g, 1] + 1.0
            boxes[g, 0] = _clamp_int(math.floor(x - rx), 0, width)
            boxes[g, 1] = _clamp_int(math.floor(y - ry), 0, height)
            boxes[g, 2] = _clamp_int(math.ceil(x + rx), 0, width)
            boxes[g, 3] = _clamp_int(math.ceil(y + ry), 0, height)
    return boxes


@njit(cache=True)
def _cover(boxes, height, width):
    """[C, H, W] bool: the pixels inside at least one of the [C, M, 4] pixel boxes."""
    n_cams = boxes.shape[0]
    diff = np.zeros((n_cams, height + 1, width + 1), np.int32)
    for c in range(n_cams):
        for g in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[c, g, 0], boxes[c, g, 1], boxes[c, g, 2], boxes[c, g, 3]
            if x1 > x0 and y1 > y0:
                diff[c, y0, x0] += 1
                diff[c, y0, x1] -= 1
                diff[c, y1, x0] -= 1
                diff[c, y1, x1] += 1
    hot = np.empty((n_cams, height, width), np.bool_)
    for c in range(n_cams):
        for i in range(height + 1):
            for j in range(width + 1):
                s = diff[c, i, j]
                if i > 0:
                    s += diff[c, i - 1, j]
                if j > 0:
                    s += diff[c, i, j - 1]
                if i > 0 and j > 0:
                    s -= diff[c, i - 1, j - 1]
                diff[c, i, j] = s
                if i < height and j < width:
                    hot[c, i, j] = s > 0
    return hot


@njit(cache=True)
def _touching(boxes, hot):
    """[K] int64 rows of [R, 4] pixel boxes holding a pixel set in `hot` [H, W], in row order."""
    height, width = hot.shape
    sat = np.zeros((height + 1, width + 1), np.int32)
    for i in range(height):
        for j in range(width):
            sat[i + 1, j + 1] = hot[i, j] + sat[i, j + 1] + sat[i + 1, j] - sat[i, j]
    rows = np.empty(boxes.shape[0], np.int64)
    k = 0
    for r in range(boxes.shape[0]):
        x0, y0, x1, y1 = boxes[r, 0], boxes[r, 1], boxes[r, 2], boxes[r, 3]
        if x1 > x0 and y1 > y0 and sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0] > 0:
            rows[k] = r
            k += 1
    return rows[:k]


@njit(cache=True)
def _merge(l_recs, l_cols, l_tiles, l_depths, picked, s_recs, s_cols, s_tiles, s_depths, s_order, s_base,
           recs, cols, tiles, src, at):
    """Write one camera's rows front to back into recs / cols / tiles / src from row `at` on: the
    `picked` layer rows (already in depth order) merged with the set's rows in `s_order` (those with a
    tile box); a depth tie goes to the layer. src: -1 for a layer row, s_base + i for set row i.
    Returns the row after the last one written."""
    i = j = 0
    n_l, n_s = picked.shape[0], s_order.shape[0]
    while i < n_l or j < n_s:
        if j < n_s:
            g = s_order[j]
            if s_tiles[g, 2] <= s_tiles[g, 0] or s_tiles[g, 3] <= s_tiles[g, 1]:
                j += 1  # culled: composites nowhere
                continue
        if j == n_s or (i < n_l and l_depths[picked[i]] <= s_depths[s_order[j]]):
            _copy_row(l_recs, l_cols, l_tiles, picked[i], recs, cols, tiles, at)
            src[at] = -1
            i += 1
        else:
            _copy_row(s_recs, s_cols, s_tiles, s_order[j], recs, cols, tiles, at)
            src[at] = s_base + s_order[j]
            j += 1
        at += 1
    return at


@njit(cache=True, inline="always")
def _copy_row(a_recs, a_cols, a_tiles, r, recs, cols, tiles, at):
    for k in range(a_recs.shape[1]):
        recs[at, k] = a_recs[r, k]
    for k in range(a_cols.shape[1]):
        cols[at, k] = a_cols[r, k]
    for k in range(4):
        tiles[at, k] = a_tiles[r, k]


@njit(cache=True)
def _set_grads(grads, src, n_rows):
    """[n_rows, G] sums over workers of the [W, M, G] gradients of the rows with src >= 0."""
    out = np.zeros((n_rows, grads.shape[2]))
    for w in range(grads.shape[0]):
        for m in range(grads.shape[1]):
            if src[m] >= 0:
                for k in range(grads.shape[2]):
                    out[src[m], k] += grads[w, m, k]
    return out


# --------------------------------------------------------------------------- host side


@torch.no_grad()
def frozen_layer(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor,
                 image: Tensor, keep: Tensor | None = None, tile_size: int = 16) -> FrozenLayer:
    """One camera's projected Gaussians (means2d [N,2], conics [N,3], colors [N,D], opacities [N],
    depths [N], radii [N,2]; the outputs of a projection without the camera axis) as a layer.
    image: [H, W, D] their render alone (with the background the composite will use). keep: [N] bool
    or None (all): Gaussians to keep (drop only those that neither composite into nor end any pixel
    of `image`: such a Gaussian does neither with more Gaussians in front or behind)."""
    height, width = image.shape[:2]
    rows = (radii > 0).all(-1) if keep is None else keep & (radii > 0).all(-1)
    idx = rows.nonzero()[:, 0].numpy()
    idx = idx[_depth_order(_np(depths)[idx][None])[0]]
    xy, rad = _np(means2d)[idx], radii.cpu().numpy()[idx]
    recs, tiles = _prepare(xy, _np(conics)[idx], _np(opacities)[idx], rad.astype(xy.dtype),
                           xy.dtype.type(tile_size), -(-width // tile_size), -(-height // tile_size))
    return FrozenLayer(recs, _f64(colors)[idx], _np(depths)[idx], tiles, _pixel_boxes(xy, rad, width, height),
                       _f64(image))


class _CompositeWithLayers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, depths, radii, layers, backgrounds, tile_size):
        n_cams, n, dim = colors.shape
        height, width = layers[0].image.shape[:2]
        tiles_w, tiles_h = -(-width // tile_size), -(-height // tile_size)
        n_tiles = tiles_w * tiles_h
        xy, rad = _np(means2d), radii.cpu().numpy()
        s_recs, s_tiles = _prepare(xy.reshape(-1, 2), _np(conics).reshape(-1, 3), _np(opacities).reshape(-1),
                                   rad.reshape(-1, 2).astype(xy.dtype), xy.dtype.type(tile_size), tiles_w, tiles_h)
        s_cols = _f64(colors).reshape(-1, dim)
        s_depths = _np(depths)
        order = _depth_order(s_depths)
        boxes = np.stack([_pixel_boxes(xy[c], rad[c], width, height) for c in range(n_cams)])
        hot = _cover(boxes, height, width)
        picked = [_touching(layers[c].boxes, hot[c]) for c in range(n_cams)]
        size = sum(len(p) for p in picked) + n_cams * n
        recs, cols = np.empty((size, s_recs.shape[1])), np.empty((size, dim))
        tiles, src = np.empty((size, 4), np.int32), np.empty(size, np.int64)
        starts = np.zeros(n_cams + 1, np.int64)  # camera c's rows: starts[c]:starts[c + 1], front to back
        for c, lay in enumerate(layers):
            starts[c + 1] = _merge(lay.recs, lay.colors, lay.tiles, lay.depths, picked[c], s_recs[c * n:(c + 1) * n],
                                   s_cols[c * n:(c + 1) * n], s_tiles[c * n:(c + 1) * n], s_depths[c], order[c],
                                   c * n, recs, cols, tiles, src, starts[c])
        total = int(starts[-1])
        recs, cols, tiles, src = recs[:total], cols[:total], tiles[:total], src[:total]
        offsets, ids = _bin(tiles, np.arange(total), starts, tiles_w, n_tiles)
        work, ptr = _assign(offsets, max(1, numba.get_num_threads()))
        bgs = _f64(backgrounds).reshape(n_cams, dim)
        binned = (recs, cols, bgs, offsets, ids, work, ptr, height, width, tile_size, tiles_w, n_tiles, hot)
        render = np.empty((n_cams, height, width, dim))
        trans = np.empty((n_cams, height, width))
        last = np.empty((n_cams, height, width), np.int32)
        _forward(*binned, render, trans, last)
        for c, lay in enumerate(layers):
            np.copyto(render[c], lay.image, where=~hot[c][..., None])
        ctx.binned, ctx.trans, ctx.last, ctx.src, ctx.n_rows = binned, trans, last, src, n_cams * n
        ctx.like = [(t.dtype, t.device) for t in (means2d, conics, colors, opacities)]
        return torch.from_numpy(render).to(colors.device, colors.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_render):
        binned, trans = ctx.binned, ctx.trans
        n_cams = trans.shape[0]
        dim = binned[1].shape[1]
        grads = np.zeros((binned[6].shape[0] - 1, binned[0].shape[0], 6 + dim))
        _backward(*binned, trans, ctx.last, _f64(v_render), np.zeros_like(trans), grads)
        g = torch.from_numpy(_set_grads(grads, ctx.src, ctx.n_rows)).reshape(n_cams, -1, 6 + dim)
        out = [g[..., 0:2], g[..., 2:5], g[..., 6:], g[..., 5]]
        out = [t.to(device, dtype) for t, (dtype, device) in zip(out, ctx.like)]
        return (*out, None, None, None, None, None)


def composite_with_layers(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor,
                          radii: Tensor, layers: list[FrozenLayer], backgrounds: Tensor,
                          tile_size: int = 16) -> Tensor:
    """Composite projected Gaussians (as `rasterize_to_pixels_cpu`: means2d [C,N,2], conics [C,N,3],
    colors [C,N,D], opacities [C,N] at most 1, depths [C,N], radii [C,N,2]) with `layers[c]` behind
    and in front in camera c, over backgrounds [C,D] (those the layers' images were rendered with).

    Returns render [C,H,W,D], differentiable w.r.t. means2d, conics, colors and opacities.
    """
    n_cams, n, dim = colors.shape
    if len(layers) != n_cams or means2d.shape != (n_cams, n, 2) or radii.shape != (n_cams, n, 2):
        raise ValueError(f"need one layer per camera and [C, N, ...] inputs: {len(layers)} layers, means2d "
                         f"{tuple(means2d.shape)}, radii {tuple(radii.shape)}, colors {tuple(colors.shape)}")
    if any(lay.image.shape != layers[0].image.shape or lay.colors.shape[1] != dim for lay in layers):
        raise ValueError("layers must share one image size and the feature size D of colors")
    return _CompositeWithLayers.apply(means2d, conics, colors, opacities, depths, radii, list(layers),
                                      backgrounds.detach(), int(tile_size))
