"""Batch rendering of splat scenes to turntable videos, PNG frames and contact sheets.

Everything streams: scenes are loaded one at a time, and each frame goes to the video encoder and
to its PNG as it is rendered, so a run holds one scene, one batch of frames and the contact sheet's
dozen frames (downsized past `SHEET_MAX_SIDE`) whatever the frame count. Under `accelerate launch
-m gendistill render ...` (or torchrun) the frames of every scene are split across processes, which
write them as PNGs (into a hidden `.frames` folder when no PNGs were asked for); the main process
then streams those into the video and the contact sheet, in order.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import imageio.v3 as iio
import numpy as np
import torch
from tqdm.auto import tqdm

from gendistill.core.render import BACKENDS
from gendistill.core.runtime import resolve_device
from gendistill.core.cameras import Cameras, load_cameras, orbit_path, spiral_path
from gendistill.core.media import VideoWriter, contact_sheet, to_uint8, write_image
from gendistill.core.scene import GaussianScene

FORMATS = ("mp4", "png", "both")
PATHS = ("orbit", "spiral")
SHEET_FRAMES = 12  # frames on a contact sheet, evenly spaced
SHEET_MAX_SIDE = 512  # contact-sheet frames with a longer side are downsized by a whole factor


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


def sheet_picks(n_frames: int) -> list[int]:
    """The frame indices a contact sheet of `n_frames` frames shows: up to `SHEET_FRAMES`, evenly spaced."""
    return torch.linspace(0, n_frames - 1, min(SHEET_FRAMES, n_frames)).round().long().unique().tolist()


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> itself, or box-downsized by the least whole factor that brings its longer
    side to `SHEET_MAX_SIDE` or below."""
    factor = -(-max(image.shape[:2]) // SHEET_MAX_SIDE)
    if factor <= 1:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).reduce(factor))


def write_outputs(folder: Path, frames: Iterable[tuple[int, np.ndarray]], n_frames: int, job: RenderJob) -> None:
    """Stream `frames` ((index, uint8 [H, W, 3]), indices 0..n_frames-1 in order) into
    `folder/turntable.mp4` (mp4/both) and `folder/contact_sheet.png`, each written atomically.

    Holds only the frame at hand and the contact sheet's frames (`sheet_picks`, `_thumbnail`).
    """
    picks, thumbs, count = set(sheet_picks(n_frames)), [], 0
    with contextlib.ExitStack() as stack:
        video = stack.enter_context(VideoWriter(folder / "turntable.mp4", fps=job.fps)) if job.fmt != "png" else None
        for i, image in frames:
            if i != count:
                raise RuntimeError(f"{folder}: frame {i} arrived where frame {count} was due")
            if video is not None:
                video.append(image)
            if i in picks:
                thumbs.append(_thumbnail(image))
            count += 1
        if count != n_frames:
            raise RuntimeError(f"{folder}: {count} frames arrived, {n_frames} were due")
    write_image(folder / "contact_sheet.png", contact_sheet(thumbs, cols=6 if len(thumbs) > 6 else None))


def _with_pngs(frames: Iterable[tuple[int, np.ndarray]], frames_dir: Path | None) -> Iterator[tuple[int, np.ndarray]]:
    """Pass (index, image) pairs through, writing each as frames_dir/NNNNN.png first (when a folder is given)."""
    for i, image in frames:
        if frames_dir is not None:
            write_image(frames_dir / f"{i:05d}.png", image)
        yield i, image


def _read_pngs(frames_dir: Path, n_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 [H, W, 3]) of frames_dir/00000.png, 00001.png, ..., read one at a time."""
    for i in range(n_frames):
        yield i, iio.imread(frames_dir / f"{i:05d}.png")


def render_scenes(scene_paths: Sequence[str | Path], out_dir: str | Path, job: RenderJob,
                  device: str | torch.device | None = None) -> list[Path]:
    """Render every scene along the job's cameras into `out_dir/<scene stem>/`.

    Writes `turntable.mp4` (mp4/both), `frames/NNNNN.png` (png/both) and `contact_sheet.png`, each
    file atomically. Every scene is loaded and checked, one at a time, before anything is written
    (a bad one fails the run up front); each is then loaded again in turn (the first one is kept from
    the check) and its frames streamed to the outputs, so at most one scene and a batch of frames
    are held. Returns the scene folders.
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
    cameras, held = [None] * len(scene_paths), None
    for k in reversed(range(len(scene_paths))):  # last to first: the one still held at the end renders first
        held = None  # release the previous one before loading the next
        held = GaussianScene.load(scene_paths[k])
        cameras[k] = scene_cameras(held, job)
    total = sum(len(c) for c in cameras)

    folders = []
    with tqdm(total=math.ceil(total / state.num_processes), unit="frame", disable=not state.is_main_process,
              desc="render") as bar:
        for k, (path, cams) in enumerate(zip(scene_paths, cameras)):
            scene, held = (held if k == 0 else GaussianScene.load(path)).to(device), None
            folder = out_dir / Path(path).stem
            folder.mkdir(parents=True, exist_ok=True)
            frames_dir = folder / "frames" if job.fmt in ("png", "both") else None
            if state.num_processes == 1:
                write_outputs(folder, _with_pngs(render_frames(scene, cams, range(len(cams)), job, bar), frames_dir),
                              len(cams), job)
            else:
                parts = frames_dir or folder / ".frames"
                with state.split_between_processes(list(range(len(cams)))) as mine:
                    for _ in _with_pngs(render_frames(scene, cams, mine, job, bar), parts):
                        pass
                state.wait_for_everyone()
                if state.is_main_process:
                    try:
                        write_outputs(folder, _read_pngs(parts, len(cams)), len(cams), job)
                    finally:
                        if frames_dir is None:
                            shutil.rmtree(parts, ignore_errors=True)
                state.wait_for_everyone()
            del scene
            folders.append(folder)
    return folders
