"""The "cpu" backend's view-dependent colours: `sh.sh_colors` compiled with numba, with its own backward.

One (camera, Gaussian) at a time in float64: the unit direction from the camera centre, the SH basis
of `sh.sh_basis` (degree 0-3) and the colour clamp_min(SH + 0.5, 0), instead of about thirty small
torch operations (and as many in the backward) that dominate a CPU edit step's colour cost.
Gradients reach the coefficients and the means; a call the kernel does not cover (per-camera
coefficients, viewmats that require gradients, non-CPU tensors) goes to the torch version.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .cpu_backend import _f64
from .sh import SH_C0, num_sh_bases, sh_colors

__all__ = ["sh_colors_cpu"]

_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, 0.31539156525252005, 0.5462742152960396)
_C3 = (0.5900435899266435, 2.890611442640554, 0.4570457994644658, 0.3731763325901154, 1.445305721320277)


@njit(cache=True, inline="always")
def _basis(k, x, y, z, out):
    """out[:k] = the SH basis at the unit direction (x, y, z), as `sh.sh_basis`."""
    xx, yy, zz = x * x, y * y, z * z  # not inside a branch: numba's parfors got such values wrong
    out[0] = SH_C0
    if k > 1:
        out[1], out[2], out[3] = -_C1 * y, _C1 * z, -_C1 * x
    if k > 4:
        out[4] = _C2[0] * x * y
        out[5] = -_C2[0] * y * z
        out[6] = _C2[1] * (2.0 * zz - xx - yy)
        out[7] = -_C2[0] * x * z
        out[8] = _C2[2] * (xx - yy)
    if k > 9:
        out[9] = -_C3[0] * y * (3.0 * xx - yy)
        out[10] = _C3[1] * x * y * z
        out[11] = -_C3[2] * y * (4.0 * zz - xx - yy)
        out[12] = _C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy)
        out[13] = -_C3[2] * x * (4.0 * zz - xx - yy)
        out[14] = _C3[4] * z * (xx - yy)
        out[15] = -_C3[0] * x * (xx - 3.0 * yy)


@njit(cache=True, inline="always")
def _basis_vjp(k, x, y, z, vb):
    """(d/dx, d/dy, d/dz) of sum_i vb[i] * basis_i(x, y, z), the basis as a polynomial (not yet
    restricted to unit vectors)."""
    xx, yy, zz = x * x, y * y, z * z
    gx = gy = gz = 0.0
    if k > 1:
        gx -= _C1 * vb[3]
        gy -= _C1 * vb[1]
        gz += _C1 * vb[2]
    if k > 4:
        a, b, c = _C2
        gx += a * y * vb[4] - 2.0 * b * x * vb[6] - a * z * vb[7] + 2.0 * c * x * vb[8]
        gy += a * x * vb[4] - a * z * vb[5] - 2.0 * b * y * vb[6] - 2.0 * c * y * vb[8]
        gz += -a * y * vb[5] + 4.0 * b * z * vb[6] - a * x * vb[7]
    if k > 9:
        a9, a10, a11, a12, a14 = _C3
        gx += (-6.0 * a9 * x * y * vb[9] + a10 * y * z * vb[10] + 2.0 * a11 * x * y * vb[11]
               - 6.0 * a12 * x * z * vb[12] - a11 * (4.0 * zz - 3.0 * xx - yy) * vb[13] + 2.0 * a14 * x * z * vb[14]
               - 3.0 * a9 * (xx - yy) * vb[15])
        gy += (-3.0 * a9 * (xx - yy) * vb[9] + a10 * x * z * vb[10] - a11 * (4.0 * zz - xx - 3.0 * yy) * vb[11]
               - 6.0 * a12 * y * z * vb[12] + 2.0 * a11 * x * y * vb[13] - 2.0 * a14 * y * z * vb[14]
               + 6.0 * a9 * x * y * vb[15])
        gz += (a10 * x * y * vb[10] - 8.0 * a11 * y * z * vb[11] + a12 * (6.0 * zz - 3.0 * xx - 3.0 * yy) * vb[12]
               - 8.0 * a11 * x * z * vb[13] + a14 * (xx - yy) * vb[14])
    return gx, gy, gz


@njit(cache=True, inline="always")
def _unit(means, campos, c, g):
    """The direction from camera c's centre to mean g, its norm clamped below at 1e-12 (as torch's
    `normalize`), and the unit vector."""
    dx, dy, dz = means[g, 0] - campos[c, 0], means[g, 1] - campos[c, 1], means[g, 2] - campos[c, 2]
    n = max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
    return n, dx / n, dy / n, dz / n


@njit(cache=True, parallel=True)
def _forward(k, coeffs, means, campos, raw):
    """raw [C, N, D] = SH + 0.5 (the colour before its clamp at 0), from coeffs [N, >=k, D], means
    [N, 3] and camera centres campos [C, 3]."""
    n_cams, n, dim = raw.shape
    for g in prange(n):
        basis = np.empty(16)
        for c in range(n_cams):
            _, x, y, z = _unit(means, campos, c, g)
            _basis(k, x, y, z, basis)
            for d in range(dim):
                s = 0.0
                for i in range(k):
                    s += basis[i] * coeffs[g, i, d]
                raw[c, g, d] = s + 0.5


@njit(cache=True, parallel=True)
def _backward(k, coeffs, means, campos, raw, v_colors, v_coeffs, v_means):
    """Adds the gradients of the clamped colours' loss (v_colors [C, N, D]) to v_coeffs and v_means."""
    n_cams, n, dim = raw.shape
    for g in prange(n):
        basis, vb = np.empty(16), np.empty(16)
        for c in range(n_cams):
            zero = True
            for d in range(dim):
                zero = zero and v_colors[c, g, d] == 0.0
            if zero:
                continue  # adds nothing
            nrm, x, y, z = _unit(means, campos, c, g)
            _basis(k, x, y, z, basis)
            vb[:k] = 0.0
            for d in range(dim):
                v = v_colors[c, g, d] if raw[c, g, d] >= 0.0 else 0.0  # clamp_min passes x >= 0
                for i in range(k):
                    v_coeffs[g, i, d] += basis[i] * v
                    vb[i] += coeffs[g, i, d] * v
            gx, gy, gz = _basis_vjp(k, x, y, z, vb)
            if nrm > 1e-12:  # through u = d / |d|: (v - u (u . v)) / |d|
                dot = x * gx + y * gy + z * gz
                gx, gy, gz = gx - x * dot, gy - y * dot, gz - z * dot
            v_means[g, 0] += gx / nrm
            v_means[g, 1] += gy / nrm
            v_means[g, 2] += gz / nrm


class _SHColorsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coeffs, means, campos, k):
        arrays = [_f64(t) for t in (coeffs, means)] + [campos]
        n_cams, n, dim = campos.shape[0], means.shape[0], coeffs.shape[-1]
        raw = np.empty((n_cams, n, dim))
        _forward(k, *arrays, raw)
        ctx.arrays, ctx.raw, ctx.k = arrays, raw, k
        ctx.like = [(t.dtype, t.device) for t in (coeffs, means)]
        return torch.from_numpy(np.maximum(raw, 0.0)).to(coeffs.device, coeffs.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_colors):
        coeffs, means, campos = ctx.arrays
        v_coeffs, v_means = np.zeros_like(coeffs), np.zeros_like(means)
        _backward(ctx.k, coeffs, means, campos, ctx.raw, _f64(v_colors), v_coeffs, v_means)
        grads = [torch.from_numpy(x).to(device, dtype) for x, (dtype, device) in zip((v_coeffs, v_means), ctx.like)]
        return (*grads, None, None)


def sh_colors_cpu(degree: int, coeffs: Tensor, means: Tensor, viewmats: Tensor) -> Tensor:
    """`sh.sh_colors` (same arguments and output) compiled for the CPU, float64 inside."""
    if coeffs.dim() != 3 or viewmats.requires_grad or means.device.type != "cpu" or coeffs.device.type != "cpu":
        return sh_colors(degree, coeffs, means, viewmats)
    k = num_sh_bases(degree)
    if coeffs.shape[1] < k:
        raise ValueError(f"sh_degree={degree} needs {k} coefficients, colors has {coeffs.shape[1]}")
    campos = np.ascontiguousarray(np.linalg.inv(_f64(viewmats))[:, :3, 3])
    return _SHColorsCPU.apply(coeffs[:, :k], means, campos, k)
