"""Part-mask sources: mask folders (transforms.json, COLMAP), callables, diffusers attention maps; the segment CLI."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gendistill.core.cameras import Cameras, orbit_path
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.part_masks import (
    AttentionCapture,
    PartMasks,
    attention_maps,
    get_part_masks,
    load_mask_folder,
    part_token_indices,
    postprocess_attention,
    truth_part_masks,
    write_mask_folder,
)

PROMPT = "a snowman with a nose and a hat"


pytestmark = pytest.mark.usefixtures("one_thread")


def two_part_scene(n_per: int = 150) -> GaussianScene:
    g = torch.Generator().manual_seed(0)
    pts = [torch.nn.functional.normalize(torch.randn(n_per, 3, generator=g), dim=-1) * 0.5 + torch.tensor([cx, 0, 0])
           for cx in (-0.65, 0.65)]
    scene = GaussianScene.from_points(torch.cat(pts), sh_degree=0, init_opacity=0.95, init_scale=1.2)
    scene.extras["part"] = torch.cat([torch.zeros(n_per), torch.ones(n_per)]).int()
    scene.comments.append("part_names: left right")
    return scene


def cams(n: int = 6, size: int = 32) -> Cameras:
    return Cameras.cat([orbit_path([0, 0, 0], 3.5, n // 2, elevation_deg=15, width=size, height=size),
                        orbit_path([0, 0, 0], 3.5, n - n // 2, elevation_deg=50, width=size, height=size,
                                   start_deg=20)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    scene, c = two_part_scene(), cams()
    root = write_mask_folder(scene, c, tmp_path_factory.mktemp("masks") / "folder")
    return scene, c, root


def copy_folder(folder, tmp_path):
    return shutil.copytree(folder[2], tmp_path / "copy")


# ---------------------------------------------------------------------- folders
def test_mask_folder_round_trip(folder):
    scene, c, root = folder
    truth = truth_part_masks(scene, c, scene.extras["part"], 2)
    assert truth.sum() > 0 and set(truth.unique().tolist()) == {0.0, 1.0}
    pm = load_mask_folder(root)
    assert pm.parts == ["left", "right"]
    assert torch.equal(pm.masks, truth)
    assert torch.allclose(pm.cameras.viewmats, c.viewmats, atol=1e-5)
    assert torch.allclose(pm.cameras.Ks, c.Ks)
    assert (root / "images" / "view_000.png").is_file()
    meta = json.loads((root / "transforms.json").read_text())
    assert meta["frames"][0]["file_path"] == "images/view_000.png"
    # a subset of parts, through the registry
    pm = get_part_masks("files", None, ["right"], path=root)
    assert pm.parts == ["right"] and torch.equal(pm.masks[:, 0], truth[:, 1])


def test_colmap_mask_folder(folder, tmp_path):
    from scipy.spatial.transform import Rotation

    scene, c, root = folder
    out = tmp_path / "colmap"
    shutil.copytree(root / "masks", out / "masks")
    (out / "sparse" / "0").mkdir(parents=True)
    k = c.Ks[0].tolist()
    line = f"1 PINHOLE {c.width} {c.height} {k[0][0]} {k[1][1]} {k[0][2]} {k[1][2]}\n"
    (out / "sparse" / "0" / "cameras.txt").write_text(line)
    lines = []
    for i, vm in enumerate(c.viewmats.double().numpy()):
        x, y, z, w = Rotation.from_matrix(vm[:3, :3]).as_quat()
        t = vm[:3, 3]
        lines.append(f"{i + 1} {w} {x} {y} {z} {t[0]} {t[1]} {t[2]} 1 view_{i:03d}.png\n\n")
    (out / "sparse" / "0" / "images.txt").write_text("".join(lines))
    pm = load_mask_folder(out)
    assert torch.equal(pm.masks, load_mask_folder(root).masks)
    assert torch.allclose(pm.cameras.viewmats, c.viewmats, atol=1e-5)


def test_missing_extra_and_wrong_size_masks(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "masks" / "right" / "view_003.png").unlink()
    with pytest.raises(ValueError, match=r"part 'right'.*5 mask files.*6 cameras.*missing views: view_003"):
        load_mask_folder(root)
    iio.imwrite(root / "masks" / "right" / "view_003.png", np.zeros((32, 32), np.uint8))
    iio.imwrite(root / "masks" / "right" / "view_999.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"part 'right'.*masks of no camera: view_999"):
        load_mask_folder(root)
    (root / "masks" / "right" / "view_999.png").unlink()
    iio.imwrite(root / "masks" / "left" / "view_002.png", np.zeros((16, 32), np.uint8))
    with pytest.raises(ValueError, match=r"part 'left'.*size 32x32.*view_002.png is 32x16"):
        load_mask_folder(root)
    with pytest.raises(ValueError, match=r"part 'nose': no folder.*\['left', 'right'\]"):
        load_mask_folder(folder[2], ["nose"])


def test_part_empty_in_every_view_is_an_error(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    for f in (root / "masks" / "left").iterdir():
        iio.imwrite(f, np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"part 'left' is empty in every view \(images/view_000.png"):
        load_mask_folder(root)


# ---------------------------------------------------------------------- callables and the registry
def test_callable_source():
    scene, c = two_part_scene(), cams(2)

    def halves(images, parts):
        out = torch.zeros(len(images), len(parts), *images.shape[1:3])
        out[:, 0, :, :16] = 1
        out[:, 1, :, 16:] = (images[..., 16:, :].mean(-1) < 0.99).float()  # non-white pixels
        return out

    pm = get_part_masks("callable", scene, ["a", "b"], fn=halves, cameras=c)
    assert isinstance(pm, PartMasks) and pm.masks.shape == (2, 2, 32, 32) and pm.images.shape == (2, 32, 32, 3)
    assert pm.masks[:, 0, :, :16].min() == 1 and 0 < pm.masks[:, 1].mean() < 0.5
    with pytest.raises(ValueError, match=r"returned shape \[2, 2, 16, 16\].*H=32, W=32"):
        get_part_masks("callable", scene, ["a", "b"], fn=lambda im, p: np.ones((2, 2, 16, 16)), cameras=c)
    with pytest.raises(KeyError, match="callable, files"):
        get_part_masks("sam9", scene, ["a"])


# ---------------------------------------------------------------------- attention
@pytest.fixture(scope="module")
def pipes():
    from gendistill.core.guidance.tiny import tiny_sd3_pipeline, tiny_sd_pipeline

    return {"sd": tiny_sd_pipeline(), "sd3": tiny_sd3_pipeline()}


def test_part_token_indices(pipes):
    tok = pipes["sd"].tokenizer  # character-level: one token per character, start token at 0
    assert part_token_indices(tok, "a nose", "nose") == [2, 3, 4, 5]  # a</w> n o s e</w>
    with pytest.raises(ValueError, match=r"part 'tail' is not in the prompt 'a nose'"):
        part_token_indices(tok, "a nose", "tail")


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_attention_maps_shape_and_word_response(pipes, kind):
    pipe = pipes[kind]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 24, 40, 3, generator=g)
    maps = attention_maps(pipe, images, "a cat with a hat", ["cat", "hat"])
    assert maps.shape == (2, 2, 24, 40) and torch.isfinite(maps).all() and (maps >= 0).all()
    # asking for one word gives that word's map, whatever else is asked
    hat = attention_maps(pipe, images, "a cat with a hat", ["hat"])
    assert torch.allclose(hat[:, 0], maps[:, 1], atol=1e-6)
    rel = (maps[:, 0] - maps[:, 1]).abs().mean() / maps.abs().mean()
    assert rel > 0.01  # different words, different maps
    with pytest.raises(ValueError, match=r"part 'nose' is not in the prompt"):
        attention_maps(pipe, images, "a cat with a hat", ["cat", "nose"])


def test_capture_matches_diffusers_scores_and_restores(pipes):
    unet = pipes["sd"].unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    name, attn = next((n, m) for n, m in unet.named_modules() if n.endswith("attn2"))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 12, attn.to_q.in_features, generator=g)
    e = torch.randn(2, 7, attn.to_k.in_features, generator=g)
    ref_out = attn(h, encoder_hidden_states=e)
    with AttentionCapture(unet, [1, 4]) as cap:
        out = attn(h, encoder_hidden_states=e)
    assert torch.allclose(out, ref_out, atol=1e-6)  # capturing does not change the model
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    scores = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(h)), attn.head_to_batch_dim(attn.to_k(e)))
    expected = scores.view(2, attn.heads, 12, 7).mean(1)[..., [1, 4]]
    assert len(cap.maps) == 1 and torch.allclose(cap.maps[0], expected, atol=1e-5)


def test_postprocess_attention_order_and_threshold():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :, :2] = 1.0  # part 0: left half
    maps[0, 1, :, 1:3] = 1.0  # part 1: middle, overlapping column 1
    out = postprocess_attention(maps, temperatures=[0.5, 0.5])
    assert out[0, 0, :, :2].min() == 1 and out[0, 0, :, 2:].max() == 0
    assert out[0, 1, :, 1].max() == 0 and out[0, 1, :, 2].min() == 1  # column 1 went to the earlier part
    ramp = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    soft = postprocess_attention(ramp, 1.0, soft=True)[0, 0].flatten()
    assert soft[0] == 0 and soft[-1] == 1 and (soft.diff() > 0).all()
    # threshold 0.5 after softmax(x / t) and min-max: x > t * log((1 + e^(1/t)) / 2)
    for t in (0.25, 1.0):
        cut = t * np.log((1 + np.exp(1 / t)) / 2)
        got = postprocess_attention(ramp, t)[0, 0].flatten().bool()
        assert torch.equal(got, torch.linspace(0, 1, 16) > cut)
    with pytest.raises(ValueError, match="one per part"):
        postprocess_attention(maps, [1.0])


# ---------------------------------------------------------------------- the segment command
def run_cli(argv):
    from gendistill.cli import main

    return main(["segment", *argv])


def test_segment_cli_with_mask_folder(folder, tmp_path, capsys):
    scene, c, root = folder
    ply = scene.save_ply(tmp_path / "scene.ply")
    out = tmp_path / "out"
    rc = run_cli([str(ply), "--parts", "right,left", "--masks", str(root), "--out", str(out), "--steps", "300",
                  "--no-progress", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "labelled.ply") in printed and str(out / "masks3d" / "right.npy") in printed
    back = GaussianScene.load_ply(out / "labelled.ply")
    assert back.label_sh.shape == (len(scene), 16, 3) and back.certainty.shape == (len(scene),)
    m = np.load(out / "masks3d" / "right.npy")
    assert m.dtype == np.bool_ and m.shape == (len(scene),)
    right = scene.extras["part"].numpy() == 1
    assert m[right].mean() > 0.8 and m[~right].mean() < 0.05
    assert len(list((out / "overlays").glob("*.png"))) == len(c)
    assert iio.imread(out / "contact_sheet.png").ndim == 3


def test_segment_cli_attention_and_bad_input(tmp_path, capsys, pipes):
    scene = two_part_scene(60)
    ply = scene.save_ply(tmp_path / "scene.ply")
    model = tmp_path / "tiny_sd"
    pipes["sd"].save_pretrained(model)
    base = [str(ply), "--attention-model", str(model), "--out", str(tmp_path / "att"), "--views", "2",
            "--size", "32", "--steps", "5", "--no-progress", "--device", "cpu"]
    assert run_cli(base + ["--parts", "nose", "--prompt", "a snowman with a hat"]) == 2
    assert "part 'nose' is not in the prompt" in capsys.readouterr().err
    assert run_cli(base + ["--parts", "hat"]) == 2
    assert "needs --prompt" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="empty"):  # 5 steps do not get labels near their codes
        assert run_cli(base + ["--parts", "nose,hat", "--prompt", PROMPT]) == 0
    assert (tmp_path / "att" / "masks3d" / "hat.npy").is_file()
    assert "contact sheet" in capsys.readouterr().out
