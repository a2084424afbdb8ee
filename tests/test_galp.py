"""3D-GALP label field: colour codes, softness, anchors, neighbour loss, training, voting, PLY round trip."""

import math

import pytest
import torch

from gendistill.core.cameras import Cameras, orbit_path
from gendistill.core.render.sh import SH_C0
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.galp import (
    GALPConfig,
    LabelField,
    codes_within,
    contribution_weights,
    knn_query,
    label_softness,
    labelled_scene,
    mask_colors,
    mask_iou,
    masks_from_scene,
    neighbor_loss,
    part_colors,
    render_labels,
    romap_neighbor_loss,
    romap_softness,
    select_anchors,
    train_label_field,
    view_contributions,
    vote_masks,
)
from gendistill.splat_edit.part_masks import truth_part_masks


pytestmark = pytest.mark.usefixtures("one_thread")


def two_part_scene(n_per: int = 300, seed: int = 0) -> tuple[GaussianScene, torch.Tensor]:
    """Two opaque spheres of surface Gaussians (radius 0.5) at x = -0.65 and x = +0.65; part ids [N]."""
    g = torch.Generator().manual_seed(seed)
    pts, ids = [], []
    for k, cx in enumerate((-0.65, 0.65)):
        d = torch.nn.functional.normalize(torch.randn(n_per, 3, generator=g), dim=-1)
        pts.append(d * 0.5 + torch.tensor([cx, 0.0, 0.0]))
        ids.append(torch.full((n_per,), k))
    scene = GaussianScene.from_points(torch.cat(pts), sh_degree=0, init_opacity=0.95, init_scale=1.2)
    scene.extras["part"] = torch.cat(ids).int()
    scene.comments.append("part_names: left right")
    return scene, torch.cat(ids)


def ring(n: int = 8, size: int = 40) -> Cameras:
    return Cameras.cat([orbit_path([0, 0, 0], 3.5, n // 2, elevation_deg=15, width=size, height=size),
                        orbit_path([0, 0, 0], 3.5, n - n // 2, elevation_deg=50, width=size, height=size,
                                   start_deg=20)])


@pytest.fixture(scope="module")
def trained():
    scene, ids = two_part_scene()
    cams = ring()
    masks = truth_part_masks(scene, cams, ids, 2)
    cfg = GALPConfig(steps=300, n_anchors=100, knn=10, softness_every=50)
    field = train_label_field(scene, cams, masks, ["left", "right"], cfg, progress=False)
    return scene, ids, cams, masks, field


def test_part_colors_are_romap_codes_then_seeded():
    c = part_colors(8)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=c.dtype)
    assert torch.equal(c[:6], expected)
    assert torch.equal(part_colors(8), c)  # seeded
    assert not torch.equal(part_colors(8, seed=1)[6:], c[6:])
    d = (c[:, None] - c[None]).abs().sum(-1) + torch.eye(8) * 9
    assert d.min() > 0.3 and (c.sum(-1) > 0.3).all()


def test_mask_colors_earlier_parts_claim_first():
    masks = torch.zeros(1, 2, 2, 3)
    masks[0, 0, 0, :2] = 1  # part 0 at (0,0), (0,1)
    masks[0, 1, 0, 1:] = 1  # part 1 at (0,1), (0,2): (0,1) overlaps
    out = mask_colors(masks, part_colors(2))
    assert out[0, 0, 1].tolist() == [1, 0, 0]  # overlap goes to the first part
    assert out[0, 0, 2].tolist() == [0, 1, 0]
    assert out[0, 1].abs().sum() == 0  # no part: black


def test_label_softness_numbers():
    colors = part_colors(2)  # red, green
    labels = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
                           [[1.0, 0.0, 0.0], [0.7, 0.3, 0.0]]])  # [C=2, N=2, 3]
    s = label_softness(labels, colors)
    assert s[0] == 0  # no variance across views
    mean = torch.tensor([0.6, 0.4, 0.0])
    cos = torch.nn.functional.normalize(mean, dim=0) @ colors.T
    p = torch.softmax(cos, 0)
    h = -(p * p.log()).sum()
    v = 2 * 0.1 ** 2  # var of R and G, each 0.01
    assert s[1].item() == pytest.approx((h * v).item(), rel=1e-5)
    # weights: a view that does not see the Gaussian does not count
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert label_softness(labels, colors, weights=w)[1] == 0


def test_select_anchors_takes_both_ends():
    s = torch.tensor([5.0, 0.1, 3.0, 9.0, 0.0, 7.0])
    a = select_anchors(s, 4)
    assert sorted(a.tolist()) == sorted([3, 5, 4, 1])
    assert len(select_anchors(s, 100)) == 6


def test_neighbor_loss_value_and_gradient():
    dc = torch.zeros(4, 3, requires_grad=True)
    with torch.no_grad():
        dc[1:] = 1.0 / SH_C0  # colours 1.5 for Gaussians 1..3, 0.5 for Gaussian 0
    nbrs = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]])
    loss = neighbor_loss(dc, torch.tensor([0]), nbrs)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert dc.grad[1:].abs().sum() == 0 and dc.grad[0].abs().sum() > 0  # only the anchor moves


def test_render_labels_learns_labels_only():
    scene, _ = two_part_scene(50)
    scene.means.requires_grad_(True)
    label = torch.zeros(len(scene), 16, 3, requires_grad=True)
    img = render_labels(scene, label, ring(2, 24))
    assert img.shape == (2, 24, 24, 3)
    img.sum().backward()
    assert scene.means.grad is None and label.grad.abs().sum() > 0


def test_two_parts_exact_split_from_clean_masks(trained):
    scene, ids, cams, masks, field = trained
    truth = torch.stack([ids == 0, ids == 1])
    seen = contribution_weights(scene, cams) > 0.05
    assert seen.sum() > 0.9 * len(scene)
    pred = field.masks_3d()
    assert pred.shape == (2, len(scene)) and pred.dtype == torch.bool
    assert torch.equal(pred[:, seen], truth[:, seen])
    # voting counts the pixels where a Gaussian is (nearly) hidden too: close, not exact
    assert mask_iou(vote_masks(scene, cams, masks), truth, seen).min() > 0.98
    # 2D masks from the label field agree with the input masks almost everywhere
    m2 = field.masks_2d()
    assert m2.shape == masks.shape
    assert (m2 == (masks > 0.5)).float().mean() > 0.98
    assert field.softness.shape == (len(scene),) and (field.softness >= 0).all()


def test_unseen_gaussians_get_no_part():
    # two small Gaussians inside the left sphere's opaque shell: every view sees them only through
    # the shell, whose pixels say "left"; the masks carry no evidence about them: no part
    scene, ids = two_part_scene(n_per=600)
    scene.log_scales += math.log(1.3)  # a closed shell
    inner = GaussianScene.from_points(torch.tensor([[-0.65, 0.02, 0.0], [-0.65, -0.02, 0.0]]), sh_degree=0,
                                      init_opacity=0.95)
    inner.log_scales.fill_(math.log(0.02))
    inner.extras["part"] = torch.zeros(2, dtype=torch.int32)
    scene = GaussianScene.concat([scene, inner])
    cams = ring()
    masks = truth_part_masks(scene, cams, torch.cat([ids, ids.new_zeros(2)]), 2)
    cfg = GALPConfig(steps=100, n_anchors=100, knn=10)
    field = LabelField(scene, cams, masks, ["left", "right"], cfg)
    assert (field.view_weights[:, -2:].amax(0) > 0).all()
    assert (field.view_weights[:, -2:].amax(0) < cfg.min_view_weight).all()
    field.fit(progress=False)
    assert field.unseen()[-2:].all() and not field.unseen()[:-2].all()
    assert not field.masks_3d()[:, -2:].any()
    assert torch.allclose(field.mean_labels()[-2:], torch.zeros(2, 3), atol=1e-6)  # black: no part
    assert field.masks_3d()[0, : len(ids)][ids == 0].float().mean() > 0.9  # the shell is still "left"


def test_view_contributions_sum_to_alpha():
    scene, _ = two_part_scene(50)
    cams = ring(2, 24)
    w = view_contributions(scene, cams)
    _, alphas, _ = scene.render(cams)
    assert w.shape == (2, len(scene))
    assert torch.allclose(w.sum(1), alphas.sum((1, 2, 3)), rtol=1e-4)


def test_codes_within_is_disjoint():
    colors = part_colors(4)  # red, green, blue, yellow: red and yellow are 1.0 apart
    labels = torch.tensor([[1.0, 0.4, 0.0], [1.0, 0.6, 0.0], [0.5, 0.5, 0.5], [0.3, 0.0, 0.0], [0.7, 0.0, 0.0]])
    m = codes_within(labels, colors, 1.0)
    assert m.shape == (4, 5)
    assert m[:, 0].tolist() == [True, False, False, False]
    assert m[:, 1].tolist() == [False, False, False, True]
    assert not m[:, 2].any()  # grey is 1.5 from every code
    assert not m[:, 3].any()  # dim red is nearer black (no part)
    assert m[:, 4].tolist() == [True, False, False, False]


def test_vote_masks_average_over_pixels():
    scene, ids = two_part_scene(50)
    cams = ring(2, 24)
    masks = torch.zeros(2, 2, 24, 24)
    masks[0, 0] = 1.0  # part 0: view 0 says "part" everywhere, view 1 nowhere; part 1 the reverse
    masks[1, 1] = 1.0
    _, scores = vote_masks(scene, cams, masks, return_scores=True)
    w = view_contributions(scene, cams)
    seen = w.sum(0) > 0
    assert torch.allclose(scores[0, seen] + scores[1, seen], torch.ones(())) and (scores[:, ~seen] == 0).all()
    both = (w > 0).all(0)
    assert both.sum() > 50
    assert ((scores[0, both] > 0) & (scores[0, both] < 1)).all()
    # each pixel counts once, not by alpha * T: a mostly hidden Gaussian votes as a visible one
    weighted = w[0, both] / w[:, both].sum(0)
    assert (scores[0, both] - weighted).abs().max() > 0.05


def test_labelled_ply_round_trip(trained, tmp_path):
    scene, ids, cams, masks, field = trained
    path = field.to_scene().save_ply(tmp_path / "labelled.ply")
    back = GaussianScene.load_ply(path)
    assert torch.allclose(back.label_sh, field.label_sh)
    assert torch.allclose(back.certainty, field.softness)
    assert back.label_sh_degree == 3
    assert torch.equal(back.extras["part"], scene.extras["part"])
    m = masks_from_scene(back)
    assert list(m) == ["left", "right"]
    assert torch.equal(m["left"], codes_within(field.label_sh[:, 0] * SH_C0 + 0.5, field.colors)[0])
    with pytest.raises(ValueError, match="nose"):
        masks_from_scene(back, ["nose"])
    with pytest.raises(ValueError, match="no label field"):
        masks_from_scene(scene)
    # relabelling replaces the old label comments
    again = labelled_scene(back, back.label_sh, None, ["a", "b"])
    assert sum(c.startswith("label_parts:") for c in again.comments) == 1


def test_config_and_shape_errors():
    with pytest.raises(ValueError, match="SH degree"):
        GALPConfig(sh_degree=4)
    scene, ids = two_part_scene(20)
    cams = ring(2, 24)
    with pytest.raises(ValueError, match=r"P=2"):
        LabelField(scene, cams, torch.ones(2, 3, 24, 24), ["a", "b"])
    with pytest.raises(ValueError, match="match"):
        LabelField(scene, cams, torch.ones(2, 2, 20, 24), ["a", "b"])


def test_lower_sh_degree_and_empty_part_warns():
    scene, ids = two_part_scene(40)
    cams = ring(2, 24)
    masks = truth_part_masks(scene, cams, ids, 2)
    masks[:, 1] = 0.0  # the right part never appears: its 3D mask comes out empty
    with pytest.warns(UserWarning) as rec:
        field = train_label_field(scene, cams, masks, ["left", "right"], GALPConfig(sh_degree=1, steps=5),
                                  progress=False)
    assert any("'right' is empty" in str(w.message) for w in rec)
    assert field.label_sh.shape == (len(scene), 4, 3)
    assert math.isfinite(field.step())


# ---------------------------------------------------------------------- the "romap" variant (released code)
def test_variant_config_errors_name_the_key():
    assert GALPConfig().variant == "ours" and GALPConfig().first_neighbor_step == 0
    assert GALPConfig(variant="romap").first_neighbor_step == 51  # official `global_step > 50`
    assert GALPConfig(variant="romap", neighbor_start=3).first_neighbor_step == 3
    for bad, key in (({"variant": "paper"}, "GALPConfig.variant"),
                     ({"neighbor_start": -1}, "GALPConfig.neighbor_start"),
                     ({"knn_max_points": 0}, "GALPConfig.knn_max_points"),
                     ({"foreground_only": "yes"}, "GALPConfig.foreground_only")):
        with pytest.raises(ValueError, match=key):
            GALPConfig(**bad)
    scene, ids = two_part_scene(20)
    cams = ring(2, 24)
    with pytest.raises(ValueError, match="recompute_targets.*mask_fn"):
        LabelField(scene, cams, truth_part_masks(scene, cams, ids, 2), ["a", "b"], GALPConfig(recompute_targets=True))


def test_romap_neighbor_loss_sums_channels_and_moves_both_sides():
    dc = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]], requires_grad=True)
    anchors = torch.tensor([0])
    nbrs = torch.tensor([[0, 1, 2]])  # the anchor itself first, as the official kNN returns it
    loss = romap_neighbor_loss(dc, anchors, nbrs)
    assert loss.item() == pytest.approx((0.0 + 2.5 + 2.0) / 3)  # raw DC, summed over channels, mean over pairs
    loss.backward()
    assert dc.grad[1].abs().sum() > 0 and dc.grad[2].abs().sum() > 0  # neighbours move too
    assert dc.grad[0].abs().sum() > 0 and dc.grad[3].abs().sum() == 0
    assert torch.allclose(dc.grad[2], torch.tensor([1.0, 0.0, 0.0]) / 3)
    # ours on the same numbers: colour space, channel mean, detached neighbour mean: a different value
    ours = neighbor_loss(dc.detach(), anchors, torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]]))
    assert ours.item() != pytest.approx(loss.item())


def test_knn_query_includes_self():
    pts = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [10.0, 0, 0]])
    idx = knn_query(pts, pts[[0, 2]], 3)
    assert idx.tolist() == [[0, 1, 2], [2, 1, 0]]
    assert knn_query(pts, pts[:1], 10).shape == (1, 4)


def test_romap_softness_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    colors = part_colors(3).double()
    raw = torch.randn(5, 40, 3, generator=g, dtype=torch.float64)  # [C, N, 3] per-view raw SH values
    dc = torch.randn(40, 3, generator=g, dtype=torch.float64)
    dc[0] = -1.0  # opposite to every code: black (cos 0) wins its softmax
    s = romap_softness(raw, dc, colors)
    # independent: numpy, codes plus black, entropy clamped at its 10th percentile, channel-mean variance
    import numpy as np

    codes = np.concatenate([colors.numpy(), np.zeros((1, 3))])
    d = dc.numpy()
    cos = np.array([[0.0 if not c.any() else (x @ c) / (np.linalg.norm(x) * np.linalg.norm(c)) for c in codes]
                    for x in d])
    p = np.exp(cos) / np.exp(cos).sum(1, keepdims=True)
    h = -(p * np.log(p + 1e-8)).sum(1)
    h = np.minimum(h, np.quantile(h, 0.1))
    v = raw.numpy().var(0).mean(-1)
    want = h * v
    want = (want - want.min()) / (want.max() - want.min() + 1e-6)
    assert np.allclose(s.numpy(), want, atol=1e-12)
    assert p[0].argmax() == 3 and (h < h.max()).sum() <= 4  # black in the softmax; H clamped for ~90%


def test_romap_init_and_neighbor_start():
    scene, ids = two_part_scene(60)
    cams = ring(2, 24)
    masks = truth_part_masks(scene, cams, ids, 2)
    cfg = GALPConfig(variant="romap", steps=5, n_anchors=20, knn=5, softness_every=2, neighbor_start=3, sh_degree=1)
    field = LabelField(scene, cams, masks, ["a", "b"], cfg)
    assert torch.equal(field.label_sh[:, 0], torch.full((len(scene), 3), 0.5))  # raw DC 0.5
    assert field.label_sh[:, 1:].abs().sum() == 0
    assert LabelField(scene, cams, masks, ["a", "b"], GALPConfig(sh_degree=1)).label_sh.abs().sum() == 0  # ours
    nb = []
    for _ in range(5):
        field.step()
        nb.append(field.last_losses["neighbor"])
    assert nb[:3] == [0.0, 0.0, 0.0] and nb[3] > 0 and nb[4] > 0
    assert field.anchor_neighbors.shape == (len(field.anchors), 5)
    assert torch.equal(field.anchor_neighbors[:, 0], field.anchors)  # each anchor is its own first neighbour
    assert field.softness.min() == 0 and field.softness.max() <= 1  # min-max normalised


def test_romap_subset_for_large_scenes():
    scene, ids = two_part_scene(60)
    cams = ring(2, 24)
    cfg = GALPConfig(variant="romap", n_anchors=10, knn=4, knn_max_points=30, sh_degree=0)
    field = LabelField(scene, cams, truth_part_masks(scene, cams, ids, 2), ["a", "b"], cfg)
    field.softness = torch.rand(len(scene), generator=torch.Generator().manual_seed(1))
    anchors, nbrs = field._romap_subset_anchors()
    assert anchors.shape == (10,) and nbrs.shape == (10, 4) and torch.equal(nbrs[:, 0], anchors)
    assert len(set(anchors.tolist()) | set(nbrs.flatten().tolist())) <= 30  # all from one 30-point subset
    again, _ = field._romap_subset_anchors()
    assert not torch.equal(anchors, again)  # a fresh subset each step


def test_foreground_only_and_recompute_targets():
    scene, ids = two_part_scene(60)
    cams = ring(2, 24)
    masks = truth_part_masks(scene, cams, ids, 2)
    fg = (masks > 0.5).any(1)
    assert fg.any() and (~fg).any()
    calls = []

    def mask_fn(views):
        calls.append(list(views))
        return masks[views]

    field = LabelField(scene, cams, masks, ["a", "b"], GALPConfig(foreground_only=True, recompute_targets=True,
                                                                   sh_degree=0), mask_fn=mask_fn)
    target = field.targets[[0, 1]].clone()
    off = target.clone()
    off[~fg] = 0.7  # wrong only where no part is
    assert field._l1(off, [0, 1]).item() == 0.0
    assert calls == [[0, 1]]
    off[fg] += 0.1
    assert field._l1(off, [0, 1]).item() == pytest.approx(0.1, rel=1e-5)  # mean over the foreground
    plain = LabelField(scene, cams, masks, ["a", "b"], GALPConfig(sh_degree=0))
    assert plain._l1(target + (~fg)[..., None] * 0.7, [0, 1]).item() > 0
    bad = LabelField(scene, cams, masks, ["a", "b"], GALPConfig(recompute_targets=True, sh_degree=0),
                     mask_fn=lambda views: masks)
    with pytest.raises(ValueError, match="mask_fn must return"):
        bad._l1(target[:1], [0])


def test_romap_two_parts_from_clean_masks():
    scene, ids = two_part_scene()
    cams = ring()
    masks = truth_part_masks(scene, cams, ids, 2)
    cfg = GALPConfig(variant="romap", steps=600, n_anchors=100, knn=10)
    field = train_label_field(scene, cams, masks, ["left", "right"], cfg, progress=False)
    seen = contribution_weights(scene, cams) > 0.05
    truth = torch.stack([ids == 0, ids == 1])
    assert torch.equal(field.masks_3d()[:, seen], truth[:, seen])
