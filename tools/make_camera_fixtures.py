"""Write the camera fixtures of tests/data/cameras/ with other tools than ours.

- `colmap_bin/`, `colmap_txt/`: one small COLMAP model, written by pycolmap (COLMAP's own bindings)
  as binary and as text, from a model built here: 3 cameras of one size (PINHOLE, OPENCV with
  distortion, SIMPLE_RADIAL) and 5 images. `colmap_truth.json` holds what pycolmap itself reports
  for each image: its world-to-camera matrix and its camera's calibration matrix.
- `splatfacto/`: a nerfstudio-style folder: `transforms.json` (OpenGL camera-to-world poses in the
  capture's frame), `dataparser_transforms.json` (the transform and scale nerfstudio applied before
  training) and `expected.json`: where the centre of a splatfacto scene, which lives in the
  dataparser frame, must land in each image. Written with numpy from nerfstudio's documented
  convention; the test checks our reader against it.

pycolmap is a 38 MB wheel used here only: run this script with an interpreter that has it, e.g.

    python3 -m venv /tmp/pcvenv && /tmp/pcvenv/bin/pip install pycolmap numpy
    /tmp/pcvenv/bin/python tools/make_camera_fixtures.py
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "cameras"
W, H = 64, 48


def rotation(axis, deg) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def quat_wxyz(r: np.ndarray) -> np.ndarray:
    w = math.sqrt(max(0.0, 1 + np.trace(r))) / 2
    return np.array([w, (r[2, 1] - r[1, 2]) / (4 * w), (r[0, 2] - r[2, 0]) / (4 * w), (r[1, 0] - r[0, 1]) / (4 * w)])


def colmap_fixtures() -> None:
    import pycolmap

    text = Path(tempfile.mkdtemp())
    (text / "cameras.txt").write_text(
        f"1 PINHOLE {W} {H} 60 62 31.5 24.5\n"
        f"2 OPENCV {W} {H} 55 56 32 23 -0.05 0.01 0.001 -0.002\n"
        f"3 SIMPLE_RADIAL {W} {H} 58 30 25 0.02\n")
    lines = []
    for i in range(5):
        r = rotation([0.3, 1, 0.2 * i], 25 * i - 40)
        t = np.array([0.1 * i - 0.2, 0.05 * i, 2.0 + 0.1 * i])
        lines += [" ".join(map(str, [i + 1, *quat_wxyz(r), *t, i % 3 + 1, f"view_{4 - i:02d}.png"])), ""]
    (text / "images.txt").write_text("\n".join(lines) + "\n")
    (text / "points3D.txt").write_text("")
    rec = pycolmap.Reconstruction()
    rec.read_text(str(text))
    for kind in ("bin", "txt"):
        folder = OUT / f"colmap_{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (rec.write_binary if kind == "bin" else rec.write_text)(str(folder))
    truth = {}
    for image in rec.images.values():
        vm = np.eye(4)
        vm[:3] = image.cam_from_world().matrix()
        truth[image.name] = {"viewmat": vm.tolist(), "K": rec.cameras[image.camera_id].calibration_matrix().tolist(),
                             "model": rec.cameras[image.camera_id].model.name}
    (OUT / "colmap_truth.json").write_text(json.dumps({"pycolmap": pycolmap.__version__, "images": truth}, indent=1))
    shutil.rmtree(text)


def splatfacto_fixture() -> None:
    folder = OUT / "splatfacto"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scene_centre = np.array([0.2, -0.1, 0.05])  # in the dataparser frame, where splatfacto's PLY lives
    transform = np.eye(4)
    transform[:3, :3] = rotation([1, 0.2, -0.4], 70)  # the orientation nerfstudio chose
    transform[:3, 3] = [0.4, -1.2, 0.3]
    scale = 0.37
    frames, expected = [], {}
    for i in range(4):
        # cameras look at the scene centre from the dataparser frame, then go back to the capture frame
        eye = scene_centre + np.array([math.cos(i), math.sin(i), 0.6]) * 1.5
        fwd = (scene_centre - eye) / np.linalg.norm(scene_centre - eye)
        right = np.cross(fwd, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        c2w_cv = np.eye(4)
        c2w_cv[:3, :3] = np.stack([right, down, fwd], 1)
        c2w_cv[:3, 3] = eye
        offset = rng.uniform(-0.1, 0.1, 2)  # the centre lands off the image centre
        c2w_cv[:3, 3] -= offset[0] * right + offset[1] * down
        c2w = c2w_cv.copy()
        c2w[:3, 3] /= scale  # undo nerfstudio: capture-frame pose = T^-1 @ (pose with translation / scale)
        c2w = np.linalg.inv(transform) @ c2w
        frames.append({"file_path": f"images/frame_{i:05d}.png",
                       "transform_matrix": (c2w @ np.diag([1.0, -1, -1, 1])).tolist()})
        cam = np.linalg.inv(c2w_cv) @ np.append(scene_centre, 1)
        fx = 50.0
        expected[frames[-1]["file_path"]] = [fx * cam[0] / cam[2] + W / 2, fx * cam[1] / cam[2] + H / 2]
    meta = {"camera_model": "OPENCV", "fl_x": 50.0, "fl_y": 50.0, "cx": W / 2, "cy": H / 2, "w": W, "h": H,
            "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(meta, indent=1))
    (folder / "dataparser_transforms.json").write_text(json.dumps({"transform": transform[:3].tolist(),
                                                                   "scale": scale}, indent=1))
    (folder / "expected.json").write_text(json.dumps({"scene_centre": scene_centre.tolist(), "pixels": expected},
                                                     indent=1))


if __name__ == "__main__":
    colmap_fixtures()
    splatfacto_fixture()
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(OUT)}: {f.stat().st_size} bytes")
