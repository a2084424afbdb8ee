"""The "cpu" render backend: tile-binned alpha compositing compiled with numba, with its own backward.

Semantics are gsplat 1.5.3's `rasterize_to_pixels` (classic 3DGS, non-packed): Gaussians are binned
into the tiles their `radii` box touches, every pixel of a touched tile evaluates them front to back
by depth, alpha = min(0.999, o * exp(-sigma)), fragments with sigma < 0 or alpha < 1/255 are skipped,
and a fragment that would bring the transmittance to 1e-4 or below ends the pixel uncomposited.

How it runs on a CPU: every tile is processed Gaussian by Gaussian (not pixel by pixel), and for
each Gaussian only the pixels inside the ellipse where alpha can reach 1/255 are visited: the row
span and, per row, the column span come from solving the conic's quadratic, with margins far
above rounding error so that the exact per-pixel test still decides every fragment. Along a row,
sigma is quadratic in the column, so exp(-sigma) comes from two exponentials per row and products
(relative error ~1e-15); forward and backward use the same spans and products, so they agree on
which fragments count. A row is skipped when every pixel the Gaussian can reach there has ended
(forward) or has its last fragment in front of this one (backward). With a `pixel_mask` only the
masked pixels are composited (the editor composites just the pixels its part can reach). Tiles are
shared between the worker threads by a longest-job-first assignment. The backward pass writes one
gradient record per tile-list entry (a Gaussian's sums over one tile's pixels) and adds the records
into the Gaussians' gradients in tile-list order, a bounded run of tiles at a time: its scratch is at
most `BACKWARD_SCRATCH_BYTES` (or one tile list), whatever the thread, camera and Gaussian counts, and
the sums do not depend on the thread count. Everything is computed in float64; outputs come back in
the input dtype.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from .torch_backend import check_pixel_mask

__all__ = ["rasterize_to_pixels_cpu", "backward_scratch_bytes", "BACKWARD_SCRATCH_BYTES"]

ALPHA_MIN = 1.0 / 255.0  # fragments with a smaller alpha are skipped
ALPHA_MAX = 0.999  # alpha is clamped to this
T_MIN = 1e-4  # a fragment that would bring T to this or below ends the pixel
_LIM_MARGIN = 1e-6  # relative slack on the ellipse bound; the exact test decides inside it
_SPAN_TOL = 1e-7  # relative slack (pixels) on the row and column spans, far above rounding errors
_PD_MIN = 1e-6  # conics with det < this * a * c are scanned pixel by pixel (spans ill-conditioned)
_NP = 11  # per-Gaussian record: x, y, a, b, c, opacity, sigma bound, positive-definite flag, then the
# ellipse's half-width and half-height at the bound (inf when not positive definite) and exp(-a)
_RECUR_MIN = 3  # rows at least this long get exp(-sigma) by products; shorter ones per visited pixel
BACKWARD_SCRATCH_BYTES = 16 << 20  # the backward's gradient records for a run of tiles (a longer tile list gets its own)


# --------------------------------------------------------------------------- kernels


@njit(cache=True, inline="always")
def _clamp_int(v, lo, hi):
    """int(v) clamped to [lo, hi]; v a float that may be huge (or nan, which gives lo)."""
    if v >= hi:
        return hi
    if v >= lo:
        return int(v)
    return lo


@njit(cache=True, inline="always")
def _span(rec, axis, lo, hi):
    """Pixels [p0, p1) of [lo, hi) along `axis` (0: columns, 1: rows) that can hold a fragment of
    Gaussian `rec` in any row or column: those with |mean - (p + .5)| within the ellipse's extent."""
    if rec[7] == 0.0:
        return lo, hi
    m, ext = rec[axis], rec[8 + axis]
    tol = _SPAN_TOL * (1.0 + abs(m) + ext)
    return _clamp_int(math.ceil(m - 0.5 - ext - tol), lo, hi), _clamp_int(math.floor(m - 0.5 + ext + tol) + 1.0, lo, hi)


@njit(cache=True, inline="always")
def _row_setup(rec, dy, x0, x1):
    """Columns [j0, j1) of the tile's [x0, x1) that can hold a fragment in the row at offset dy, and
    exp(-sigma) along it as products: e = exp(-sigma(j0)) and h = e(j0+1) / e(j0); each next h is
    h * exp(-a), sigma being quadratic in j. `recur` is False when exp(-sigma) must be computed per
    pixel instead (indefinite conic, short row, or one so steep that the products could overflow)."""
    if rec[7] == 0.0:
        return x0, x1, 0.0, 0.0, False
    mx, a, b, c, lim = rec[0], rec[2], rec[3], rec[4], rec[6]
    disc = (b * b - a * c) * dy * dy + 2.0 * a * lim
    if disc < 0.0:
        return x0, x0, 0.0, 0.0, False
    half = math.sqrt(disc) / a
    jc = mx - 0.5 + b * dy / a  # column of the row's sigma minimum; sigma <= lim within +- half
    tol = _SPAN_TOL * (1.0 + abs(jc) + half)
    j0 = _clamp_int(math.ceil(jc - half - tol), x0, x1)
    j1 = _clamp_int(math.floor(jc + half + tol) + 1.0, x0, x1)
    dx = mx - (j0 + 0.5)
    step = 0.5 * a - a * dx - b * dy  # sigma(j0 + 1) - sigma(j0)
    if j1 - j0 < _RECUR_MIN or a * (j1 - j0) + abs(step) > 60.0:
        return j0, j1, 0.0, 0.0, False
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    return j0, j1, math.exp(-sigma), math.exp(-step), True


@njit(cache=True, inline="always")
def _active_spans(active, cam, x0, x1, y0, y1, lo, hi):
    """lo[r], hi[r]: the columns from the first to past the last `active` pixel of row y0 + r of the
    tile (lo = hi when none). Both passes draw fragments only there, with the same spans, so they
    agree on which fragments count."""
    for i in range(y0, y1):
        lo[i - y0] = hi[i - y0] = x0
        for j in range(x0, x1):
            if active[cam, i, j]:
                if hi[i - y0] == x0:
                    lo[i - y0] = j
                hi[i - y0] = j + 1


@njit(cache=True, parallel=True)
def _prepare(means2d, conics, opacities, radii, tile_size, tiles_w, tiles_h):
    """Per (camera, Gaussian) row of [M, 2] means2d, [M, 3] conics, [M] opacities and [M, 2] radii
    (radii in the float dtype of means2d): the [M, _NP] float64 record and the [M, 4] int32 tile box.
    The box is `tile_boxes`' (in the dtype of means2d; `tile_size` a scalar of that dtype) less the
    tiles that the row and column `_span`s of the ellipse miss, where no fragment can be drawn (about
    a sixth of the tile visits in an edit step); empty for a Gaussian that draws nothing (lim < 0)."""
    n = means2d.shape[0]
    recs = np.empty((n, _NP))
    rects = np.zeros((n, 4), np.int32)
    for g in prange(n):
        x, y = np.float64(means2d[g, 0]), np.float64(means2d[g, 1])
        a, b, c = np.float64(conics[g, 0]), np.float64(conics[g, 1]), np.float64(conics[g, 2])
        o = np.float64(opacities[g])
        lim = -np.inf  # sigma >= 0 always, so a negative bound is never drawn
        if o > 0.0:
            lim = math.log(255.0 * o)
            lim += _LIM_MARGIN * (1.0 + abs(lim))
            if lim != lim:
                lim = -np.inf
        recs[g, 0], recs[g, 1], recs[g, 2], recs[g, 3], recs[g, 4], recs[g, 5], recs[g, 6] = x, y, a, b, c, o, lim
        pd = a > 0.0 and c > 0.0 and a * c - b * b > _PD_MIN * a * c
        recs[g, 7] = 1.0 if pd else 0.0
        recs[g, 8] = recs[g, 9] = np.inf
        recs[g, 10] = 0.0
        if pd:
            ext = 2.0 * max(lim, 0.0) / (a * c - b * b)
            recs[g, 8], recs[g, 9] = math.sqrt(ext * c), math.sqrt(ext * a)  # the largest |dx|, |dy| at sigma = lim
            recs[g, 10] = math.exp(-a)
        if radii[g, 0] > 0 and radii[g, 1] > 0 and lim >= 0.0:
            tx, ty = means2d[g, 0] / tile_size, means2d[g, 1] / tile_size
            rx, ry = radii[g, 0] / tile_size, radii[g, 1] / tile_size
            rects[g, 0] = _clamp_int(np.floor(tx - rx), 0, tiles_w)
            rects[g, 1] = _clamp_int(np.floor(ty - ry), 0, tiles_h)
            rects[g, 2] = _clamp_int(np.ceil(tx + rx), 0, tiles_w)
            rects[g, 3] = _clamp_int(np.ceil(ty + ry), 0, tiles_h)
            ts = int(tile_size)
            for axis in range(2):  # trim to the tiles the ellipse's pixel span reaches: it draws nowhere else
                p0, p1 = _span(recs[g], axis, 0, (tiles_w if axis == 0 else tiles_h) * ts)
                if p1 <= p0:
                    rects[g, 0] = rects[g, 1] = rects[g, 2] = rects[g, 3] = 0
                    break
                rects[g, axis] = max(rects[g, axis], p0 // ts)
                rects[g, axis + 2] = min(rects[g, axis + 2], (p1 - 1) // ts + 1)
    return recs, rects


@njit(cache=True)
def _bin(rects, order, starts, tiles_w, n_tiles):
    """Per-tile lists of rows, front to back.

    rects: [M, 4] int32 tile boxes (tx0, ty0, tx1, ty1), exclusive ends; empty for skipped rows.
    order: [K] int64 rows, camera by camera and front to back within a camera: camera c's rows are
        order[starts[c]:starts[c + 1]] (starts: [C + 1] int64).
    Returns offsets [C*n_tiles + 1] int64 and ids [n_isects] int32 (rows).
    """
    n_cams = starts.shape[0] - 1
    offsets = np.zeros(n_cams * n_tiles + 1, np.int64)
    for c in range(n_cams):
        base = c * n_tiles + 1
        for k in range(starts[c], starts[c + 1]):
            g = order[k]
            for ty in range(rects[g, 1], rects[g, 3]):
                for tx in range(rects[g, 0], rects[g, 2]):
                    offsets[base + ty * tiles_w + tx] += 1
    for t in range(n_cams * n_tiles):
        offsets[t + 1] += offsets[t]
    ids = np.empty(offsets[-1], np.int32)
    cursor = offsets[:-1].copy()
    for c in range(n_cams):
        base = c * n_tiles
        for k in range(starts[c], starts[c + 1]):
            g = order[k]
            for ty in range(rects[g, 1], rects[g, 3]):
                for tx in range(rects[g, 0], rects[g, 2]):
                    t = base + ty * tiles_w + tx
                    ids[cursor[t]] = g
                    cursor[t] += 1
    return offsets, ids


@njit(cache=True)
def _by_first_use(ids, recs, colors):
    """The Gaussians the tile lists use, in the order they first appear there, so that the kernels
    read their records and colours nearly in sequence (a cold cache costs them ~1.5x otherwise).
    Returns (used [U] int64 indices into the rows, recs[used], colors[used], ids renumbered into used)."""
    slot = np.full(recs.shape[0], -1, np.int32)
    used = np.empty(recs.shape[0], np.int64)
    n_used = 0
    new_ids = np.empty_like(ids)
    for k in range(ids.shape[0]):
        g = ids[k]
        if slot[g] < 0:
            slot[g] = n_used
            used[n_used] = g
            n_used += 1
        new_ids[k] = slot[g]
    used = used[:n_used]
    packed, cols = np.empty((n_used, recs.shape[1])), np.empty((n_used, colors.shape[1]))
    for u in range(n_used):
        packed[u] = recs[used[u]]
        cols[u] = colors[used[u]]
    return used, packed, cols, new_ids


@njit(cache=True)
def _assign(offsets, n_workers):
    """Longest-first assignment of all tiles to workers (cost ~ list length); returns (tile ids, ptr)."""
    n = offsets.shape[0] - 1
    cost = offsets[1:] - offsets[:-1]
    tiles = np.argsort(-cost, kind="mergesort")
    load = np.zeros(n_workers, np.int64)
    owner = np.empty(n, np.int64)
    for t in tiles:
        w = np.argmin(load)
        owner[t] = w
        load[w] += cost[t] + 16  # + a per-tile constant for the pixel writes
    ptr = np.zeros(n_workers + 1, np.int64)
    for t in range(n):
        ptr[owner[t] + 1] += 1
    for w in range(n_workers):
        ptr[w + 1] += ptr[w]
    out = np.empty(n, np.int64)
    fill = ptr[:-1].copy()
    for t in tiles:  # costliest first inside each worker
        out[fill[owner[t]]] = t
        fill[owner[t]] += 1
    return out, ptr


@njit(cache=True, parallel=True)
def _forward(recs, colors, recs2, colors2, bgs, offsets, ids, work, ptr, height, width, tile_size, tiles_w,
             n_tiles, active, render, trans, last):
    """Composite every tile's `active` [C,H,W] pixels (the others start ended). Row g of the tile lists
    is recs[g] / colors[g], or recs2 / colors2[g - len(recs)] past the end of recs. Writes render
    [C,H,W,D], trans [C,H,W] (final T), last [C,H,W] int32."""
    dim = colors.shape[1]
    n1 = recs.shape[0]
    npix = tile_size * tile_size
    for w in prange(ptr.shape[0] - 1):
        t_buf = np.empty(npix)
        acc = np.empty((npix, dim))
        lst = np.empty(npix, np.int32)
        done = np.empty(npix, np.bool_)
        open_lo = np.empty(tile_size, np.int64)  # per tile row, the columns from the first to past the
        open_hi = np.empty(tile_size, np.int64)  # last pixel not ended yet
        lo = np.empty(tile_size, np.int64)
        hi = np.empty(tile_size, np.int64)
        for q in range(ptr[w], ptr[w + 1]):
            tile = work[q]
            cam = tile // n_tiles
            ty = (tile % n_tiles) // tiles_w
            tx = (tile % n_tiles) % tiles_w
            x0 = tx * tile_size
            y0 = ty * tile_size
            x1 = min(x0 + tile_size, width)
            y1 = min(y0 + tile_size, height)
            bw = x1 - x0
            n_here = bw * (y1 - y0)
            t_buf[:n_here] = 1.0
            acc[:n_here] = 0.0
            lst[:n_here] = -1
            n_done = 0
            _active_spans(active, cam, x0, x1, y0, y1, lo, hi)
            for i in range(y0, y1):
                open_lo[i - y0], open_hi[i - y0] = lo[i - y0], hi[i - y0]
                for j in range(x0, x1):
                    p = (i - y0) * bw + (j - x0)
                    done[p] = not active[cam, i, j]
                    if done[p]:
                        n_done += 1
            start = offsets[tile]
            for k in range(start, offsets[tile + 1]):
                if n_done == n_here:
                    break
                g = ids[k]
                rec, col = (recs[g], colors[g]) if g < n1 else (recs2[g - n1], colors2[g - n1])
                if rec[6] < 0.0:
                    continue
                mx, my, a, b, c, opac = rec[0], rec[1], rec[2], rec[3], rec[4], rec[5]
                qq = rec[10]
                i0, i1 = _span(rec, 1, y0, y1)
                c0, c1 = _span(rec, 0, x0, x1)
                for i in range(i0, i1):
                    if max(c0, open_lo[i - y0]) >= min(c1, open_hi[i - y0]):
                        continue  # every pixel the Gaussian can reach in this row has ended
                    dy = my - (i + 0.5)
                    j0, j1, e, h, recur = _row_setup(rec, dy, lo[i - y0], hi[i - y0])
                    for j in range(j0, j1):
                        vis = e
                        e *= h
                        h *= qq
                        p = (i - y0) * bw + (j - x0)
                        if done[p]:
                            continue
                        dx = mx - (j + 0.5)
                        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                        if sigma < 0.0:
                            continue
                        if not recur:
                            vis = math.exp(-sigma)
                        alpha = min(ALPHA_MAX, opac * vis)
                        if alpha < ALPHA_MIN:
                            continue
                        t_now = t_buf[p]
                        t_next = t_now * (1.0 - alpha)
                        if t_next <= T_MIN:
                            done[p] = True
                            n_done += 1
                            r = i - y0
                            while open_lo[r] < open_hi[r] and done[r * bw + open_lo[r] - x0]:
                                open_lo[r] += 1
                            while open_hi[r] > open_lo[r] and done[r * bw + open_hi[r] - 1 - x0]:
                                open_hi[r] -= 1
                            continue
                        vis = alpha * t_now
                        for d in range(dim):
                            acc[p, d] += col[d] * vis
                        t_buf[p] = t_next
                        lst[p] = k - start
            for i in range(y0, y1):
                for j in range(x0, x1):
                    p = (i - y0) * bw + (j - x0)
                    t_fin = t_buf[p]
                    for d in range(dim):
                        render[cam, i, j, d] = acc[p, d] + t_fin * bgs[cam, d]
                    trans[cam, i, j] = t_fin
                    last[cam, i, j] = lst[p]


@njit(cache=True, parallel=True)
def _backward(recs, colors, recs2, colors2, bgs, offsets, ids, work, ptr, height, width, tile_size, tiles_w,
              n_tiles, active, trans, last, v_render, v_alpha_out, records, hit, k0, g0):
    """Back-to-front pass over the tiles in `work` (rows as `_forward`, whose tile lists cover entries
    k0 to k0 + len(records) of `ids`). For each list entry k of rows g >= g0, records[k - k0] [6 + D]
    gets the sums over the tile's pixels of d/d(x, y, a, b, c, opacity, colour...) and hit[k - k0]
    whether there were any; rows below g0 are frozen: no gradient is computed for them."""
    dim = colors.shape[1]
    n1 = recs.shape[0]
    npix = tile_size * tile_size
    for w in prange(ptr.shape[0] - 1):
        t_cur = np.empty(npix)
        t_fin = np.empty(npix)
        lst = np.empty(npix, np.int32)
        vrc = np.empty((npix, dim))
        vra = np.empty(npix)
        bgdot = np.empty(npix)
        behind = np.empty((npix, dim))  # colour composited behind the current fragment
        lo = np.empty(tile_size, np.int64)
        hi = np.empty(tile_size, np.int64)
        open_lo = np.empty(tile_size, np.int64)  # per tile row, the columns from the first to past the last
        open_hi = np.empty(tile_size, np.int64)  # pixel whose last fragment is at or behind the current one
        loc = np.empty(dim)
        for q in range(ptr[w], ptr[w + 1]):
            tile = work[q]
            cam = tile // n_tiles
            ty = (tile % n_tiles) // tiles_w
            tx = (tile % n_tiles) % tiles_w
            x0 = tx * tile_size
            y0 = ty * tile_size
            x1 = min(x0 + tile_size, width)
            y1 = min(y0 + tile_size, height)
            bw = x1 - x0
            hit[offsets[tile] - k0 : offsets[tile + 1] - k0] = False
            k_max = -1
            for i in range(y0, y1):
                for j in range(x0, x1):
                    k_max = max(k_max, last[cam, i, j])
            if k_max < 0:
                continue  # no pixel of the tile has a fragment: no gradient from it
            _active_spans(active, cam, x0, x1, y0, y1, lo, hi)
            for i in range(y0, y1):
                open_lo[i - y0], open_hi[i - y0] = x1, x0
                for j in range(x0, x1):
                    p = (i - y0) * bw + (j - x0)
                    t_fin[p] = trans[cam, i, j]
                    t_cur[p] = t_fin[p]
                    lst[p] = last[cam, i, j]
                    vra[p] = v_alpha_out[cam, i, j]
                    s = 0.0
                    for d in range(dim):
                        vrc[p, d] = v_render[cam, i, j, d]
                        behind[p, d] = 0.0
                        s += bgs[cam, d] * vrc[p, d]
                    bgdot[p] = s
            start = offsets[tile]
            by_last = np.argsort(-lst[: bw * (y1 - y0)])  # pixels open up as kk falls to their last fragment
            nxt = 0
            for kk in range(k_max, -1, -1):
                while nxt < by_last.shape[0] and lst[by_last[nxt]] >= kk:
                    r, col = by_last[nxt] // bw, x0 + by_last[nxt] % bw
                    open_lo[r], open_hi[r] = min(open_lo[r], col), max(open_hi[r], col + 1)
                    nxt += 1
                g = ids[start + kk]
                rec, cl = (recs[g], colors[g]) if g < n1 else (recs2[g - n1], colors2[g - n1])
                if rec[6] < 0.0:
                    continue
                mx, my, a, b, c, opac = rec[0], rec[1], rec[2], rec[3], rec[4], rec[5]
                qq = rec[10]
                loc[:dim] = 0.0
                gx = gy = ga = gb = gc = go = 0.0
                drawn = False
                i0, i1 = _span(rec, 1, y0, y1)
                c0, c1 = _span(rec, 0, x0, x1)
                for i in range(i0, i1):
                    if max(c0, open_lo[i - y0]) >= min(c1, open_hi[i - y0]):
                        continue  # no pixel the Gaussian can reach in this row has it in front of its end
                    dy = my - (i + 0.5)
                    j0, j1, e, h, recur = _row_setup(rec, dy, lo[i - y0], hi[i - y0])
                    for j in range(j0, j1):
                        vis = e
                        e *= h
                        h *= qq
                        p = (i - y0) * bw + (j - x0)
                        if kk > lst[p]:
                            continue
                        dx = mx - (j + 0.5)
                        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                        if sigma < 0.0:
                            continue
                        if not recur:
                            vis = math.exp(-sigma)
                        alpha = min(ALPHA_MAX, opac * vis)
                        if alpha < ALPHA_MIN:
                            continue
                        drawn = True
                        ra = 1.0 / (1.0 - alpha)
                        t = t_cur[p] * ra  # transmittance in front of this fragment
                        t_cur[p] = t
                        fac = alpha * t
                        if g < g0:
                            for d in range(dim):
                                behind[p, d] += cl[d] * fac
                            continue
                        v_alpha = (t_fin[p] * ra) * (vra[p] - bgdot[p])
                        for d in range(dim):
                            loc[d] += fac * vrc[p, d]
                            v_alpha += (cl[d] * t - behind[p, d] * ra) * vrc[p, d]
                            behind[p, d] += cl[d] * fac
                        if opac * vis <= ALPHA_MAX:
                            v_sigma = -opac * vis * v_alpha
                            gx += v_sigma * (a * dx + b * dy)
                            gy += v_sigma * (b * dx + c * dy)
                            ga += 0.5 * v_sigma * dx * dx
                            gb += v_sigma * dx * dy
                            gc += 0.5 * v_sigma * dy * dy
                            go += vis * v_alpha
                if drawn and g >= g0:
                    r = start + kk - k0
                    hit[r] = True
                    records[r, 0] = gx
                    records[r, 1] = gy
                    records[r, 2] = ga
                    records[r, 3] = gb
                    records[r, 4] = gc
                    records[r, 5] = go
                    for d in range(dim):
                        records[r, 6 + d] = loc[d]


@njit(cache=True)
def _add_records(records, hit, ids, k0, g0, dest, out):
    """out[dest[ids[k] - g0]] += records[k - k0] for the entries k from k0 with a hit, in order of k."""
    for r in range(hit.shape[0]):
        if hit[r]:
            row = out[dest[ids[k0 + r] - g0]]
            for d in range(records.shape[1]):
                row[d] += records[r, d]


# --------------------------------------------------------------------------- host side


def _depth_order(depths: np.ndarray) -> np.ndarray:
    """[C, N] -> [C, N] int64 front-to-back order per camera, ties by index (a stable argsort).

    float32 depths become unique int64 keys (order-preserving bits, then the index), which an
    unstable sort orders several times faster than a stable sort does the floats.
    """
    if depths.dtype != np.float32:
        return np.argsort(depths, axis=-1, kind="stable").astype(np.int64)
    bits = (depths + np.float32(0.0)).view(np.int32).astype(np.int64)  # + 0: -0.0 ties with 0.0
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: reverse their order, keep them below positives
    keys = (bits << 32) | np.arange(depths.shape[-1], dtype=np.int64)
    return np.argsort(keys, axis=-1)


def _np(x: torch.Tensor) -> np.ndarray:
    """A float tensor as a C-contiguous numpy array for the kernels: float32 or float64 as it is
    (no copy when it already is one), narrower floats as float32."""
    x = x.detach().cpu()
    return np.ascontiguousarray((x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy())


def _f64(x: torch.Tensor) -> np.ndarray:
    """A tensor as a C-contiguous float64 numpy array (a copy unless it already is one)."""
    return np.ascontiguousarray(x.detach().cpu().double().numpy())


def _run_plan(offsets: np.ndarray, dim: int, n_rows: int) -> tuple[list[tuple[int, int]], int]:
    """The backward's runs of tiles: consecutive tile ranges [t0, t1) with tile-list entries (offsets
    [T + 1]), each of at most min(`BACKWARD_SCRATCH_BYTES` of records, n_rows) entries unless one tile
    alone holds more (a list holds a row at most once, so at most n_rows then too). Runs without
    entries are left out. Returns (runs, the most entries in a run)."""
    entry = 8 * (6 + dim) + 1
    cap = max(1, min(BACKWARD_SCRATCH_BYTES // entry, n_rows))
    runs, t0, n_tiles, size = [], 0, offsets.shape[0] - 1, 0
    while t0 < n_tiles:
        t1 = int(np.searchsorted(offsets, offsets[t0] + cap, side="right")) - 1
        t1 = min(max(t1, t0 + 1), n_tiles)
        if offsets[t1] > offsets[t0]:
            runs.append((t0, t1))
            size = max(size, int(offsets[t1] - offsets[t0]))
        t0 = t1
    return runs, size


def backward_scratch_bytes(dim: int, offsets: np.ndarray | None = None, n_rows: int | None = None) -> int:
    """Bytes of gradient scratch the backward allocates for D = `dim` features: a float64 record of
    6 + D values and a flag for each tile-list entry of a run of tiles, reused from run to run.

    offsets: [T + 1] the tile lists' offsets, n_rows the number of rows they draw from (None: no
    fewer than entries); offsets None: the most a run can take (`BACKWARD_SCRATCH_BYTES` rounded down
    to whole entries), which only a tile whose list alone is longer exceeds. The scratch depends on
    neither the thread count nor, beyond the tile lists, the number of cameras and Gaussians.
    """
    entry = 8 * (6 + dim) + 1
    if offsets is None:
        return BACKWARD_SCRATCH_BYTES // entry * entry
    return _run_plan(offsets, dim, int(offsets[-1]) if n_rows is None else n_rows)[1] * entry


def _backward_sums(binned: tuple, trans: np.ndarray, last: np.ndarray, v_render: np.ndarray,
                   v_alpha: np.ndarray, g0: int, dest: np.ndarray, out: np.ndarray) -> None:
    """Add the gradients of the tile lists' rows g >= g0 into out[dest[g - g0]] (out: [R, 6 + D] float64).

    binned: the `_forward` arguments up to `active`; trans, last: its outputs; v_render [C, H, W, D] and
    v_alpha [C, H, W] float64. The tiles go a run at a time (`_run_plan`): `_backward` writes a record
    per list entry of the run into scratch reused from run to run, `_add_records` adds them in list
    order, so the sums do not depend on the threads or the runs.
    """
    offsets, ids, ptr = binned[5], binned[6], binned[8]
    dim = binned[1].shape[1]
    runs, size = _run_plan(offsets, dim, binned[0].shape[0] + binned[2].shape[0])
    records, hit = np.empty((size, 6 + dim)), np.empty(size, np.bool_)
    for t0, t1 in runs:
        k0, n = int(offsets[t0]), int(offsets[t1] - offsets[t0])
        work, run_ptr = _assign(offsets[t0 : t1 + 1], ptr.shape[0] - 1)
        _backward(*binned[:7], work + t0, run_ptr, *binned[9:], trans, last, v_render, v_alpha, records[:n], hit[:n],
                  k0, g0)
        _add_records(records[:n], hit[:n], ids, k0, g0, dest, out)


class _RasterizeCPU(torch.autograd.Function):
    """Forward: bin, composite. Backward: one back-to-front pass per tile, sums in tile-list order."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, depths, radii, width, height, tile_size,
                pixel_mask):
        n_cams, n_gauss, dim = colors.shape
        tiles_w, tiles_h = -(-width // tile_size), -(-height // tile_size)
        n_tiles = tiles_w * tiles_h
        xy, cn, op = (_np(t) for t in (means2d, conics, opacities))
        recs, rects = _prepare(xy.reshape(-1, 2), cn.reshape(-1, 3), op.reshape(-1),
                               radii.cpu().numpy().reshape(-1, 2).astype(xy.dtype), xy.dtype.type(tile_size),
                               tiles_w, tiles_h)
        cols = _f64(colors).reshape(-1, dim)
        bgs = np.zeros((n_cams, dim)) if backgrounds is None else _f64(backgrounds).reshape(n_cams, dim)
        order = _depth_order(_np(depths)) + np.arange(n_cams)[:, None] * n_gauss  # [C, N] rows
        offsets, ids = _bin(rects, order.reshape(-1), np.arange(n_cams + 1) * n_gauss, tiles_w, n_tiles)
        used, recs, cols, ids = _by_first_use(ids, recs, cols)
        work, ptr = _assign(offsets, max(1, numba.get_num_threads()))
        active = np.ones((n_cams, height, width), np.bool_) if pixel_mask is None else pixel_mask.cpu().numpy()
        binned = (recs, cols, recs[:0], cols[:0], bgs, offsets, ids, work, ptr, height, width, tile_size, tiles_w,
                  n_tiles, np.ascontiguousarray(active))

        render = np.empty((n_cams, height, width, dim))
        trans = np.empty((n_cams, height, width))
        last = np.empty((n_cams, height, width), np.int32)
        _forward(*binned, render, trans, last)

        ctx.binned, ctx.trans, ctx.last, ctx.used, ctx.n_rows = binned, trans, last, used, n_cams * n_gauss
        ctx.has_bg = backgrounds is not None
        ctx.like = [(t.dtype, t.device) for t in (means2d, conics, colors, opacities)]
        if ctx.has_bg:
            ctx.like.append((backgrounds.dtype, backgrounds.device))
        dtype, device = colors.dtype, colors.device
        alphas = torch.from_numpy(1.0 - trans).unsqueeze(-1)
        return torch.from_numpy(render).to(device, dtype), alphas.to(device, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_render, v_alphas):
        binned, trans = ctx.binned, ctx.trans
        n_cams = trans.shape[0]
        dim = binned[1].shape[1]
        v_r = _f64(v_render)
        g = np.zeros((ctx.n_rows, 6 + dim))
        _backward_sums(binned, trans, ctx.last, v_r, _f64(v_alphas).reshape(trans.shape), 0, ctx.used, g)
        g = torch.from_numpy(g).reshape(n_cams, -1, 6 + dim)
        out = [g[..., 0:2], g[..., 2:5], g[..., 6:], g[..., 5]]
        if ctx.has_bg:
            out.append(torch.from_numpy(np.einsum("chwd,chw->cd", v_r, trans)))
        out = [t.to(device, dtype) for t, (dtype, device) in zip(out, ctx.like)]
        if not ctx.has_bg:
            out.append(None)
        return (*out, None, None, None, None, None, None)


def rasterize_to_pixels_cpu(means2d: torch.Tensor, conics: torch.Tensor, colors: torch.Tensor,
                            opacities: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor,
                            width: int, height: int, backgrounds: torch.Tensor | None = None,
                            tile_size: int = 16, pixel_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite projected Gaussians into images on the CPU (numba), differentiably.

    Args:
        means2d: [C, N, 2] pixel-space centres (x right, y down; pixel (j, i) has centre (j+.5, i+.5)).
        conics: [C, N, 3] inverse 2D covariances (00, 01, 11).
        colors: [C, N, D] features, any D.
        opacities: [C, N].
        depths: [C, N] sort keys (front to back, ties by index).
        radii: [C, N, 2] int32 pixel extents; a Gaussian with a radius <= 0 is skipped.
        width, height: image size in pixels.
        backgrounds: [C, D] or None (black).
        tile_size: tile edge in pixels; sets which Gaussians each pixel evaluates, as in gsplat.
        pixel_mask: [C, H, W] bool or None (all): the pixels composited; the others get the
            background and alpha 0 at no cost.
    Returns:
        render [C, H, W, D] and alphas [C, H, W, 1], in the dtype of `colors`; gradients flow to
        means2d, conics, colors, opacities and backgrounds.
    """
    if radii.dim() == 2:
        radii = radii.unsqueeze(-1).expand(*radii.shape, 2)
    n_cams, n_gauss = opacities.shape
    if means2d.shape != (n_cams, n_gauss, 2) or conics.shape != (n_cams, n_gauss, 3):
        raise ValueError(f"means2d {tuple(means2d.shape)} / conics {tuple(conics.shape)} do not match "
                         f"opacities {tuple(opacities.shape)}")
    if colors.shape[:2] != (n_cams, n_gauss) or depths.shape != (n_cams, n_gauss):
        raise ValueError(f"colors {tuple(colors.shape)} / depths {tuple(depths.shape)} do not match [C, N]")
    if backgrounds is not None and backgrounds.shape != (n_cams, colors.shape[-1]):
        raise ValueError(f"backgrounds must be [C, D] = {(n_cams, colors.shape[-1])}, got {tuple(backgrounds.shape)}")
    if int(tile_size) <= 0:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    check_pixel_mask(pixel_mask, n_cams, width, height)
    return _RasterizeCPU.apply(means2d, conics, colors, opacities, backgrounds, depths, radii,
                               int(width), int(height), int(tile_size), pixel_mask)
