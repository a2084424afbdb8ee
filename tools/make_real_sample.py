"""Cut the small real-data sample that the tests carry (`tests/data/garden/`) from `../shared/data`.

The full files (138,766 points, an 83-frame video) live outside the repository; the tests need to run
where that folder is absent, so they use this sample. Seeded: running it again writes the same points.

    .venv/bin/python tools/make_real_sample.py [--shared ../shared/data] [--out tests/data/garden]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cut_points(src: Path, out: Path, n: int = 8000, seed: int = 0) -> None:
    """n points seen by camera 0 at a quarter of its size, drawn at random, with all 3 cameras."""
    with np.load(src) as z:
        data = {k: z[k] for k in z.files}
    vm, K = data["viewmats"][0], data["Ks"][0]
    pc = data["means3d"] @ vm[:3, :3].T + vm[:3, 3]
    uv = pc @ K.T
    u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
    seen = (pc[:, 2] > 0.01) & (u >= 0) & (u < data["width"]) & (v >= 0) & (v < data["height"])
    keep = np.sort(np.random.default_rng(seed).choice(np.flatnonzero(seen), n, replace=False))
    data["means3d"], data["colors"] = data["means3d"][keep], data["colors"][keep]
    np.savez_compressed(out, **data)


def cut_video(src: Path, out: Path, frames: int = 9) -> None:
    """The first `frames` frames, same size and frame rate, re-encoded."""
    reader = imageio.get_reader(src, "ffmpeg")
    fps = reader.get_meta_data()["fps"]
    images = [f for _, f in zip(range(frames), reader)]
    reader.close()
    imageio.mimwrite(out, images, fps=fps, codec="libx264", quality=8, macro_block_size=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "garden")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cut_points(args.shared / "test_garden.npz", args.out / "garden_points.npz")
    cut_video(args.shared / "garden_render_480p.mp4", args.out / "garden_9frames.mp4")
    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
