"""Benchmark 3D part segmentation: 3D-GALP vs GaussianEditor-style voting on several mask sources.

    .venv/bin/python tools/bench_segment.py                      # snowman, 20,000 Gaussians, 24 views at 128x128
    .venv/bin/python tools/bench_segment.py --gaussians 0 --steps 300 --out /tmp/seg
    .venv/bin/python tools/bench_segment.py --variants romap --foreground-only
    .venv/bin/python tools/bench_segment.py --sources attention --attention-parts "hat,nose;hat"

3D-GALP runs once per `GALPConfig.variant` in `--variants` (default both: "ours" and "romap", the
released RoMaP code); the table has a row per mask set, method and variant.

The scene is the demo snowman (true part of every Gaussian in its `part` property), resampled to
`--gaussians` Gaussians (extra ones are jittered copies of random originals, same part). Masks of
every part are rendered from the truth for 24 views (two rings, 12 at 10 and 12 at 45 degrees
elevation). `--sources` picks the mask sets (default all):

- "clean": the truth.
- "noisy": 30% of the views changed: every part boundary eroded or dilated by 2-5 pixels and a
  wrong blob (a disk of 5-9 px radius, given to a random part) painted in. Voting stays at the
  clean ceiling under this noise.
- "majority-wrong": 60% of the views (`--wrong-frac`, seeded) are wrong for *every* part, each part
  in its own way, chosen by the view's azimuth (`majority_wrong_masks`): shifted 6-10 px along the
  azimuth's direction in the image, replaced by a neighbouring part's region, or dropped. Over all
  views, only about half of each part's true pixels keep their label (defaults: body 0.62, head
  0.48, nose 0.46, hat 0.56; the body survives most shifts) and the swaps add wrong regions, so
  voting is misled; the wrong views disagree with one another, which smoothing may exploit.
- "attention": masks a model really produces: the cross-attention of the part words of
  `--prompt` in the demo model `--attention-model` (assets/models/snowman-tiny, a pixel-space
  UNet; capture "ours" with its post-processing defaults: white background, temperature 1.0,
  "hard" masks at threshold 0.5, the model's 32x32 input size), on the bench's own views. One
  mask set per part list in `--attention-parts` ("hat,nose;hat": both words, and the hat alone),
  named attention[PARTS]; they are scored over their parts only. The model finds the hat; its
  "nose" map lands nowhere near the nose (2D IoU 0 in every view), so attention[hat,nose] shows
  what a degenerate part does to each method.

Defaults, 3D mIoU, GALP ours / romap / voting: clean 0.979 / 0.952 / 0.980, noisy 0.963 / 0.897 /
0.975, majority-wrong 0.472 / 0.419 / 0.417, attention[hat] 0.844 / 0.884 / 0.856 (attention seed 1:
0.867 / 0.901 / 0.885), attention[hat,nose] 0.421 / 0.436 / 0.428 (nose 0 for all three).

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


def view_azimuths(cameras: Cameras, center: torch.Tensor) -> torch.Tensor:
    """[C] azimuth in degrees [0, 360) of every camera around `center` (z up, as `bench_cameras`)."""
    d = cameras.centers().double().cpu() - center.double().cpu()
    return torch.rad2deg(torch.atan2(d[:, 1], d[:, 0])) % 360.0


def part_neighbors(masks: torch.Tensor, px: int = 2) -> list[list[int]]:
    """Per part, the parts whose masks [C, P, H, W] come within `px` pixels of it in some view."""
    p = masks.shape[1]
    grown = torch.nn.functional.max_pool2d(masks.float(), 2 * px + 1, 1, px) > 0.5
    hard = masks > 0.5
    return [[k for k in range(p) if k != j and bool((grown[:, j] & hard[:, k]).any())] for j in range(p)]


def _shifted(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """m [H, W] moved by (dy, dx) pixels, zero-filled."""
    h, w = m.shape
    out = torch.zeros_like(m)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    return out


WRONG_KINDS = ("shift", "swap", "drop")


def majority_wrong_masks(masks: torch.Tensor, azimuths: torch.Tensor, frac: float = 0.6, seed: int = 0,
                         shift_px: tuple[int, int] = (6, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of masks [C, P, H, W] where `frac` of the views (a seeded random choice) are wrong for
    every part, in a way set by the view's azimuth a (degrees, [C]) and the part index j: the error
    kind is WRONG_KINDS[(a // 120 + j) % 3], so each wrong view has all three kinds and a view's
    kinds rotate with its azimuth sector:

    - "shift": the part's mask moved by r pixels (r in `shift_px`, inclusive, drawn per view) in the
      image direction of angle a (dx = r cos a, dy = r sin a), zero-filled;
    - "swap": the part's mask replaced by the true region of a neighbouring part (`part_neighbors`;
      which neighbour also follows a); a part with no neighbour is dropped instead;
    - "drop": the part's mask emptied.

    Returns the masks and the wrong views' indices.
    """
    g = torch.Generator().manual_seed(seed)
    c, p, h, w = masks.shape
    out = masks.clone()
    views = torch.randperm(c, generator=g)[: round(frac * c)]
    nbrs = part_neighbors(masks)
    for v in views.tolist():
        a = float(azimuths[v])
        r = int(torch.randint(shift_px[0], shift_px[1] + 1, (1,), generator=g))
        for j in range(p):
            kind = WRONG_KINDS[(int(a // 120.0) + j) % len(WRONG_KINDS)]
            if kind == "swap" and nbrs[j]:
                out[v, j] = masks[v, nbrs[j][int(a / 360.0 * len(nbrs[j])) % len(nbrs[j])]]
            elif kind == "shift":
                rad = torch.deg2rad(torch.tensor(a))
                out[v, j] = _shifted(masks[v, j], round(r * float(torch.sin(rad))), round(r * float(torch.cos(rad))))
            else:
                out[v, j] = 0.0
    return out, views


def attention_masks(scene: GaussianScene, cameras: Cameras, parts: list[str], model: str, prompt: str,
                    capture: str = "ours") -> torch.Tensor:
    """[C, P, H, W] masks of `parts` from the "attention" mask source: `model`'s attention for the
    part words of `prompt` on the scene rendered at `cameras`, with the capture's own defaults."""
    from gendistill.core.guidance.load import load_pipeline
    from gendistill.splat_edit.part_masks import get_part_masks

    pipe = load_pipeline(model, device="cpu")
    return get_part_masks("attention", scene, parts, pipeline=pipe, prompt=prompt, cameras=cameras,
                          capture=capture).masks


def pixel_iou(masks: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[P] IoU of the pixels (> 0.5) of masks and truth [C, P, H, W], pooled over the views."""
    a, b = masks > 0.5, truth > 0.5
    inter = (a & b).transpose(0, 1).flatten(1).sum(1).float()
    union = (a | b).transpose(0, 1).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


SOURCES = ("clean", "noisy", "majority-wrong", "attention")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default=str(ROOT / "assets/scenes/snowman.ply"))
    ap.add_argument("--gaussians", type=int, default=20000, help="resample to this many (0: keep)")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    ap.add_argument("--min-weight", type=float, default=0.05)
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"mask sets to score, comma-separated, of {SOURCES}")
    ap.add_argument("--edge-px", default="2,5", help="noisy views: erosion / dilation range in pixels")
    ap.add_argument("--blob-px", default="5,9", help="noisy views: wrong-blob radius range in pixels")
    ap.add_argument("--noisy-frac", type=float, default=0.3, help="fraction of noisy views")
    ap.add_argument("--wrong-frac", type=float, default=0.6, help="majority-wrong: fraction of wrong views")
    ap.add_argument("--shift-px", default="6,10", help="majority-wrong: shift range in pixels")
    ap.add_argument("--attention-model", default=str(ROOT / "assets/models/snowman-tiny"))
    ap.add_argument("--prompt", default="a snowman with a black hat and a nose", help="attention: the prompt")
    ap.add_argument("--attention-parts", default="hat,nose;hat",
                    help="attention: part lists (words of the prompt and parts of the scene), ';'-separated; "
                         "one mask set each")
    ap.add_argument("--capture", default="ours", help="attention: capture mode (part_masks.CAPTURES)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="GALPConfig.variant values to run, comma-separated")
    ap.add_argument("--foreground-only", action="store_true", help="GALPConfig.foreground_only")
    ap.add_argument("--out", default=None, help="write a mask folder of every mask set here")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: {bad or 'none given'}; choose from {list(VARIANTS)}")
    sources = [v.strip() for v in args.sources.split(",") if v.strip()]
    bad = [v for v in sources if v not in SOURCES]
    if bad or not sources:
        ap.error(f"--sources: {bad or 'none given'}; choose from {list(SOURCES)}")
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    scene = resample(GaussianScene.load_ply(args.scene), args.gaussians)
    ids, names = scene_part_ids(scene)
    cams = bench_cameras(scene, args.views, args.size)
    clean = truth_part_masks(scene, cams, ids, len(names))
    rng = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    truth = torch.stack([ids == i for i in range(len(names))])
    weight = contribution_weights(scene, cams)
    valid = weight >= args.min_weight
    print(f"scene: {len(scene)} Gaussians, parts {names}; {len(cams)} views at {args.size}x{args.size}; "
          f"{int(valid.sum())} Gaussians contribute >= {args.min_weight} px (IoU counted over these), "
          f"{int((weight == 0).sum())} are never seen")

    sets = {}  # tag -> (part indices into names, masks [C, len(parts), H, W])
    every = list(range(len(names)))
    for src in sources:
        if src == "clean":
            sets["clean"] = (every, clean)
        elif src == "noisy":
            sets["noisy"] = (every, noisy_masks(clean, args.noisy_frac, edge_px=rng(args.edge_px),
                                                blob_px=rng(args.blob_px)))
        elif src == "majority-wrong":
            az = view_azimuths(cams, scene.center())
            wrong, views = majority_wrong_masks(clean, az, args.wrong_frac, shift_px=rng(args.shift_px))
            sets["majority-wrong"] = (every, wrong)
            per_part = lambda m: m.transpose(0, 1).flatten(1).sum(1)  # noqa: E731
            share = per_part((wrong > 0.5) & (clean > 0.5)) / per_part(clean > 0.5).clamp_min(1)
            print(f"majority-wrong: {len(views)} of {len(cams)} views wrong; share of each part's true pixels "
                  "(all views) still in its mask: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, share.tolist())))
        else:
            for group in args.attention_parts.split(";"):
                parts = [q.strip() for q in group.split(",") if q.strip()]
                unknown = [q for q in parts if q not in names]
                if unknown or not parts:
                    ap.error(f"--attention-parts: {unknown or 'empty list'} not parts of the scene {names}")
                t0 = time.perf_counter()
                m = attention_masks(scene, cams, parts, args.attention_model, args.prompt, args.capture)
                print(f"attention[{','.join(parts)}]: capture {args.capture!r}, prompt {args.prompt!r}, "
                      f"{time.perf_counter() - t0:.1f} s")
                sets[f"attention[{','.join(parts)}]"] = ([names.index(q) for q in parts], m)
    for tag, (idx, masks) in sets.items():
        iou2d = pixel_iou(masks, clean[:, idx])
        print(f"2D pixel IoU of {tag} (pooled over views): "
              + ", ".join(f"{names[i]} {v:.3f}" for i, v in zip(idx, iou2d.tolist())))
    if args.out:
        from gendistill.splat_edit.part_masks import write_mask_folder

        for tag, (idx, masks) in sets.items():
            full = torch.zeros_like(clean)
            full[:, idx] = masks
            folder = tag.replace("[", "-").replace("]", "").replace(",", "-")  # attention-hat-nose
            write_mask_folder(scene, cams, Path(args.out) / folder, parts=[names[i] for i in idx], masks=full)

    rows = {}  # (masks, method, variant) -> (part indices, per-part IoU, seconds)
    for tag, (idx, masks) in sets.items():
        parts, part_truth = [names[i] for i in idx], truth[idx]
        for variant in variants:
            cfg = GALPConfig(steps=args.steps, variant=variant, foreground_only=args.foreground_only)
            t0 = time.perf_counter()
            pred = LabelField(scene, cams, masks, parts, cfg).fit(progress=False).masks_3d()
            rows[tag, "3D-GALP", variant] = (idx, mask_iou(pred, part_truth, valid), time.perf_counter() - t0)
        t0 = time.perf_counter()
        vote = vote_masks(scene, cams, masks)
        rows[tag, "voting", "-"] = (idx, mask_iou(vote, part_truth, valid), time.perf_counter() - t0)

    print(f"\n| masks | method | variant | 3D mIoU | {' | '.join(names)} | seconds |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    for (tag, method, variant), (idx, iou, sec) in rows.items():
        per = {i: f"{v:.3f}" for i, v in zip(idx, iou.tolist())}
        cells = " | ".join(per.get(i, "-") for i in range(len(names)))
        print(f"| {tag} | {method} | {variant} | {iou.mean():.3f} | {cells} | {sec:.1f} |")

    mean = lambda key: float(rows[key][1].mean())  # noqa: E731
    if "clean" in sets and "noisy" in sets:
        print("\ntargets (GALP >= 0.90 clean, >= 0.85 noisy, >= voting + 0.05 noisy):")
        v_noisy = mean(("noisy", "voting", "-"))
        for variant in variants:
            g_clean, g_noisy = (mean((tag, "3D-GALP", variant)) for tag in ("clean", "noisy"))
            ok = g_clean >= 0.90 and g_noisy >= 0.85 and g_noisy - v_noisy >= 0.05
            print(f"  {variant}: {'met' if ok else 'NOT met'}")
    others = [t for t in sets if t not in ("clean", "noisy")]
    if others:
        print("\nGALP >= voting (3D mIoU):")
        for tag in others:
            v = mean((tag, "voting", "-"))
            for variant in variants:
                g = mean((tag, "3D-GALP", variant))
                print(f"  {tag}, {variant}: {g:.3f} vs {v:.3f} ({g - v:+.3f}): {'met' if g >= v else 'NOT met'}")


if __name__ == "__main__":
    main()
