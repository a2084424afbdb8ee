"""Part picking (the viewer's click): the compositing weights at the clicked pixels, grown to a part."""

from pathlib import Path

import pytest
import torch

from gendistill.core.cameras import orbit_path
from gendistill.core.render import rasterize
from gendistill.core.scene import GaussianScene
from gendistill.viewer.select import client_camera, combine, grow, pick, pick_box, pixel_weights

SCENE = GaussianScene.load(Path(__file__).parents[1] / "assets" / "scenes" / "snowman.ply")
PARTS = SCENE.extras["part"]  # body 0, head 1, nose 2, hat 3
CAMS = orbit_path(SCENE.center(0.01), 3.2, 4, elevation_deg=15.0, width=96, height=96)  # front, side, back, side


def _pixel_of(part: int, view: int) -> tuple[int, int]:
    uv, _ = CAMS[view].project(SCENE.means[PARTS == part].mean(0, keepdim=True))
    return int(uv[0, 0, 0]), int(uv[0, 0, 1])


def test_weights_at_a_pixel_sum_to_its_alpha():
    px = _pixel_of(3, 0)
    w = pixel_weights(SCENE, CAMS[0], [px])
    _, alpha, _ = rasterize(**SCENE.render_args(), viewmats=CAMS[0].viewmats, Ks=CAMS[0].Ks, width=96, height=96)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), alpha[0, px[1], px[0], 0].double().to(w.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("view", range(4))
def test_a_click_on_the_hat_picks_hat_gaussians_and_labels_grow_it_whole(view):
    seed = pick(SCENE, CAMS[view], [_pixel_of(3, view)])
    assert seed.any() and (PARTS[seed] == 3).all()
    part = grow(SCENE, seed, labels=PARTS)
    assert torch.equal(part, PARTS == 3)


def test_the_renderer_s_occlusion_decides_what_a_click_picks():
    front, back = pick(SCENE, CAMS[0], [_pixel_of(2, 0)]), pick(SCENE, CAMS[2], [_pixel_of(2, 2)])
    assert (PARTS[front] == 2).all()  # the nose, seen from the front
    assert not (PARTS[back] == 2).any()  # from behind, the head hides it: the head is picked


def test_growing_without_labels_follows_one_colour():
    nose = grow(SCENE, pick(SCENE, CAMS[0], [_pixel_of(2, 0)]))
    truth = PARTS == 2
    assert float((nose & truth).sum() / (nose | truth).sum()) > 0.99  # an orange cone on a white head
    crown = grow(SCENE, pick(SCENE, CAMS[0], [_pixel_of(3, 0)]))
    assert (PARTS[crown] == 3).all()  # stops at the hat's red band and at the white head below it
    assert not grow(SCENE, torch.zeros(len(SCENE), dtype=torch.bool)).any()


def test_a_pixel_outside_the_view_is_an_error():
    with pytest.raises(ValueError, match=r"outside the 96x96 view"):
        pick(SCENE, CAMS[0], [(96, 10)])


def test_a_browser_camera_is_the_pinhole_camera_it_came_from():
    import viser.transforms as vtf  # how viser itself turns a rotation into the wxyz a client reports

    c2w = CAMS[1].camtoworlds()[0].double().numpy()
    wxyz = vtf.SO3.from_matrix(c2w[:3, :3]).wxyz
    fov = 2 * torch.atan(torch.tensor(48.0) / CAMS.Ks[0, 1, 1]).item()  # vertical, radians
    cam = client_camera(c2w[:3, 3], wxyz, fov, 96, 96)
    torch.testing.assert_close(cam.viewmats, CAMS[1].viewmats.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam.Ks, CAMS[1].Ks.float(), atol=1e-4, rtol=0)


def test_a_box_takes_the_visible_gaussians_inside_it():
    uv, depth = CAMS[0].project(SCENE.means)
    u, v = uv[0].unbind(-1)
    box = (30, 10, 66, 40)  # the top of the snowman seen from the front
    got = pick_box(SCENE, CAMS[0], box)
    inside = (u >= 30) & (u < 67) & (v >= 10) & (v < 41)
    assert got.any() and not (got & ~inside).any()  # nothing outside the box
    front, back = pick_box(SCENE, CAMS[0], (0, 0, 95, 95)), pick_box(SCENE, CAMS[2], (0, 0, 95, 95))
    nose = PARTS == 2
    assert (front & nose).sum() > 0.25 * nose.sum() and not (back & nose).any()  # its surface; none from behind


def test_combine_replaces_adds_and_subtracts():
    a, b = torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    assert combine(a, b, "replace").tolist() == [False, True, True, False]
    assert combine(a, b, "add").tolist() == [True, True, True, False]
    assert combine(a, b, "subtract").tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="selection mode must be one of"):
        combine(a, b, "xor")
