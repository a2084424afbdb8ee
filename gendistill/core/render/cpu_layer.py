"""Compositing a differentiable set of Gaussians with a frozen, pre-sorted layer on the CPU.

A part editor renders the same frozen rest of a scene from a few fixed views, step after step, with a
small set of Gaussians that changes. `frozen_layer` prepares one view of the rest once: its kernel
records sorted front to back, their tile boxes, the pixel boxes where each can draw and its render
alone. `composite_with_layers` then composites the set with one layer per camera, exactly as
`rasterize_to_pixels_cpu` composites the two concatenated (layer first, so depth ties go to the
layer), but only at the pixels the set can draw into and with only the layer Gaussians that can draw
into those pixels (both from the boxes of the kernels' own row and column spans of the ellipses):
the layer rows need no sorting, packing or gradients, and every other pixel is the layer's render
alone. Same kernels, same float64 arithmetic, so the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from numba import njit
from torch import Tensor

from .cpu_backend import _assign, _backward_sums, _depth_order, _f64, _forward, _np, _prepare, _span

__all__ = ["FrozenLayer", "frozen_layer", "composite_with_layers"]


@dataclass(frozen=True)
class FrozenLayer:
    """One view of frozen Gaussians for `composite_with_layers` (numpy, R kept rows, front to back)."""

    recs: np.ndarray  # [R, _NP] float64 kernel records
    colors: np.ndarray  # [R, D] float64
    depths: np.ndarray  # [R] sort keys, in the dtype of the set's depths
    tiles: np.ndarray  # [R, 4] int32 tile boxes
    boxes: np.ndarray  # [R, 4] int32 pixel boxes where each row can draw (`_draw_boxes`)
    image: np.ndarray  # [H, W, D] float64: the layer alone over the background
    set_order: dict = field(default_factory=dict, compare=False)  # N -> last depth order of an N-row set here

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.recs, self.colors, self.depths, self.tiles, self.boxes, self.image))


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _draw_boxes(recs, tiles, tile_size, width, height):
    """[M, 4] int32 pixel boxes (x0, y0, x1, y1), exclusive ends, of the kernels' [M, _NP] records and
    [M, 4] tile boxes: the pixels inside the tile box and the ellipse's row and column `_span`s, which
    hold every pixel where the exact test can pass (with margins); empty where a row draws nothing."""
    boxes = np.zeros((recs.shape[0], 4), np.int32)
    for r in range(recs.shape[0]):
        if recs[r, 6] < 0.0 or tiles[r, 2] <= tiles[r, 0] or tiles[r, 3] <= tiles[r, 1]:
            continue
        i0, i1 = _span(recs[r], 1, tiles[r, 1] * tile_size, min(tiles[r, 3] * tile_size, height))
        j0, j1 = _span(recs[r], 0, tiles[r, 0] * tile_size, min(tiles[r, 2] * tile_size, width))
        if i1 > i0 and j1 > j0:
            boxes[r, 0], boxes[r, 1], boxes[r, 2], boxes[r, 3] = j0, i0, j1, i1
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
                if i > 0:
                    diff[c, i, j] += diff[c, i - 1, j]
                if j > 0:
                    diff[c, i, j] += diff[c, i, j - 1]
                if i > 0 and j > 0:
                    diff[c, i, j] -= diff[c, i - 1, j - 1]
                if i < height and j < width:
                    hot[c, i, j] = diff[c, i, j] > 0
    return hot


@njit(cache=True)
def _is_order(depths, order):
    """Whether `order` lists `depths` front to back with ties by index (is their stable argsort)."""
    for i in range(1, order.shape[0]):
        a, b = depths[order[i - 1]], depths[order[i]]
        if not (a < b or (a == b and order[i - 1] < order[i])):
            return False
    return True


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


@njit(cache=True, inline="always")
def _count(tiles, r, tiles_w, offsets):
    """Add row r's tile box to the per-tile counts offsets[t + 1]."""
    for ty in range(tiles[r, 1], tiles[r, 3]):
        for tx in range(tiles[r, 0], tiles[r, 2]):
            offsets[ty * tiles_w + tx + 1] += 1


@njit(cache=True)
def _merge_bin(l_tiles, l_depths, picked, s_tiles, s_depths, s_order, tiles_w, n_tiles):
    """One camera's per-tile lists, front to back, of the `picked` layer rows (in depth order already)
    merged with the set's rows in `s_order`; a depth tie goes to the layer (it comes first). Layer
    row r is listed as r, set row i as len(l_tiles) + i.
    Returns offsets [n_tiles + 1] int64 and ids [n_isects] int32."""
    n_l, n_p, n_s = l_tiles.shape[0], picked.shape[0], s_order.shape[0]
    offsets = np.zeros(n_tiles + 1, np.int64)
    for i in range(n_p):
        _count(l_tiles, picked[i], tiles_w, offsets)
    for j in range(n_s):
        _count(s_tiles, j, tiles_w, offsets)
    for t in range(n_tiles):
        offsets[t + 1] += offsets[t]
    ids = np.empty(offsets[-1], np.int32)
    cursor = offsets[:-1].copy()
    i = j = 0
    while i < n_p or j < n_s:
        if j == n_s or (i < n_p and l_depths[picked[i]] <= s_depths[s_order[j]]):
            r = picked[i]
            row, x0, y0, x1, y1 = r, l_tiles[r, 0], l_tiles[r, 1], l_tiles[r, 2], l_tiles[r, 3]
            i += 1
        else:
            r = s_order[j]
            row, x0, y0, x1, y1 = n_l + r, s_tiles[r, 0], s_tiles[r, 1], s_tiles[r, 2], s_tiles[r, 3]
            j += 1
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                t = ty * tiles_w + tx
                ids[cursor[t]] = row
                cursor[t] += 1
    return offsets, ids


# --------------------------------------------------------------------------- host side


@torch.no_grad()
def frozen_layer(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor,
                 image: Tensor, keep: Tensor | None = None, tile_size: int = 16) -> FrozenLayer:
    """One camera's projected Gaussians (means2d [N,2], conics [N,3], colors [N,D], opacities [N],
    depths [N], radii [N,2]: a projection's outputs without the camera axis) as a layer.
    image: [H, W, D] their render alone (with the background the composite will use). keep: [N] bool
    or None (all): Gaussians to keep (drop only those that neither composite into nor end any pixel
    of `image`: such a Gaussian does neither with more Gaussians in front or behind)."""
    height, width = image.shape[:2]
    rows = (radii > 0).all(-1) if keep is None else keep & (radii > 0).all(-1)
    idx = rows.nonzero()[:, 0].numpy()
    idx = idx[_depth_order(_np(depths)[idx][None])[0]]
    xy = _np(means2d)[idx]
    recs, tiles = _prepare(xy, _np(conics)[idx], _np(opacities)[idx], radii.cpu().numpy()[idx].astype(xy.dtype),
                           xy.dtype.type(tile_size), -(-width // tile_size), -(-height // tile_size))
    boxes = _draw_boxes(recs, tiles, tile_size, width, height)
    return FrozenLayer(recs, _f64(colors)[idx], _np(depths)[idx], tiles, boxes, _f64(image))


class _CompositeWithLayers(torch.autograd.Function):
    """Per camera: the set's rows merged into the layer's tile lists; the kernels read the layer's rows
    where they are and compute no gradient for them."""

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
        order = np.empty((n_cams, n), np.int64)
        for c, lay in enumerate(layers):  # a set that stays put keeps its order in a view: check it, O(N)
            hint = lay.set_order.get(n)
            if hint is None or not _is_order(s_depths[c], hint):
                hint = lay.set_order[n] = _depth_order(s_depths[c:c + 1])[0]
            order[c] = hint
        hot = _cover(_draw_boxes(s_recs, s_tiles, tile_size, width, height).reshape(n_cams, n, 4), height, width)
        bgs = _f64(backgrounds).reshape(n_cams, dim)
        render = np.empty((n_cams, height, width, dim))
        trans = np.empty((n_cams, height, width))
        last = np.empty((n_cams, height, width), np.int32)
        ctx.binned = []
        for c, lay in enumerate(layers):
            rows = slice(c * n, (c + 1) * n)
            offsets, ids = _merge_bin(lay.tiles, lay.depths, _touching(lay.boxes, hot[c]), s_tiles[rows],
                                      s_depths[c], order[c], tiles_w, n_tiles)
            work, ptr = _assign(offsets, max(1, numba.get_num_threads()))
            binned = (lay.recs, lay.colors, s_recs[rows], s_cols[rows], bgs[c:c + 1], offsets, ids, work, ptr, height,
                      width, tile_size, tiles_w, n_tiles, hot[c:c + 1])
            _forward(*binned, render[c:c + 1], trans[c:c + 1], last[c:c + 1])
            np.copyto(render[c], lay.image, where=~hot[c][..., None])
            ctx.binned.append(binned)
        ctx.trans, ctx.last = trans, last
        ctx.like = [(t.dtype, t.device) for t in (means2d, conics, colors, opacities)]
        return torch.from_numpy(render).to(colors.device, colors.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_render):
        v_r = _f64(v_render)
        n_cams, dim = v_r.shape[0], v_r.shape[-1]
        n = ctx.binned[0][2].shape[0]
        g = np.zeros((n_cams, n, 6 + dim))
        rows = np.arange(n)
        for c, binned in enumerate(ctx.binned):
            cam = slice(c, c + 1)
            _backward_sums(binned, ctx.trans[cam], ctx.last[cam], v_r[cam], np.zeros_like(ctx.trans[cam]),
                           binned[0].shape[0], rows, g[c])
        g = torch.from_numpy(g)
        out = [g[..., 0:2], g[..., 2:5], g[..., 6:], g[..., 5]]
        out = [t.to(device, dtype) for t, (dtype, device) in zip(out, ctx.like)]
        return (*out, None, None, None, None, None)


def composite_with_layers(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor,
                          radii: Tensor, layers: list[FrozenLayer], backgrounds: Tensor,
                          tile_size: int = 16) -> Tensor:
    """Composite projected Gaussians (as `rasterize_to_pixels_cpu`: means2d [C,N,2], conics [C,N,3],
    colors [C,N,D], opacities [C,N], depths [C,N], radii [C,N,2]) with `layers[c]` behind
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
