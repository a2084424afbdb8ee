"""Real spherical harmonics up to degree 3, in the basis and sign convention of 3DGS / gsplat."""

from __future__ import annotations

import math

import torch

__all__ = [
    "SH_C0",
    "num_sh_bases",
    "sh_degree_from_bases",
    "sh_basis",
    "eval_sh",
    "sh_colors",
    "rgb_to_sh",
    "sh_to_rgb",
]

SH_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi))


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients K for a degree in 0..3: (degree + 1) ** 2."""
    if degree not in (0, 1, 2, 3):
        raise ValueError(f"SH degree must be 0, 1, 2 or 3, got {degree}")
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    """Inverse of `num_sh_bases`: the degree of K coefficients (1, 4, 9 or 16)."""
    degree = round(math.sqrt(k)) - 1
    if degree < 0 or (degree + 1) ** 2 != k or degree > 3:
        raise ValueError(f"{k} SH coefficients per channel is not a degree 0-3 layout (1, 4, 9 or 16)")
    return degree


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """SH basis values for unit directions.

    Args:
        degree: 0..3.
        dirs: [..., 3] unit vectors (x, y, z).
    Returns:
        [..., (degree + 1) ** 2]
    """
    k = num_sh_bases(degree)
    out = [torch.full_like(dirs[..., 0], SH_C0)]
    if k > 1:
        x, y, z = dirs.unbind(-1)
        c1 = 0.4886025119029199
        out += [-c1 * y, c1 * z, -c1 * x]
    if k > 4:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.31539156525252005 * (2.0 * zz - xx - yy),
            -1.0925484305920792 * x * z,
            0.5462742152960396 * (xx - yy),
        ]
    if k > 9:
        out += [
            -0.5900435899266435 * y * (3.0 * xx - yy),
            2.890611442640554 * x * y * z,
            -0.4570457994644658 * y * (4.0 * zz - xx - yy),
            0.3731763325901154 * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            -0.4570457994644658 * x * (4.0 * zz - xx - yy),
            1.445305721320277 * z * (xx - yy),
            -0.5900435899266435 * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Evaluate SH coefficients along view directions.

    Args:
        degree: SH degree to use, 0..3; only the first (degree + 1) ** 2 coefficients are read.
        coeffs: [..., K, D] coefficients, K >= (degree + 1) ** 2.
        dirs: [..., 3] directions (normalized here; zero vectors give the DC term only).
    Returns:
        [..., D] raw SH value (add 0.5 and clamp for colours, as 3DGS does).
    """
    k = num_sh_bases(degree)
    if coeffs.shape[-2] < k:
        raise ValueError(f"sh_degree={degree} needs {k} coefficients, colors has {coeffs.shape[-2]}")
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    basis = sh_basis(degree, dirs)  # [..., k]
    return (basis.unsqueeze(-1) * coeffs[..., :k, :]).sum(dim=-2)


def sh_colors(degree: int, coeffs: torch.Tensor, means: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Colours clamp_min(SH(mean - camera centre) + 0.5, 0), as 3DGS and gsplat.

    Args:
        degree: SH degree, 0..3. coeffs: [N, K, D] or [C, N, K, D]. means: [N, 3].
        viewmats: [C, 4, 4] world-to-camera.
    Returns:
        [C, N, D]
    """
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    coeffs = coeffs if coeffs.dim() == 4 else coeffs[None].expand(len(viewmats), -1, -1, -1)
    return torch.clamp_min(eval_sh(degree, coeffs, means[None, :, :] - campos[:, None, :]) + 0.5, 0.0)


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] to the SH DC coefficient (the INRIA `f_dc_*` values): (rgb - 0.5) / C0."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    """SH DC coefficient to RGB (unclamped): dc * C0 + 0.5."""
    return dc * SH_C0 + 0.5
