"""Camera files of the NeRF family: `transforms.json` (NeRF, instant-ngp, nerfstudio, with
nerfstudio's `dataparser_transforms.json`) and the `cameras.json` of INRIA 3DGS training."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from gendistill.core.cameras import CameraFormatError, Cameras

__all__ = ["load_transforms_json", "apply_dataparser_transform", "load_inria_cameras"]

# OpenGL / NeRF camera axes (+y up, +z backward) -> OpenCV (+y down, +z forward)
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])

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


def load_transforms_json(path: str | os.PathLike, dataparser: str | os.PathLike | bool | None = None) -> Cameras:
    """Read a NeRF / instant-ngp / nerfstudio `transforms.json` (a file, or a folder holding one).

    Each frame's `transform_matrix` is an OpenGL camera-to-world ([3, 4] or [4, 4]); intrinsics
    `fl_x`/`fl_y`/`cx`/`cy` or `camera_angle_x` (/`camera_angle_y`), `w`/`h`, taken from the frame or
    the top level (frame wins); without `w`/`h` the first image's size is read. Distortion
    coefficients are ignored with a warning. `file_path` values become `names`.

    `dataparser`: nerfstudio's `dataparser_transforms.json` ({"transform": 3x4, "scale": s}), which
    maps these poses into the frame a splatfacto model (and its PLY export) lives in:
    c2w <- transform @ c2w, then its translation times `scale`. None: applied when a
    `dataparser_transforms.json` sits beside `transforms.json`; a path: that file; False: never.
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
        viewmats.append(np.linalg.inv(c2w @ _GL_TO_CV))
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
    viewmats = np.stack(viewmats)
    if dataparser is not False:
        dp = Path(dataparser) if dataparser not in (None, True) else path.parent / "dataparser_transforms.json"
        if dataparser not in (None, True) or dp.is_file():
            viewmats = apply_dataparser_transform(viewmats, dp)
    return Cameras(torch.tensor(viewmats, dtype=torch.float32), torch.tensor(ks, dtype=torch.float32),
                   w, h, names=names, image_paths=images)


def apply_dataparser_transform(viewmats: np.ndarray, path: Path) -> np.ndarray:
    """World-to-camera [C,4,4] (OpenCV) moved into nerfstudio's dataparser frame given by `path`.

    nerfstudio applies to every camera-to-world pose P: P <- T @ P (T the 3x4 `transform` made
    4x4), then multiplies the translation by `scale`. Rotation axes are unaffected by the OpenGL
    / OpenCV difference (a right multiplication), so the same applies to OpenCV poses.
    """
    try:
        meta = json.loads(path.read_text())
        t = np.asarray(meta["transform"], dtype=np.float64)
        scale = float(meta["scale"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such dataparser transforms file") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CameraFormatError(f"{path}: not a nerfstudio dataparser_transforms.json "
                                f"(need 'transform' 3x4 and 'scale'; {type(err).__name__}: {err})") from None
    if t.shape not in ((3, 4), (4, 4)) or not np.isfinite(t).all() or not math.isfinite(scale) or scale <= 0:
        raise CameraFormatError(f"{path}: 'transform' must be a finite 3x4 matrix and 'scale' > 0, "
                                f"got shape {t.shape} and scale {scale}")
    m = np.eye(4)
    m[:3] = t[:3]
    c2w = m @ np.linalg.inv(viewmats)
    c2w[:, :3, 3] *= scale
    return np.linalg.inv(c2w)


def load_inria_cameras(path: str | os.PathLike) -> Cameras:
    """Read the `cameras.json` INRIA 3DGS training writes beside its PLY.

    A list of {id, img_name, width, height, position [3], rotation [3][3], fx, fy}: `position`
    and `rotation` are the camera-to-world translation and rotation in OpenCV axes; the principal
    point is the image centre. Entries are kept in file order.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CameraFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise CameraFormatError(f"{path}: an INRIA cameras.json is a non-empty list of cameras")
    viewmats, ks, names, sizes = [], [], [], set()
    for i, e in enumerate(entries):
        where = f"{path}: camera {i}"
        try:
            rot = np.asarray(e["rotation"], dtype=np.float64)
            pos = np.asarray(e["position"], dtype=np.float64)
            w, h, fx, fy = int(e["width"]), int(e["height"]), float(e["fx"]), float(e["fy"])
        except KeyError as err:
            raise CameraFormatError(f"{where}: missing key {err}") from None
        except (TypeError, ValueError):
            raise CameraFormatError(f"{where}: rotation, position, width, height, fx, fy must be numbers") from None
        if rot.shape != (3, 3) or pos.shape != (3,) or not (np.isfinite(rot).all() and np.isfinite(pos).all()):
            raise CameraFormatError(f"{where}: rotation must be a finite 3x3 and position a finite 3-vector")
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = rot, pos
        viewmats.append(np.linalg.inv(c2w))
        ks.append([[fx, 0.0, w / 2], [0.0, fy, h / 2], [0.0, 0.0, 1.0]])
        names.append(str(e.get("img_name", f"camera_{i:05d}")))
        sizes.add((w, h))
    if len(sizes) > 1:
        raise CameraFormatError(f"{path}: cameras have different image sizes {sorted(sizes)}; a Cameras batch has one size")
    w, h = sizes.pop()
    return Cameras(torch.tensor(np.stack(viewmats), dtype=torch.float32), torch.tensor(ks, dtype=torch.float32),
                   w, h, names=names)
