"""`composite_with_layers` (a differentiable set over frozen, pre-sorted layers) against
`rasterize_to_pixels_cpu` on the layer and the set concatenated."""

import pytest
import torch

from gendistill.core.render.cpu_backend import rasterize_to_pixels_cpu
from gendistill.core.render.cpu_layer import composite_with_layers, frozen_layer
from test_render_cpu import random_scene

WIDTH, HEIGHT, TILE = 41, 35, 8


def bounded(scene, seed):
    """`random_scene` with radii that bound each Gaussian's alpha >= 1/255 ellipse, as a projection's
    do, and depths on a coarse grid (many ties, also between the layer and the set)."""
    means2d, conics, colors, opacities, depths, radii, bg = scene
    a, b, c = conics.unbind(-1)
    det = a * c - b * b
    ext = torch.sqrt(2 * torch.log(255 * opacities).clamp_min(0))
    rad = torch.stack([torch.ceil(ext * torch.sqrt(c / det)), torch.ceil(ext * torch.sqrt(a / det))], -1)
    g = torch.Generator().manual_seed(seed)
    rad[torch.rand(rad.shape[:2], generator=g) < 0.1] = 0  # culled
    depths = torch.randint(0, 6, depths.shape, generator=g).to(depths)
    return means2d, conics, colors, opacities, depths, rad.to(torch.int32), bg


def layers_of(layer, tile_size=TILE, keep=None):
    means2d, conics, colors, opacities, depths, radii, bg = layer
    image, _ = rasterize_to_pixels_cpu(means2d, conics, colors, opacities, depths, radii, WIDTH, HEIGHT, bg, tile_size)
    return [frozen_layer(*(t[c] for t in layer[:6]), image=image[c], tile_size=tile_size,
                         keep=None if keep is None else keep[c]) for c in range(len(image))]


def weighted_grads(fn, set_, seed=2):
    """Gradients of sum(w * render) w.r.t. the set's means2d, conics, colors, opacities, and the render."""
    g = torch.Generator().manual_seed(seed)
    leaves = [t.clone().requires_grad_(True) for t in (set_[0], set_[1], set_[2], set_[3])]
    render = fn(*leaves)
    (render * torch.randn(render.shape, generator=g, dtype=torch.float64).to(render.dtype)).sum().backward()
    return render.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("seed,opaque", [(0, False), (1, False), (2, True)])
def test_matches_compositing_the_concatenation(seed, opaque):
    """Same render and set gradients as compositing [layer, set] whole; the layer comes first, so it
    wins depth ties, and pixels the set cannot reach are the layer's image."""
    layer = bounded(random_scene(2, 90, 4, WIDTH, HEIGHT, seed=seed, scale=(1.0, 4.0)), seed)
    set_ = bounded(random_scene(2, 25, 4, WIDTH, HEIGHT, seed=seed + 10, scale=(0.5, 3.0)), seed + 1)
    if opaque:
        layer[3].fill_(1.0)  # most pixels end on a fragment that is not composited
    bg = layer[6]
    cat = lambda i, x: torch.cat([layer[i], x], 1)  # noqa: E731

    def full(m, c, col, o):
        r, _ = rasterize_to_pixels_cpu(cat(0, m), cat(1, c), cat(2, col), cat(3, o), cat(4, set_[4]), cat(5, set_[5]),
                                       WIDTH, HEIGHT, bg, TILE)
        return r

    layers = layers_of(layer)
    for depths in (set_[4], set_[4], set_[4].flip(1)):  # a layer keeps the set's last order as a hint: the
        set_ = (*set_[:4], depths, *set_[5:])  # same depths reuse it, new ones must not
        ours = weighted_grads(lambda m, c, col, o: composite_with_layers(m, c, col, o, set_[4], set_[5], layers, bg,
                                                                         TILE), set_)
        ref = weighted_grads(full, set_)
        assert (ours[0] - ref[0]).abs().max() < 1e-12
        for name, go, gr in zip(["means2d", "conics", "colors", "opacities"], ours[1], ref[1]):
            assert gr.abs().max() > 0, name
            assert (go - gr).abs().max() <= 1e-12 * gr.abs().max(), name
    # the part of the image the set cannot reach is the layer alone
    alone = torch.stack([torch.from_numpy(lay.image) for lay in layers])
    assert 0 < (ours[0] == alone).all(-1).float().mean() < 1


def test_dropping_gaussians_that_never_show_changes_nothing():
    """A layer keeps only the Gaussians that composite into or end a pixel of its image alone."""
    from gendistill.core.render.torch_backend import pixel_votes

    layer = bounded(random_scene(1, 120, 3, WIDTH, HEIGHT, seed=5, scale=(1.0, 5.0)), 5)
    layer[3].fill_(0.995)
    set_ = bounded(random_scene(1, 20, 3, WIDTH, HEIGHT, seed=6, scale=(0.5, 3.0)), 6)
    counts, ends, _ = pixel_votes(layer[0], layer[1], layer[3], layer[4], layer[5], WIDTH, HEIGHT, tile_size=TILE)
    shows = (counts + ends) > 0
    assert 0 < shows.sum() < (layer[5] > 0).all(-1).sum()  # some hidden ones to drop
    run = lambda lays: composite_with_layers(*set_[:6], lays, layer[6], TILE)  # noqa: E731
    assert torch.equal(run(layers_of(layer, keep=shows)), run(layers_of(layer)))
    assert len(layers_of(layer, keep=shows)[0].recs) == int(shows.sum())


def test_float32_inputs_and_bad_layers():
    layer = bounded(random_scene(2, 60, 4, WIDTH, HEIGHT, seed=8), 8)
    set_ = bounded(random_scene(2, 15, 4, WIDTH, HEIGHT, seed=9), 9)
    f32 = lambda s: tuple(t.float() if t.is_floating_point() else t for t in s)  # noqa: E731
    layers32, layers64 = layers_of(f32(layer)), layers_of(layer)
    r32, g32 = weighted_grads(lambda *x: composite_with_layers(*x, set_[4].float(), set_[5], layers32,
                                                               layer[6].float(), TILE), f32(set_))
    r64, g64 = weighted_grads(lambda *x: composite_with_layers(*x, set_[4], set_[5], layers64, layer[6], TILE), set_)
    assert r32.dtype == torch.float32 and g32[0].dtype == torch.float32
    assert (r32.double() - r64).abs().max() < 1e-5
    for a, b in zip(g32, g64):
        assert (a.double() - b).abs().max() < 1e-4 * b.abs().max()
    with pytest.raises(ValueError, match="one layer per camera"):
        composite_with_layers(*set_[:6], layers64[:1], layer[6], TILE)
    odd = frozen_layer(*(t[1] for t in layer[:6]), image=torch.zeros(HEIGHT + 1, WIDTH, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="image size"):
        composite_with_layers(*set_[:6], [layers64[0], odd], layer[6], TILE)
