"""Camera files written by other tools: COLMAP binary and text (pycolmap), nerfstudio with its
dataparser transform, INRIA cameras.json. Fixtures: tests/data/cameras (tools/make_camera_fixtures.py)."""

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gendistill.core.cameras import CameraFormatError, load_cameras

DATA = Path(__file__).parent / "data" / "cameras"
TRUTH = json.loads((DATA / "colmap_truth.json").read_text())["images"]


@pytest.mark.parametrize("kind", ["bin", "txt"])
def test_colmap_models_written_by_pycolmap_match_its_own_poses(kind):
    with pytest.warns(UserWarning, match=r"camera 2 \(OPENCV, distortion \[-0.05.*camera 3 \(SIMPLE_RADIAL"):
        cams = load_cameras(DATA / f"colmap_{kind}")
    assert cams.names == sorted(TRUTH) and (cams.width, cams.height) == (64, 48)
    for i, name in enumerate(cams.names):
        torch.testing.assert_close(cams.viewmats[i].double(), torch.tensor(TRUTH[name]["viewmat"], dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(cams.Ks[i].double(), torch.tensor(TRUTH[name]["K"], dtype=torch.float64), atol=1e-5, rtol=0)
    for f in ("cameras", "images"):  # one of its files names the model too
        with pytest.warns(UserWarning, match="distortion"):
            assert load_cameras(DATA / f"colmap_{kind}" / f"{f}.{kind}").names == cams.names


def test_a_colmap_scene_folder_prefers_the_binary_model(tmp_path):
    shutil.copytree(DATA / "colmap_bin", tmp_path / "sparse" / "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load_cameras(tmp_path)) == 5


def _bin_model(tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(DATA / "colmap_bin", model)
    return model


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "cameras.bin").write_bytes((m / "cameras.bin").read_bytes()[:-5]), "cameras.bin: truncated"),
    (lambda m: (m / "images.bin").write_bytes((m / "images.bin").read_bytes()[:-7]), "images.bin: truncated"),
    (lambda m: (m / "cameras.bin").write_bytes(struct.pack("<Q", 10**12) + (m / "cameras.bin").read_bytes()[8:]),
     r"cameras.bin: claims 1000000000000 cameras, more than"),
    (lambda m: (m / "images.bin").write_bytes(struct.pack("<Q", 2**63) + (m / "images.bin").read_bytes()[8:]),
     r"images.bin: claims \d+ images"),
    (lambda m: (m / "cameras.bin").write_bytes(
        (m / "cameras.bin").read_bytes()[:12] + struct.pack("<i", 99) + (m / "cameras.bin").read_bytes()[16:]),
     "camera 1: unknown camera model id 99"),
    (lambda m: (m / "images.bin").write_bytes((m / "images.bin").read_bytes() + b"\0\0"), "2 bytes left"),
])
def test_damaged_binary_models_are_refused_by_name(tmp_path, damage, message):
    model = _bin_model(tmp_path)
    damage(model)
    with pytest.raises(CameraFormatError, match=message):
        load_cameras(model)


def test_splatfacto_cameras_are_moved_into_the_dataparser_frame():
    folder = DATA / "splatfacto"
    expected = json.loads((folder / "expected.json").read_text())
    centre = torch.tensor([expected["scene_centre"]])
    cams = load_cameras(folder)  # dataparser_transforms.json beside transforms.json is applied
    for i, name in enumerate(cams.names):
        uv, depth = cams[i].project(centre)
        torch.testing.assert_close(uv[0, 0], torch.tensor(expected["pixels"][name], dtype=torch.float32),
                                   atol=1e-3, rtol=0)
        assert depth[0, 0] > 0
    raw = load_cameras(folder / "transforms.json", dataparser=False)  # the capture frame: misaligned
    uv, _ = raw[0].project(centre)
    assert (uv[0, 0] - torch.tensor(expected["pixels"][raw.names[0]])).abs().max() > 5
    named = load_cameras(folder / "transforms.json", dataparser=folder / "dataparser_transforms.json")
    torch.testing.assert_close(named.viewmats, cams.viewmats)


def test_a_bad_dataparser_file_is_named(tmp_path):
    shutil.copytree(DATA / "splatfacto", tmp_path / "s")
    (tmp_path / "s" / "dataparser_transforms.json").write_text(json.dumps({"transform": [[1, 0, 0]], "scale": 1}))
    with pytest.raises(CameraFormatError, match="dataparser_transforms.json: 'transform' must be a finite 3x4"):
        load_cameras(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_cameras(tmp_path / "s" / "transforms.json", dataparser=tmp_path / "nope.json")


def test_inria_cameras_json_gives_the_colmap_poses(tmp_path):
    """INRIA's camera_to_JSON: position and rotation of the camera-to-world, fx / fy, centred principal point."""
    entries = []
    for i, name in enumerate(sorted(TRUTH)):
        c2w = np.linalg.inv(np.array(TRUTH[name]["viewmat"]))
        k = np.array(TRUTH[name]["K"])
        entries.append({"id": i, "img_name": name.removesuffix(".png"), "width": 64, "height": 48,
                        "position": c2w[:3, 3].tolist(), "rotation": c2w[:3, :3].tolist(), "fx": k[0, 0], "fy": k[1, 1]})
    (tmp_path / "cameras.json").write_text(json.dumps(entries))
    cams = load_cameras(tmp_path)  # the INRIA output folder
    assert cams.names == [n.removesuffix(".png") for n in sorted(TRUTH)]
    for i, name in enumerate(sorted(TRUTH)):
        torch.testing.assert_close(cams.viewmats[i].double(), torch.tensor(TRUTH[name]["viewmat"], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.Ks[:, :2, 2], torch.tensor([[32.0, 24.0]]).expand(5, 2))
    entries[2].pop("fx")
    (tmp_path / "cameras.json").write_text(json.dumps(entries))
    with pytest.raises(CameraFormatError, match="cameras.json: camera 2: missing key 'fx'"):
        load_cameras(tmp_path / "cameras.json")
