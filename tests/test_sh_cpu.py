"""`sh_colors_cpu` (numba) against the torch `sh_colors`: colours and gradients, degrees 0-3."""

import math

import pytest
import torch

from gendistill.core.cameras import look_at
from gendistill.core.render.cpu_sh import sh_colors_cpu
from gendistill.core.render.sh import sh_colors


def inputs(degree, n=300, dim=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(n, (degree + 1) ** 2 + 2, dim, generator=g, dtype=torch.float64) * 0.6  # extra K unused
    means = torch.randn(n, 3, generator=g, dtype=torch.float64)
    viewmats = look_at(torch.tensor([[3.0, 0.5, -2.0], [-1.0, 2.0, 2.5]]), torch.zeros(3)).double()
    means[0] = torch.linalg.inv(viewmats[1])[:3, 3]  # at a camera centre, up to rounding
    return coeffs.to(dtype), means.to(dtype), viewmats


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_matches_torch_values_and_gradients(degree):
    coeffs, means, viewmats = inputs(degree, seed=degree)
    out = {}
    for name, fn in (("cpu", sh_colors_cpu), ("torch", sh_colors)):
        c, m = coeffs.clone().requires_grad_(True), means.clone().requires_grad_(True)
        colors = fn(degree, c, m, viewmats)
        g = torch.Generator().manual_seed(1)
        w = torch.randn(colors.shape, generator=g, dtype=torch.float64)
        w[torch.rand(colors.shape[:2], generator=g) < 0.3] = 0  # no gradient at all: skipped
        (colors * w).sum().backward()
        out[name] = colors.detach(), c.grad, m.grad
    (c1, gc1, gm1), (c2, gc2, gm2) = out["cpu"], out["torch"]
    assert c1.shape == (2, len(means), 3) and (c1 == 0).any() and (c1 > 0).any()  # some clamped
    assert (c1 - c2).abs().max() < 1e-12
    assert (gc1 - gc2).abs().max() < 1e-12 * gc2.abs().max() and gc1[:, (degree + 1) ** 2:].abs().max() == 0
    if degree == 0:  # no view dependence
        assert gm2 is None and gm1.abs().max() == 0
        return
    assert gm2.abs().max() > 0
    assert (gm1[1:] - gm2[1:]).abs().max() <= 1e-12 * gm2[1:].abs().max()


def test_float32_and_fallbacks():
    coeffs, means, viewmats = inputs(3, dtype=torch.float32)
    c32 = sh_colors_cpu(3, coeffs, means, viewmats)
    assert c32.dtype == torch.float32 and (c32 - sh_colors(3, coeffs, means, viewmats)).abs().max() < 1e-5
    per_camera = coeffs[None].expand(2, -1, -1, -1)  # [C, N, K, D]: the torch version
    assert torch.equal(sh_colors_cpu(3, per_camera, means, viewmats), sh_colors(3, per_camera, means, viewmats))
    with pytest.raises(ValueError, match="needs 16 coefficients"):
        sh_colors_cpu(3, coeffs[:, :9], means, viewmats)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_eval_sh_against_gsplat_and_orthonormal(degree):
    """Our SH against an oracle outside our code (gsplat's pure-torch `_spherical_harmonics`, CPU), and
    the basis orthonormal over the sphere (Fibonacci quadrature: mean of Y_i Y_j x 4 pi = delta_ij)."""
    from gsplat.cuda._torch_impl import _spherical_harmonics

    from gendistill.core.render.sh import eval_sh, num_sh_bases, sh_basis

    g = torch.Generator().manual_seed(degree)
    k = num_sh_bases(degree)
    dirs = torch.randn(500, 3, generator=g, dtype=torch.float64)
    coeffs = torch.randn(500, 16, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(eval_sh(degree, coeffs, dirs), _spherical_harmonics(degree, dirs, coeffs),
                               rtol=1e-10, atol=1e-12)
    n = 20000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5 ** 0.5) * i
    r = (1 - z * z).sqrt()
    points = torch.stack([r * phi.cos(), r * phi.sin(), z], -1)
    basis = sh_basis(degree, points)  # [n, k]
    gram = basis.T @ basis * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(k, dtype=torch.float64), atol=2e-3, rtol=0)
