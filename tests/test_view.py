"""`gendistill view`: the arrays viser gets, the parts it colours, saving picked parts, a served page, and a
real browser (headless chromium driven by Playwright): the screenshot against our own render, a click on the hat."""

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
from gendistill.splat_edit.edit_config import load_edit_config
from gendistill.splat_edit.edit_inputs import segment_part
from gendistill.splat_edit.galp import labelled_from_masks, masks_from_scene
from gendistill.viewer.select import client_camera
from gendistill.viewer.view import (PALETTE, SELECTION_RGB, display_colours, load_parts, part_labels, render_view,
                                    save_parts, splat_arrays, start_viewer)

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


def test_a_label_field_is_read_through_the_reader_given(tmp_path):
    parts = load_parts(SCENE)
    labelled_from_masks(SCENE, {"hat": parts["hat"], "nose": parts["nose"]}).save(tmp_path / "labelled.ply")
    with pytest.raises(ValueError, match="a label field, and no reader"):
        load_parts(SCENE, labels=tmp_path / "labelled.ply")
    got = load_parts(SCENE, labels=tmp_path / "labelled.ply", read_label_field=masks_from_scene)
    assert list(got) == ["hat", "nose"] and all(np.array_equal(got[n], parts[n]) for n in got)


def test_part_labels_and_display_colours():
    parts = {"a": np.array([1, 1, 0, 0], bool), "b": np.array([0, 1, 1, 0], bool)}
    np.testing.assert_array_equal(part_labels(parts, 4), [0, 0, 1, -1])  # the first part wins an overlap
    rgbs = np.full((4, 3), 0.5, np.float32)
    out = display_colours(rgbs, parts, ["b"], selection=np.array([0, 0, 0, 1], bool))
    np.testing.assert_array_equal(out, np.stack([rgbs[0], PALETTE[1], PALETTE[1], SELECTION_RGB]))
    assert (rgbs == 0.5).all()  # not changed in place


def test_saved_parts_are_what_gendistill_edit_reads(tmp_path):
    parts = load_parts(SCENE)
    picked = {"hat": parts["hat"], "face": parts["nose"] | parts["head"]}
    written = save_parts(tmp_path, SCENE, picked, labelled_from_masks)
    assert [p.name for p in written] == ["hat.npy", "face.npy", "labelled.ply"]
    for part, mask in picked.items():
        for source in ([f"segment.mask_file={tmp_path}", "segment.source=mask_file"],
                       [f"segment.labelled_ply={tmp_path / 'labelled.ply'}", "segment.source=labels"]):
            cfg = load_edit_config(None, [f"part={part}", "scene=s.ply", "edit_prompt=e", "guidance.model=m",
                                          f"out={tmp_path}", *source])
            np.testing.assert_array_equal(segment_part(SCENE, cfg, None).numpy(), mask, err_msg=str(source))
    with pytest.raises(ValueError, match="cannot name a part"):
        save_parts(tmp_path, SCENE, {"../hat": parts["hat"]})


def test_the_viewer_serves_its_page_and_moves_off_a_busy_port(free_port, capsys):
    port = free_port()
    cams = orbit_path(SCENE.center(0.01), 3.2, 4, width=64, height=64)
    first = start_viewer({"input": SCENE, "edited": SCENE}, parts=load_parts(SCENE), cameras=cams, port=port)
    try:
        page = urllib.request.urlopen(first.url, timeout=10).read()
        assert first.url.endswith(f":{port}") and b"<html" in page.lower()  # viser's own client, from the wheel
        second = start_viewer({"input": SCENE}, port=port)
        assert second.url != first.url
        assert f"port {port} is in use; the viewer is at {second.url}" in capsys.readouterr().out
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
WEBGL = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", "--no-sandbox",
         "--disable-background-networking", "--disable-component-update"]


def _wait(condition, seconds: float, what: str):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (.ci/run does)")
def test_a_browser_shows_the_coloured_hat_where_we_render_it_and_a_click_selects_the_hat(free_port, tmp_path):
    import imageio.v3 as iio
    from playwright.sync_api import sync_playwright

    parts = load_parts(SCENE)
    phrases = []

    def from_text(scene, phrase):  # stands in for CLIPSeg + 3D-GALP (tested in test_segmenters)
        phrases.append(phrase)
        return parts[phrase]

    viewer = start_viewer({"snowman": SCENE}, parts=parts, port=free_port(), coloured=["hat"], out=tmp_path,
                          write_labelled=labelled_from_masks, from_text=from_text)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=WEBGL)
            page = browser.new_page(viewport={"width": 1024, "height": 768})
            t = time.perf_counter()
            page.goto(viewer.url)
            page.wait_for_selector("canvas", timeout=60_000)

            def _field(label: str):  # viser's labels do not point at their inputs: the input in the label's row
                return page.locator(f"xpath=//label[text()='{label}']/ancestor::div[contains(@class, "
                                    "'mantine-Flex-root')][1]//input")

            _wait(lambda: len(viewer.server.get_clients()) == 1, 30, "the page to connect")
            (client,) = viewer.server.get_clients().values()
            _wait(lambda: client.camera.image_width == 1024 and abs(client.camera.up_direction[2] - 1) < 1e-6, 30,
                  "the page's camera")
            # the hat's colour covers where our rasterizer draws the hat, seen from the browser's camera
            hat_only = SCENE.subset(torch.from_numpy(parts["hat"]))
            end = time.perf_counter() + 60
            while True:  # splats fade in and the page's camera settles over a few seconds (longer when busy)
                cam = client.camera  # read each time: the framing may still be arriving
                camera = client_camera(cam.position, cam.wxyz, cam.fov, cam.image_width, cam.image_height)
                page.screenshot(path=str(tmp_path / "shot.png"))
                hat_region = (render_view(hat_only, camera) < 100).all(-1)  # the black hat on white
                hat_region[:, 640:] = False  # the panel
                shot = iio.imread(tmp_path / "shot.png")[..., :3].astype(np.int32)
                coloured = (np.abs(shot - PALETTE[3] * 255) < 40).all(-1)
                cover = (coloured & hat_region).sum() / max(1, hat_region.sum())
                spill = (coloured & ~hat_region).sum() / max(1, coloured.sum())
                if (cover > 0.8 and spill < 0.2) or time.perf_counter() > end:
                    break
            assert hat_region.sum() > 2000, int(hat_region.sum())
            assert cover > 0.8 and spill < 0.2, (cover, spill, time.perf_counter() - t)

            # a click on the hat's centre pixel selects the hat
            uv, _ = camera.project(SCENE.means[torch.from_numpy(parts["hat"])].float())
            x, y = uv[0].median(dim=0).values.tolist()
            for _ in range(3):  # a click before the page listens for clicks is dropped: try again
                page.mouse.click(x, y)
                try:
                    _wait(lambda: viewer.selection["snowman"].any(), 10, "the click's selection")
                    break
                except AssertionError:
                    continue
            sel, truth = viewer.selection["snowman"], parts["hat"]
            iou = (sel & truth).sum() / (sel | truth).sum()
            assert iou >= 0.8, iou

            # the panel: a phrase selects through `from_text`; "save part" writes what `gendistill edit` reads
            _field("phrase").fill("nose")
            page.get_by_role("button", name="select from text").click()
            _wait(lambda: np.array_equal(viewer.selection["snowman"], parts["nose"]), 10, "the phrase's selection")
            _field("part name").fill("snout")
            page.get_by_role("button", name="save part").click()
            _wait(lambda: (tmp_path / "labelled.ply").is_file(), 20, "the saved part")
            assert phrases == ["nose"]
            np.testing.assert_array_equal(np.load(tmp_path / "masks3d" / "snout.npy"), parts["nose"])
            labelled = masks_from_scene(GaussianScene.load(tmp_path / "labelled.ply"))
            assert list(labelled) == ["body", "head", "nose", "hat", "snout"]
            np.testing.assert_array_equal(labelled["snout"].numpy(), parts["nose"] & ~parts["nose"])  # "nose" first
            browser.close()
    finally:
        viewer.stop()
