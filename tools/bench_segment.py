"""Benchmark 3D part segmentation: 3D-GALP vs GaussianEditor-style voting, clean and noisy masks.

    .venv/bin/python tools/bench_segment.py                      # snowman, 20,000 Gaussians, 24 views at 128x128
    .venv/bin/python tools/bench_segment.py --gaussians 0 --steps 300 --out /tmp/seg
    .venv/bin/python tools/bench_segment.py --variants romap --foreground-only

3D-GALP runs once per `GALPConfig.variant` in `--variants` (default both: "ours" and "romap", the
released RoMaP code); the table has a row per mask set, method and variant.

The scene is the demo snowman (true part of every Gaussian in its `part` property), resampled to
`--gaussians` Gaussians (extra ones are jittered copies of random originals, same part). Masks of
every part are rendered from the truth for 24 views (two rings, 12 at 10 and 12 at 45 degrees
elevation); the noisy variant changes 30% of the views: every part boundary eroded or dilated
by 2-5 pixels and a wrong blob (a disk of 5-9 px radius, given to a random part) painted in.

Voting is GaussianEditor's `update_mask`: each Gaussian's mask value averaged over every pixel it
composites into (each pixel once, as its `apply_weights` kernel counts), above 0.5.

3D mIoU is the mean over parts of the IoU of the boolean 3D masks, counted over the Gaussians
that contribute to some view: total compositing weight (sum of alpha * T over all pixels of all
views) >= `--min-weight` (default 0.05 pixel). Gaussians hidden inside the figure are never seen
and no method can label them, so they are left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gendistill.core.cameras import Cameras, orbit_path  # noqa: E402
from gendistill.core.scene import GaussianScene  # noqa: E402
from gendistill.splat_edit.galp import (  # noqa: E402
    VARIANTS,
    GALPConfig,
    LabelField,
    contribution_weights,
    mask_iou,
    vote_masks,
)
from gendistill.splat_edit.part_masks import scene_part_ids, truth_part_masks  # noqa: E402


def resample(scene: GaussianScene, n: int, seed: int = 0) -> GaussianScene:
    """`scene` with n Gaussians: the originals (first) plus jittered copies of random ones."""
    if n <= len(scene):
        return scene
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(scene), (n - len(scene),), generator=g)
    extra = scene.subset(pick)
    jitter = torch.randn(extra.means.shape, generator=g) * extra.scales().mean(-1, keepdim=True) * 0.5
    extra.means = extra.means + jitter
    return GaussianScene.concat([scene, extra])


def bench_cameras(scene: GaussianScene, n: int = 24, size: int = 128) -> Cameras:
    half = n // 2
    ring = lambda k, el, start: orbit_path(scene.center(), 3.2, k, elevation_deg=el, fov_deg=40,  # noqa: E731
                                           width=size, height=size, start_deg=start)
    return Cameras.cat([ring(half, 10.0, 0.0), ring(n - half, 45.0, 15.0)])


def noisy_masks(masks: torch.Tensor, frac: float = 0.3, seed: int = 0, edge_px: tuple[int, int] = (2, 5),
                blob_px: tuple[int, int] = (5, 9)) -> torch.Tensor:
    """A copy of masks [C, P, H, W] where `frac` of the views have every part eroded or dilated by
    `edge_px` (inclusive range) pixels and one wrong blob (a disk of radius in `blob_px`, given to
    a random part) painted in."""
    g = torch.Generator().manual_seed(seed)
    c, p, h, w = masks.shape
    out = masks.clone()
    views = torch.randperm(c, generator=g)[: round(frac * c)]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for v in views.tolist():
        for j in range(p):
            r = int(torch.randint(edge_px[0], edge_px[1] + 1, (1,), generator=g))
            m = out[v, j][None, None]
            if bool(torch.rand(1, generator=g) < 0.5):
                m = torch.nn.functional.max_pool2d(m, 2 * r + 1, 1, r)
            else:
                m = -torch.nn.functional.max_pool2d(-m, 2 * r + 1, 1, r)
            out[v, j] = m[0, 0]
        fg = masks[v].amax(0).nonzero()
        cy, cx = fg[int(torch.randint(0, len(fg), (1,), generator=g))].tolist()
        rad = int(torch.randint(blob_px[0], blob_px[1] + 1, (1,), generator=g))
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
        part = int(torch.randint(0, p, (1,), generator=g))
        out[v, :, disk] = 0.0
        out[v, part, disk] = 1.0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default=str(ROOT / "assets/scenes/snowman.ply"))
    ap.add_argument("--gaussians", type=int, default=20000, help="resample to this many (0: keep)")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    ap.add_argument("--min-weight", type=float, default=0.05)
    ap.add_argument("--edge-px", default="2,5", help="noisy views: erosion / dilation range in pixels")
    ap.add_argument("--blob-px", default="5,9", help="noisy views: wrong-blob radius range in pixels")
    ap.add_argument("--noisy-frac", type=float, default=0.3, help="fraction of noisy views")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="GALPConfig.variant values to run, comma-separated")
    ap.add_argument("--foreground-only", action="store_true", help="GALPConfig.foreground_only")
    ap.add_argument("--out", default=None, help="write masks of the clean and noisy variants here")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: {bad or 'none given'}; choose from {list(VARIANTS)}")
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    scene = resample(GaussianScene.load_ply(args.scene), args.gaussians)
    ids, names = scene_part_ids(scene)
    cams = bench_cameras(scene, args.views, args.size)
    clean = truth_part_masks(scene, cams, ids, len(names))
    rng = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    noisy = noisy_masks(clean, args.noisy_frac, edge_px=rng(args.edge_px), blob_px=rng(args.blob_px))
    truth = torch.stack([ids == i for i in range(len(names))])
    weight = contribution_weights(scene, cams)
    valid = weight >= args.min_weight
    print(f"scene: {len(scene)} Gaussians, parts {names}; {len(cams)} views at {args.size}x{args.size}; "
          f"{int(valid.sum())} Gaussians contribute >= {args.min_weight} px (IoU counted over these), "
          f"{int((weight == 0).sum())} are never seen")
    if args.out:
        from gendistill.splat_edit.part_masks import write_mask_folder

        for tag, m in (("clean", clean), ("noisy", noisy)):
            write_mask_folder(scene, cams, Path(args.out) / tag, masks=m)

    rows = {}  # (masks, method, variant) -> (per-part IoU, seconds)
    for tag, masks in (("clean", clean), ("noisy", noisy)):
        for variant in variants:
            cfg = GALPConfig(steps=args.steps, variant=variant, foreground_only=args.foreground_only)
            t0 = time.perf_counter()
            pred = LabelField(scene, cams, masks, names, cfg).fit(progress=False).masks_3d()
            rows[tag, "3D-GALP", variant] = (mask_iou(pred, truth, valid), time.perf_counter() - t0)
        t0 = time.perf_counter()
        vote = vote_masks(scene, cams, masks)
        rows[tag, "voting", "-"] = (mask_iou(vote, truth, valid), time.perf_counter() - t0)

    print(f"\n| masks | method | variant | 3D mIoU | {' | '.join(names)} | seconds |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    for (tag, method, variant), (iou, sec) in rows.items():
        per = " | ".join(f"{v:.3f}" for v in iou.tolist())
        print(f"| {tag} | {method} | {variant} | {iou.mean():.3f} | {per} | {sec:.1f} |")
    print("\ntargets (GALP >= 0.90 clean, >= 0.85 noisy, >= voting + 0.05 noisy):")
    v_noisy = rows["noisy", "voting", "-"][0].mean()
    for variant in variants:
        g_clean, g_noisy = (rows[tag, "3D-GALP", variant][0].mean() for tag in ("clean", "noisy"))
        ok = g_clean >= 0.90 and g_noisy >= 0.85 and g_noisy - v_noisy >= 0.05
        print(f"  {variant}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
