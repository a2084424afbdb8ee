"""Batch rendering of splat scenes to turntable videos, PNG frames and contact sheets.

Under `accelerate launch -m gendistill render ...` (or torchrun) the frames of every scene are split
across processes; the main process assembles the videos and contact sheets.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import imageio.v3 as iio
import torch
from tqdm.auto import tqdm

from gendistill.core.render import BACKENDS
from gendistill.core.runtime import resolve_device
from gendistill.core.cameras import Cameras, load_cameras, orbit_path, spiral_path
from gendistill.core.media import contact_sheet, to_uint8, write_image, write_video
from gendistill.core.scene import GaussianScene

FORMATS = ("mp4", "png", "both")
PATHS = ("orbit", "spiral")


@dataclass
class RenderJob:
    """What to render: camera path or file, frame count, size, output formats."""

    path: str = "orbit"
    frames: int = 120
    size: tuple[int, int] | None = (512, 512)  # (width, height); None keeps a camera file's size
    cameras_file: str | None = None
    fmt: str = "mp4"
    fps: float = 30.0
    fov_deg: float = 45.0
    elevation_deg: float = 20.0
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    backend: str = "auto"
    batch: int = 4  # cameras rasterized together

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.path not in PATHS:
            raise ValueError(f"--path must be one of {', '.join(PATHS)}, got {self.path!r}")
        if self.frames < 1:
            raise ValueError(f"--frames must be at least 1, got {self.frames}")
        if self.backend != "auto":
            BACKENDS.get_entry(self.backend)  # an unknown name fails here, before any scene loads


def parse_size(text: str) -> tuple[int, int]:
    """'512x384' -> (512, 384) as (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 512x512 (width x height), got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"--size must be positive, got {text!r}")
    return w, h


def scene_cameras(scene: GaussianScene, job: RenderJob) -> Cameras:
    """The cameras for one scene: the job's camera file, or an orbit/spiral framing the scene's bounds."""
    if job.cameras_file:
        cams = load_cameras(job.cameras_file)
        if job.size is not None:
            cams = cams.scaled(width=job.size[0], height=job.size[1])
        return cams
    lo, hi = scene.bbox(quantile=0.01)
    center = (lo + hi) / 2
    extent = float((hi - lo).norm()) / 2
    radius = 1.15 * extent / math.sin(math.radians(job.fov_deg) / 2)
    width, height = job.size or (512, 512)
    make = orbit_path if job.path == "orbit" else spiral_path
    return make(center.double(), radius, job.frames, elevation_deg=job.elevation_deg, fov_deg=job.fov_deg,
                width=width, height=height)


@torch.no_grad()
def render_frames(scene: GaussianScene, cams: Cameras, indices: Sequence[int], job: RenderJob, progress=None):
    """Yield (index, uint8 [H, W, 3]) for the cameras at `indices`, `job.batch` at a time."""
    bg = torch.tensor(job.background, dtype=scene.means.dtype, device=scene.device)
    for start in range(0, len(indices), job.batch):
        idx = list(indices[start : start + job.batch])
        sub = cams[idx]
        images, _, _ = scene.render(sub, backgrounds=bg.expand(len(idx), 3), backend=job.backend)
        for i, image in zip(idx, images):
            yield i, to_uint8(image)
        if progress is not None:
            progress.update(len(idx))


def render_scenes(scene_paths: Sequence[str | Path], out_dir: str | Path, job: RenderJob,
                  device: str | torch.device | None = None) -> list[Path]:
    """Render every scene along the job's cameras into `out_dir/<scene stem>/`.

    Writes `turntable.mp4` (mp4/both), `frames/NNNNN.png` (png/both) and `contact_sheet.png`.
    All scenes are loaded and checked before any rendering starts. Returns the scene folders.
    """
    from accelerate import PartialState

    device = resolve_device(device)
    state = PartialState(cpu=device.type == "cpu")  # cpu=True: several CPU processes join over gloo
    if device.type == "cuda" and state.num_processes > 1:
        device = state.device
    out_dir = Path(out_dir)
    stems = [Path(p).stem for p in scene_paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"scene file names must differ, got {', '.join(map(str, scene_paths))}")
    scenes = [GaussianScene.load_ply(p) for p in scene_paths]
    jobs = [(p, s, scene_cameras(s, job)) for p, s in zip(scene_paths, scenes)]
    total = sum(len(c) for _, _, c in jobs)

    folders = []
    with tqdm(total=math.ceil(total / state.num_processes), unit="frame", disable=not state.is_main_process,
              desc="render") as bar:
        for path, scene, cams in jobs:
            folder = out_dir / Path(path).stem
            frames_dir = folder / ("frames" if job.fmt in ("png", "both") else ".frames")
            frames_dir.mkdir(parents=True, exist_ok=True)
            scene = scene.to(device)
            with state.split_between_processes(list(range(len(cams)))) as mine:
                for i, image in render_frames(scene, cams, mine, job, bar):
                    write_image(frames_dir / f"{i:05d}.png", image)
            state.wait_for_everyone()
            if state.is_main_process:
                frames = [iio.imread(frames_dir / f"{i:05d}.png") for i in range(len(cams))]
                if job.fmt in ("mp4", "both"):
                    write_video(folder / "turntable.mp4", frames, fps=job.fps)
                picks = torch.linspace(0, len(frames) - 1, min(12, len(frames))).round().long().unique()
                write_image(folder / "contact_sheet.png", contact_sheet([frames[i] for i in picks], cols=6 if len(picks) > 6 else None))
                if frames_dir.name == ".frames":
                    shutil.rmtree(frames_dir)
            state.wait_for_everyone()
            folders.append(folder)
    return folders
