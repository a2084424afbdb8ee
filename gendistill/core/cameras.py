"""Camera batches (world-to-camera matrices, intrinsics, one image size), camera paths and readers.

Conventions:
- `viewmats` are world-to-camera in the OpenCV convention: +x right, +y down, +z forward,
  as `rasterize` takes them. Every reader converts to it.
- Intrinsics follow pixel-centre coordinates at (x + 0.5, y + 0.5): the image spans [0, W] x [0, H]
  and a centred principal point is (W / 2, H / 2).
- World "up" for generated paths is an argument; the default, and the demo scene's, is +z.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["Cameras", "CameraFormatError", "look_at", "intrinsics_from_fov", "orbit_path", "spiral_path",
           "load_transforms_json", "load_colmap", "load_cameras", "ring_basis"]


class CameraFormatError(ValueError):
    """A camera file that cannot be read; the message names the file and the key or line."""


@dataclass
class Cameras:
    """C pinhole cameras sharing one image size.

    Attributes:
        viewmats: [C, 4, 4] world-to-camera, OpenCV convention.
        Ks: [C, 3, 3] intrinsics in pixels.
        width, height: image size in pixels.
        names: optional C names (e.g. the `file_path` of a transforms.json frame, COLMAP image name).
        image_paths: optional C image paths (None where unknown).
    """

    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int
    names: list[str] | None = None
    image_paths: list[Path | None] | None = None

    def __post_init__(self):
        c = self.viewmats.shape[0] if self.viewmats.ndim == 3 else -1
        if self.viewmats.ndim != 3 or tuple(self.viewmats.shape[1:]) != (4, 4):
            raise ValueError(f"viewmats must be [C, 4, 4], got {list(self.viewmats.shape)}")
        if tuple(self.Ks.shape) != (c, 3, 3):
            raise ValueError(f"Ks must be [C={c}, 3, 3], got {list(self.Ks.shape)}")
        self.width, self.height = int(self.width), int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        for name in ("names", "image_paths"):
            v = getattr(self, name)
            if v is not None:
                v = list(v)
                setattr(self, name, v)
                if len(v) != c:
                    raise ValueError(f"{name} has {len(v)} entries for {c} cameras")

    def __len__(self) -> int:
        return self.viewmats.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> "Cameras":
        """A sub-batch; an integer index keeps the batch dimension (C = 1)."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"camera index {index} out of range for {len(self)} cameras")
            index = [index % len(self)]
        if isinstance(index, slice):
            ids = list(range(len(self)))[index]
        else:
            t = torch.as_tensor(index)
            ids = t.nonzero().flatten().tolist() if t.dtype == torch.bool else t.flatten().tolist()
        sel = torch.as_tensor(ids, dtype=torch.long, device=self.viewmats.device)
        pick = lambda v: None if v is None else [v[i] for i in ids]  # noqa: E731
        return Cameras(self.viewmats[sel], self.Ks[sel], self.width, self.height,
                       pick(self.names), pick(self.image_paths))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cameras":
        return Cameras(self.viewmats.to(device=device, dtype=dtype), self.Ks.to(device=device, dtype=dtype),
                       self.width, self.height, self.names, self.image_paths)

    def scaled(self, factor: float | None = None, *, width: int | None = None, height: int | None = None) -> "Cameras":
        """The same cameras at another resolution: size round(W * factor) x round(H * factor)
        (or the given width / height), Ks scaled by the actual size ratios per axis."""
        if factor is not None:
            if factor <= 0:
                raise ValueError(f"scale factor must be positive, got {factor}")
            width, height = round(self.width * factor), round(self.height * factor)
        if width is None or height is None:
            raise ValueError("give a factor, or both width and height")
        sx, sy = width / self.width, height / self.height
        s = torch.tensor([[sx, sx, sx], [sy, sy, sy], [1.0, 1.0, 1.0]], dtype=self.Ks.dtype, device=self.device)
        return Cameras(self.viewmats.clone(), self.Ks * s, width, height, self.names, self.image_paths)

    def centers(self) -> torch.Tensor:
        """[C, 3] camera positions in world space, -R^T t."""
        r, t = self.viewmats[:, :3, :3], self.viewmats[:, :3, 3]
        return -(r.transpose(1, 2) @ t[..., None])[..., 0]

    def camtoworlds(self) -> torch.Tensor:
        """[C, 4, 4] camera-to-world, OpenCV axes."""
        return torch.linalg.inv(self.viewmats)

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinhole projection of world points [N, 3] -> (pixels [C, N, 2], depths [C, N])."""
        pc = points.to(self.viewmats.dtype) @ self.viewmats[:, :3, :3].transpose(1, 2) + self.viewmats[:, None, :3, 3]
        z = pc[..., 2]
        uv = pc @ self.Ks.transpose(1, 2)
        return uv[..., :2] / uv[..., 2:3], z

    @staticmethod
    def cat(batches: Sequence["Cameras"]) -> "Cameras":
        """Concatenate batches of the same image size."""
        batches = list(batches)
        if not batches:
            raise ValueError("Cameras.cat needs at least one batch")
        w, h = batches[0].width, batches[0].height
        if any((b.width, b.height) != (w, h) for b in batches):
            raise ValueError("Cameras.cat: batches have different image sizes")
        merge = lambda attr: (None if any(getattr(b, attr) is None for b in batches)  # noqa: E731
                              else [x for b in batches for x in getattr(b, attr)])
        return Cameras(torch.cat([b.viewmats for b in batches]), torch.cat([b.Ks for b in batches]),
                       w, h, merge("names"), merge("image_paths"))


# ---------------------------------------------------------------------- construction and paths
def look_at(eyes: torch.Tensor, target: torch.Tensor,
            up: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0)) -> torch.Tensor:
    """World-to-camera matrices (OpenCV) of cameras at `eyes` [C, 3] looking at `target` [3] or [C, 3],
    with world `up` [3] appearing up in the image. Returns [C, 4, 4]."""
    eyes = torch.as_tensor(eyes, dtype=torch.float64).reshape(-1, 3)
    target = torch.as_tensor(target, dtype=torch.float64).expand_as(eyes)
    up = torch.as_tensor(up, dtype=torch.float64).reshape(3)
    fwd = target - eyes
    if (fwd.norm(dim=-1) < 1e-12).any():
        raise ValueError("look_at: a camera sits on its target")
    fwd = fwd / fwd.norm(dim=-1, keepdim=True)
    right = torch.linalg.cross(fwd, up.expand_as(fwd), dim=-1)
    if (right.norm(dim=-1) < 1e-9).any():
        raise ValueError("look_at: viewing direction is parallel to `up` (elevation of +-90 degrees)")
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(fwd, right, dim=-1)
    rot = torch.stack([right, down, fwd], dim=1)  # rows: camera axes in world coordinates
    out = torch.eye(4, dtype=torch.float64).repeat(eyes.shape[0], 1, 1)
    out[:, :3, :3] = rot
    out[:, :3, 3] = -(rot @ eyes[..., None])[..., 0]
    return out.float()


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> torch.Tensor:
    """[3, 3] K with horizontal field of view `fov_deg`, square pixels, centred principal point."""
    if not 0 < fov_deg < 180:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def ring_basis(up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit up u and two unit vectors a, b spanning the plane orthogonal to it (b = u x a)."""
    u = up / up.norm()
    axis = torch.eye(3, dtype=torch.float64)[int(torch.argmin(u.abs()))]
    a = axis - (axis @ u) * u
    a = a / a.norm()
    return u, a, torch.linalg.cross(u, a, dim=-1)


def _ring(center, radius, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
          up) -> tuple[torch.Tensor, torch.Tensor]:
    """Eyes [n, 3] on a sphere around `center` at the given azimuths / elevations, and the centre [3]."""
    center = torch.as_tensor(center, dtype=torch.float64).reshape(3)
    upv = torch.as_tensor(up, dtype=torch.float64).reshape(3)
    if upv.norm() < 1e-12:
        raise ValueError("up must be a non-zero vector")
    u, a, b = ring_basis(upv)
    az, el = torch.deg2rad(azimuth_deg.double()), torch.deg2rad(elevation_deg.double())
    radius = torch.as_tensor(radius, dtype=torch.float64)
    dirs = (el.cos() * az.cos())[:, None] * a + (el.cos() * az.sin())[:, None] * b + el.sin()[:, None] * u
    return center + radius.reshape(-1, 1) * dirs, center


def orbit_path(center: Sequence[float] | torch.Tensor, radius: float, n: int, *, elevation_deg: float = 15.0,
               fov_deg: float = 45.0, width: int = 256, height: int = 256,
               up: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0), start_deg: float = 0.0) -> Cameras:
    """A turntable ring of `n` cameras at distance `radius` from `center`, all looking at it.

    Azimuth goes counter-clockwise seen from above (+up), starting at `start_deg` (0 is the world
    axis least aligned with `up`: +x for z-up and y-up worlds). `fov_deg` is horizontal.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    az = start_deg + 360.0 * torch.arange(n, dtype=torch.float64) / n
    eyes, c = _ring(center, radius, az, torch.full((n,), float(elevation_deg), dtype=torch.float64), up)
    k = intrinsics_from_fov(fov_deg, width, height)
    return Cameras(look_at(eyes, c, up), k.repeat(n, 1, 1), width, height, names=[f"orbit_{i:04d}" for i in range(n)])


def spiral_path(center: Sequence[float] | torch.Tensor, radius: float, n: int, *, elevation_deg: float = 15.0,
                elevation_amplitude_deg: float = 15.0, elevation_cycles: float = 2.0, rotations: float = 1.0,
                radius_amplitude: float = 0.0, fov_deg: float = 45.0, width: int = 256, height: int = 256,
                up: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0), start_deg: float = 0.0) -> Cameras:
    """An orbit whose elevation oscillates: elevation_deg + amplitude * sin(2 pi cycles i / n), over
    `rotations` turns; the radius may breathe by +- `radius_amplitude` (a fraction) the same way."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    s = torch.arange(n, dtype=torch.float64) / n
    wave = torch.sin(2 * math.pi * elevation_cycles * s)
    el = elevation_deg + elevation_amplitude_deg * wave
    if (el.abs() >= 90).any():
        raise ValueError("spiral_path: elevation reaches +-90 degrees; lower elevation_deg or the amplitude")
    r = radius * (1.0 + radius_amplitude * wave)
    eyes, c = _ring(center, r, start_deg + 360.0 * rotations * s, el, up)
    k = intrinsics_from_fov(fov_deg, width, height)
    return Cameras(look_at(eyes, c, up), k.repeat(n, 1, 1), width, height, names=[f"spiral_{i:04d}" for i in range(n)])


# ---------------------------------------------------------------------- readers
def load_transforms_json(path: str | os.PathLike, dataparser: str | os.PathLike | bool | None = None) -> "Cameras":
    """A NeRF / instant-ngp / nerfstudio transforms.json (`gendistill.core.formats.transforms`)."""
    from gendistill.core.formats.transforms import load_transforms_json as read

    return read(path, dataparser)


def load_colmap(path: str | os.PathLike) -> "Cameras":
    """A COLMAP model, binary or text (`gendistill.core.formats.colmap`)."""
    from gendistill.core.formats.colmap import load_colmap as read

    return read(path)


def load_cameras(path: str | os.PathLike, dataparser: str | os.PathLike | bool | None = None) -> "Cameras":
    """Read cameras from whatever `path` is, found from its name and content:

    - a `transforms.json` (NeRF, instant-ngp, nerfstudio; `dataparser_transforms.json` beside it,
      or named by `dataparser`, is applied), or a folder holding one;
    - a COLMAP model, binary or text: its folder, a scene folder with `sparse/0`, or one of its files;
    - the `cameras.json` INRIA 3DGS training writes (a JSON list), or a folder holding one;
    - an `.npz` with `viewmats` [C,4,4] (OpenCV world-to-camera), `Ks` [C,3,3], `width`, `height`.
    """
    from gendistill.core.formats.transforms import load_inria_cameras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such camera file or folder")
    if path.is_dir():
        if (path / "transforms.json").is_file():
            return load_transforms_json(path / "transforms.json", dataparser)
        if (path / "cameras.json").is_file() and not (path / "cameras.bin").is_file():
            return load_inria_cameras(path / "cameras.json")
        return load_colmap(path)
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            first = f.read(64).lstrip()[:1]
        return load_inria_cameras(path) if first == b"[" else load_transforms_json(path, dataparser)
    if path.name in ("cameras.txt", "images.txt", "points3D.txt", "cameras.bin", "images.bin", "points3D.bin"):
        return load_colmap(path.parent)
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            missing = [k for k in ("viewmats", "Ks", "width", "height") if k not in z]
            if missing:
                raise CameraFormatError(f"{path}: missing key(s) {missing} (need viewmats, Ks, width, height)")
            return Cameras(torch.from_numpy(z["viewmats"]).float(), torch.from_numpy(z["Ks"]).float(),
                           int(z["width"]), int(z["height"]))
    raise CameraFormatError(f"{path}: not a recognised camera file (transforms.json, INRIA cameras.json, "
                            "COLMAP model or .npz)")
