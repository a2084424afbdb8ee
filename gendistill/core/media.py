"""Image and video writing (imageio + its ffmpeg plugin), contact sheets. Every write is atomic."""

from __future__ import annotations

import math
import os
from typing import Sequence

import imageio.v3 as iio
import numpy as np
import torch

from gendistill.core.io import atomic_path


__all__ = ["to_uint8", "write_image", "write_video", "read_video", "contact_sheet"]

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


def write_video(path: str | os.PathLike, frames: Sequence | np.ndarray | torch.Tensor, fps: float = 30) -> None:
    """Write [F, H, W, C] frames (float in [0, 1] or uint8) as an H.264 mp4, atomically.

    Odd sizes are padded to even ones (yuv420p needs them) by repeating the last row/column.
    """
    frames = to_uint8(frames) if hasattr(frames, "shape") else np.stack([to_uint8(f) for f in frames])
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"write_video({path}): expected frames [F, H, W, C] with F > 0, got shape {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)


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
