"""Synthetic physics clips: coloured balls thrown, dropped and bouncing under gravity, with captions.

    python tools/make_physics_clips.py --out outputs/physics_clips [--n 200] [--frames 13] [--size 32]
                                       [--broken] [--quality lossless|h264] [--seed 0]

Writes into --out:
  real/NNNNN.mp4        the clips (CogVideoX frame counts 1 + 4k: 9, 13, ...), H.264 mp4
  manifest.csv          video,caption,label,colour,bounces: the real clips only (`discover_clips` reads it)
  broken/KIND_NNNNN.mp4 with --broken: as many negatives as real clips, the kinds in turn
                        (shuffled, reversed, gravity_flipped, teleport; see `physics.break_clip`)
  broken.csv            their manifest, same columns, label = the break kind, caption = the source clip's
  trajectories.json     {video path (relative to --out): the trajectory: per-frame ball centre "x", "y" in
                        pixels (y down), "radius", "floor_y", colour, gravity, restitution, bounce times, ...}

--quality lossless (default) stores yuv444p at qp 0 (within 2 levels of the rendered RGB; ~3.5 kB a clip);
h264 stores yuv420p at crf 18, the usual player-friendly format, whose half-resolution chroma smears a
3-pixel ball's colour by up to ~110 levels at its edge (the tracker still finds the centre within 0.3 px).
Deterministic: the same arguments write the same frames. The simulation lives in
gendistill/video_distill/physics.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gendistill.core.io import atomic_path  # noqa: E402
from gendistill.video_distill.physics import BREAK_KINDS, break_clip, simulate_clip, write_clip  # noqa: E402

COLUMNS = ["video", "caption", "label", "colour", "bounces"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def make_clips(out: str | Path, n: int = 200, frames: int = 13, size: int = 32, *, broken: bool = False,
               kinds: tuple[str, ...] = BREAK_KINDS, quality: str = "lossless", fps: float = 8.0, seed: int = 0,
               min_bounces: int = 0, max_bounces: int = 2, progress: bool = True) -> dict:
    """Write `n` clips (and with `broken` n negatives) into `out`; returns the paths written:
    {"manifest", "trajectories", and with `broken` "broken"}."""
    if frames < 5 or (frames - 1) % 4:
        raise ValueError(f"--frames must be 1 + 4k and at least 5 (CogVideoX: 9, 13, 49), got {frames}")
    if size % 2:
        raise ValueError(f"--size must be even (H.264), got {size}")
    out = Path(out)
    rng, rng_broken = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    rows, bad_rows, trajectories = [], [], {}
    for i in tqdm(range(n), desc="physics clips", unit="clip", disable=not progress):
        video, traj, caption = simulate_clip(rng, frames, size, min_bounces=min_bounces, max_bounces=max_bounces)
        name = f"real/{i:05d}.mp4"
        write_clip(out / name, video, fps=fps, quality=quality)
        rows.append({"video": name, "caption": caption, "label": "real", "colour": traj["colour"],
                     "bounces": len(traj["bounce_times"])})
        trajectories[name] = traj
        if broken:
            kind = kinds[i % len(kinds)]
            source = traj
            if kind == "reversed" and not traj["bounce_times"]:  # a bounce-free throw reversed is still physical
                source = simulate_clip(rng_broken, frames, size, min_bounces=max(1, min_bounces),
                                       max_bounces=max(1, max_bounces))[1]
            bad, bad_traj = break_clip(rng_broken, source, kind)
            bad_name = f"broken/{kind}_{i:05d}.mp4"
            write_clip(out / bad_name, bad, fps=fps, quality=quality)
            bad_rows.append({"video": bad_name, "caption": source["caption"], "label": kind,
                             "colour": source["colour"], "bounces": len(source["bounce_times"])})
            trajectories[bad_name] = bad_traj
    paths = {"manifest": out / "manifest.csv", "trajectories": out / "trajectories.json"}
    _write_csv(paths["manifest"], rows)
    if broken:
        paths["broken"] = out / "broken.csv"
        _write_csv(paths["broken"], bad_rows)
    with atomic_path(paths["trajectories"]) as tmp:
        tmp.write_text(json.dumps(trajectories), encoding="utf-8")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=200, help="real clips")
    parser.add_argument("--frames", type=int, default=13, help="frames per clip, 1 + 4k (9, 13, ...)")
    parser.add_argument("--size", type=int, default=32, help="width = height in pixels (even)")
    parser.add_argument("--broken", action="store_true", help="also write as many negatives, with a label")
    parser.add_argument("--kinds", nargs="+", choices=BREAK_KINDS, default=list(BREAK_KINDS))
    parser.add_argument("--quality", choices=["lossless", "h264"], default="lossless")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--min-bounces", type=int, default=0)
    parser.add_argument("--max-bounces", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_clips(args.out, args.n, args.frames, args.size, broken=args.broken, kinds=tuple(args.kinds),
                       quality=args.quality, fps=args.fps, seed=args.seed, min_bounces=args.min_bounces,
                       max_bounces=args.max_bounces)
    for what, path in paths.items():
        print(f"{what}: {path}")


if __name__ == "__main__":
    main()
