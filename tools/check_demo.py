"""Check a `make demo` run: did the snowman's hat turn blue, and nothing else change?

    .venv/bin/python tools/check_demo.py                    # checks outputs/demo (after `make demo`)
    .venv/bin/python tools/check_demo.py --run /tmp/demo --colour red

Figures (from the input scene and the run's edited.ply, indexed alike since the demo does not densify):
- hat colour: the mean SH DC colour (as RGB) of the hat Gaussians (the scene's `part` property,
  not the segmentation) before and after; the target channel must be the largest and the mean must
  move by >= 0.2 (Euclidean, RGB in [0, 1]).
- outside: every Gaussian outside the true hat (the scene's `part` property) byte-identical (with
  `--max-outside F`, at most F x the hat's size may change there: a segmentation from the prompt
  alone is not the ground truth), and every Gaussian outside the edit's 3D mask (masks3d/hat.npy) too.
- views: 24 orbit views rendered before / after; in the true hat's pixels the target colour's share
  (e.g. blue: B - (R + G) / 2) must rise in >= 90% of them.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gendistill.core.cameras import orbit_path  # noqa: E402
from gendistill.core.render.sh import sh_to_rgb  # noqa: E402
from gendistill.core.scene import GaussianScene  # noqa: E402
from gendistill.splat_edit.part_masks import render_views, truth_part_masks  # noqa: E402

SCENE = ROOT / "assets/scenes/snowman.ply"
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def colour_score(rgb: torch.Tensor, colour: str) -> torch.Tensor:
    """[..., 3] -> [...]: how much the target channel stands out, c - mean(other two)."""
    c = CHANNEL[colour]
    others = [i for i in range(3) if i != c]
    return rgb[..., c] - rgb[..., others].mean(-1)


def demo_figures(before: GaussianScene, after: GaussianScene, *, part: str = "hat", colour: str = "blue",
                 edit_mask: np.ndarray | None = None, views: int = 24, size: int = 64,
                 background=(0.6, 0.6, 0.6)) -> dict:
    """The colour figures of an edit of `part` towards `colour` (see the module doc)."""
    if len(before) != len(after):
        raise ValueError(f"the edited scene has {len(after)} Gaussians, the input {len(before)}: "
                         "run the demo without densification")
    names = before.metadata()["part_names"].split()
    ids = before.extras["part"].long()
    hat = ids == names.index(part)
    if not torch.equal(after.extras["part"].long(), ids):
        raise ValueError("the edited scene's `part` property is not indexed like the input's")
    rgb0, rgb1 = sh_to_rgb(before.sh[hat, 0]).clamp(0, 1), sh_to_rgb(after.sh[hat, 0]).clamp(0, 1)
    m0, m1 = rgb0.mean(0), rgb1.mean(0)

    def changed(keep: torch.Tensor) -> int:
        diff = torch.zeros(len(before), dtype=torch.bool)
        for a, b in ((before.means, after.means), (before.quats, after.quats), (before.log_scales, after.log_scales),
                     (before.opacity_logits, after.opacity_logits), (before.sh, after.sh)):
            diff |= (a != b).reshape(len(before), -1).any(1)
        return int((diff & keep).sum())

    out = {
        "hat_gaussians": int(hat.sum()),
        "hat_mean_before": [round(float(v), 4) for v in m0],
        "hat_mean_after": [round(float(v), 4) for v in m1],
        "hat_mean_moved": round(float((m1 - m0).norm()), 4),
        "target_largest": bool(int(m1.argmax()) == CHANNEL[colour]),
        "hat_gaussians_target_largest": round(float((rgb1.argmax(-1) == CHANNEL[colour]).float().mean()), 4),
        "changed_outside_true_part": changed(~hat),
    }
    if edit_mask is not None:
        em = torch.as_tensor(edit_mask, dtype=torch.bool)
        out["edit_mask_gaussians"] = int(em.sum())
        out["edit_mask_false_positives"] = int((em & ~hat).sum())
        out["edit_mask_missed"] = int((~em & hat).sum())
        out["changed_outside_edit_mask"] = changed(~em)

    lo, hi = before.bbox(0.01)
    cams = orbit_path((lo + hi).double() / 2, 2.6 * float((hi - lo).norm()) / 2, views, elevation_deg=20.0,
                      width=size, height=size)
    mask = truth_part_masks(before, cams, ids, len(names))[:, names.index(part)] > 0.5  # [C,H,W]
    img0 = render_views(before, cams, background=background)
    img1 = render_views(after, cams, background=background)
    s0 = torch.stack([colour_score(img0[i][mask[i]], colour).mean() for i in range(views)])
    s1 = torch.stack([colour_score(img1[i][mask[i]], colour).mean() for i in range(views)])
    out["views"] = views
    out["views_more_target"] = round(float((s1 > s0).float().mean()), 4)
    out["view_score_before"] = round(float(s0.mean()), 4)
    out["view_score_after"] = round(float(s1.mean()), 4)
    return out


def check(figures: dict, min_moved: float = 0.2, min_views: float = 0.9, max_outside: float = 0.0) -> list[str]:
    """The failed checks, as sentences (empty: all passed)."""
    fails = []
    if not figures["target_largest"]:
        fails.append(f"the target channel is not the largest of the hat's mean colour {figures['hat_mean_after']}")
    if figures["hat_mean_moved"] < min_moved:
        fails.append(f"the hat's mean colour moved by {figures['hat_mean_moved']} < {min_moved}")
    if figures["changed_outside_true_part"] > max_outside * figures["hat_gaussians"]:
        fails.append(f"{figures['changed_outside_true_part']} Gaussians outside the true part changed "
                     f"(allowed: {max_outside:.0%} of its {figures['hat_gaussians']})")
    if figures.get("changed_outside_edit_mask", 0):
        fails.append(f"{figures['changed_outside_edit_mask']} Gaussians outside the edit's 3D mask changed")
    if figures["views_more_target"] < min_views:
        fails.append(f"only {figures['views_more_target']:.0%} of the views are more {figures.get('colour', 'blue')} "
                     f"in the hat (< {min_views:.0%})")
    return fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "outputs/demo", help="the run folder of the edit")
    p.add_argument("--scene", type=Path, default=SCENE)
    p.add_argument("--part", default="hat")
    p.add_argument("--colour", default="blue", choices=sorted(CHANNEL))
    p.add_argument("--min-moved", type=float, default=0.2)
    p.add_argument("--max-outside", type=float, default=0.0,
                   help="changes allowed outside the true part, as a fraction of its size (prompt-only runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    before = GaussianScene.load_ply(args.scene)
    after = GaussianScene.load_ply(args.run / "edited.ply")
    mask_file = args.run / "masks3d" / f"{args.part}.npy"
    edit_mask = np.load(mask_file) if mask_file.is_file() else None
    figures = demo_figures(before, after, part=args.part, colour=args.colour, edit_mask=edit_mask)
    figures["colour"] = args.colour
    print(json.dumps(figures, indent=1))
    fails = check(figures, args.min_moved, max_outside=args.max_outside)
    for f in fails:
        print(f"FAIL: {f}")
    print("demo check: " + ("passed" if not fails else f"{len(fails)} check(s) failed"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
