"""Check the physics metric: AUC of its plausibility score, real vs broken clips, per break kind.

    python tools/bench_physics_metric.py [--n 200] [--frames 9 13] [--size 32]
                                         [--encode none lossless h264] [--noise 0.05]

Draws `n` real clips (half of them with at least one bounce, which the "reversed" negatives need) and
`n` negatives split evenly over the break kinds, optionally round-trips every clip through an mp4
(`write_clip`), optionally after adding pixel noise, scores each with `physics_score(frames, colour)`
and prints per kind the AUC of `plausibility` (real vs that kind) and the spread of implausibility,
plus the tracker's centre error on the real clips (median / max). Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gendistill.core.media import read_video  # noqa: E402
from gendistill.video_distill.physics import (  # noqa: E402
    BREAK_KINDS, auc, break_clip, physics_score, simulate_clip, track_ball, write_clip)


def bench(n: int = 200, frames: int = 13, size: int = 32, encode: str = "none", seed: int = 0,
          noise: float = 0.0) -> dict:
    """{"real": [scores], kind: [scores], "track_error_px": [max centre error per real clip]} for one setting."""
    rng = np.random.default_rng(seed)
    scores: dict = {"real": [], "track_error_px": [], **{k: [] for k in BREAK_KINDS}}
    tmp = tempfile.TemporaryDirectory()

    def roundtrip(video):
        if noise:  # Gaussian pixel noise of std `noise` (in [0, 1] units), before any encoding
            video = np.clip(video + rng.normal(0, noise * 255, video.shape), 0, 255).round().astype(np.uint8)
        if encode == "none":
            return video
        path = Path(tmp.name) / "clip.mp4"
        write_clip(path, video, quality=encode)
        return read_video(path)

    for i in range(n):
        video, traj, caption = simulate_clip(rng, frames, size, min_bounces=1 if i % 2 else 0)
        video = roundtrip(video)
        scores["real"].append(physics_score(video, traj["colour"]))
        track = track_ball(video, traj["colour"])
        scores["track_error_px"].append(float(np.nanmax(np.hypot(track["x"] - traj["x"], track["y"] - traj["y"]))))
        kind = BREAK_KINDS[i % len(BREAK_KINDS)]
        if kind == "reversed" and not traj["bounce_times"]:
            _, traj, _ = simulate_clip(rng, frames, size, min_bounces=1)
        bad, bad_traj = break_clip(rng, traj, kind)
        scores[kind].append(physics_score(roundtrip(bad), traj["colour"]))
    tmp.cleanup()
    return scores


def report(scores: dict) -> dict:
    """{kind: AUC} plus "all" (real vs every negative)."""
    real = [s["plausibility"] for s in scores["real"]]
    out = {k: auc(real, [s["plausibility"] for s in scores[k]]) for k in BREAK_KINDS}
    out["all"] = auc(real, [s["plausibility"] for k in BREAK_KINDS for s in scores[k]])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="real clips (and as many negatives) per setting")
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 13])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--encode", choices=["none", "lossless", "h264"], nargs="+", default=["none", "lossless"])
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian pixel noise std (0-1 units) on every clip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = list(BREAK_KINDS) + ["all"]
    print(f"{'frames':>6} {'encode':>8} " + " ".join(f"{k:>15}" for k in kinds)
          + "  real_impl_px(med/95th) track_err_px(med/max) s")
    for frames in args.frames:
        for encode in args.encode:
            t0 = time.perf_counter()
            scores = bench(args.n, frames, args.size, encode, args.seed, args.noise)
            table = report(scores)
            real = np.asarray([s["implausibility_px"] for s in scores["real"]])
            err = np.asarray(scores["track_error_px"])
            print(f"{frames:>6} {encode:>8} " + " ".join(f"{table[k]:>15.3f}" for k in kinds)
                  + f"  {np.median(real):>5.2f}/{np.percentile(real, 95):<6.2f}"
                  + f" {np.median(err):>5.2f}/{err.max():<6.2f}"
                  + f" {time.perf_counter() - t0:.0f}")
            for k in ["real", *BREAK_KINDS]:
                imp = np.asarray([s["implausibility_px"] for s in scores[k]])
                down = np.mean([s["gravity_down"] for s in scores[k]])
                pct = np.percentile(imp, [5, 50, 95])
                print(f"{'':>16} {k}: implausibility 5/50/95th pct {pct[0]:.2f} / {pct[1]:.2f} / {pct[2]:.2f} px; "
                      f"gravity down {down:.0%}")


if __name__ == "__main__":
    main()
