"""Camera batches (world-to-camera matrices, intrinsics, one image size), camera paths and readers.

Conventions:
- `viewmats` are world-to-camera in the OpenCV convention: +x right, +y down, +z forward,
  as `rasterize` takes them. Every reader converts to it.
- Intrinsics follow pixel-centre coordinates at (x + 0.5, y + 0.5): the image spans [0, W] x [0, H]
  and a centred principal point is (W / 2, H / 2).
- World "up" for generated paths is an argument; the default, and the demo scene's, is +z.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["Cameras", "CameraFormatError", "look_at", "intrinsics_from_fov", "orbit_path", "spiral_path",
           "load_transforms_json", "load_colmap", "load_cameras", "ring_basis"]

# OpenGL / NeRF camera axes (+y up, +z backward) <-> OpenCV (+y down, +z forward)
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


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
def _image_size(path: Path) -> tuple[int, int]:
    import imageio.v3 as iio

    props = iio.improps(path)
    h, w = props.shape[:2]
    return int(w), int(h)


def _resolve_image(root: Path, file_path: str) -> Path:
    p = (root / file_path).resolve() if not os.path.isabs(file_path) else Path(file_path)
    if not p.suffix and not p.exists():
        for ext in (".png", ".jpg", ".jpeg", ".JPG", ".PNG"):
            if p.with_suffix(ext).exists():
                return p.with_suffix(ext)
    return p


def load_transforms_json(path: str | os.PathLike) -> Cameras:
    """Read a NeRF / instant-ngp / nerfstudio `transforms.json` (a file, or a folder holding one).

    Each frame's `transform_matrix` is an OpenGL camera-to-world ([3, 4] or [4, 4]); intrinsics
    `fl_x`/`fl_y`/`cx`/`cy` or `camera_angle_x` (/`camera_angle_y`), `w`/`h`, taken from the frame or
    the top level (frame wins); without `w`/`h` the first image's size is read. Distortion
    coefficients are ignored with a warning. `file_path` values become `names`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such transforms file")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CameraFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CameraFormatError(f"{path}: top level is not a JSON object")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise CameraFormatError(f"{path}: no 'frames' (a non-empty list is required)")
    root = path.parent
    viewmats, ks, names, images, sizes = [], [], [], [], []
    distorted, first_size = False, None
    for i, fr in enumerate(frames):
        where = f"{path}: frame {i}"
        if not isinstance(fr, dict):
            raise CameraFormatError(f"{where} is not an object")
        get = lambda key: fr.get(key, meta.get(key))  # noqa: E731
        if "transform_matrix" not in fr:
            raise CameraFormatError(f"{where}: missing key 'transform_matrix'")
        try:
            m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise CameraFormatError(f"{where}: 'transform_matrix' is not a numeric matrix") from None
        if m.shape not in ((4, 4), (3, 4)) or not np.isfinite(m).all():
            raise CameraFormatError(f"{where}: 'transform_matrix' must be a finite 4x4 or 3x4 matrix, "
                                    f"got shape {m.shape}")
        c2w = np.eye(4)
        c2w[:3] = m[:3]
        file_path = fr.get("file_path")
        image = _resolve_image(root, str(file_path)) if file_path is not None else None
        w, h = get("w"), get("h")
        if w is None or h is None:
            if first_size is None:  # the first image's size stands for all frames without w / h
                if image is None or not image.is_file():
                    raise CameraFormatError(f"{where}: no 'w'/'h' and no readable image to take the size from "
                                            f"({image if image is not None else 'no file_path'})")
                first_size = _image_size(image)
            w, h = first_size
        w, h = int(w), int(h)
        fx, fy = get("fl_x"), get("fl_y")
        if fx is None:
            ax = get("camera_angle_x")
            if ax is None:
                raise CameraFormatError(f"{where}: missing intrinsics: need 'fl_x' or 'camera_angle_x'")
            fx = 0.5 * w / math.tan(0.5 * float(ax))
        if fy is None:
            ay = get("camera_angle_y")
            fy = 0.5 * h / math.tan(0.5 * float(ay)) if ay is not None else fx
        cx, cy = get("cx"), get("cy")
        cx = w / 2 if cx is None else cx
        cy = h / 2 if cy is None else cy
        try:
            k = [[float(fx), 0.0, float(cx)], [0.0, float(fy), float(cy)], [0.0, 0.0, 1.0]]
        except (TypeError, ValueError):
            raise CameraFormatError(f"{where}: intrinsics are not numbers") from None
        distorted |= any(float(get(key) or 0.0) != 0.0 for key in ("k1", "k2", "k3", "k4", "p1", "p2"))
        viewmats.append(np.linalg.inv(c2w @ _GL_TO_CV.numpy()))
        ks.append(k)
        names.append(str(file_path) if file_path is not None else f"frame_{i:05d}")
        images.append(image)
        sizes.append((w, h))
    if len(set(sizes)) > 1:
        raise CameraFormatError(f"{path}: frames have different image sizes {sorted(set(sizes))}; "
                                "a Cameras batch has one size")
    if distorted:
        warnings.warn(f"{path}: lens distortion coefficients are ignored (pinhole model)", stacklevel=2)
    w, h = sizes[0]
    return Cameras(torch.tensor(np.stack(viewmats), dtype=torch.float32), torch.tensor(ks, dtype=torch.float32),
                   w, h, names=names, image_paths=images)


# COLMAP camera models: name -> (number of params, index of fx, fy, cx, cy; fy == fx when shared)
_COLMAP_MODELS = {
    "SIMPLE_PINHOLE": (3, (0, 0, 1, 2)),
    "PINHOLE": (4, (0, 1, 2, 3)),
    "SIMPLE_RADIAL": (4, (0, 0, 1, 2)),
    "RADIAL": (5, (0, 0, 1, 2)),
    "OPENCV": (8, (0, 1, 2, 3)),
}


def _colmap_lines(path: Path):
    """(line number, stripped line) of a COLMAP text file, comments and blank lines kept out."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield i, s


def _colmap_lines_keep_blank(path: Path):
    """(line number, stripped line), blank lines included (an image's POINTS2D line may be empty)."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        yield i, line.strip()


def _quat_to_rotmat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _find_colmap_dir(path: Path) -> Path:
    for cand in (path, path / "sparse" / "0", path / "sparse", path / "colmap" / "sparse" / "0"):
        if (cand / "cameras.txt").is_file() and (cand / "images.txt").is_file():
            return cand
        if (cand / "cameras.bin").is_file():
            raise CameraFormatError(f"{cand}: only a binary COLMAP model (cameras.bin) was found; convert it "
                                    "with `colmap model_converter --output_type TXT`")
    raise CameraFormatError(f"{path}: no COLMAP text model (cameras.txt and images.txt) here or in sparse/0")


def load_colmap(path: str | os.PathLike) -> Cameras:
    """Read a COLMAP text model: a folder with `cameras.txt` and `images.txt` (or its `sparse/0`).

    Camera models SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV; distortion is ignored
    with a warning. Image poses (qvec, tvec) are world-to-camera, already OpenCV. Images are
    sorted by name; `image_paths` point into `images/` beside the model's scene folder when found.
    """
    model = _find_colmap_dir(Path(path))
    cam_file, img_file = model / "cameras.txt", model / "images.txt"
    cams: dict[int, tuple[int, int, np.ndarray]] = {}
    distorted = False
    for ln, s in _colmap_lines(cam_file):
        tok = s.split()
        where = f"{cam_file}: line {ln}"
        if len(tok) < 4:
            raise CameraFormatError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...', got {s!r}")
        model_name = tok[1]
        if model_name not in _COLMAP_MODELS:
            raise CameraFormatError(f"{where}: unsupported camera model {model_name!r} "
                                    f"(supported: {', '.join(_COLMAP_MODELS)})")
        n_params, (ifx, ify, icx, icy) = _COLMAP_MODELS[model_name]
        try:
            cam_id, w, h = int(tok[0]), int(tok[2]), int(tok[3])
            params = [float(v) for v in tok[4:]]
        except ValueError:
            raise CameraFormatError(f"{where}: non-numeric value in {s!r}") from None
        if len(params) != n_params:
            raise CameraFormatError(f"{where}: {model_name} takes {n_params} parameters, got {len(params)}")
        distorted |= any(v != 0.0 for v in params[max(ifx, ify, icx, icy) + 1:])
        k = np.array([[params[ifx], 0, params[icx]], [0, params[ify], params[icy]], [0, 0, 1]], dtype=np.float64)
        cams[cam_id] = (w, h, k)
    if not cams:
        raise CameraFormatError(f"{cam_file}: no cameras")
    entries = []
    lines = iter(_colmap_lines_keep_blank(img_file))
    for ln, s in lines:
        if not s or s.startswith("#"):
            continue
        where = f"{img_file}: line {ln}"
        tok = s.split(maxsplit=9)
        if len(tok) < 10:
            raise CameraFormatError(f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {s!r}")
        try:
            q = np.array([float(v) for v in tok[1:5]])
            t = np.array([float(v) for v in tok[5:8]])
            cam_id = int(tok[8])
        except ValueError:
            raise CameraFormatError(f"{where}: non-numeric value in {s!r}") from None
        if cam_id not in cams:
            raise CameraFormatError(f"{where}: camera {cam_id} is not in {cam_file}")
        if not np.isfinite(q).all() or not np.isfinite(t).all() or np.linalg.norm(q) == 0:
            raise CameraFormatError(f"{where}: invalid pose")
        next(lines, None)  # the POINTS2D line that follows every image line (may be blank)
        vm = np.eye(4)
        vm[:3, :3] = _quat_to_rotmat(q)
        vm[:3, 3] = t
        entries.append((tok[9], vm, cam_id))
    if not entries:
        raise CameraFormatError(f"{img_file}: no images")
    entries.sort(key=lambda e: e[0])
    sizes = {cams[c][:2] for _, _, c in entries}
    if len(sizes) > 1:
        raise CameraFormatError(f"{cam_file}: images use cameras of different sizes {sorted(sizes)}; "
                                "a Cameras batch has one size")
    if distorted:
        warnings.warn(f"{cam_file}: lens distortion is ignored (pinhole model)", stacklevel=2)
    w, h = sizes.pop()
    image_dir = next((d for d in (model / "images", model.parent / "images", model.parent.parent / "images")
                      if d.is_dir()), None)
    paths = [(image_dir / name) if image_dir is not None else None for name, _, _ in entries]
    return Cameras(torch.tensor(np.stack([vm for _, vm, _ in entries]), dtype=torch.float32),
                   torch.tensor(np.stack([cams[c][2] for _, _, c in entries]), dtype=torch.float32),
                   w, h, names=[name for name, _, _ in entries], image_paths=paths)


def load_cameras(path: str | os.PathLike) -> Cameras:
    """Read cameras from whatever `path` is: a transforms.json (or a folder with one), a COLMAP text
    model folder (or a scene folder with sparse/0, or its cameras.txt / images.txt), or an .npz with
    `viewmats` [C,4,4] (OpenCV world-to-camera), `Ks` [C,3,3], `width`, `height`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such camera file or folder")
    if path.is_dir():
        if (path / "transforms.json").is_file():
            return load_transforms_json(path / "transforms.json")
        return load_colmap(path)
    if path.suffix.lower() == ".json":
        return load_transforms_json(path)
    if path.name in ("cameras.txt", "images.txt"):
        return load_colmap(path.parent)
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            missing = [k for k in ("viewmats", "Ks", "width", "height") if k not in z]
            if missing:
                raise CameraFormatError(f"{path}: missing key(s) {missing} (need viewmats, Ks, width, height)")
            return Cameras(torch.from_numpy(z["viewmats"]).float(), torch.from_numpy(z["Ks"]).float(),
                           int(z["width"]), int(z["height"]))
    raise CameraFormatError(f"{path}: not a recognised camera file (transforms.json, COLMAP text model or .npz)")
