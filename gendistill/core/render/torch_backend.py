"""Pure-PyTorch tile compositor with gsplat 1.5 semantics: any device, float32/float64, autograd.

Each tile's Gaussians are sorted front to back and visited in blocks of `BLOCK` for a batch of tiles
at once. A block costs a few [tiles, tile_size^2, BLOCK] tensors: log(o) - sigma is one matmul of
per-pixel monomials (relative to the tile centre, which keeps float32 accurate) with per-Gaussian
coefficients, and the transmittance a cumprod along the block. Blocks keep only their inputs for
backward and recompute the rest there (checkpointing, with a hand-written vector-Jacobian product),
and tiles whose pixels have all finished stop early. No tensor spans all pixels times all Gaussians.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .projection import ALPHA_THRESHOLD

__all__ = [
    "tile_boxes",
    "touched_tiles",
    "boxes_touch",
    "tile_intersections",
    "rasterize_to_pixels_torch",
    "check_pixel_mask",
    "pixel_votes",
]

MAX_ALPHA = 0.999
T_EPS = 1e-4  # a fragment that would bring transmittance to this or below ends the pixel
BLOCK = 128  # Gaussians per block
CHUNK_BLOCKS = 8  # blocks gathered from the per-Gaussian tensors at once
PIXEL_BUDGET = 1 << 22  # tiles * pixels-per-tile * BLOCK elements per block tensor


def tile_boxes(means2d: Tensor, radii: Tensor, tile_size: int, tiles_x: int, tiles_y: int) -> Tensor:
    """The tiles each Gaussian touches, as gsplat's `isect_tiles` computes them (in the dtype of means2d).

    Tiles tx in [floor(x/ts - rx/ts), ceil(x/ts + rx/ts)) clamped to [0, tiles_x], and y alike.
    Args:
        means2d: [..., 2]; radii: [..., 2] int, a Gaussian with a radius <= 0 touches nothing.
    Returns:
        [..., 4] int64 boxes (tx0, ty0, tx1, ty1), exclusive ends; all zero for culled Gaussians.
    """
    with torch.no_grad():
        xy = means2d.detach() / tile_size
        rad = radii.to(xy.dtype) / tile_size
        lim = xy.new_tensor([tiles_x, tiles_y])
        lo = torch.minimum(torch.floor(xy - rad).clamp_min(0), lim)
        hi = torch.minimum(torch.ceil(xy + rad).clamp_min(0), lim)
        box = torch.cat([lo, hi], -1).nan_to_num(0.0).long()
        return box.masked_fill((radii <= 0).any(-1, keepdim=True), 0)


def touched_tiles(boxes: Tensor, tiles_x: int, tiles_y: int) -> Tensor:
    """[C, M, 4] tile boxes -> [C, tiles_y, tiles_x] bool: tiles inside at least one box."""
    n_cams = boxes.shape[0]
    diff = boxes.new_zeros(n_cams, (tiles_y + 1) * (tiles_x + 1))
    valid = ((boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])).long()
    for yi, xi, sign in ((1, 0, 1), (1, 2, -1), (3, 0, -1), (3, 2, 1)):  # 2D difference array corners
        diff.scatter_add_(1, boxes[..., yi] * (tiles_x + 1) + boxes[..., xi], sign * valid)
    return diff.view(n_cams, tiles_y + 1, tiles_x + 1).cumsum(1).cumsum(2)[:, :tiles_y, :tiles_x] > 0


def boxes_touch(boxes: Tensor, tiles: Tensor) -> Tensor:
    """[C, M] bool: does box [C, M, 4] contain any tile set in `tiles` [C, tiles_y, tiles_x]?"""
    n_cams = tiles.shape[0]
    table = torch.nn.functional.pad(tiles.long().cumsum(1).cumsum(2), (1, 0, 1, 0)).view(n_cams, -1)
    stride = tiles.shape[2] + 1
    x0, y0, x1, y1 = boxes.long().unbind(-1)
    at = lambda y, x: torch.gather(table, 1, y * stride + x)  # noqa: E731
    return (at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)) > 0


def tile_intersections(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int = 16
) -> tuple[Tensor, Tensor]:
    """Which Gaussians touch which tiles (`tile_boxes`), sorted by (camera, tile, depth), as gsplat's
    `isect_tiles`. Depth ties keep index order (gsplat's stable radix sort).

    Args:
        means2d: [C, N, 2]; radii: [C, N, 2] int; depths: [C, N].
    Returns:
        flat_ids [M] int64 indices into C*N, sorted; tile_offsets [C * tiles_y * tiles_x + 1] int64
        (tile t owns flat_ids[tile_offsets[t]:tile_offsets[t + 1]]).
    """
    n_cams, n = depths.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    with torch.no_grad():
        x0, y0, x1, y1 = tile_boxes(means2d, radii, tile_size, tiles_x, tiles_y).reshape(-1, 4).unbind(-1)
        w = (x1 - x0).clamp_min(0)
        count = w * (y1 - y0).clamp_min(0)
        # front to back over every (camera, Gaussian); stable so that ties keep index order
        order = torch.sort(depths.detach().reshape(-1), stable=True).indices
        order = order[count[order] > 0]
        counts = count[order]
        flat = torch.repeat_interleave(order, counts)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=flat.device) - torch.repeat_interleave(start, counts)
        wf = w[flat]
        tx = x0[flat] + rank % wf
        ty = y0[flat] + torch.div(rank, wf, rounding_mode="floor")
        key = torch.div(flat, n, rounding_mode="floor") * n_tiles + ty * tiles_x + tx
        key, perm = torch.sort(key, stable=True)
        flat = flat[perm]
        per_tile = torch.bincount(key, minlength=n_cams * n_tiles)
        offsets = torch.zeros(n_cams * n_tiles + 1, dtype=torch.long, device=flat.device)
        offsets[1:] = torch.cumsum(per_tile, 0)
    return flat, offsets


def _pixel_features(tile_size: int, device, dtype) -> Tensor:
    """[P, 6] monomials (u^2, v^2, u v, u, v, 1) of the tile's pixel centres relative to the tile centre."""
    c = torch.arange(tile_size, device=device, dtype=dtype) + 0.5 - tile_size / 2
    u, v = (g.reshape(-1) for g in torch.meshgrid(c, c, indexing="xy"))  # row-major pixels
    return torch.stack([u * u, v * v, u * v, u, v, torch.ones_like(u)], dim=-1)


def _exponent_coefficients(xy: Tensor, conic: Tensor, opac: Tensor) -> Tensor:
    """Coefficients of log(o) - sigma as a quadratic in the pixel offset (u, v) from the tile centre.

    Args:
        xy: [..., 2] means relative to the tile centre; conic: [..., 3] (a, b, c); opac: [...].
    Returns:
        [..., 6] matching `_pixel_features`.
    """
    x, y = xy.unbind(-1)
    a, b, c = conic.unbind(-1)
    ax_by, cy_bx = a * x + b * y, c * y + b * x
    const = 0.5 * (x * ax_by + y * cy_bx)  # sigma at the tile centre
    log_o = torch.log(opac.clamp_min(1e-30))  # padding has opacity 0: alpha underflows and is skipped
    return torch.stack([-0.5 * a, -0.5 * c, -b, ax_by, cy_bx, log_o - const], dim=-1)


def _block_forward(trans: Tensor, coef: Tensor, color: Tensor, feats: Tensor, log_o: Tensor | None, cap: bool):
    """Intermediates of one block, [B, P, K] unless noted (see `_BlockComposite`)."""
    expo = torch.matmul(feats, coef.transpose(1, 2))  # log(o) - sigma
    raw = torch.exp(expo)
    alpha = torch.clamp_max(raw, MAX_ALPHA) if cap else raw
    alpha = torch.threshold(alpha, _below(ALPHA_THRESHOLD, alpha.dtype), 0.0)  # alpha < 1/255 -> 0
    if log_o is not None:
        alpha = alpha * (expo <= log_o[:, None, :])  # sigma < 0 -> 0
    one_minus = 1.0 - alpha
    after = trans[..., None] * torch.cumprod(one_minus, dim=-1)  # T after each fragment
    kept = (after > T_EPS).to(alpha.dtype)  # `after` is non-increasing: the first 0 ends the pixel
    before = torch.cat([trans[..., None], after[..., :-1]], dim=-1)  # T before each fragment
    alpha_kept = alpha * kept
    weight = alpha_kept * before
    finished = kept[..., -1] == 0  # [B, P]
    trans_after = torch.where(finished, trans - weight.sum(-1), after[..., -1])  # [B, P]
    return raw, alpha_kept, one_minus, before, weight, trans_after, finished


class _BlockComposite(torch.autograd.Function):
    """Composite one depth-sorted block of Gaussians over the pixels of a batch of tiles.

    forward(trans [B, P], coef [B, K, 6], color [B, K, D], feats [P, 6], log_o [B, K] or None, cap)
    -> (colour added [B, P, D], transmittance after [B, P], finished [B, P] bool).

    `trans` is the transmittance so far, in (0, 1e-4) for finished pixels (nothing composites);
    `coef` comes from `_exponent_coefficients`; `log_o` is given when conics may be indefinite
    (fragments with sigma < 0 are then skipped); `cap`: some opacity exceeds 0.999 (clamp alpha).
    The transmittance after is the one before the fragment that ended the pixel, if any.
    Only the inputs are saved; backward recomputes the block (checkpointing), then applies
    dL/dalpha_k = kept_k (T_k s_k - (sum_{j>k} w_j s_j + gT T_end) / (1 - alpha_k)), s = dL/dcolour . c.
    """

    @staticmethod
    def forward(ctx, trans, coef, color, feats, log_o, cap):
        _, _, _, _, weight, trans_after, finished = _block_forward(trans, coef, color, feats, log_o, cap)
        ctx.save_for_backward(trans, coef, color, feats, log_o)
        ctx.cap = cap
        ctx.mark_non_differentiable(finished)
        return torch.matmul(weight, color), trans_after, finished

    @staticmethod
    def backward(ctx, grad_added, grad_trans, _):
        trans, coef, color, feats, log_o = ctx.saved_tensors
        raw, alpha_kept, one_minus, before, weight, trans_after, _ = _block_forward(
            trans, coef, color, feats, log_o, ctx.cap
        )
        if grad_added is None:
            grad_added = trans.new_zeros(trans.shape + color.shape[-1:])
        tail = trans_after * grad_trans if grad_trans is not None else torch.zeros_like(trans)  # [B, P]
        s = torch.matmul(grad_added, color.transpose(1, 2))  # [B, P, K]
        ws = weight * s
        total = ws.sum(-1, keepdim=True)
        later = (total + tail[..., None]) - torch.cumsum(ws, dim=-1)  # sum_{j>k} w_j s_j + gT T_end
        # d/d(expo) = alpha * dL/dalpha, zero for skipped and not composited fragments
        grad_expo = alpha_kept * (before * s - later / one_minus)
        if ctx.cap:
            grad_expo = grad_expo * (raw <= MAX_ALPHA)
        grad_coef = torch.matmul(grad_expo.transpose(1, 2), feats)
        grad_color = torch.matmul(weight.transpose(1, 2), grad_added)
        grad_trans_in = (total[..., 0] + tail) / trans
        return grad_trans_in, grad_coef, grad_color, None, None, None


@functools.lru_cache(maxsize=None)
def _below(x: float, dtype: torch.dtype) -> float:
    """The largest `dtype` value below `x` as rounded to `dtype` (so that `v > it` means `v >= x`)."""
    t = torch.tensor(x, dtype=dtype)
    return torch.nextafter(t, torch.zeros_like(t)).item()


def _composite_tiles(
    tiles: Tensor,
    flat_ids: Tensor,
    offsets: Tensor,
    params: Tensor,
    tiles_x: int,
    tiles_y: int,
    tile_size: int,
    width: int,
    height: int,
    check_sigma: bool,
) -> tuple[Tensor, Tensor]:
    """Composite a batch of tiles front to back, block by block, stopping tiles whose pixels finished.

    Args:
        tiles: [B] global tile ids (camera * tiles_per_image + row * tiles_x + col), each non-empty.
        flat_ids, offsets: from `tile_intersections`.
        params: [C*N, 6 + D] per Gaussian: x, y, conic a, b, c, opacity, colour.
        check_sigma: some conics may be indefinite, so test sigma >= 0 per fragment.
    Returns:
        colour [B, P, D] and transmittance [B, P], P = tile_size^2 pixels row-major in the tile.
    """
    device, dtype = params.device, params.dtype
    start, stop = offsets[tiles], offsets[tiles + 1]
    counts = stop - start
    local = tiles % (tiles_x * tiles_y)
    corner = torch.stack([local % tiles_x, torch.div(local, tiles_x, rounding_mode="floor")], -1) * tile_size
    centre = corner.to(dtype) + tile_size / 2  # [B, 2]
    feats = _pixel_features(tile_size, device, dtype)
    offs = torch.arange(tile_size, device=device)
    px = (corner[:, None, 0] + offs.repeat(tile_size)[None]) < width  # row-major pixels of each tile
    py = (corner[:, None, 1] + offs.repeat_interleave(tile_size)[None]) < height
    done = ~(px & py)  # pixels outside the image count as finished

    n_tiles, n_pix = tiles.numel(), feats.shape[0]
    trans = torch.ones(n_tiles, n_pix, device=device, dtype=dtype)
    colour = torch.zeros(n_tiles, n_pix, params.shape[-1] - 6, device=device, dtype=dtype)
    chunk = BLOCK * CHUNK_BLOCKS
    last = flat_ids.numel() - 1
    for s in range(-(-int(counts.max()) // chunk)):
        rows = torch.nonzero(~done.all(-1) & (counts > s * chunk)).squeeze(-1)
        if rows.numel() == 0:
            break
        pos = start[rows, None] + s * chunk + torch.arange(chunk, device=device)  # [b, chunk]
        g = params.index_select(0, flat_ids.index_select(0, pos.clamp_max(last).reshape(-1)))
        g = g.reshape(pos.shape[0], chunk, -1)  # [b, chunk, F]
        opac = torch.where(pos < stop[rows, None], g[..., 5], 0.0)  # padding never composites
        coef = _exponent_coefficients(g[..., :2] - centre.index_select(0, rows)[:, None, :], g[..., 2:5], opac)
        log_o = torch.log(opac.clamp_min(1e-30)) if check_sigma else None
        cap = bool(opac.max() > MAX_ALPHA)
        counts_rows = counts.index_select(0, rows)
        blocks = zip(coef.split(BLOCK, 1), g[..., 6:].split(BLOCK, 1),
                     log_o.split(BLOCK, 1) if check_sigma else [None] * CHUNK_BLOCKS)  # fmt: skip
        for j, (b_coef, b_colour, b_log_o) in enumerate(blocks):
            done_rows = done.index_select(0, rows)
            sub = torch.nonzero(~done_rows.all(-1) & (counts_rows > s * chunk + j * BLOCK)).squeeze(-1)
            if sub.numel() == 0:
                break
            r = rows.index_select(0, sub)
            done_r, trans_r = done.index_select(0, r), trans.index_select(0, r)
            # finished pixels enter with T = 1e-4 / 2: nothing composites, and backward may divide by T
            args = (torch.where(done_r, T_EPS / 2, trans_r), b_coef.index_select(0, sub), b_colour.index_select(0, sub),
                    feats, None if b_log_o is None else b_log_o.index_select(0, sub), cap)  # fmt: skip
            added, t_after, finished = _BlockComposite.apply(*args)
            colour = colour.index_copy(0, r, colour.index_select(0, r) + added)  # (index_add: slow on CPU)
            trans = trans.index_copy(0, r, torch.where(done_r, trans_r, t_after))
            done = done.index_copy(0, r, done_r | finished)
    return colour, trans


def rasterize_to_pixels_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    tile_size: int = 16,
    pixel_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite projected Gaussians front to back, exactly as gsplat 1.5's classic rasterizer.

    Per pixel (centre j+0.5, i+0.5), every Gaussian whose tile box covers the pixel's tile, by depth:
    sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, alpha = min(0.999, o exp(-sigma)); skipped when
    sigma < 0 or alpha < 1/255; a fragment that would bring the transmittance T to <= 1e-4 is not
    composited and ends the pixel. render = sum c alpha T + T bg, alphas = 1 - T.

    Args:
        means2d: [C, N, 2]; conics: [C, N, 3] (inverse covariance 00, 01, 11); colors: [C, N, D];
        opacities: [C, N]; depths: [C, N] (sort key only); radii: [C, N, 2] int, <= 0 means culled.
        width, height: image size; backgrounds: [C, D] or None; tile_size: tile edge in pixels.
        pixel_mask: [C, H, W] bool or None (all): the pixels composited; the others get the
            background and alpha 0 (the cpu compositor skips them; this one masks its result).
    Returns:
        render [C, H, W, D], alphas [C, H, W, 1]. Differentiable w.r.t. means2d, conics, colors,
        opacities and backgrounds.
    """
    n_cams, n, n_colors = colors.shape
    check_pixel_mask(pixel_mask, n_cams, width, height)
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tiles_per_image = tiles_x * tiles_y
    flat_ids, offsets = tile_intersections(means2d, radii, depths, width, height, tile_size)

    params = torch.cat([means2d, conics, opacities[..., None], colors], dim=-1).reshape(n_cams * n, 6 + n_colors)
    with torch.no_grad():  # indefinite conics (never from `project_gaussians`) need the sigma >= 0 test
        a, b, c = conics.detach().unbind(-1)
        visible = (radii > 0).all(-1)
        check_sigma = bool(((a <= 0) | (a * c - b * b <= 0))[visible].any())
    n_pix = tile_size * tile_size
    out_colour = params.new_zeros(n_cams * tiles_per_image, n_pix, n_colors)
    out_trans = params.new_ones(n_cams * tiles_per_image, n_pix)
    counts = offsets[1:] - offsets[:-1]
    busy = torch.nonzero(counts > 0).squeeze(-1)
    if busy.numel() > 0:
        busy = busy[torch.sort(counts[busy], descending=True, stable=True).indices]
        per_batch = max(1, PIXEL_BUDGET // (n_pix * BLOCK))
        parts = [
            _composite_tiles(t, flat_ids, offsets, params, tiles_x, tiles_y, tile_size, width, height, check_sigma)
            for t in busy.split(per_batch)
        ]
        out_colour = out_colour.index_copy(0, busy, torch.cat([p[0] for p in parts]))
        out_trans = out_trans.index_copy(0, busy, torch.cat([p[1] for p in parts]))

    def to_image(x: Tensor) -> Tensor:  # [C*tiles, P, D] -> [C, H, W, D]
        x = x.reshape(n_cams, tiles_y, tiles_x, tile_size, tile_size, x.shape[-1])
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(n_cams, tiles_y * tile_size, tiles_x * tile_size, -1)
        return x[:, :height, :width]

    render = to_image(out_colour)
    trans = to_image(out_trans[..., None])
    if pixel_mask is not None:
        on = pixel_mask[..., None].to(render.device)
        render, trans = torch.where(on, render, 0.0), torch.where(on, trans, 1.0)
    if backgrounds is not None:
        render = render + trans * backgrounds[:, None, None, :]
    return render, 1.0 - trans


def check_pixel_mask(pixel_mask: Tensor | None, n_cams: int, width: int, height: int) -> None:
    """Raise unless `pixel_mask` is None or a [C, H, W] bool tensor."""
    if pixel_mask is not None and (pixel_mask.dtype != torch.bool or pixel_mask.shape != (n_cams, height, width)):
        raise ValueError(f"pixel_mask must be a bool tensor [C, H, W] = {[n_cams, height, width]}, got "
                         f"{pixel_mask.dtype} {list(pixel_mask.shape)}")


@torch.no_grad()
def pixel_votes(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    values: Tensor | None = None,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per Gaussian, the pixels it composites into (unweighted), the pixels it ends, and the sum of
    `values` over the pixels it composites into.

    As in `rasterize_to_pixels_torch`, a Gaussian composites into a pixel when alpha >= 1/255 and the
    pixel has not ended; it ends the pixel instead when it would bring T to 1e-4 or below. The
    composited counts and sums are what GaussianEditor's `apply_weights` kernel uses to lift 2D masks.

    Args:
        means2d, conics, opacities, depths, radii, width, height: as `rasterize_to_pixels_torch`.
        values: [C, H, W, D] per-pixel values (masks) or None.
    Returns:
        counts [C, N], ends [C, N] (pixels), sums [C, N, D] (None without values).
    """
    n_cams, n = depths.shape
    dtype, device = means2d.dtype, means2d.device
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_pix = tile_size * tile_size
    flat_ids, offsets = tile_intersections(means2d, radii, depths, width, height, tile_size)
    params = torch.cat([means2d, conics, opacities[..., None]], dim=-1).reshape(n_cams * n, 6).to(dtype)
    a, b, c = conics.unbind(-1)
    check_sigma = bool(((a <= 0) | (a * c - b * b <= 0))[(radii > 0).all(-1)].any())
    vals = None
    if values is not None:
        vals = torch.nn.functional.pad(values.to(dtype), (0, 0, 0, tiles_x * tile_size - width, 0,
                                                          tiles_y * tile_size - height))
        vals = vals.reshape(n_cams, tiles_y, tile_size, tiles_x, tile_size, -1).permute(0, 1, 3, 2, 4, 5)
        vals = vals.reshape(n_cams * tiles_y * tiles_x, n_pix, -1)  # [C*tiles, P, D]
    counts, ends = params.new_zeros(n_cams * n), params.new_zeros(n_cams * n)
    sums = None if vals is None else params.new_zeros(n_cams * n, vals.shape[-1])
    feats = _pixel_features(tile_size, device, dtype)
    offs = torch.arange(tile_size, device=device)
    last = max(flat_ids.numel() - 1, 0)
    busy = torch.nonzero(offsets[1:] > offsets[:-1]).squeeze(-1)
    for tiles in busy.split(max(1, PIXEL_BUDGET // (n_pix * BLOCK))) if busy.numel() else ():
        start, stop = offsets[tiles], offsets[tiles + 1]
        local = tiles % (tiles_x * tiles_y)
        corner = torch.stack([local % tiles_x, torch.div(local, tiles_x, rounding_mode="floor")], -1) * tile_size
        centre = corner.to(dtype) + tile_size / 2
        done = ~(((corner[:, None, 0] + offs.repeat(tile_size)) < width)
                 & ((corner[:, None, 1] + offs.repeat_interleave(tile_size)) < height))
        trans = torch.ones(tiles.numel(), n_pix, device=device, dtype=dtype)
        for s in range(0, int((stop - start).max()), BLOCK):
            pos = start[:, None] + s + torch.arange(BLOCK, device=device)  # [B, K]
            ids = flat_ids[pos.clamp_max(last)]
            g = params[ids]
            opac = torch.where(pos < stop[:, None], g[..., 5], 0.0)  # padding never composites
            coef = _exponent_coefficients(g[..., :2] - centre[:, None], g[..., 2:5], opac)
            log_o = torch.log(opac.clamp_min(1e-30)) if check_sigma else None
            _, _, one_minus, before, weight, trans_after, finished = _block_forward(
                torch.where(done, T_EPS / 2, trans), coef, None, feats, log_o, bool(opac.max() > MAX_ALPHA))
            hit = (weight > 0).to(dtype)  # [B, P, K]
            # the fragment that ends a pixel: reached (T before it above 1e-4), alpha >= 1/255, not composited
            end = ((before > T_EPS) & (one_minus < 1.0) & (weight == 0)).to(dtype)
            counts.index_add_(0, ids.reshape(-1), hit.sum(1).reshape(-1))
            ends.index_add_(0, ids.reshape(-1), end.sum(1).reshape(-1))
            if vals is not None:
                sums.index_add_(0, ids.reshape(-1), torch.matmul(hit.transpose(1, 2), vals[tiles]).flatten(0, 1))
            trans = torch.where(done, trans, trans_after)
            done = done | finished
            if bool(done.all()):
                break
    return (counts.reshape(n_cams, n), ends.reshape(n_cams, n),
            None if sums is None else sums.reshape(n_cams, n, -1))
