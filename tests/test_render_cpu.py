"""The "cpu" compositor (numba) against a dense float64 compositor written here, on 2D inputs."""

import math

import numba
import numpy as np
import pytest
import torch

from gendistill.core.render.cpu_backend import rasterize_to_pixels_cpu


def dense_composite(means2d, conics, colors, opacities, depths, radii, width, height, backgrounds, tile_size):
    """gsplat 1.5.3 compositing by brute force: every Gaussian against every pixel, differentiable.

    Shapes as `rasterize_to_pixels_cpu`; returns render [C,H,W,D], alphas [C,H,W,1].
    """
    n_cams, n_gauss, dim = colors.shape
    dt = colors.dtype
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    px, py = xs.to(dt) + 0.5, ys.to(dt) + 0.5
    tile_x, tile_y = xs // tile_size, ys // tile_size
    tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    renders, alphas = [], []
    for c in range(n_cams):
        trans = torch.ones(height, width, dtype=dt)
        acc = torch.zeros(height, width, dim, dtype=dt)
        alive = torch.ones(height, width, dtype=torch.bool)
        for n in torch.argsort(depths[c], stable=True).tolist():
            rx, ry = radii[c, n].tolist()
            if rx <= 0 or ry <= 0:
                continue
            x, y = means2d[c, n].detach().tolist()
            tx0 = min(max(math.floor(x / tile_size - rx / tile_size), 0), tiles_w)
            tx1 = min(max(math.ceil(x / tile_size + rx / tile_size), 0), tiles_w)
            ty0 = min(max(math.floor(y / tile_size - ry / tile_size), 0), tiles_h)
            ty1 = min(max(math.ceil(y / tile_size + ry / tile_size), 0), tiles_h)
            cover = (tile_x >= tx0) & (tile_x < tx1) & (tile_y >= ty0) & (tile_y < ty1)
            dx, dy = means2d[c, n, 0] - px, means2d[c, n, 1] - py
            a, b, cc = conics[c, n]
            sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
            alpha = torch.clamp(opacities[c, n] * torch.exp(-sigma), max=0.999)
            ok = cover & alive & (sigma >= 0) & (alpha >= 1.0 / 255.0)
            t_next = trans * (1 - alpha)
            end = ok & (t_next <= 1e-4)
            comp = ok & ~end
            acc = acc + torch.where(comp, alpha * trans, 0.0)[..., None] * colors[c, n]
            trans = torch.where(comp, t_next, trans)
            alive = alive & ~end
        bg = backgrounds[c] if backgrounds is not None else torch.zeros(dim, dtype=dt)
        renders.append(acc + trans[..., None] * bg)
        alphas.append(1 - trans[..., None])
    return torch.stack(renders), torch.stack(alphas)


def random_scene(n_cams, n_gauss, dim, width, height, *, seed=0, dtype=torch.float64, non_pd=0.0,
                 max_opacity=1.0, scale=(1.0, 8.0)):
    """Random 2D Gaussians, some centred outside the image, some with zero radii, some equal depths."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    means2d = torch.stack([u(n_cams, n_gauss) * (width + 16) - 8, u(n_cams, n_gauss) * (height + 16) - 8], -1)
    s = scale[0] + u(n_cams, n_gauss, 2) * (scale[1] - scale[0])
    th = u(n_cams, n_gauss) * math.pi
    cos, sin = torch.cos(th), torch.sin(th)
    # conic = R diag(1/s^2) R^T
    ia, ib = 1 / s[..., 0] ** 2, 1 / s[..., 1] ** 2
    conics = torch.stack([cos * cos * ia + sin * sin * ib, cos * sin * (ia - ib), sin * sin * ia + cos * cos * ib], -1)
    if non_pd:
        flip = u(n_cams, n_gauss) < non_pd
        conics[..., 1] = torch.where(flip, 2.0 * (conics[..., 0] * conics[..., 2]).sqrt() + 0.05, conics[..., 1])
    colors = u(n_cams, n_gauss, dim)
    opacities = 0.02 + u(n_cams, n_gauss) * (max_opacity - 0.02)
    depths = torch.floor(u(n_cams, n_gauss) * n_gauss / 3)  # many ties
    radii = torch.ceil(3 * s.max(-1, keepdim=True).values * (0.5 + u(n_cams, n_gauss, 1))).expand(-1, -1, 2)
    radii = radii.to(torch.int32).contiguous()
    radii[u(n_cams, n_gauss) < 0.1] = 0
    backgrounds = u(n_cams, dim)
    out = means2d, conics, colors, opacities, depths, radii, backgrounds
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in out)


def call_both(scene, width, height, use_bg, tile_size):
    means2d, conics, colors, opacities, depths, radii, bg = scene
    bg = bg if use_bg else None
    ours = rasterize_to_pixels_cpu(means2d, conics, colors, opacities, depths, radii, width, height, bg, tile_size)
    ref = dense_composite(means2d, conics, colors, opacities, depths, radii, width, height, bg, tile_size)
    return ours, ref


@pytest.mark.parametrize("dim,use_bg,tile_size", [(1, False, 16), (3, True, 16), (7, True, 8), (3, False, 5)])
def test_forward_matches_dense(dim, use_bg, tile_size):
    width, height = 45, 37  # partial tiles on the right and bottom
    scene = random_scene(3, 60, dim, width, height, seed=dim, non_pd=0.1)
    (r, a), (rr, ra) = call_both(scene, width, height, use_bg, tile_size)
    assert r.shape == (3, height, width, dim) and a.shape == (3, height, width, 1)
    assert r.dtype == torch.float64
    assert (r - rr).abs().max() < 1e-9
    assert (a - ra).abs().max() < 1e-9
    assert ra.max() > 0.9 and ra.std() > 0.1  # a non-trivial image


@pytest.mark.parametrize("seed", [0, 1])
def test_thin_large_and_tiny_ellipses(seed):
    """Needle-thin, huge and sub-pixel Gaussians: the span bounds of the kernel must not drop fragments."""
    width, height = 50, 41
    scene = list(random_scene(1, 150, 3, width, height, seed=seed, scale=(0.2, 30.0)))
    scene[5] = torch.full_like(scene[5], 40)  # radii covering everything: every fragment is tested
    (r, a), (rr, ra) = call_both(tuple(scene), width, height, True, 16)
    assert (r - rr).abs().max() < 1e-9 and (a - ra).abs().max() < 1e-9


def test_transmittance_cutoff_and_clamp():
    """Opaque stacks end pixels (the ending fragment is not composited); opacity 1 at a pixel centre clamps."""
    width, height = 24, 20
    means2d, conics, colors, opacities, depths, radii, bg = random_scene(2, 50, 3, width, height, seed=3, scale=(4, 10))
    opacities = torch.full_like(opacities, 0.97)
    opacities[:, :10] = 1.0
    means2d[:, :10] = torch.floor(means2d[:, :10]) + 0.5  # exactly on pixel centres: alpha clamps to 0.999
    scene = means2d, conics, colors, opacities, depths, radii, bg
    (r, a), (rr, ra) = call_both(scene, width, height, True, 8)
    assert (r - rr).abs().max() < 1e-9 and (a - ra).abs().max() < 1e-9
    t = 1 - a
    assert ((t > 1e-4) & (t < 1e-3)).sum() > 10  # pixels that ended just above the cut-off
    assert t.min() > 1e-4
    assert_grads_match(scene, width, height, 8)  # zero gradient through the 0.999 clamp, as gsplat


def test_empty_and_fully_skipped():
    means2d, conics, colors, opacities, depths, radii, bg = random_scene(2, 5, 3, 10, 10, seed=1)
    r, a = rasterize_to_pixels_cpu(means2d, conics, colors, opacities, depths, torch.zeros_like(radii), 10, 10, bg)
    assert torch.equal(r, bg[:, None, None].expand(2, 10, 10, 3)) and a.abs().max() == 0
    e = lambda *s: torch.zeros(2, 0, *s, dtype=torch.float64)  # noqa: E731
    r, a = rasterize_to_pixels_cpu(e(2), e(3), e(3), e(), e(), torch.zeros(2, 0, 2, dtype=torch.int32), 10, 10)
    assert r.shape == (2, 10, 10, 3) and r.abs().max() == 0 and a.abs().max() == 0


def weighted_grads(fn, scene, width, height, tile_size, seed=1):
    """Gradients of sum(w_r * render) + sum(w_a * alphas) for random weights, w.r.t. the five float inputs."""
    means2d, conics, colors, opacities, depths, radii, bg = scene
    n_cams, _, dim = colors.shape
    g = torch.Generator().manual_seed(seed)
    w_r = torch.randn(n_cams, height, width, dim, generator=g, dtype=torch.float64)
    w_a = torch.randn(n_cams, height, width, 1, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (means2d, conics, colors, opacities, bg)]
    m, c, col, o, b = leaves
    r, a = fn(m, c, col, o, depths, radii, width, height, b, tile_size)
    ((r * w_r).sum() + (a * w_a).sum()).backward()
    return [x.grad for x in leaves]


def assert_grads_match(scene, width, height, tile_size):
    ours = weighted_grads(rasterize_to_pixels_cpu, scene, width, height, tile_size)
    ref = weighted_grads(dense_composite, scene, width, height, tile_size)
    for name, g, r in zip(["means2d", "conics", "colors", "opacities", "backgrounds"], ours, ref):
        assert r.abs().max() > 0, name
        err = (g - r).abs().max() / r.abs().max()
        assert err < 1e-9, (name, err.item())


def test_gradients_match_dense_autograd():
    width, height = 30, 22
    assert_grads_match(random_scene(2, 40, 5, width, height, seed=7, non_pd=0.1), width, height, 8)


def test_gradcheck_tiny():
    width, height = 11, 9
    means2d, conics, colors, opacities, depths, radii, bg = random_scene(2, 6, 2, width, height, seed=11,
                                                                          max_opacity=0.9, scale=(2, 4))
    radii = torch.full_like(radii, 12)

    def fn(m, c, col, o, b):
        return rasterize_to_pixels_cpu(m, c, col, o, depths, radii, width, height, b, 4)

    inputs = [x.clone().requires_grad_(True) for x in (means2d, conics, colors, opacities, bg)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float32_matches_float64():
    width, height = 40, 33
    scene64 = random_scene(2, 80, 3, width, height, seed=5)
    scene32 = tuple(x.float() if x.is_floating_point() else x for x in scene64)
    leaves = []
    outs = []
    for sc in (scene32, scene64):
        means2d, conics, colors, opacities, depths, radii, bg = sc
        lv = [x.clone().requires_grad_(True) for x in (means2d, colors, opacities)]
        r, a = rasterize_to_pixels_cpu(lv[0], conics, lv[1], lv[2], depths, radii, width, height, bg)
        (r.sum() + a.sum()).backward()
        outs.append((r, a))
        leaves.append(lv)
    assert outs[0][0].dtype == torch.float32 and leaves[0][0].grad.dtype == torch.float32
    assert (outs[0][0].double() - outs[1][0]).abs().max() < 1e-5
    assert (outs[0][1].double() - outs[1][1]).abs().max() < 1e-5
    for l32, l64 in zip(*leaves):
        assert (l32.grad.double() - l64.grad).abs().max() < 1e-4 * l64.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Half inputs are composited in float32 inside; outputs and gradients come back in their dtype."""
    width, height = 30, 24
    scene = random_scene(1, 40, 3, width, height, seed=8)
    (r32, a32), _ = call_both(tuple(x.float() if x.is_floating_point() else x for x in scene), width, height, True, 8)
    half = [x.to(dtype) if x.is_floating_point() else x for x in scene]
    m = half[0].clone().requires_grad_(True)
    r, a = rasterize_to_pixels_cpu(m, *half[1:6], width, height, half[6], 8)
    r.sum().backward()
    assert r.dtype == dtype and m.grad.dtype == dtype and m.grad.abs().max() > 0
    assert (r.float() - r32).abs().max() < 0.05 and (a.float() - a32).abs().max() < 0.05


def test_independent_of_thread_count():
    width, height = 64, 48
    means2d, conics, colors, opacities, depths, radii, bg = random_scene(1, 300, 3, width, height, seed=2)
    res = []
    before = numba.get_num_threads()
    try:
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            m = means2d.clone().requires_grad_(True)
            r, a = rasterize_to_pixels_cpu(m, conics, colors, opacities, depths, radii, width, height, bg)
            (r.square().sum() + a.sum()).backward()
            res.append((r, m.grad))
    finally:
        numba.set_num_threads(before)
    assert torch.equal(res[0][0], res[-1][0])
    assert torch.equal(res[0][1], res[-1][1])  # gradients are summed in tile-list order, whatever the threads


def test_depth_order_is_a_stable_argsort():
    from gendistill.core.render.cpu_backend import _depth_order

    rng = np.random.default_rng(0)
    ties = np.array([-2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.5, 3.0, np.inf, -np.inf], np.float32)
    for x in (rng.choice(ties, size=(3, 500)), rng.standard_normal((2, 700)).astype(np.float32),
              rng.choice(ties, size=(2, 300)).astype(np.float64)):
        np.testing.assert_array_equal(_depth_order(x), np.argsort(x, axis=-1, kind="stable"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_pixel_mask_composites_only_masked_pixels(backend):
    """Masked-in pixels are the full render (values and gradients); the others are the background with
    alpha 0 and pass no gradient. The mask has gaps inside rows, which the cpu kernels' spans skip."""
    from gendistill.core.render.torch_backend import rasterize_to_pixels_torch

    fn = rasterize_to_pixels_cpu if backend == "cpu" else rasterize_to_pixels_torch
    width, height = 37, 29
    scene = random_scene(2, 70, 3, width, height, seed=9)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, height, width, generator=g) < 0.4
    mask[1, 5:20, 3:30] = True
    mask[0, :, 20:] = False
    masked = lambda *a: fn(*a, pixel_mask=mask)  # noqa: E731
    (r, a), (rr, ra) = masked(*scene[:6], width, height, scene[6], 8), dense_composite(*scene[:6], width, height,
                                                                                        scene[6], 8)
    on = mask[..., None]
    assert (r - rr).abs()[on.expand_as(r)].max() < 1e-9 and (a - ra).abs()[on].max() < 1e-9
    bg = scene[6][:, None, None].expand(2, height, width, 3)
    assert torch.equal(r[~mask], bg[~mask]) and a[~mask].abs().max() == 0
    ours = weighted_grads(masked, scene, width, height, 8)
    ref = weighted_grads(lambda *x: [t * on for t in dense_composite(*x)], scene, width, height, 8)
    for name, go, gr in zip(["means2d", "conics", "colors", "opacities"], ours, ref):
        assert gr.abs().max() > 0, name
        assert (go - gr).abs().max() < 1e-9 * gr.abs().max(), name
    with pytest.raises(ValueError, match="pixel_mask"):
        fn(*scene[:6], width, height, scene[6], 8, pixel_mask=mask[:, :-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prepared_tile_boxes_match_tile_boxes(dtype):
    """The kernel's fused tile boxes are `tile_boxes`, also at tile edges and for NaN / inf / culled
    entries, trimmed to the tiles the ellipse reaches (none here: the ellipses are huge)."""
    from gendistill.core.render.cpu_backend import _prepare
    from gendistill.core.render.torch_backend import tile_boxes

    rng = np.random.default_rng(4)
    n = 4000
    xy = (rng.integers(-3, 12, (n, 2)) * 8 + rng.choice([0.0, 1e-6, -1e-6, 0.5, 3.25], (n, 2))).astype(dtype)
    xy[:5] = [[np.nan, 3], [np.inf, 2], [-np.inf, 5], [1e30, -1e30], [7.5, np.nan]]
    radii = rng.integers(-1, 30, (n, 2)).astype(np.int32)
    conics = np.tile(np.array([1e-6, 0.0, 1e-6], dtype), (n, 1))
    opac = (0.01 + rng.random(n)).astype(dtype)
    _, rects = _prepare(xy, conics, opac, radii.astype(dtype), dtype(8), 9, 7)
    ref = tile_boxes(torch.from_numpy(xy), torch.from_numpy(radii), 8, 9, 7).numpy()
    empty = lambda b: (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])  # noqa: E731
    np.testing.assert_array_equal(empty(rects), empty(ref))
    np.testing.assert_array_equal(rects[~empty(ref)], ref[~empty(ref)])
    assert (~empty(ref)).sum() > 1500


def test_prepared_tile_boxes_skip_tiles_the_ellipse_misses():
    """Small ellipses in large radii boxes keep only the tiles their pixel span reaches (each axis:
    pixels whose centre is within the ellipse's half-width at sigma = log(255 opacity) of the mean);
    Gaussians too faint to draw (opacity < 1/255) get an empty box."""
    from gendistill.core.render.cpu_backend import _LIM_MARGIN, _SPAN_TOL, _prepare

    rng = np.random.default_rng(5)
    n = 3000
    xy = rng.uniform(-10, 90, (n, 2))
    s = rng.uniform(0.3, 6.0, (n, 2))
    conics = np.stack([1 / s[:, 0] ** 2, np.zeros(n), 1 / s[:, 1] ** 2], -1)  # axis-aligned
    opac = rng.uniform(0.0, 1.0, n)
    opac[:10] = 0.001
    _, rects = _prepare(xy, conics, opac, np.full((n, 2), 40.0), 16.0, 5, 5)
    lim = np.log(255 * opac)
    lim += _LIM_MARGIN * (1 + np.abs(lim))
    want, gone = np.zeros((n, 4), np.int64), lim < 0
    for axis in range(2):
        ext = s[:, axis] * np.sqrt(2 * lim.clip(0))
        tol = _SPAN_TOL * (1 + np.abs(xy[:, axis]) + ext)
        p0 = np.clip(np.ceil(xy[:, axis] - 0.5 - ext - tol), 0, 80)
        p1 = np.clip(np.floor(xy[:, axis] - 0.5 + ext + tol) + 1, 0, 80)
        want[:, axis] = np.maximum(np.clip(np.floor((xy[:, axis] - 40) / 16), 0, 5), p0 // 16)
        want[:, axis + 2] = np.minimum(np.clip(np.ceil((xy[:, axis] + 40) / 16), 0, 5), (p1 - 1) // 16 + 1)
        gone |= p1 <= p0  # no pixel centre within reach
    empty = lambda b: (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])  # noqa: E731
    gone |= empty(want)
    np.testing.assert_array_equal(empty(rects), gone)
    np.testing.assert_array_equal(rects[~gone], want[~gone])
    assert gone[:10].all() and (~gone).sum() > 2000
    radii_tiles = (np.clip(np.ceil((xy + 40) / 16), 0, 5) - np.clip(np.floor((xy - 40) / 16), 0, 5)).prod(-1)
    assert (want[~gone, 2:] - want[~gone, :2]).prod(-1).sum() < 0.5 * radii_tiles.sum()  # most tiles dropped
