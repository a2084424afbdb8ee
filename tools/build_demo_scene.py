"""Build the procedural demo scene `assets/scenes/snowman.ply` (seeded, so it rebuilds identically).

A snowman standing on z = 0, z up, facing +x: body and head (white spheres with coal eyes and
buttons), an orange cone nose and a black top hat with a red band. Every Gaussian is a flat disc on
a part's surface; its part id is stored as the integer vertex property `part`, and the part names
as the PLY comment `part_names: body head nose hat` (id = position). See assets/scenes/README.md.

    python tools/build_demo_scene.py [--out assets/scenes/snowman.ply] [--seed 0] [--preview DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gendistill.core.render.sh import rgb_to_sh  # noqa: E402
from gendistill.core.scene import GaussianScene  # noqa: E402

PART_NAMES = ["body", "head", "nose", "hat"]
COUNTS = {"body": 6000, "head": 4000, "nose": 1500, "hat": 3500}

BODY_C, BODY_R = np.array([0.0, 0.0, 0.5]), 0.5
HEAD_C, HEAD_R = np.array([0.0, 0.0, 1.22]), 0.3
NOSE_BASE, NOSE_R, NOSE_LEN = HEAD_C + np.array([0.26, 0.0, 0.0]), 0.055, 0.28
HAT_Z0, BRIM_T, HAT_H, CROWN_R, BRIM_R = 1.44, 0.03, 0.30, 0.19, 0.33

SNOW = (0.93, 0.94, 0.97)
COAL = (0.05, 0.05, 0.06)
ORANGE = (1.0, 0.45, 0.05)
HAT_BLACK = (0.07, 0.07, 0.08)
BAND_RED = (0.65, 0.06, 0.06)
SHEEN = 0.08  # degree-1 SH term: surfaces facing the camera are this much brighter


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def sample_sphere(rng, n, center, radius):
    """n points uniform on a sphere -> (points [n,3], normals [n,3])."""
    d = _unit(rng.normal(size=(n, 3)))
    return center + radius * d, d


def sample_cone(rng, n):
    """Lateral surface of the nose cone along +x (area-uniform)."""
    t = np.sqrt(rng.uniform(size=n))  # distance from the apex, as a fraction (area grows linearly)
    phi = rng.uniform(0, 2 * math.pi, size=n)
    r = NOSE_R * t
    x = NOSE_BASE[0] + NOSE_LEN * (1 - t)
    pts = np.stack([x, NOSE_BASE[1] + r * np.cos(phi), NOSE_BASE[2] + r * np.sin(phi)], -1)
    slope = NOSE_R / NOSE_LEN
    nrm = _unit(np.stack([np.full(n, slope), np.cos(phi), np.sin(phi)], -1))
    return pts, nrm


def sample_hat(rng, n):
    """Crown side and top, brim top, bottom and rim, each by its area."""
    z1, z2 = HAT_Z0 + BRIM_T, HAT_Z0 + BRIM_T + HAT_H
    areas = np.array([2 * math.pi * CROWN_R * HAT_H, math.pi * CROWN_R**2,
                      math.pi * (BRIM_R**2 - CROWN_R**2), math.pi * BRIM_R**2, 2 * math.pi * BRIM_R * BRIM_T])
    which = rng.choice(5, size=n, p=areas / areas.sum())
    phi = rng.uniform(0, 2 * math.pi, size=n)
    c, s = np.cos(phi), np.sin(phi)
    u = rng.uniform(size=n)
    pts, nrm = np.zeros((n, 3)), np.zeros((n, 3))
    radial = np.stack([c, s, np.zeros(n)], -1)
    up = np.tile([0.0, 0.0, 1.0], (n, 1))
    for k in range(5):
        m = which == k
        if k == 0:  # crown side
            pts[m] = CROWN_R * radial[m] + np.c_[np.zeros((m.sum(), 2)), z1 + HAT_H * u[m]]
            nrm[m] = radial[m]
        elif k == 1:  # crown top
            pts[m] = CROWN_R * np.sqrt(u[m])[:, None] * radial[m] + [0, 0, z2]
            nrm[m] = up[m]
        elif k == 2:  # brim top (annulus)
            r = np.sqrt(CROWN_R**2 + u[m] * (BRIM_R**2 - CROWN_R**2))
            pts[m] = r[:, None] * radial[m] + [0, 0, z1]
            nrm[m] = up[m]
        elif k == 3:  # brim bottom (disc; its centre is hidden in the head and dropped later)
            pts[m] = BRIM_R * np.sqrt(u[m])[:, None] * radial[m] + [0, 0, HAT_Z0]
            nrm[m] = -up[m]
        else:  # brim rim
            pts[m] = BRIM_R * radial[m] + np.c_[np.zeros((m.sum(), 2)), HAT_Z0 + BRIM_T * u[m]]
            nrm[m] = radial[m]
    return pts, nrm


def inside(part: str, p: np.ndarray, margin: float = 0.005) -> np.ndarray:
    """[n] bool: points strictly inside the solid of `part`."""
    if part == "body":
        return np.linalg.norm(p - BODY_C, axis=-1) < BODY_R - margin
    if part == "head":
        return np.linalg.norm(p - HEAD_C, axis=-1) < HEAD_R - margin
    if part == "nose":
        t = (p[:, 0] - NOSE_BASE[0]) / NOSE_LEN  # 0 at the base, 1 at the apex
        rr = np.hypot(p[:, 1] - NOSE_BASE[1], p[:, 2] - NOSE_BASE[2])
        return (t > 0) & (t < 1) & (rr < NOSE_R * (1 - t) - margin)
    rr = np.hypot(p[:, 0], p[:, 1])
    crown = (rr < CROWN_R - margin) & (p[:, 2] > HAT_Z0 + margin) & (p[:, 2] < HAT_Z0 + BRIM_T + HAT_H - margin)
    brim = (rr < BRIM_R - margin) & (p[:, 2] > HAT_Z0 + margin) & (p[:, 2] < HAT_Z0 + BRIM_T - margin)
    return crown | brim


def colors_for(part: str, p: np.ndarray, rng) -> np.ndarray:
    n = len(p)
    rgb = np.tile(np.array({"body": SNOW, "head": SNOW, "nose": ORANGE, "hat": HAT_BLACK}[part]), (n, 1))
    if part in ("body", "head"):
        rgb += rng.normal(scale=0.015, size=(n, 3))
    if part == "head":  # two coal eyes, looking along +x
        for side in (-1, 1):
            eye = HEAD_C + HEAD_R * _unit(np.array([0.88, 0.36 * side, 0.32]))
            rgb[np.linalg.norm(p - eye, axis=-1) < 0.042] = COAL
        for k in range(5):  # a smile of coal dots
            a = (k - 2) * 0.28
            dot = HEAD_C + HEAD_R * _unit(np.array([0.92, 0.42 * math.sin(a), -0.30 + 0.10 * (1 - math.cos(a))]))
            rgb[np.linalg.norm(p - dot, axis=-1) < 0.022] = COAL
    if part == "body":  # three buttons down the front
        for el in (0.25, 0.6, 0.95):
            b = BODY_C + BODY_R * _unit(np.array([math.cos(el), 0.0, math.sin(el)]))
            rgb[np.linalg.norm(p - b, axis=-1) < 0.045] = COAL
    if part == "hat":
        band = (np.hypot(p[:, 0], p[:, 1]) > CROWN_R - 0.01) & (p[:, 2] > HAT_Z0 + BRIM_T + 0.005) \
            & (p[:, 2] < HAT_Z0 + BRIM_T + 0.06)
        rgb[band] = BAND_RED
    return np.clip(rgb, 0.0, 1.0)


def quats_from_normals(nrm: np.ndarray, rng) -> np.ndarray:
    """wxyz quaternions of rotations taking local +z to each normal (random twist about it)."""
    t1 = np.cross(nrm, np.where(np.abs(nrm[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]]))
    t1 = _unit(t1)
    t2 = np.cross(nrm, t1)
    a = rng.uniform(0, 2 * math.pi, size=(len(nrm), 1))
    t1, t2 = np.cos(a) * t1 + np.sin(a) * t2, -np.sin(a) * t1 + np.cos(a) * t2
    r = np.stack([t1, t2, nrm], axis=-1)  # columns: local axes in world
    w = np.sqrt(np.clip(1 + r[:, 0, 0] + r[:, 1, 1] + r[:, 2, 2], 1e-12, None)) / 2
    q = np.stack([w, (r[:, 2, 1] - r[:, 1, 2]) / (4 * w), (r[:, 0, 2] - r[:, 2, 0]) / (4 * w),
                  (r[:, 1, 0] - r[:, 0, 1]) / (4 * w)], -1)
    bad = w < 1e-3  # near 180-degree rotations: fall back to scipy's robust conversion
    if bad.any():
        from scipy.spatial.transform import Rotation

        xyzw = Rotation.from_matrix(r[bad]).as_quat()
        q[bad] = xyzw[:, [3, 0, 1, 2]]
    return _unit(q)


def build_snowman(seed: int = 0) -> GaussianScene:
    """The demo scene: ~15k surface Gaussians, SH degree 1, `part` extra and part-name comment."""
    rng = np.random.default_rng(seed)
    samplers = {"body": lambda n: sample_sphere(rng, n, BODY_C, BODY_R),
                "head": lambda n: sample_sphere(rng, n, HEAD_C, HEAD_R),
                "nose": lambda n: sample_cone(rng, n), "hat": lambda n: sample_hat(rng, n)}
    chunks = []
    for pid, part in enumerate(PART_NAMES):
        want = COUNTS[part]
        pts, nrm = samplers[part](want * 2)
        keep = np.ones(len(pts), bool)
        for other in PART_NAMES:
            if other != part:
                keep &= ~inside(other, pts)
        keep &= pts[:, 2] > 0.02  # the bottom of the body sits in the snow
        pts, nrm = pts[keep][:want], nrm[keep][:want]
        assert len(pts) == want, (part, len(pts))
        # disc radius from the local spacing: mean distance to the 4 nearest neighbours in the part
        d, _ = cKDTree(pts).query(pts, k=5)
        s = 1.0 * d[:, 1:].mean(1)
        scales = np.stack([s, s, 0.12 * s], -1)
        rgb = colors_for(part, pts, rng)
        chunks.append((pts, nrm, scales, rgb, np.full(want, pid, np.int32)))
    pts, nrm, scales, rgb, part = (np.concatenate(x) for x in zip(*chunks))
    n = len(pts)
    c1 = 0.4886025119029199  # degree-1 SH constant: rest coeffs giving -SHEEN * dot(view dir, normal)
    rest = SHEEN / c1 * np.stack([nrm[:, 1], -nrm[:, 2], nrm[:, 0]], -1)  # [n, 3] bases
    sh = np.zeros((n, 4, 3), np.float32)
    sh[:, 0] = rgb_to_sh(torch.from_numpy(rgb - 0.6 * SHEEN)).numpy()
    sh[:, 1:] = rest[:, :, None]
    opacity = 0.95
    return GaussianScene(
        means=torch.from_numpy(pts).float(),
        quats=torch.from_numpy(quats_from_normals(nrm, rng)).float(),
        log_scales=torch.from_numpy(np.log(scales)).float(),
        opacity_logits=torch.full((n,), math.log(opacity / (1 - opacity))),
        sh=torch.from_numpy(sh),
        extras={"part": torch.from_numpy(part)},
        comments=["part_names: " + " ".join(PART_NAMES), "up: +z",
                  f"generator: gendistill tools/build_demo_scene.py --seed {seed}"],
    )


def preview(scene: GaussianScene, out_dir: Path, n: int = 4, size: int = 256) -> list[Path]:
    """Render an orbit of `n` views to PNGs in `out_dir` (needs gendistill.core.render)."""
    import imageio.v3 as iio

    from gendistill.core.cameras import orbit_path
    from gendistill.core.io import atomic_path

    cams = orbit_path(scene.center(), 3.2, n, elevation_deg=12, fov_deg=40, width=size, height=size)
    img, _, _ = scene.render(cams, backgrounds=torch.full((n, 3), 0.55), backend="torch")
    out = []
    for i in range(n):
        p = out_dir / f"snowman_{i:02d}.png"
        with atomic_path(p) as tmp:
            iio.imwrite(tmp, (img[i].clamp(0, 1) * 255).round().byte().numpy())
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "scenes" / "snowman.ply")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", type=Path, default=None, help="also render a few orbit views into this folder")
    args = ap.parse_args(argv)
    scene = build_snowman(args.seed)
    path = scene.save_ply(args.out)
    print(f"wrote {path} ({len(scene)} Gaussians, {path.stat().st_size / 1e6:.2f} MB)")
    if args.preview is not None:
        for p in preview(scene, args.preview):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
