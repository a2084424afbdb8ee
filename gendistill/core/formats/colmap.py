"""COLMAP sparse models, text (`cameras.txt`, `images.txt`) or binary (`cameras.bin`, `images.bin`).

INRIA 3DGS training leaves a binary model in `sparse/0`; `colmap model_converter` writes either.
Every COLMAP camera model is read. Its pinhole part (fx, fy, cx, cy) is used; lens distortion is
not undistorted here, so a model with non-zero distortion gives one warning naming each such
camera (id, model, coefficients), and fisheye models say that a pinhole stands in for them.

Image poses (qvec wxyz, tvec) are world-to-camera in OpenCV axes already. Images are sorted by
name. Binary counts are checked against the file size before anything is allocated from them.

Read by hand: pycolmap, the maintained reader, is a 38 MB compiled wheel with the whole of
COLMAP, for two small fixed binary layouts; it makes this package's test fixtures instead.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from gendistill.core.cameras import CameraFormatError, Cameras

__all__ = ["load_colmap", "find_colmap_model", "COLMAP_MODELS"]

# id -> (name, number of params, indices of fx, fy, cx, cy (fy == fx when shared), fisheye)
COLMAP_MODELS = {
    0: ("SIMPLE_PINHOLE", 3, (0, 0, 1, 2), False),
    1: ("PINHOLE", 4, (0, 1, 2, 3), False),
    2: ("SIMPLE_RADIAL", 4, (0, 0, 1, 2), False),
    3: ("RADIAL", 5, (0, 0, 1, 2), False),
    4: ("OPENCV", 8, (0, 1, 2, 3), False),
    5: ("OPENCV_FISHEYE", 8, (0, 1, 2, 3), True),
    6: ("FULL_OPENCV", 12, (0, 1, 2, 3), False),
    7: ("FOV", 5, (0, 1, 2, 3), True),
    8: ("SIMPLE_RADIAL_FISHEYE", 4, (0, 0, 1, 2), True),
    9: ("RADIAL_FISHEYE", 5, (0, 0, 1, 2), True),
    10: ("THIN_PRISM_FISHEYE", 12, (0, 1, 2, 3), True),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16, (0, 1, 2, 3), True),
}
_BY_NAME = {name: mid for mid, (name, *_) in COLMAP_MODELS.items()}


def find_colmap_model(path: Path) -> tuple[Path, str]:
    """(model folder, "bin" | "txt") for a model folder, a scene folder holding sparse/0, or one of its files."""
    if path.is_file():
        path = path.parent
    for cand in (path, path / "sparse" / "0", path / "sparse", path / "colmap" / "sparse" / "0"):
        if (cand / "cameras.bin").is_file() and (cand / "images.bin").is_file():
            return cand, "bin"
        if (cand / "cameras.txt").is_file() and (cand / "images.txt").is_file():
            return cand, "txt"
    raise CameraFormatError(f"{path}: no COLMAP model (cameras.bin + images.bin, or cameras.txt + images.txt) "
                            "here or in sparse/0")


def _quat_to_rotmat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _camera(where: str, model_id: int, w: int, h: int, params: list[float]) -> dict:
    if model_id not in COLMAP_MODELS:
        raise CameraFormatError(f"{where}: unknown camera model id {model_id}")
    name, n_params, (ifx, ify, icx, icy), fisheye = COLMAP_MODELS[model_id]
    if len(params) != n_params:
        raise CameraFormatError(f"{where}: {name} takes {n_params} parameters, got {len(params)}")
    if not np.isfinite(params).all() or w <= 0 or h <= 0:
        raise CameraFormatError(f"{where}: size {w}x{h} or parameters {params} are not valid")
    k = np.array([[params[ifx], 0, params[icx]], [0, params[ify], params[icy]], [0, 0, 1]], dtype=np.float64)
    extra = params[max(ifx, ify, icx, icy) + 1:]
    return {"model": name, "size": (w, h), "K": k, "distortion": extra if any(extra) else [], "fisheye": fisheye}


# -- text ---------------------------------------------------------------------------------------------
def _lines(path: Path):
    """(line number, stripped line) of a COLMAP text file, comment lines left out (blank ones kept)."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s.startswith("#"):
            yield i, s


def _read_text(model: Path) -> tuple[dict, list]:
    cam_file, img_file = model / "cameras.txt", model / "images.txt"
    cams = {}
    for ln, s in _lines(cam_file):
        if not s:
            continue
        tok, where = s.split(), f"{cam_file}: line {ln}"
        if len(tok) < 4:
            raise CameraFormatError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...', got {s!r}")
        if tok[1] not in _BY_NAME:
            raise CameraFormatError(f"{where}: unknown camera model {tok[1]!r} (known: {', '.join(_BY_NAME)})")
        try:
            cam_id, w, h, params = int(tok[0]), int(tok[2]), int(tok[3]), [float(v) for v in tok[4:]]
        except ValueError:
            raise CameraFormatError(f"{where}: non-numeric value in {s!r}") from None
        cams[cam_id] = _camera(where, _BY_NAME[tok[1]], w, h, params)
    images = []
    lines = _lines(img_file)
    for ln, s in lines:
        if not s:
            continue
        tok, where = s.split(maxsplit=9), f"{img_file}: line {ln}"
        if len(tok) < 10:
            raise CameraFormatError(f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {s!r}")
        try:
            q, t, cam_id = [float(v) for v in tok[1:5]], [float(v) for v in tok[5:8]], int(tok[8])
        except ValueError:
            raise CameraFormatError(f"{where}: non-numeric value in {s!r}") from None
        next(lines, None)  # the POINTS2D line that follows every image line (may be blank)
        images.append((where, tok[9], np.array(q), np.array(t), cam_id))
    return cams, images


# -- binary -------------------------------------------------------------------------------------------
class _Reader:
    """Little-endian fields from a bytes buffer; running past the end is a CameraFormatError."""

    def __init__(self, path: Path):
        self.path, self.data, self.pos = path, path.read_bytes(), 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise CameraFormatError(f"{self.path}: truncated at byte {self.pos} (file of {len(self.data)} bytes)")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def count(self, what: str, min_bytes_each: int) -> int:
        (n,) = self.take("Q")
        if n * min_bytes_each > len(self.data) - self.pos:
            raise CameraFormatError(f"{self.path}: claims {n} {what}, more than its remaining "
                                    f"{len(self.data) - self.pos} bytes can hold")
        return n

    def name(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise CameraFormatError(f"{self.path}: an image name is not terminated (byte {self.pos})")
        raw, self.pos = self.data[self.pos:end], end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CameraFormatError(f"{self.path}: an image name is not UTF-8 (byte {self.pos})") from None


def _read_binary(model: Path) -> tuple[dict, list]:
    r = _Reader(model / "cameras.bin")
    cams = {}
    for _ in range(r.count("cameras", 24)):
        cam_id, model_id, w, h = r.take("iiQQ")
        where = f"{r.path}: camera {cam_id}"
        if model_id not in COLMAP_MODELS:
            raise CameraFormatError(f"{where}: unknown camera model id {model_id}")
        params = list(r.take(f"{COLMAP_MODELS[model_id][1]}d"))
        cams[cam_id] = _camera(where, model_id, w, h, params)
    if r.pos != len(r.data):
        raise CameraFormatError(f"{r.path}: {len(r.data) - r.pos} bytes left after the last camera")
    r = _Reader(model / "images.bin")
    images = []
    for _ in range(r.count("images", 64)):
        image_id, *qt, cam_id = r.take("i7di")
        name = r.name()
        n_points = r.count(f"2D points in image {name}", 24)
        r.pos += 24 * n_points  # x, y (float64), point3D id (int64): not needed for cameras
        images.append((f"{r.path}: image {image_id} ({name})", name, np.array(qt[:4]), np.array(qt[4:]), cam_id))
    if r.pos != len(r.data):
        raise CameraFormatError(f"{r.path}: {len(r.data) - r.pos} bytes left after the last image")
    return cams, images


# -- both ---------------------------------------------------------------------------------------------
def load_colmap(path: str | os.PathLike) -> Cameras:
    """Read a COLMAP model, binary or text: its folder, a scene folder with sparse/0, or one of its files.

    All images must share one size (a `Cameras` batch has one). `image_paths` point into `images/`
    beside the model or its scene folder when found.
    """
    model, kind = find_colmap_model(Path(path))
    cams, images = _read_binary(model) if kind == "bin" else _read_text(model)
    if not cams:
        raise CameraFormatError(f"{model}: no cameras in the {kind} model")
    if not images:
        raise CameraFormatError(f"{model}: no images in the {kind} model")
    entries = []
    for where, name, q, t, cam_id in images:
        if cam_id not in cams:
            raise CameraFormatError(f"{where}: camera {cam_id} is not in the model's cameras")
        if not (np.isfinite(q).all() and np.isfinite(t).all()) or np.linalg.norm(q) < 1e-12:
            raise CameraFormatError(f"{where}: invalid pose (qvec {q.tolist()}, tvec {t.tolist()})")
        vm = np.eye(4)
        vm[:3, :3], vm[:3, 3] = _quat_to_rotmat(q), t
        entries.append((name, vm, cam_id))
    entries.sort(key=lambda e: e[0])
    used = sorted({c for _, _, c in entries})
    sizes = {cams[c]["size"] for c in used}
    if len(sizes) > 1:
        raise CameraFormatError(f"{model}: images use cameras of different sizes {sorted(sizes)}; a Cameras batch "
                                "has one size (split the model, or undistort it to one size with COLMAP)")
    odd = [f"camera {c} ({cams[c]['model']}, " + (f"distortion {cams[c]['distortion']}" if cams[c]["distortion"]
           else "fisheye") + ")" for c in used if cams[c]["distortion"] or cams[c]["fisheye"]]
    if odd:
        warnings.warn(f"{model}: lens distortion is not undistorted, a pinhole stands in for {'; '.join(odd)}; "
                      "for exact pixels undistort the images first (colmap image_undistorter)", stacklevel=2)
    w, h = sizes.pop()
    image_dir = next((d for d in (model / "images", model.parent / "images", model.parent.parent / "images")
                      if d.is_dir()), None)
    return Cameras(torch.tensor(np.stack([vm for _, vm, _ in entries]), dtype=torch.float32),
                   torch.tensor(np.stack([cams[c]["K"] for _, _, c in entries]), dtype=torch.float32),
                   w, h, names=[name for name, _, _ in entries],
                   image_paths=[(image_dir / name) if image_dir is not None else None for name, _, _ in entries])
