"""`gendistill view`: the arrays viser gets, the parts it colours, and a served page (no browser yet)."""

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gendistill.cli import main
from gendistill.core.cameras import orbit_path
from gendistill.core.scene import GaussianScene
from gendistill.viewer.view import PALETTE, load_parts, splat_arrays, start_viewer

SCENE_PATH = Path(__file__).parents[1] / "assets" / "scenes" / "snowman.ply"
SCENE = GaussianScene.load(SCENE_PATH)


def test_splat_arrays_are_the_gaussians_second_moments():
    a = splat_arrays(SCENE.subset(slice(0, 50)))
    q = SCENE.quats[:50].numpy()
    rot = Rotation.from_quat(np.c_[q[:, 1:], q[:, :1]]).as_matrix()  # scipy: xyzw
    s = np.exp(SCENE.log_scales[:50].numpy())
    expect = np.einsum("nij,nj,nkj->nik", rot, s**2, rot)
    np.testing.assert_allclose(a["covariances"], expect, rtol=1e-4, atol=1e-9)
    assert a["rgbs"].min() >= 0 and a["rgbs"].max() <= 1 and a["opacities"].shape == (50, 1)


def test_parts_from_the_scene_a_labelled_ply_or_mask_files(tmp_path):
    parts = load_parts(SCENE)
    assert list(parts) == ["body", "head", "nose", "hat"]
    assert all(np.array_equal(parts[n], (SCENE.extras["part"] == i).numpy()) for i, n in enumerate(parts))
    SCENE.save_ply(tmp_path / "labelled.ply")
    assert list(load_parts(SCENE, labels=tmp_path / "labelled.ply")) == list(parts)
    (tmp_path / "masks").mkdir()
    np.save(tmp_path / "masks" / "hat.npy", parts["hat"])
    assert list(load_parts(SCENE, masks3d=tmp_path / "masks")) == ["hat"]
    np.save(tmp_path / "masks" / "nose.npy", parts["nose"][:-3])
    with pytest.raises(ValueError, match=r"nose.npy: 14997 entries, the scene has 15000 Gaussians"):
        load_parts(SCENE, masks3d=tmp_path / "masks")
    SCENE.subset(slice(0, 10)).save_ply(tmp_path / "small.ply")
    with pytest.raises(ValueError, match=r"small.ply: 10 Gaussians, the scene has 15000"):
        load_parts(SCENE, labels=tmp_path / "small.ply")


def test_the_viewer_serves_its_page_and_moves_off_a_busy_port(free_port, capsys):
    port = free_port()
    cams = orbit_path(SCENE.center(0.01), 3.2, 4, width=64, height=64)
    first, url = start_viewer({"input": SCENE, "edited": SCENE}, parts=load_parts(SCENE), cameras=cams, port=port)
    try:
        page = urllib.request.urlopen(url, timeout=10).read()
        assert url.endswith(f":{port}") and b"<html" in page.lower()  # viser's own client, from the wheel
        second, url2 = start_viewer({"input": SCENE}, port=port)
        assert url2 != url and f"port {port} is in use; the viewer is at {url2}" in capsys.readouterr().out
        second.stop()
    finally:
        first.stop()


def test_view_command_errors_are_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing.ply")]) == 2
    assert "missing.ply: no such scene file" in capsys.readouterr().err
    assert main(["view", str(SCENE_PATH), "--masks3d", str(tmp_path)]) == 2
    assert f"--masks3d {tmp_path}: no <part>.npy files" in capsys.readouterr().err


def test_an_unknown_part_to_colour_is_named(tmp_path, capsys):
    assert main(["view", str(SCENE_PATH), "--colour", "hat,scarf", "--port", "1"]) == 2
    assert "--colour: no part scarf (parts: body, head, nose, hat)" in capsys.readouterr().err


# -- in a real browser (Debian's chromium, headless, software WebGL; .ci/run installs it) -----------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (.ci/run does)")
def test_a_browser_shows_the_snowman_with_its_hat_coloured(free_port, tmp_path):
    import imageio.v3 as iio

    server, url = start_viewer({"snowman": SCENE}, parts=load_parts(SCENE), port=free_port(), coloured=["hat"])
    try:
        t = time.perf_counter()
        run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--use-angle=swiftshader",
                              "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update",
                              f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={tmp_path / 'shot.png'}",
                              "--window-size=1024,768", "--virtual-time-budget=20000", url],
                             capture_output=True, text=True, timeout=180)
        seconds = time.perf_counter() - t
    finally:
        server.stop()
    assert run.returncode == 0 and (tmp_path / "shot.png").is_file(), run.stderr[-2000:]
    img = iio.imread(tmp_path / "shot.png")[150:700, 300:724, :3].astype(np.int32)  # the scene; not the panels
    hat = (np.abs(img - PALETTE[3] * 255) < 40).all(-1)  # the hat's part colour
    nose = (img[..., 0] > 200) & (img[..., 1] > 80) & (img[..., 1] < 160) & (img[..., 2] < 80)  # orange
    assert hat.sum() > 200 and nose.sum() > 20, (int(hat.sum()), int(nose.sum()), seconds)
    assert np.nonzero(hat)[0].mean() < np.nonzero(nose)[0].mean()  # the coloured hat sits above the nose
    cols = np.nonzero(hat)[1]
    assert abs(cols.mean() - np.nonzero(nose)[1].mean()) < 40  # over it, not beside it
