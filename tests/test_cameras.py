"""Cameras: transforms.json and COLMAP readers (to OpenCV), orbit / spiral paths, batching."""

import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gendistill.core.cameras import (CameraFormatError, Cameras, load_cameras, load_colmap, load_transforms_json,
                                     look_at, orbit_path, spiral_path)

# Two OpenGL camera-to-world poses: at (0, 0, 5) looking down -z; at (5, 0, 0) looking down -x.
# Both see the world point below at pixel (70, 30) with fx = fy = 100, cx = 50, cy = 40.
C2W_GL = [
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]],
    [[0, 0, 1, 5], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]],
]
POINTS = [[1.0, 0.5, 0.0], [0.0, 0.5, -1.0]]  # one per camera
PIXEL = (70.0, 30.0)


def write_json(path, meta):
    path.write_text(json.dumps(meta))
    return path


def frames(**extra):
    return [{"file_path": f"./images/f{i}.png", "transform_matrix": m, **extra} for i, m in enumerate(C2W_GL)]


def test_transforms_fl_x_projects_known_points(tmp_path):
    meta = {"fl_x": 100, "fl_y": 100, "cx": 50, "cy": 40, "w": 100, "h": 80, "frames": frames()}
    cams = load_transforms_json(write_json(tmp_path / "transforms.json", meta))
    assert len(cams) == 2 and (cams.width, cams.height) == (100, 80)
    assert cams.names == ["./images/f0.png", "./images/f1.png"]
    assert cams.image_paths[1] == (tmp_path / "images" / "f1.png").resolve()
    for i in range(2):
        uv, z = cams[i].project(torch.tensor([POINTS[i]]))
        torch.testing.assert_close(uv[0, 0], torch.tensor(PIXEL))
        assert abs(float(z[0, 0]) - 5.0) < 1e-5
    torch.testing.assert_close(cams.centers(), torch.tensor([[0.0, 0, 5], [5.0, 0, 0]]))
    # the OpenCV matrices have +z forward: the origin is in front of both cameras
    assert (cams.viewmats[:, 2, 3] > 0).all()


def test_transforms_camera_angle_x_and_size_from_image(tmp_path):
    (tmp_path / "train").mkdir()
    iio.imwrite(tmp_path / "train" / "r_0.png", np.zeros((80, 100, 3), np.uint8))
    meta = {"camera_angle_x": 2 * math.atan(0.5),  # fx = 0.5 * w / tan(angle / 2) = 100
            "frames": [{"file_path": "./train/r_0", "transform_matrix": C2W_GL[0]},
                       {"file_path": "./train/r_1", "transform_matrix": C2W_GL[1]}]}
    cams = load_transforms_json(write_json(tmp_path / "transforms.json", meta))
    assert (cams.width, cams.height) == (100, 80)
    torch.testing.assert_close(cams.Ks[0], torch.tensor([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]]))
    assert cams.image_paths[0] == (tmp_path / "train" / "r_0.png").resolve()
    uv, _ = cams[1].project(torch.tensor([POINTS[1]]))
    torch.testing.assert_close(uv[0, 0], torch.tensor(PIXEL))


def test_transforms_per_frame_intrinsics_and_distortion_warning(tmp_path):
    meta = {"frames": frames(fl_x=100, fl_y=100, cx=50, cy=40, w=100, h=80, k1=0.1)}
    with pytest.warns(UserWarning, match="distortion"):
        cams = load_transforms_json(write_json(tmp_path / "t.json", meta))
    uv, _ = cams.project(torch.tensor([POINTS[0]]))
    torch.testing.assert_close(uv[0, 0], torch.tensor(PIXEL))


def _colmap_model(root, with_distortion=False):
    """The two cameras above as a hand-written COLMAP text model (world-to-camera qvec / tvec)."""
    model = root / "sparse" / "0"
    model.mkdir(parents=True)
    cam = "1 OPENCV 100 80 100 100 50 40 0.01 0 0 0" if with_distortion else "1 PINHOLE 100 80 100 100 50 40"
    (model / "cameras.txt").write_text(f"# Camera list with one line of data per camera:\n# comment\n{cam}\n")
    lines = ["# Image list with two lines of data per image:", "# N images"]
    for i, m in reversed(list(enumerate(C2W_GL))):  # written out of order: the reader sorts by name
        c2w_cv = np.array(m, float) @ np.diag([1.0, -1, -1, 1])
        w2c = np.linalg.inv(c2w_cv)
        x, y, z, w = Rotation.from_matrix(w2c[:3, :3]).as_quat()
        t = w2c[:3, 3]
        nums = " ".join(repr(float(v)) for v in (w, x, y, z, *t))
        lines.append(f"{i + 1} {nums} 1 f{i}.png")
        lines.append("" if i == 0 else "10.5 20.5 -1 30.0 40.0 7")  # POINTS2D, possibly empty
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    return model


def test_colmap_agrees_with_transforms(tmp_path):
    _colmap_model(tmp_path)
    col = load_colmap(tmp_path)  # the scene folder: finds sparse/0
    meta = {"fl_x": 100, "fl_y": 100, "cx": 50, "cy": 40, "w": 100, "h": 80, "frames": frames()}
    ref = load_transforms_json(write_json(tmp_path / "transforms.json", meta))
    assert col.names == ["f0.png", "f1.png"] and (col.width, col.height) == (100, 80)
    torch.testing.assert_close(col.viewmats, ref.viewmats, atol=1e-6, rtol=0)
    torch.testing.assert_close(col.Ks, ref.Ks)
    uv, _ = col[1].project(torch.tensor([POINTS[1]]))
    torch.testing.assert_close(uv[0, 0], torch.tensor(PIXEL))
    # load_cameras dispatch: the folder with transforms.json, the model folder, its cameras.txt
    torch.testing.assert_close(load_cameras(tmp_path).viewmats, ref.viewmats)
    torch.testing.assert_close(load_cameras(tmp_path / "sparse" / "0").viewmats, col.viewmats)
    torch.testing.assert_close(load_cameras(tmp_path / "sparse" / "0" / "images.txt").Ks, col.Ks)


def test_colmap_distortion_warns(tmp_path):
    _colmap_model(tmp_path, with_distortion=True)
    with pytest.warns(UserWarning, match="distortion"):
        cams = load_colmap(tmp_path / "sparse" / "0")
    torch.testing.assert_close(cams.Ks[0], torch.tensor([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]]))


def test_colmap_simple_models(tmp_path):
    model = _colmap_model(tmp_path)
    for line, fx, fy in [("1 SIMPLE_PINHOLE 100 80 90 50 40", 90, 90), ("1 SIMPLE_RADIAL 100 80 90 50 40 0", 90, 90),
                         ("1 RADIAL 100 80 90 50 40 0 0", 90, 90)]:
        (model / "cameras.txt").write_text(line + "\n")
        k = load_colmap(model).Ks[0]
        assert (k[0, 0], k[1, 1], k[0, 2], k[1, 2]) == (fx, fy, 50, 40)


@pytest.mark.parametrize("meta, key", [
    ({"fl_x": 1, "w": 4, "h": 4, "frames": []}, "'frames'"),
    ({"fl_x": 1, "w": 4, "h": 4}, "'frames'"),
    ({"fl_x": 1, "w": 4, "h": 4, "frames": [{"file_path": "a.png"}]}, "frame 0: missing key 'transform_matrix'"),
    ({"w": 4, "h": 4, "frames": [{"transform_matrix": C2W_GL[0]}]}, "'fl_x' or 'camera_angle_x'"),
    ({"fl_x": 1, "frames": [{"file_path": "nope.png", "transform_matrix": C2W_GL[0]}]}, "no 'w'/'h'"),
    ({"fl_x": 1, "w": 4, "h": 4, "frames": [{"transform_matrix": [[1, 2], [3, 4]]}]}, "4x4 or 3x4"),
])
def test_bad_transforms(tmp_path, meta, key):
    path = write_json(tmp_path / "transforms.json", meta)
    with pytest.raises(CameraFormatError) as e:
        load_transforms_json(path)
    assert str(path) in str(e.value) and key in str(e.value), str(e.value)


def test_bad_json_and_colmap(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(CameraFormatError, match="t.json: not valid JSON"):
        load_transforms_json(tmp_path / "t.json")
    model = _colmap_model(tmp_path)
    good_images = (model / "images.txt").read_text()
    (model / "cameras.txt").write_text("# c\n1 PINHOLE 100 80 100 100 50\n")
    with pytest.raises(CameraFormatError, match=r"cameras.txt: line 2: PINHOLE takes 4 parameters, got 3"):
        load_colmap(model)
    (model / "cameras.txt").write_text("1 FISHEYE_X 100 80 1 2 3\n")
    with pytest.raises(CameraFormatError, match="line 1: unknown camera model 'FISHEYE_X'"):
        load_colmap(model)
    (model / "cameras.txt").write_text("1 PINHOLE 100 80 100 100 50 40\n")
    (model / "images.txt").write_text(good_images.replace(" 1 f1.png", " 1"))
    with pytest.raises(CameraFormatError, match=r"images.txt: line 3: expected 'IMAGE_ID"):
        load_colmap(model)
    (model / "images.txt").write_text(good_images.replace(" 1 f1.png", " 2 f1.png"))
    with pytest.raises(CameraFormatError, match="line 3: camera 2 is not in"):
        load_colmap(model)
    with pytest.raises(CameraFormatError, match="no COLMAP model"):
        load_colmap(tmp_path / "sparse")
    with pytest.raises(FileNotFoundError):
        load_cameras(tmp_path / "missing")


# ---------------------------------------------------------------------- paths
@pytest.mark.parametrize("up", [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0)])
def test_orbit_looks_at_center(up):
    center = torch.tensor([0.3, -0.2, 0.8])
    cams = orbit_path(center, 3.0, 12, elevation_deg=20, fov_deg=50, width=64, height=48, up=up)
    uv, z = cams.project(center[None])
    torch.testing.assert_close(uv[:, 0], torch.tensor([32.0, 24.0]).expand(12, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, 0], torch.full((12,), 3.0), atol=1e-5, rtol=0)
    upv = torch.tensor(up)
    rel = cams.centers() - center
    torch.testing.assert_close(rel.norm(dim=-1), torch.full((12,), 3.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(rel @ upv, torch.full((12,), 3.0 * math.sin(math.radians(20))), atol=1e-5, rtol=0)
    above, _ = cams.project((center + 0.5 * upv)[None])
    assert (above[:, 0, 1] < 24).all()  # world up is up in the image
    torch.testing.assert_close(cams.Ks[0, 0, 0], torch.tensor(32 / math.tan(math.radians(25))))
    # counter-clockwise seen from +up: azimuth steps of 30 degrees, in order
    a = rel - (rel @ upv)[:, None] * upv
    turn = torch.linalg.cross(a[:-1], a[1:], dim=-1) @ upv
    assert (turn > 0).all()


def test_spiral_path():
    cams = spiral_path([0, 0, 1], 2.0, 40, elevation_deg=10, elevation_amplitude_deg=20, width=32, height=32)
    uv, _ = cams.project(torch.tensor([[0.0, 0, 1]]))
    torch.testing.assert_close(uv[:, 0], torch.full((40, 2), 16.0), atol=1e-4, rtol=0)
    el = torch.rad2deg(torch.asin((cams.centers()[:, 2] - 1) / 2.0))
    assert el.min() < -9 and el.max() > 29  # 10 +- 20 degrees
    with pytest.raises(ValueError, match="90"):
        spiral_path([0, 0, 0], 1.0, 8, elevation_deg=80, elevation_amplitude_deg=20)


def test_look_at_parallel_up_is_an_error():
    with pytest.raises(ValueError, match="parallel"):
        look_at(torch.tensor([[0.0, 0, 5]]), torch.zeros(3))


def test_batching_scaling_and_device():
    cams = orbit_path([0, 0, 0], 2.0, 6, width=64, height=48)
    assert len(cams[1:4]) == 3 and cams[1:4].names == ["orbit_0001", "orbit_0002", "orbit_0003"]
    assert torch.equal(cams[-1].viewmats, cams.viewmats[5:]) and len(cams[[0, 2]]) == 2
    assert len(cams[torch.tensor([True, False] * 3)]) == 3 and len(list(cams)) == 6
    with pytest.raises(IndexError):
        cams[6]
    p = torch.tensor([[0.3, 0.2, 0.1]])
    half = cams.scaled(0.5)
    assert (half.width, half.height) == (32, 24)
    torch.testing.assert_close(half.project(p)[0], cams.project(p)[0] / 2)
    odd = cams.scaled(width=50, height=30)
    torch.testing.assert_close(odd.project(p)[0], cams.project(p)[0] * torch.tensor([50 / 64, 30 / 48]))
    assert cams.to(dtype=torch.float64).viewmats.dtype == torch.float64
    both = Cameras.cat([cams[:2], cams[4:]])
    assert len(both) == 4 and both.names[2] == "orbit_0004"


def test_npz_dispatch(tmp_path):
    cams = orbit_path([0, 0, 0], 2.0, 3, width=20, height=10)
    np.savez(tmp_path / "c.npz", viewmats=cams.viewmats.numpy(), Ks=cams.Ks.numpy(), width=20, height=10)
    back = load_cameras(tmp_path / "c.npz")
    assert torch.equal(back.viewmats, cams.viewmats) and (back.width, back.height) == (20, 10)
    np.savez(tmp_path / "d.npz", viewmats=cams.viewmats.numpy())
    with pytest.raises(CameraFormatError, match="d.npz: missing key"):
        load_cameras(tmp_path / "d.npz")
