import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from gendistill.cli import main
from gendistill.core.scene import GaussianScene

ROOT = Path(__file__).resolve().parents[1]
SNOWMAN = ROOT / "assets" / "scenes" / "snowman.ply"


def test_render_orbit_writes_video_frames_and_sheet(tmp_path, capsys):
    rc = main(["render", str(SNOWMAN), "--frames", "4", "--size", "48x40", "--out", str(tmp_path),
               "--format", "both", "--background", "1,1,1"])
    assert rc == 0
    folder = tmp_path / "snowman"
    assert str(folder) in capsys.readouterr().out
    frames = sorted((folder / "frames").glob("*.png"))
    assert [f.name for f in frames] == [f"{i:05d}.png" for i in range(4)]
    first = iio.imread(frames[0])
    assert first.shape == (40, 48, 3)
    # white background at the corners, something darker (hat, nose) inside
    assert (first[0, 0] == 255).all() and first.min() < 100
    video = iio.imread(folder / "turntable.mp4")
    assert video.shape[0] == 4
    assert iio.imread(folder / "contact_sheet.png").shape[1] > 48
    # frames differ: the camera moves around the scene
    assert np.abs(first.astype(int) - iio.imread(frames[2]).astype(int)).mean() > 1.0


def test_render_from_transforms_json(tmp_path):
    lo, hi = GaussianScene.load_ply(SNOWMAN).bbox()
    center = ((lo + hi) / 2).numpy()
    c2w = np.eye(4)  # OpenGL camera-to-world: x right, y up (+z world), looking along +y world
    c2w[:3, :3] = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]).T
    c2w[:3, 3] = center + [0.0, -4.0 * float((hi - lo).max()), 0.0]
    tj = tmp_path / "transforms.json"
    tj.write_text(json.dumps({"camera_angle_x": 0.8, "w": 32, "h": 32,
                              "frames": [{"file_path": "a.png", "transform_matrix": c2w.tolist()}]}))
    rc = main(["render", str(SNOWMAN), "--cameras", str(tj), "--out", str(tmp_path / "o"), "--format", "png"])
    assert rc == 0
    frames = list((tmp_path / "o" / "snowman" / "frames").glob("*.png"))
    assert len(frames) == 1
    image = iio.imread(frames[0])
    assert image.shape == (32, 32, 3)
    assert image[16, 16].max() > 150 and image[0, 0].max() == 0  # snowman in the middle, black corners
    assert not (tmp_path / "o" / "snowman" / "turntable.mp4").exists()


@pytest.mark.parametrize("content", [b"ply\nformat binary_little_endian 1.0\nelement vertex 10\n", b"hello"])
def test_render_bad_scene_is_one_clear_error_and_writes_nothing(tmp_path, capsys, content):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(content)
    rc = main(["render", str(SNOWMAN), str(bad), "--frames", "2", "--size", "16x16", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "bad.ply" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_render_bad_size_and_format(capsys, tmp_path):
    assert main(["render", str(SNOWMAN), "--size", "big", "--out", str(tmp_path)]) == 2
    assert "--size" in capsys.readouterr().err


def test_render_split_across_two_processes_matches_one(tmp_path):
    """torchrun starts 2 CPU processes (accelerate's launcher needs MPI for that); frames are split, and
    the main process streams them all, in order, into the video and the contact sheet."""
    args = ["render", str(SNOWMAN), "--frames", "5", "--size", "32x32", "--format", "both"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # a gloo rendezvous on CPU occasionally aborts; retry once on a fresh port
        port = str(29500 + os.getpid() % 1000 + 7 * attempt)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", port, "-m", "gendistill", *args, "--out", str(tmp_path / "two")],
                              env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i in range(5):
        a = iio.imread(tmp_path / "one" / "snowman" / "frames" / f"{i:05d}.png")
        b = iio.imread(tmp_path / "two" / "snowman" / "frames" / f"{i:05d}.png")
        assert np.array_equal(a, b)
    for name in ("turntable.mp4", "contact_sheet.png"):
        a, b = (iio.imread(tmp_path / run / "snowman" / name) for run in ("one", "two"))
        assert a.shape == b.shape and np.array_equal(a, b), name
    assert iio.imread(tmp_path / "two" / "snowman" / "turntable.mp4").shape[0] == 5
    assert sorted(p.name for p in (tmp_path / "two" / "snowman").iterdir()) == [
        "contact_sheet.png", "frames", "turntable.mp4"]
    assert proc.stdout.count("rendered snowman") == 1  # only the main process reports
