"""EWA projection of 3D Gaussians to image-plane conics, as gsplat's fused pinhole projection."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALPHA_THRESHOLD", "MAX_EXTEND", "quat_to_rotmat", "covariance_3d", "project_gaussians"]

ALPHA_THRESHOLD = 1.0 / 255.0  # fragments (and Gaussians) fainter than this are skipped
MAX_EXTEND = 3.33  # radius of the screen-space bounding box, in standard deviations


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices of quaternions (wxyz, normalized here).

    Args:
        quats: [..., 4] wxyz, any norm > 0.
    Returns:
        [..., 3, 3]
    """
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances R S S R^T.

    Args:
        quats: [N, 4] wxyz; scales: [N, 3] (activated).
    Returns:
        [N, 3, 3]
    """
    m = quat_to_rotmat(quats) * scales[..., None, :]  # R @ diag(s)
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project Gaussians into C pinhole cameras (gsplat 1.5 `fully_fused_projection`, classic, unpacked).

    The 2D covariance is J W Sigma W^T J^T with the perspective Jacobian J evaluated at the mean
    clamped to 1.3x the field of view, plus `eps2d` on its diagonal. A Gaussian is culled (radii 0
    and zeros elsewhere) when its depth is outside [near_plane, far_plane], the 2D covariance is not
    positive definite, its opacity is below 1/255, both radii are <= radius_clip, or its box misses
    the image. Radii use the opacity-aware extent min(3.33, sqrt(2 ln(255 o))) standard deviations.

    Args:
        means: [N, 3] world positions.
        quats: [N, 4] wxyz rotations (normalized here).
        scales: [N, 3] activated scales.
        opacities: [N] activated opacities.
        viewmats: [C, 4, 4] world-to-camera (OpenCV: +z forward, +y down).
        Ks: [C, 3, 3] intrinsics (fx, fy, cx, cy are read; skew ignored).
        width, height: image size in pixels.
    Returns:
        radii [C, N, 2] int32, means2d [C, N, 2], depths [C, N], conics [C, N, 3] (inverse 2D
        covariance entries 00, 01, 11). Differentiable w.r.t. every float input except through radii.
    """
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
    mean_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    cov_c = rot[:, None] @ covariance_3d(quats, scales)[None] @ rot[:, None].transpose(-1, -2)  # [C, N, 3, 3]

    x, y, z = mean_c.unbind(-1)
    depth_ok = (z >= near_plane) & (z <= far_plane)
    z_safe = torch.where(depth_ok, z, torch.ones_like(z))  # keeps gradients of culled entries finite
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    rz = 1.0 / z_safe
    tx = z_safe * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x * rz))
    ty = z_safe * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y * rz))
    zero = torch.zeros_like(rz)
    jac = torch.stack(
        [fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1
    ).unflatten(-1, (2, 3))  # [C, N, 2, 3]
    cov2d = jac @ cov_c @ jac.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)

    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    det_ok = det > 0
    det_safe = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    with torch.no_grad():
        opac = opacities.detach()[None, :].expand_as(z)
        opac_ok = opac >= ALPHA_THRESHOLD
        ratio = torch.where(opac_ok, opac / ALPHA_THRESHOLD, torch.ones_like(opac))
        extend = torch.clamp_max(torch.sqrt(2.0 * torch.log(ratio)), MAX_EXTEND)
        rad_x = torch.ceil(extend * torch.sqrt(a.detach().clamp_min(0)))
        rad_y = torch.ceil(extend * torch.sqrt(c.detach().clamp_min(0)))
        mx, my = means2d.detach().unbind(-1)
        on_image = (mx + rad_x > 0) & (mx - rad_x < width) & (my + rad_y > 0) & (my - rad_y < height)
        keep = depth_ok & det_ok & opac_ok & ~((rad_x <= radius_clip) & (rad_y <= radius_clip)) & on_image
        radii = torch.stack([rad_x, rad_y], dim=-1).where(keep[..., None], 0).to(torch.int32)

    keep_f = keep[..., None]
    means2d = torch.where(keep_f, means2d, 0.0)
    conics = torch.where(keep_f, conics, 0.0)
    depths = torch.where(keep, z, 0.0)
    return radii, means2d, depths, conics
