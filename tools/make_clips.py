"""Build the demo clips in assets/clips/: a ball thrown under gravity, bouncing on the floor.

    python tools/make_clips.py [--out assets/clips] [--frames 25] [--size 64]

Each clip is an H.264 mp4 with a caption in a .txt file beside it (the folder layout
`gendistill finetune` reads). Deterministic: the same command writes the same frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gendistill.core.io import atomic_path
from gendistill.core.media import write_video

# name, colour (RGB in [0, 1]), start (x, y) as fractions of the size, velocity (fractions per frame), restitution
CLIPS = [
    ("red_throw_right", (0.9, 0.15, 0.1), (0.15, 0.25), (0.030, -0.020), 0.75, "a red ball is thrown to the right and bounces on the floor"),
    ("blue_throw_left", (0.1, 0.3, 0.9), (0.85, 0.30), (-0.025, -0.030), 0.70, "a blue ball is thrown to the left and bounces on the floor"),
    ("green_drop", (0.1, 0.75, 0.2), (0.50, 0.15), (0.004, 0.000), 0.80, "a green ball is dropped and bounces on the floor"),
    ("yellow_lob", (0.95, 0.8, 0.1), (0.10, 0.70), (0.022, -0.055), 0.65, "a yellow ball is lobbed high and bounces on the floor"),
]
GRAVITY = 0.006  # fraction of the height per frame^2
FLOOR = 0.88  # floor line, fraction of the height
RADIUS = 0.07


def ball_trajectory(start, velocity, restitution: float, frames: int) -> np.ndarray:
    """Centre positions [frames, 2] (x, y as fractions, y down) of a ball under gravity bouncing on the floor."""
    (x, y), (vx, vy) = start, velocity
    out = []
    for _ in range(frames):
        out.append((x, y))
        vy += GRAVITY
        x, y = x + vx, y + vy
        if y > FLOOR - RADIUS:  # bounce: reflect the penetration, lose some speed
            y = 2 * (FLOOR - RADIUS) - y
            vy = -vy * restitution
            vx *= 0.95
        if not RADIUS <= x <= 1 - RADIUS:  # side walls
            x = min(max(x, RADIUS), 1 - RADIUS)
            vx = -vx * restitution
    return np.asarray(out)


def render_clip(colour, centres: np.ndarray, size: int) -> np.ndarray:
    """uint8 frames [F, size, size, 3]: sky gradient, grey floor, an anti-aliased shaded ball with a shadow."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    sky = np.stack([0.75 - 0.2 * yy, 0.85 - 0.2 * yy, np.full_like(yy, 0.95)], -1)
    background = np.where((yy > FLOOR)[..., None], np.array([0.45, 0.42, 0.4]), sky)
    colour = np.asarray(colour)
    frames = []
    for cx, cy in centres:
        img = background.copy()
        shadow = np.exp(-(((xx - cx) / (2 * RADIUS)) ** 2 + ((yy - FLOOR - 0.015) / 0.015) ** 2))
        img *= 1 - 0.35 * shadow[..., None] * (yy > FLOOR)[..., None]
        d = np.hypot(xx - cx, yy - cy)
        cover = np.clip((RADIUS - d) * size + 0.5, 0, 1)[..., None]  # ~1 pixel anti-aliased edge
        shade = np.clip(1.1 - 1.5 * np.hypot(xx - cx + 0.3 * RADIUS, yy - cy + 0.3 * RADIUS) / RADIUS * 0.5, 0.4, 1.1)
        img = img * (1 - cover) + cover * np.clip(colour * shade[..., None], 0, 1)
        frames.append((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.stack(frames)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "clips"))
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=float, default=12.0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name, colour, start, velocity, restitution, caption in CLIPS:
        frames = render_clip(colour, ball_trajectory(start, velocity, restitution, args.frames), args.size)
        write_video(out / f"{name}.mp4", frames, fps=args.fps)
        with atomic_path(out / f"{name}.txt") as tmp:
            tmp.write_text(caption + "\n")
    print(f"wrote {len(CLIPS)} clips to {out}/")


if __name__ == "__main__":
    main()
