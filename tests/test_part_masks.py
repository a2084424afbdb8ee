"""Part-mask sources: mask folders (transforms.json, COLMAP), callables, diffusers attention maps; the segment CLI."""

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gendistill.core.cameras import Cameras, orbit_path
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.galp import soft_mask_colors
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
from gendistill.splat_edit.romap_attention import TextImageScores, controlled_inversion, inversion_schedule

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
    with pytest.raises(KeyError, match="callable, clipseg, files"):
        get_part_masks("sam9", scene, ["a"])


# ---------------------------------------------------------------------- attention
@pytest.fixture(scope="module")
def pipes():
    from gendistill.testing.diffusion import tiny_pixel_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

    return {"sd": tiny_sd_pipeline(), "sd3": tiny_sd3_pipeline(), "pixel": tiny_pixel_pipeline()}


def test_part_token_indices(pipes):
    tok = pipes["sd"].tokenizer  # character-level: one token per character, start token at 0
    assert part_token_indices(tok, "a nose", "nose") == [2, 3, 4, 5]  # a</w> n o s e</w>
    with pytest.raises(ValueError, match=r"part 'tail' is not in the prompt 'a nose'"):
        part_token_indices(tok, "a nose", "tail")


@pytest.mark.parametrize("kind,capture", [("sd", "auto"), ("sd3", "ours"), ("sd3", "romap"), ("pixel", "auto")])
def test_attention_maps_shape_and_word_response(pipes, kind, capture):
    pipe = pipes[kind]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 24, 40, 3, generator=g)
    kw = {"capture": capture, "resolution": 32 if kind == "sd3" else None}
    maps = attention_maps(pipe, images, "a cat with a hat", ["cat", "hat"], **kw)
    assert maps.shape == (2, 2, 24, 40) and torch.isfinite(maps).all()
    if capture != "romap":  # probabilities; romap's are raw scores
        assert (maps >= 0).all()
    # asking for one word gives that word's map, whatever else is asked
    hat = attention_maps(pipe, images, "a cat with a hat", ["hat"], **kw)
    assert torch.allclose(hat[:, 0], maps[:, 1], atol=1e-5)
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
    soft = postprocess_attention(ramp, 1.0, output="normalized")[0, 0].flatten()
    assert soft[0] == 0 and soft[-1] == 1 and (soft.diff() > 0).all()
    # threshold 0.5 after softmax(x / t) and min-max: x > t * log((1 + e^(1/t)) / 2)
    for t in (0.25, 1.0):
        cut = t * np.log((1 + np.exp(1 / t)) / 2)
        got = postprocess_attention(ramp, t)[0, 0].flatten().bool()
        assert torch.equal(got, torch.linspace(0, 1, 16) > cut)
    with pytest.raises(ValueError, match="one per part"):
        postprocess_attention(maps, [1.0])


# ---------------------------------------------------------------------- RoMaP capture (SD3)
def deep_sd3(layers: int = 3):
    """The tiny SD3 pipeline with a `layers`-block transformer (the tiny one has a single block)."""
    from diffusers import SD3Transformer2DModel

    from gendistill.testing.diffusion import tiny_sd3_pipeline, tiny_sd3_transformer

    pipe = tiny_sd3_pipeline()
    cfg = {k: v for k, v in tiny_sd3_transformer().config.items() if not k.startswith("_")}
    torch.manual_seed(7)
    pipe.transformer = SD3Transformer2DModel.from_config({**cfg, "num_layers": layers}).eval()
    return pipe


class Recorder:
    """Forward hooks on an SD3 transformer: per call its inputs and output, and per block the
    outputs of attn.to_k (image keys) and attn.add_q_proj (text queries, the full sequence)."""

    def __init__(self, model):
        self.calls, self.hooks = [], [model.register_forward_pre_hook(self.start, with_kwargs=True),
                                      model.register_forward_hook(self.end, with_kwargs=True)]
        for i, blk in enumerate(model.transformer_blocks):
            self.hooks.append(blk.attn.to_k.register_forward_hook(self.saver("k", i)))
            self.hooks.append(blk.attn.add_q_proj.register_forward_hook(self.saver("q", i)))

    def start(self, module, args, kwargs):
        self.calls.append({"t": kwargs["timestep"].clone(), "x": kwargs["hidden_states"].clone(), "k": {}, "q": {}})

    def end(self, module, args, kwargs, out):
        self.calls[-1]["v"] = (out[0] if isinstance(out, tuple) else out.sample).clone()

    def saver(self, name, block):
        def save(module, inp, out):
            d = self.calls[-1][name]
            if block not in d or out.shape[1] >= d[block].shape[1]:  # keep the full text sequence
                d[block] = out.detach().clone()
        return save

    def remove(self):
        for h in self.hooks:
            h.remove()


def hand_scores(call, heads: int, groups, blocks, grid) -> torch.Tensor:
    """[B, P, h, w]: pre-softmax text -> image scores from hooked q, k, head-mean, token-mean, block-sum."""
    total = 0
    for b in blocks:
        k, q = call["k"][b], call["q"][b]
        d = k.shape[-1] // heads
        k = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
        q = q.view(q.shape[0], -1, heads, d).transpose(1, 2)
        total = total + (q @ k.transpose(-1, -2) / d**0.5).mean(dim=1)  # [B, T, N]
    return torch.stack([total[:, g].mean(dim=1) for g in groups], dim=1).view(total.shape[0], len(groups), *grid)


FLOW_T = [1000 * 3 * s / (1 + 2 * s) for s in (0.02, 0.156, 0.292, 0.428, 0.564, 0.7)]  # shift 3, t_range (0.3, 0.98)


def test_inversion_schedule_and_update():
    pipe = deep_sd3(1)
    ts, sig = inversion_schedule(pipe.scheduler)
    assert torch.allclose(ts, torch.tensor(FLOW_T), atol=1e-3) and torch.allclose(sig * 1000, ts)
    # the controlled update, against a hand loop with a made-up velocity
    g = torch.Generator().manual_seed(0)
    x0, y1 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    seen = []

    def velocity(x, t):
        seen.append(float(t))
        return 0.3 * x - t / 1000

    last = controlled_inversion(velocity, x0, y1, ts, sig, gamma=0.5, calls=4)
    x = x0
    for k in range(3):
        v = 0.3 * x - ts[k] / 1000
        x = x + (v + 0.5 * ((y1 - x) / (1 - sig[k]) - v)) * (sig[k + 1] - sig[k])
    assert torch.allclose(last, x, atol=1e-6) and seen == pytest.approx(FLOW_T[:4], abs=1e-3)
    with pytest.raises(ValueError, match="capture_step"):
        controlled_inversion(velocity, x0, y1, ts, sig, calls=7)


def test_romap_capture_matches_hooked_qk_at_the_fourth_inversion_step():
    pipe = deep_sd3(3)
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 8, 8, 3, generator=g)  # 8 x 8 = the patch grid at resolution 32: no resampling
    rec = Recorder(model)
    try:
        maps = attention_maps(pipe, images, PROMPT, ["nose", "hat"], resolution=32, seed=5)  # "auto": romap
    finally:
        rec.remove()
    assert maps.shape == (2, 2, 8, 8)
    # 4 model calls: the first four timesteps of the 5-step schedule, ascending in noise
    assert len(rec.calls) == 4
    assert [float(c["t"][0]) for c in rec.calls] == pytest.approx(FLOW_T[:4], abs=1e-3)
    # the first call sees a VAE sample (not the mean) of the 32 px images; later calls the controlled update
    x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", antialias=True,
                                        align_corners=False) * 2 - 1
    gen = torch.Generator().manual_seed(5)
    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        lat = (dist.sample(generator=gen) - vae.config.shift_factor) * vae.config.scaling_factor
        mean = (dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    y1 = torch.randn(lat.shape, generator=gen)
    assert torch.allclose(rec.calls[0]["x"], lat, atol=1e-5) and not torch.allclose(lat, mean, atol=1e-2)
    sig = torch.tensor(FLOW_T) / 1000
    for k in range(3):
        xk, v = rec.calls[k]["x"], rec.calls[k]["v"]
        want = xk + (v + 0.5 * ((y1 - xk) / (1 - sig[k]) - v)) * (sig[k + 1] - sig[k])
        assert torch.allclose(rec.calls[k + 1]["x"], want, atol=1e-4)
    # the maps: the 4th call's pre-softmax text -> image scores, blocks 0..n-2, CLIP positions
    groups = [part_token_indices(pipe.tokenizer, PROMPT, p, pipe.tokenizer.model_max_length) for p in ("nose", "hat")]
    heads = model.transformer_blocks[0].attn.heads
    want = hand_scores(rec.calls[3], heads, groups, [0, 1], (8, 8))
    assert torch.allclose(maps, want, atol=1e-4)
    for other in (rec.calls[2], rec.calls[3]):
        blocks = [0, 1] if other is rec.calls[2] else [0, 1, 2]  # another step, or with the last block
        assert not torch.allclose(maps, hand_scores(other, heads, groups, blocks, (8, 8)), atol=1e-3)


def test_romap_capture_excludes_the_last_block():
    pipe = deep_sd3(3)
    images = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    kw = dict(resolution=32, capture="romap")
    base = attention_maps(pipe, images, PROMPT, ["nose", "hat"], **kw)
    # the last block's text queries change nothing the image stream sees: only its scores would change
    last = pipe.transformer.transformer_blocks[-1].attn.add_q_proj
    with torch.no_grad():
        last.weight.mul_(-3.0)
        last.bias.add_(1.0)
    assert torch.allclose(attention_maps(pipe, images, PROMPT, ["nose", "hat"], **kw), base, atol=1e-6)
    with_last = attention_maps(pipe, images, PROMPT, ["nose", "hat"], blocks=[0, 1, 2], **kw)
    assert not torch.allclose(with_last, base, atol=1e-3)
    first = pipe.transformer.transformer_blocks[0].attn.add_q_proj
    with torch.no_grad():
        first.weight.mul_(-3.0)
    assert not torch.allclose(attention_maps(pipe, images, PROMPT, ["nose", "hat"], **kw), base, atol=1e-3)


def test_text_image_scores_leave_the_model_unchanged():
    model = deep_sd3(3).transformer
    before = {k: type(v) for k, v in model.attn_processors.items()}
    g = torch.Generator().manual_seed(2)
    inp = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
               encoder_hidden_states=torch.randn(1, 10, 64, generator=g),
               pooled_projections=torch.randn(1, 64, generator=g))
    with torch.no_grad():
        ref = model(**inp).sample
        with TextImageScores(model, [1, 3]) as cap:
            out = model(**inp).sample
    assert torch.allclose(out, ref, atol=1e-6)
    assert cap.seen == [0, 1] and cap.total.shape == (1, 2, 16)
    assert {k: type(v) for k, v in model.attn_processors.items()} == before
    with pytest.raises(ValueError, match=r"blocks must be one or more block indices in 0..2, got \[5\]"):
        TextImageScores(model, [1], blocks=[5])


def test_postprocess_romap_temperature_soft_claims_and_colour_targets():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 3, 5, 6, generator=g) * 4 - 1
    out = postprocess_attention(maps, 0.2, output="soft")
    want = np.zeros(maps.shape)
    for c in range(2):  # by hand: per part, softmax over its pixels at T = 0.2; earlier parts claim > 0.5
        claimed = np.zeros((5, 6))
        for i in range(3):
            a = maps[c, i].double().numpy()
            a = (a - a.min()) / (a.max() - a.min())
            e = np.exp(a / 0.2)
            sm = e / e.sum()
            sm = (sm - sm.min()) / (sm.max() - sm.min())
            want[c, i] = np.where(claimed > 0.5, 0.0, sm)
            claimed += want[c, i]
    assert np.allclose(out.numpy(), want, atol=1e-5)
    assert ((out > 0.05) & (out < 0.95)).any() and (want[:, 1:] == 0).any()  # soft values, and claimed pixels
    # colour targets: sum of mask x code, min-max over the view (a no-op for one-hot codes)
    one_hot = torch.eye(3)
    assert torch.allclose(soft_mask_colors(out, one_hot), out.permute(0, 2, 3, 1), atol=1e-6)
    codes = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]])
    t = np.einsum("cphw,pk->chwk", want, codes.double().numpy())
    t = (t - t.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(t, axis=(1, 2, 3), keepdims=True)
    assert np.allclose(soft_mask_colors(out, codes).numpy(), t, atol=1e-5)
    with pytest.raises(ValueError, match="output must be one of"):
        postprocess_attention(maps, 0.2, output="binary")


def test_refiner_is_called_and_its_output_used(pipes):
    calls = []

    def refine(image, mask):
        calls.append((tuple(image.shape), tuple(mask.shape)))
        return 0.5 * (1 - mask)  # inverted and scaled: min-max normalised again

    g = torch.Generator().manual_seed(4)
    maps, images = torch.rand(2, 2, 6, 7, generator=g), torch.rand(2, 6, 7, 3, generator=g)
    plain = postprocess_attention(maps, 0.2, output="normalized")
    got = postprocess_attention(maps, 0.2, output="normalized", refine=refine, images=images)
    assert calls == [((3, 6, 7), (6, 7))] * 4 and torch.allclose(got, 1 - plain, atol=1e-6)
    with pytest.raises(ValueError, match=r"refine needs the views: images \[C=2, H=6, W=7, 3\], got None"):
        postprocess_attention(maps, refine=refine)
    # through the mask source: called once per view and part, on black-background renders (romap)
    seen = []

    def keep(image, mask):
        seen.append(float(image[:, 0, 0].max()))
        return mask

    scene, c = two_part_scene(60), cams(2, 16)
    get_part_masks("attention", scene, ["nose", "hat"], pipeline=pipes["sd3"], prompt=PROMPT, cameras=c,
                   resolution=32, refine=keep)
    assert len(seen) == 4 and max(seen) < 0.05
    with pytest.raises(ValueError, match="refine: cannot import 'no_such_module_xyz:fn'"):
        get_part_masks("attention", scene, ["hat"], pipeline=pipes["sd3"], prompt=PROMPT, cameras=c,
                       refine="no_such_module_xyz:fn")


def test_attention_source_defaults_follow_the_capture(pipes):
    scene, c = two_part_scene(60), cams(2, 16)
    kw = dict(prompt=PROMPT, cameras=c)
    sd3 = get_part_masks("attention", scene, ["nose", "hat"], pipeline=pipes["sd3"], resolution=32, **kw)
    assert sd3.images[:, 0, 0].max() < 0.05  # romap: black background
    assert ((sd3.masks > 0.05) & (sd3.masks < 0.95)).any()  # soft masks
    raw = attention_maps(pipes["sd3"], sd3.images, PROMPT, ["nose", "hat"], resolution=32)  # capture "romap"
    assert torch.allclose(sd3.masks, postprocess_attention(raw, 0.2, output="soft"), atol=1e-6)  # T = 0.2, soft
    ours = get_part_masks("attention", scene, ["nose", "hat"], pipeline=pipes["sd3"], capture="ours", **kw)
    assert ours.images[:, 0, 0].min() > 0.95 and set(ours.masks.unique().tolist()) <= {0.0, 1.0}
    unet = get_part_masks("attention", scene, ["nose", "hat"], pipeline=pipes["sd"], **kw)
    assert unet.images[:, 0, 0].min() > 0.95 and set(unet.masks.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="capture='romap'.*needs an SD3-style"):
        get_part_masks("attention", scene, ["hat"], pipeline=pipes["sd"], capture="romap", **kw)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['captrue'\]"):
        get_part_masks("attention", scene, ["hat"], pipeline=pipes["sd3"], captrue="ours", **kw)
    with pytest.raises(ValueError, match="'timesteps' is for capture='ours'"):
        get_part_masks("attention", scene, ["hat"], pipeline=pipes["sd3"], timesteps=(0.3,), **kw)
    with pytest.raises(ValueError, match=r"\['gamma'\] are for capture='romap'"):
        get_part_masks("attention", scene, ["hat"], pipeline=pipes["sd"], gamma=0.3, **kw)
    for bad in (42, 256):
        with pytest.raises(ValueError, match=f"resolution {bad} must be a multiple of 4 and at most 128"):
            get_part_masks("attention", scene, ["hat"], pipeline=pipes["sd3"], resolution=bad, **kw)


# ---------------------------------------------------------------------- pixel-space UNets
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "models" / "snowman-tiny"
DEMO_SCENE = Path(__file__).resolve().parents[1] / "assets" / "scenes" / "snowman.ply"


def test_pixel_space_demo_model_attends_to_the_hat():
    from gendistill.core.guidance.load import load_pipeline
    from gendistill.splat_edit.part_masks import scene_part_ids

    pipe = load_pipeline(DEMO_MODEL, device="cpu")
    assert pipe.vae is None and pipe.unet.config.in_channels == 3  # a pixel-space UNet
    scene = GaussianScene.load_ply(DEMO_SCENE)
    c = orbit_path(scene.center(), 3.2, 2, elevation_deg=15, width=32, height=32)
    pm = get_part_masks("attention", scene, ["hat"], pipeline=pipe, prompt="a snowman with a black hat", cameras=c,
                        output="normalized")
    ids, names = scene_part_ids(scene)
    hat = truth_part_masks(scene, c, ids, len(names))[:, names.index("hat")].bool()
    assert hat.any() and pm.masks[:, 0][hat].mean() > 2 * pm.masks[:, 0][~hat].mean()  # brighter on the hat


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


@pytest.mark.filterwarnings("ignore:3D-GALP")
def test_segment_cli_with_the_pixel_space_demo_model(tmp_path, capsys):
    out = tmp_path / "snow"
    rc = run_cli([str(DEMO_SCENE), "--parts", "hat", "--attention-model", str(DEMO_MODEL), "--prompt",
                  "a snowman with a black hat", "--out", str(out), "--views", "2", "--size", "32", "--steps", "5",
                  "--no-progress", "--device", "cpu", "--capture", "ours"])
    assert rc == 0, capsys.readouterr().err
    assert np.load(out / "masks3d" / "hat.npy").shape == (len(GaussianScene.load_ply(DEMO_SCENE)),)
    assert run_cli([str(DEMO_SCENE), "--parts", "hat", "--attention-model", str(DEMO_MODEL), "--prompt", "a hat",
                    "--out", str(out), "--capture", "romap", "--no-progress", "--device", "cpu"]) == 2
    assert "capture='romap'" in capsys.readouterr().err
