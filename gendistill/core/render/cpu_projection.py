"""The "cpu" backend's projection: `project_gaussians` compiled with numba, with its own backward.

Same maths as `projection.project_gaussians` (gsplat 1.5's fused pinhole projection), one
(camera, Gaussian) at a time in float64, so a step on a small scene is not dominated by the
overhead of a hundred small torch operations. Gradients reach means, quats and scales; a call
with viewmats or Ks that require gradients goes to the torch projection instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .cpu_backend import _f64
from .projection import ALPHA_THRESHOLD, MAX_EXTEND, project_gaussians

__all__ = ["project_gaussians_cpu"]


@njit(cache=True, inline="always")
def _mm(a, b, out):
    """out = a @ b for small matrices."""
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            s = 0.0
            for t in range(a.shape[1]):
                s += a[i, t] * b[t, j]
            out[i, j] = s


@njit(cache=True, inline="always")
def _mm_nt(a, b, out):
    """out = a @ b.T for small matrices."""
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            s = 0.0
            for t in range(a.shape[1]):
                s += a[i, t] * b[j, t]
            out[i, j] = s


@njit(cache=True, inline="always")
def _mm_tn(a, b, out):
    """out = a.T @ b for small matrices."""
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            s = 0.0
            for t in range(a.shape[0]):
                s += a[t, i] * b[t, j]
            out[i, j] = s


@njit(cache=True, inline="always")
def _gaussian(quats, scales, g, rq, m, sig):
    """Per Gaussian g (any camera), into the scratch arrays: rq (rotation of the unit quaternion),
    m = rq diag(s) and sig = m m^T. Returns the unit quaternion and the quaternion's norm."""
    qn = math.sqrt(quats[g, 0] ** 2 + quats[g, 1] ** 2 + quats[g, 2] ** 2 + quats[g, 3] ** 2)
    inv = 1.0 / max(qn, 1e-12)
    qw, qx, qy, qz = quats[g, 0] * inv, quats[g, 1] * inv, quats[g, 2] * inv, quats[g, 3] * inv
    rq[0, 0], rq[0, 1], rq[0, 2] = 1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)
    rq[1, 0], rq[1, 1], rq[1, 2] = 2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)
    rq[2, 0], rq[2, 1], rq[2, 2] = 2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)
    for i in range(3):
        for j in range(3):
            m[i, j] = rq[i, j] * scales[g, j]
    _mm_nt(m, m, sig)
    return qw, qx, qy, qz, qn


@njit(cache=True, inline="always")
def _camera(means, views, ks, g, c, width, height, sig, w, cov_c, jac, tmp23, tmp33, cov2d):
    """Gaussian g (its sig from `_gaussian`) in camera c, into the scratch arrays: w (world-to-camera
    rotation), cov_c = W sig W^T, jac [2, 3] and cov2d = jac cov_c jac^T.
    Returns the camera-space mean, tx, ty and whether x / z and y / z were clamped."""
    for i in range(3):
        for j in range(3):
            w[i, j] = views[c, i, j]
    x = w[0, 0] * means[g, 0] + w[0, 1] * means[g, 1] + w[0, 2] * means[g, 2] + views[c, 0, 3]
    y = w[1, 0] * means[g, 0] + w[1, 1] * means[g, 1] + w[1, 2] * means[g, 2] + views[c, 1, 3]
    z = w[2, 0] * means[g, 0] + w[2, 1] * means[g, 1] + w[2, 2] * means[g, 2] + views[c, 2, 3]
    _mm(w, sig, tmp33)
    _mm_nt(tmp33, w, cov_c)
    fx, fy, cx, cy = ks[c, 0, 0], ks[c, 1, 1], ks[c, 0, 2], ks[c, 1, 2]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y
    rz = 1.0 / z
    u, v = x * rz, y * rz
    ux = min(lim_xp, max(-lim_xn, u))
    uy = min(lim_yp, max(-lim_yn, v))
    tx, ty = z * ux, z * uy
    jac[0, 0], jac[0, 1], jac[0, 2] = fx * rz, 0.0, -fx * tx * rz * rz
    jac[1, 0], jac[1, 1], jac[1, 2] = 0.0, fy * rz, -fy * ty * rz * rz
    _mm(jac, cov_c, tmp23)
    _mm_nt(tmp23, jac, cov2d)
    return x, y, z, tx, ty, ux != u, uy != v


@njit(cache=True, parallel=True)
def _forward(means, quats, scales, opacities, views, ks, width, height, near, far, eps2d, radius_clip,
             radii, means2d, depths, conics):
    n_cams, n = views.shape[0], means.shape[0]
    n_chunks = min(n, 256)
    for ch in prange(n_chunks):
        rq, m, sig, cov_c, tmp33 = (np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)),
                                    np.empty((3, 3)))
        jac, tmp23, cov2d, w = np.empty((2, 3)), np.empty((2, 3)), np.empty((2, 2)), np.empty((3, 3))
        for g in range(ch * n // n_chunks, (ch + 1) * n // n_chunks):
            for c in range(n_cams):
                radii[c, g, 0] = radii[c, g, 1] = 0
                means2d[c, g, 0] = means2d[c, g, 1] = depths[c, g] = 0.0
                conics[c, g, 0] = conics[c, g, 1] = conics[c, g, 2] = 0.0
            if opacities[g] < ALPHA_THRESHOLD:
                continue
            _gaussian(quats, scales, g, rq, m, sig)
            for c in range(n_cams):
                z = views[c, 2, 0] * means[g, 0] + views[c, 2, 1] * means[g, 1] + views[c, 2, 2] * means[g, 2] + \
                    views[c, 2, 3]
                if not (z >= near and z <= far):
                    continue
                x, y, z = _camera(means, views, ks, g, c, width, height, sig, w, cov_c, jac, tmp23, tmp33, cov2d)[:3]
                a, b, cc = cov2d[0, 0] + eps2d, cov2d[0, 1], cov2d[1, 1] + eps2d
                det = a * cc - b * b
                if not det > 0.0:
                    continue
                extend = min(math.sqrt(2.0 * math.log(opacities[g] / ALPHA_THRESHOLD)), MAX_EXTEND)
                rx, ry = math.ceil(extend * math.sqrt(max(a, 0.0))), math.ceil(extend * math.sqrt(max(cc, 0.0)))
                mx = ks[c, 0, 0] * x / z + ks[c, 0, 2]
                my = ks[c, 1, 1] * y / z + ks[c, 1, 2]
                if rx <= radius_clip and ry <= radius_clip:
                    continue
                if not (mx + rx > 0 and mx - rx < width and my + ry > 0 and my - ry < height):
                    continue
                radii[c, g, 0], radii[c, g, 1] = rx, ry
                means2d[c, g, 0], means2d[c, g, 1], depths[c, g] = mx, my, z
                conics[c, g, 0], conics[c, g, 1], conics[c, g, 2] = cc / det, -b / det, a / det


@njit(cache=True, parallel=True)
def _backward(means, quats, scales, views, ks, width, height, eps2d, radii, v_means2d, v_depths, v_conics,
              v_means, v_quats, v_scales):
    """Vector-Jacobian product of `_forward` for the kept (radii > 0) entries, summed over cameras;
    entries whose output gradients are all zero add nothing and are skipped."""
    n_cams, n = views.shape[0], means.shape[0]
    n_chunks = min(n, 256)
    for ch in prange(n_chunks):
        rq, m, sig, cov_c, tmp33 = (np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)),
                                    np.empty((3, 3)))
        jac, tmp23, cov2d = np.empty((2, 3)), np.empty((2, 3)), np.empty((2, 2))
        inv, gs, t22, v_cov2d = np.empty((2, 2)), np.empty((2, 2)), np.empty((2, 2)), np.empty((2, 2))
        v_cov_c, v_sig, v_sigma, v_m, v_jac = (np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)),
                                               np.empty((2, 3)))
        w = np.empty((3, 3))
        used = np.empty(n_cams, np.bool_)
        for g in range(ch * n // n_chunks, (ch + 1) * n // n_chunks):
            for c in range(n_cams):
                used[c] = (radii[c, g, 0] > 0 or radii[c, g, 1] > 0) and not (
                    v_means2d[c, g, 0] == 0.0 and v_means2d[c, g, 1] == 0.0 and v_depths[c, g] == 0.0
                    and v_conics[c, g, 0] == 0.0 and v_conics[c, g, 1] == 0.0 and v_conics[c, g, 2] == 0.0)
            if not used.any():
                continue  # culled or without gradient in every camera: adds nothing
            # (no value set under a condition is read later: numba's parfors got such values wrong)
            qw, qx, qy, qz, qn = _gaussian(quats, scales, g, rq, m, sig)
            v_sigma[:] = 0.0
            for c in range(n_cams):
                if not used[c]:
                    continue
                x, y, z, tx, ty, clamp_x, clamp_y = _camera(means, views, ks, g, c, width, height, sig, w, cov_c,
                                                            jac, tmp23, tmp33, cov2d)
                fx, fy = ks[c, 0, 0], ks[c, 1, 1]
                rz = 1.0 / z
                a, b, cc = cov2d[0, 0] + eps2d, cov2d[0, 1], cov2d[1, 1] + eps2d
                det = a * cc - b * b
                inv[0, 0], inv[0, 1], inv[1, 0], inv[1, 1] = cc / det, -b / det, -b / det, a / det
                gs[0, 0], gs[1, 1] = v_conics[c, g, 0], v_conics[c, g, 2]
                gs[0, 1] = gs[1, 0] = 0.5 * v_conics[c, g, 1]
                _mm(inv, gs, t22)
                _mm(t22, inv, v_cov2d)
                for i in range(2):
                    for j in range(2):
                        v_cov2d[i, j] = -v_cov2d[i, j]  # d(C^-1) = -C^-1 dC C^-1, all symmetric
                _mm(v_cov2d, jac, tmp23)
                _mm_tn(jac, tmp23, v_cov_c)  # J^T V J
                _mm(tmp23, cov_c, v_jac)  # V J cov_c (times 2 below)
                _mm_tn(w, v_cov_c, tmp33)
                _mm(tmp33, w, v_sig)  # W^T V W
                for i in range(3):
                    for j in range(3):
                        v_sigma[i, j] += v_sig[i, j]
                # J = [[fx rz, 0, -fx tx rz^2], [0, fy rz, -fy ty rz^2]]; tx = x unless clamped (then z * lim)
                j00, j11, j02, j12 = 2 * v_jac[0, 0], 2 * v_jac[1, 1], 2 * v_jac[0, 2], 2 * v_jac[1, 2]
                v_rz = fx * j00 + fy * j11 - 2 * rz * (fx * tx * j02 + fy * ty * j12)
                v_tx, v_ty = -fx * rz * rz * j02, -fy * rz * rz * j12
                v_x = fx * rz * v_means2d[c, g, 0]
                v_y = fy * rz * v_means2d[c, g, 1]
                v_rz += fx * x * v_means2d[c, g, 0] + fy * y * v_means2d[c, g, 1]
                v_z = v_depths[c, g] - rz * rz * v_rz
                if clamp_x:
                    v_z += v_tx * tx / z
                else:
                    v_x += v_tx
                if clamp_y:
                    v_z += v_ty * ty / z
                else:
                    v_y += v_ty
                for j in range(3):
                    v_means[g, j] += w[0, j] * v_x + w[1, j] * v_y + w[2, j] * v_z
            # sig = m m^T, summed over the cameras: v_m = 2 v_sigma m (v_sigma symmetric)
            _mm(v_sigma, m, v_m)
            for j in range(3):
                v_scales[g, j] += 2.0 * (v_m[0, j] * rq[0, j] + v_m[1, j] * rq[1, j] + v_m[2, j] * rq[2, j])
            for i in range(3):
                for j in range(3):
                    v_m[i, j] *= 2.0 * scales[g, j]  # now dL/d rq
            r = v_m
            v_qw = 2 * (-qz * r[0, 1] + qy * r[0, 2] + qz * r[1, 0] - qx * r[1, 2] - qy * r[2, 0] + qx * r[2, 1])
            v_qx = 2 * (qy * r[0, 1] + qz * r[0, 2] + qy * r[1, 0] - 2 * qx * r[1, 1] - qw * r[1, 2]
                        + qz * r[2, 0] + qw * r[2, 1] - 2 * qx * r[2, 2])
            v_qy = 2 * (-2 * qy * r[0, 0] + qx * r[0, 1] + qw * r[0, 2] + qx * r[1, 0] + qz * r[1, 2]
                        - qw * r[2, 0] + qz * r[2, 1] - 2 * qy * r[2, 2])
            v_qz = 2 * (-2 * qz * r[0, 0] - qw * r[0, 1] + qx * r[0, 2] + qw * r[1, 0] - 2 * qz * r[1, 1]
                        + qy * r[1, 2] + qx * r[2, 0] + qy * r[2, 1])
            dot = qw * v_qw + qx * v_qx + qy * v_qy + qz * v_qz
            inv_n = 1.0 / max(qn, 1e-12)
            v_quats[g, 0] += (v_qw - qw * dot) * inv_n
            v_quats[g, 1] += (v_qx - qx * dot) * inv_n
            v_quats[g, 2] += (v_qy - qy * dot) * inv_n
            v_quats[g, 3] += (v_qz - qz * dot) * inv_n


class _ProjectCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, ks, width, height, near, far, eps2d, radius_clip):
        arrays = [_f64(t) for t in (means, quats, scales, viewmats, ks)]
        n_cams, n = viewmats.shape[0], means.shape[0]
        radii = np.empty((n_cams, n, 2), np.int32)
        means2d, depths, conics = np.empty((n_cams, n, 2)), np.empty((n_cams, n)), np.empty((n_cams, n, 3))
        _forward(arrays[0], arrays[1], arrays[2], _f64(opacities), arrays[3], arrays[4], float(width), float(height),
                 float(near), float(far), float(eps2d), float(radius_clip), radii, means2d, depths, conics)
        ctx.arrays, ctx.radii, ctx.width, ctx.height, ctx.eps2d = arrays, radii, width, height, eps2d
        ctx.like = [(t.dtype, t.device) for t in (means, quats, scales)]
        radii_t = torch.from_numpy(radii).to(means.device)
        ctx.mark_non_differentiable(radii_t)
        out = [torch.from_numpy(x).to(means.device, means.dtype) for x in (means2d, depths, conics)]
        return (radii_t, *out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _, v_means2d, v_depths, v_conics):
        means, quats, scales, viewmats, ks = ctx.arrays
        v = [np.zeros_like(x) for x in (means, quats, scales)]
        _backward(means, quats, scales, viewmats, ks, float(ctx.width), float(ctx.height), float(ctx.eps2d),
                  ctx.radii, _f64(v_means2d), _f64(v_depths), _f64(v_conics), *v)
        grads = [torch.from_numpy(x).to(device, dtype) for x, (dtype, device) in zip(v, ctx.like)]
        return (*grads, None, None, None, None, None, None, None, None, None)


def project_gaussians_cpu(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor,
                          Ks: Tensor, width: int, height: int, near_plane: float = 0.01, far_plane: float = 1e10,
                          eps2d: float = 0.3, radius_clip: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`project_gaussians` (same arguments and outputs) compiled for the CPU, float64 inside."""
    if viewmats.requires_grad or Ks.requires_grad or means.device.type != "cpu":
        return project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane,
                                 eps2d, radius_clip)
    radii, means2d, depths, conics = _ProjectCPU.apply(means, quats, scales, opacities.detach(), viewmats, Ks, width,
                                                       height, near_plane, far_plane, eps2d, radius_clip)
    return radii, means2d, depths, conics
