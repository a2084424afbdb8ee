"""The "clipseg" and "sam" part-mask sources, on tiny random transformers models saved to disk and
loaded back through `from_pretrained` (no network)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gendistill.core.cameras import Cameras, intrinsics_from_fov, look_at, orbit_path
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.part_masks import get_part_masks, render_views

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 40, 32  # not square, so that swapped x / y shows


def scene_two_balls(n_per: int = 120) -> GaussianScene:
    g = torch.Generator().manual_seed(0)
    pts = [torch.nn.functional.normalize(torch.randn(n_per, 3, generator=g), dim=-1) * 0.5 + torch.tensor([0, cy, 0])
           for cy in (-0.65, 0.65)]
    scene = GaussianScene.from_points(torch.cat(pts), sh_degree=0, init_opacity=0.9, init_scale=1.2)
    scene.opacity_logits = torch.randn(2 * n_per, generator=g) * 1.5  # unequal weights for the centroid
    return scene


def orbit(n: int = 4) -> Cameras:
    return orbit_path([0, 0, 0], 3.5, n, elevation_deg=20, width=W, height=H, start_deg=10)


def pinhole(viewmat: np.ndarray, k: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """(u, v, depth) of world point p, written out (pixel centres at +0.5)."""
    x, y, z = viewmat[:3, :3] @ p + viewmat[:3, 3]
    return k[0, 0] * x / z + k[0, 2], k[1, 1] * y / z + k[1, 2], z


# ---------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    out = tmp_path_factory.mktemp("clipseg")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    images = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.481, 0.458, 0.408],
                               image_std=[0.269, 0.261, 0.276])
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, extract_layers=[0, 1], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, conditional_layer=0)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(cfg).save_pretrained(out)
    CLIPSegProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    out = tmp_path_factory.mktemp("sam")
    cfg = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1], num_pos_feats=4,
                           mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_attention_heads=2, iou_head_hidden_dim=8))
    torch.manual_seed(0)
    SamModel(cfg).save_pretrained(out)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(out)
    return out


@pytest.fixture
def sam_spy(monkeypatch):
    """Records what SamProcessor and SamModel receive: processor points / boxes (view pixels) and the
    model's input_points (after the processor's resize)."""
    from transformers import SamModel, SamProcessor

    calls = {"points": [], "boxes": [], "model_points": []}
    proc_call, model_forward = SamProcessor.__call__, SamModel.forward

    def processor(self, *args, **kw):
        calls["points"].append(kw.get("input_points"))
        calls["boxes"].append(kw.get("input_boxes"))
        return proc_call(self, *args, **kw)

    def forward(self, *args, **kw):
        calls["model_points"].append(kw["input_points"].detach().cpu().double())
        return model_forward(self, *args, **kw)

    monkeypatch.setattr(SamProcessor, "__call__", processor)
    monkeypatch.setattr(SamModel, "forward", forward)
    return calls


# ---------------------------------------------------------------------- registration
def test_sources_registered_by_importing_part_masks():
    code = ("import sys; from gendistill.splat_edit.part_masks import MASK_SOURCES; "
            "assert {'clipseg', 'sam'} <= set(MASK_SOURCES), sorted(MASK_SOURCES); "
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- clipseg
def test_clipseg_matches_the_model_per_view_and_part(clipseg_dir, monkeypatch):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    texts = []
    call = CLIPSegProcessor.__call__
    monkeypatch.setattr(CLIPSegProcessor, "__call__",
                        lambda self, *a, **kw: texts.extend(kw["text"]) or call(self, *a, **kw))
    scene, cams = scene_two_balls(), orbit(3)
    pm = get_part_masks("clipseg", scene, ["left", "right"], cameras=cams, model=clipseg_dir,
                        prompts={"right": "a ball"}, output="soft", batch_size=4)
    assert pm.parts == ["left", "right"] and pm.masks.shape == (3, 2, H, W)
    assert pm.cameras is cams and pm.images.shape == (3, H, W, 3)
    assert torch.allclose(pm.images, render_views(scene, cams), atol=1e-6)
    assert sorted(set(texts)) == ["a ball", "left"] and len(texts) == 6
    # each (view, part) on its own, straight through the model
    net, proc = CLIPSegForImageSegmentation.from_pretrained(clipseg_dir).eval(), CLIPSegProcessor.from_pretrained(
        clipseg_dir)
    for v in range(3):
        img = (pm.images[v] * 255).round().byte().numpy()
        for i, phrase in enumerate(["left", "a ball"]):
            with torch.no_grad():
                logits = net(**proc(text=[phrase], images=[img], return_tensors="pt")).logits
            want = torch.nn.functional.interpolate(logits.reshape(1, 1, 32, 32), size=(H, W), mode="bilinear",
                                                   align_corners=False).sigmoid()[0, 0]
            assert torch.allclose(pm.masks[v, i], want, atol=1e-5), (v, i)
    assert not torch.allclose(pm.masks[:, 0], pm.masks[:, 1])  # the prompts differ


def test_clipseg_hard_masks_take_the_most_likely_part(clipseg_dir, tmp_path):
    scene, cams = scene_two_balls(), orbit(3)
    np.savez(tmp_path / "cams.npz", viewmats=cams.viewmats.numpy(), Ks=cams.Ks.numpy(), width=W, height=H)
    kw = dict(model=str(clipseg_dir), prompts={"right": "a ball"})
    soft = get_part_masks("clipseg", scene, ["left", "right"], cameras=cams, output="soft", **kw).masks
    hard = get_part_masks("clipseg", scene, ["left", "right"], cameras=str(tmp_path / "cams.npz"), threshold=0.3,
                          **kw)
    assert set(hard.masks.unique().tolist()) == {0.0, 1.0} and hard.masks.sum(1).max() == 1
    want = (soft > 0.3) & (soft >= soft.max(dim=1, keepdim=True).values)
    assert torch.equal(hard.masks.bool(), want)
    assert torch.allclose(hard.cameras.viewmats, cams.viewmats)


# ---------------------------------------------------------------------- sam
def four_cameras() -> Cameras:
    eyes = torch.tensor([[4.0, 0, 0.5], [-4.0, 0, 0.5], [0, 4.0, 0.5], [0, -4.0, 0.5]])
    k = intrinsics_from_fov(50.0, W, H)
    return Cameras(look_at(eyes, torch.zeros(3)), k.expand(4, 3, 3).clone(), W, H)


def test_sam_click_is_projected_and_hidden_views_are_empty(sam_dir, sam_spy):
    scene, cams = scene_two_balls(), four_cameras()
    p = np.array([4.5, 0.1, 0.6])  # behind camera 0, in front of camera 1, off the image of cameras 2 and 3
    proj = [pinhole(cams.viewmats[i].double().numpy(), cams.Ks[i].double().numpy(), p) for i in range(4)]
    u0, v0, z0 = proj[0]
    assert z0 < 0 and 0 <= u0 < W and 0 <= v0 < H  # a projection that ignored depth would keep view 0
    shown = [i for i, (u, v, z) in enumerate(proj) if z > 0 and 0 <= u < W and 0 <= v < H]
    assert shown == [1]
    pm = get_part_masks("sam", scene, ["ball"], cameras=cams, point=p.tolist(), model=sam_dir)
    assert pm.parts == ["ball"] and pm.masks.shape == (4, 1, H, W) and pm.cameras is cams
    u, v, _ = proj[1]
    assert len(sam_spy["points"]) == 1 and sam_spy["boxes"] == [None]
    assert np.allclose(sam_spy["points"][0], [[[u - 0.5, v - 0.5]]], atol=1e-5)
    # the model sees it scaled to SAM's 64 px longest edge (40 x 32 -> 64 x 51)
    assert np.allclose(sam_spy["model_points"][0].flatten(), [(u - 0.5) * 64 / 40, (v - 0.5) * 51 / 32], atol=1e-4)
    assert pm.masks[1].sum() > 0
    assert pm.masks[[0, 2, 3]].sum() == 0
    assert set(pm.masks.unique().tolist()) <= {0.0, 1.0}


def test_sam_selection_centroid_and_box(sam_dir, sam_spy, tmp_path):
    scene, cams = scene_two_balls(), orbit(4)
    sel = np.zeros(len(scene), dtype=bool)
    sel[len(scene) // 2:] = True  # the +y ball
    np.save(tmp_path / "ball.npy", sel)
    pm = get_part_masks("sam", scene, ["ball"], cameras=cams, selection=str(tmp_path / "ball.npy"), box=True,
                        model=sam_dir)
    w = 1 / (1 + np.exp(-scene.opacity_logits.double().numpy()[sel]))
    pts = scene.means.double().numpy()[sel]
    centroid = (w[:, None] * pts).sum(0) / w.sum()
    assert not np.allclose(centroid, pts.mean(0), atol=1e-3)  # the weights matter
    assert len(sam_spy["points"]) == 4  # the centroid is inside every orbit view
    for i in range(4):
        vm, k = cams.viewmats[i].double().numpy(), cams.Ks[i].double().numpy()
        u, v, _ = pinhole(vm, k, centroid)
        assert np.allclose(sam_spy["points"][i], [[[u - 0.5, v - 0.5]]], atol=1e-5), i
        uv = np.array([pinhole(vm, k, q)[:2] for q in pts]) - 0.5
        box = [max(uv[:, 0].min(), 0), max(uv[:, 1].min(), 0), min(uv[:, 0].max(), W - 1), min(uv[:, 1].max(), H - 1)]
        assert np.allclose(sam_spy["boxes"][i], [[box]], atol=1e-5), i
    assert pm.masks.shape == (4, 1, H, W) and pm.masks.sum() > 0
    # a bool tensor selection gives the same prompt
    first = [np.asarray(x) for x in sam_spy["points"]]
    sam_spy["points"].clear()
    get_part_masks("sam", scene, ["ball"], cameras=cams, selection=torch.from_numpy(sel), model=sam_dir)
    assert len(sam_spy["points"]) == 4 and all(np.allclose(a, b) for a, b in zip(first, sam_spy["points"]))


def test_sam_part_empty_in_every_view_is_an_error(sam_dir):
    with pytest.raises(ValueError, match="'ball' is empty in every view"):
        get_part_masks("sam", scene_two_balls(), ["ball"], cameras=orbit(2), point=[0, 0.65, 0], model=sam_dir,
                       mask_threshold=1e6)


# ---------------------------------------------------------------------- bad input
def test_bad_input_names_the_option(sam_dir, clipseg_dir, tmp_path):
    scene, cams = scene_two_balls(), orbit(2)
    missing = tmp_path / "no_such_model"
    for source, extra in (("clipseg", {}), ("sam", {"point": [0, 0, 0]})):
        with pytest.raises(ValueError, match=f"option 'model'.*{missing}"):
            get_part_masks(source, scene, ["ball"], cameras=cams, model=missing, **extra)
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
            get_part_masks(source, scene, ["ball"], cameras=cams, colour=1, **extra)
        with pytest.raises(ValueError, match="option 'cameras'"):
            get_part_masks(source, scene, ["ball"], model=missing, **extra)
    with pytest.raises(ValueError, match="option 'model'.*cannot load"):  # a folder without a model
        get_part_masks("clipseg", scene, ["ball"], cameras=cams, model=tmp_path)
    with pytest.raises(ValueError, match="option 'prompts'.*'hat'"):
        get_part_masks("clipseg", scene, ["ball"], cameras=cams, model=clipseg_dir, prompts={"hat": "a hat"})
    with pytest.raises(ValueError, match="option 'threshold'"):
        get_part_masks("clipseg", scene, ["ball"], cameras=cams, model=clipseg_dir, threshold=1.5)
    with pytest.raises(ValueError, match="option 'point'.*behind or outside every one of the 2 views"):
        get_part_masks("sam", scene, ["ball"], cameras=cams, point=[0, 0, 40], model=sam_dir)
    with pytest.raises(ValueError, match="option 'point'"):
        get_part_masks("sam", scene, ["ball"], cameras=cams, point=[0, 0], model=sam_dir)
    with pytest.raises(ValueError, match=r"option 'selection'.*\[N=240\]"):
        get_part_masks("sam", scene, ["ball"], cameras=cams, selection=np.ones(5, bool), model=sam_dir)
    with pytest.raises(ValueError, match="option 'selection'.*not a file"):
        get_part_masks("sam", scene, ["ball"], cameras=cams, selection=tmp_path / "none.npy", model=sam_dir)
    with pytest.raises(ValueError, match="option 'box' needs option 'selection'"):
        get_part_masks("sam", scene, ["ball"], cameras=cams, point=[0, 0, 0], box=True, model=sam_dir)
    with pytest.raises(ValueError, match="one part per call"):
        get_part_masks("sam", scene, ["left", "right"], cameras=cams, point=[0, 0, 0], model=sam_dir)


def test_the_viewer_s_sam_button_lifts_sam_masks_of_the_selection_to_3d(sam_dir, sam_spy, monkeypatch):
    """`gendistill view --sam DIR`: the viewer gets a function that prompts SAM with the selection on
    rendered views and lifts the masks with 3D-GALP (the real loaders, a tiny random SAM)."""
    import gendistill.viewer.view as view
    from gendistill.cli import view as view_command

    given = {}
    monkeypatch.setattr(view, "view", lambda *args, **kw: given.update(kw) or 0)
    assert view_command(["scene.ply"], sam=str(sam_dir), lift="3,32,2", backend="torch") == 0
    assert given["from_text"] is None and given["read_label_field"] is not None
    scene = scene_two_balls()
    selection = np.zeros(len(scene), bool)
    selection[:120] = True  # the first ball
    got = given["from_selection"](scene, selection)
    assert got.shape == (len(scene),) and got.dtype == torch.bool
    assert len(sam_spy["points"]) >= 1 and all(b is not None for b in sam_spy["boxes"])  # prompted with its boxes
    with pytest.raises(ValueError, match="--sam .*: no such model folder"):
        view_command(["scene.ply"], sam=str(sam_dir / "missing"))
    with pytest.raises(ValueError, match="--lift must be VIEWS,SIZE,STEPS"):
        view_command(["scene.ply"], lift="3,32")
