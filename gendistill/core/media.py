"""Image and video writing (imageio + its ffmpeg plugin), contact sheets. Every write is atomic."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Sequence

import imageio.v3 as iio
import numpy as np
import torch

from gendistill.core.io import atomic_path


__all__ = ["to_uint8", "write_image", "VideoWriter", "write_video", "read_video", "contact_sheet"]

def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[..., H, W, C] float in [0, 1] (or uint8) -> uint8 numpy, clipped; 1 channel is repeated to RGB."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def write_image(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write one [H, W, C] image (float in [0, 1] or uint8) as PNG/JPEG, atomically."""
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(image))


class VideoWriter:
    """An H.264 mp4 written one frame at a time, atomically: only the frame being encoded is held.

        with VideoWriter("out.mp4", fps=30) as video:
            for frame in frames:  # [H, W, C] float in [0, 1] or uint8, all of one size
                video.append(frame)

    `path` appears, whole, when the block ends without an error; an error or an interrupt inside it
    leaves no file under `path` (an older one stays) and no temporary file. Odd sizes are padded to
    even ones (yuv420p needs them) by repeating the last row/column. `count`: frames appended.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 30):
        self.path, self.fps, self.count = path, fps, 0
        self._atomic = self._tmp = self._shape = self._writer = None

    def __enter__(self) -> "VideoWriter":
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        return self

    def append(self, frame: torch.Tensor | np.ndarray) -> None:
        """Encode one [H, W, C] frame (float in [0, 1] or uint8)."""
        import imageio.v2 as iio2

        frame = to_uint8(frame)
        if frame.ndim != 3 or (self._shape is not None and frame.shape != self._shape):
            want = "[H, W, C]" if self._shape is None else f"{self._shape}, as the first frame"
            raise ValueError(f"{self.path}: frame {self.count} has shape {frame.shape}, expected {want}")
        if self._writer is None:
            self._shape = frame.shape
            self._writer = iio2.get_writer(self._tmp, format="FFMPEG", mode="I", fps=self.fps, codec="libx264",
                                           macro_block_size=1)
        pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        self._writer.append_data(frame)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        atomic, self._atomic = self._atomic, None
        try:
            if self._writer is not None:
                self._writer.close()
            if exc_type is None and self.count == 0:
                raise ValueError(f"{self.path}: a video needs at least one frame")
        except BaseException as err:
            atomic.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
            raise
        atomic.__exit__(exc_type, exc, tb)  # renames it onto `path`, or after an error removes it
        return False


def write_video(path: str | os.PathLike, frames: Sequence | np.ndarray | torch.Tensor, fps: float = 30) -> None:
    """Write [F, H, W, C] frames (float in [0, 1] or uint8) as an H.264 mp4, atomically (`VideoWriter`).

    Odd sizes are padded to even ones (yuv420p needs them) by repeating the last row/column.
    """
    if len(frames) == 0 or (hasattr(frames, "shape") and len(frames.shape) != 4):
        shape = tuple(frames.shape) if hasattr(frames, "shape") else (len(frames),)
        raise ValueError(f"write_video({path}): expected frames [F, H, W, C] with F > 0, got shape {shape}")
    with VideoWriter(path, fps) as video:
        for frame in frames:
            video.append(frame)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a whole video to uint8 frames [F, H, W, 3]; a clear error if it cannot be read."""
    try:
        frames = iio.imread(path, extension=os.path.splitext(str(path))[1] or None)
    except Exception as err:  # imageio raises many types for bad files
        raise ValueError(f"cannot read video {path}: {err}") from err
    if frames.ndim != 4:
        raise ValueError(f"{path} is not a video with RGB frames (decoded shape {frames.shape})")
    return frames[..., :3]


def contact_sheet(images: Sequence | np.ndarray, cols: int | None = None, pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile [H, W, C] images (float or uint8) into one uint8 grid image, `cols` per row (default ~sqrt)."""
    images = [to_uint8(im) for im in images]
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y : y + im.shape[0], x : x + im.shape[1]] = im
    return sheet
