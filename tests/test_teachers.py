"""Frozen video teachers on tiny in-process models: shapes, freezing, checkpoint conversion, real frames."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    VideoMAEConfig,
    VideoMAEModel,
    VJEPA2Config,
    VJEPA2Model,
)
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

from gendistill.video_distill.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEACHERS,
    DINOv2Teacher,
    OmniMAETeacher,
    VideoMAETeacher,
    VJEPA2Teacher,
    VJEPATeacher,
    _vjepa2_position_ids,
    load_teacher,
    preprocess_video,
)
from gendistill.core.architectures import random_model
from gendistill.video_distill.video_vit import VideoViT, VideoViTConfig, sincos_3d_pos_table
from gendistill.video_distill.videomaev2 import resize_pos_embed, sinusoid_pos_table

D, HEADS, DEPTH, PATCH, TUBELET = 16, 2, 2, 8, 2


def tiny_videomae(**overrides):
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=PATCH, num_frames=4, tubelet_size=TUBELET, hidden_size=D,
               num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=32, layer_norm_eps=1e-6)
    return VideoMAEModel(VideoMAEConfig(**{**cfg, **overrides})).eval()


def tiny_vjepa2():
    torch.manual_seed(0)
    return VJEPA2Model(VJEPA2Config(crop_size=32, patch_size=PATCH, frames_per_clip=4, hidden_size=24,
                                    num_hidden_layers=2, num_attention_heads=2, pred_hidden_size=12,
                                    pred_num_hidden_layers=1, pred_num_attention_heads=2,
                                    num_pooler_layers=1)).eval()


def tiny_dinov2(registers=0):
    torch.manual_seed(0)
    kw = dict(image_size=28, patch_size=14, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=32)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)).eval()
    return Dinov2Model(Dinov2Config(**kw)).eval()


def rand_video(frames, height, width, seed=0):
    return torch.rand(2, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


# -- an independent reference of the official VideoMAEv2 encoder ----------------------------------
def official_state_dict(seed=0, learned_pos=None):
    """Random weights in the official layout (`blocks.i.attn.qkv.weight`, `q_bias`, `v_bias`, ...)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"patch_embed.proj.weight": r(D, 3, TUBELET, PATCH, PATCH), "patch_embed.proj.bias": r(D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
            p + "attn.q_bias": r(D), p + "attn.v_bias": r(D), p + "attn.proj.weight": r(D, D),
            p + "attn.proj.bias": r(D), p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D),
            p + "mlp.fc1.weight": r(4 * D, D), p + "mlp.fc1.bias": r(4 * D), p + "mlp.fc2.weight": r(D, 4 * D),
            p + "mlp.fc2.bias": r(D),
        })
    sd.update({"fc_norm.weight": 1 + r(D), "fc_norm.bias": r(D), "head.weight": r(5, D), "head.bias": r(5)})
    if learned_pos is not None:
        sd["pos_embed"] = r(1, learned_pos, D, s=1.0)
    return sd


def numpy_sinusoid(n, d):
    pos = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(d) // 2) / d)[None]
    pos[:, 0::2], pos[:, 1::2] = np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])
    return torch.tensor(pos, dtype=torch.float32)[None]


def official_forward(sd, video, pos):
    """The official encoder on [B, T, 3, H, W] normalized pixels -> [B, N, D] (no final norm)."""
    x = F.conv3d(rearrange(video, "b t c h w -> b c t h w"), sd["patch_embed.proj.weight"],
                 sd["patch_embed.proj.bias"], stride=(TUBELET, PATCH, PATCH))
    x = rearrange(x, "b d t h w -> b (t h w) d") + pos
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(D), sd[p + "attn.v_bias"]])
        q, k, v = rearrange(F.linear(y, sd[p + "attn.qkv.weight"], bias), "b n (s h e) -> s b h n e", s=3, h=HEADS)
        attn = (q * (D // HEADS) ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
        y = rearrange(attn @ v, "b h n e -> b n (h e)")
        x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        x = x + y
    return x


def videorepa_interpolate(table, src, dst):
    """VideoREPA's pos-table resizing, written as in its code: per-slice bicubic, then trilinear in time."""
    (t, h, w), (t2, h2, w2) = src, dst
    x = table.reshape(-1, t, h, w, D).reshape(-1, h, w, D).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(-1, t, h2, w2, D).permute(0, 4, 1, 2, 3)
    x = F.interpolate(x, size=(t2, h2, w2), mode="trilinear", align_corners=False)
    return x.permute(0, 2, 3, 4, 1).flatten(1, 3)


V2_OPTS = dict(num_heads=HEADS, trained_frames=4, trained_size=32)


@pytest.mark.parametrize("layout", ["module", "model-encoder"])
def test_videomaev2_checkpoint_round_trip(tmp_path, layout):
    sd = official_state_dict()
    if layout == "module":
        ckpt = {"module": sd}
    else:  # a pretraining checkpoint: encoder under "encoder.", plus decoder weights
        ckpt = {"model": {**{f"encoder.{k}": v for k, v in sd.items() if not k.startswith(("head", "fc_norm"))},
                          "decoder.norm.weight": torch.ones(3), "mask_token": torch.zeros(1, 1, 3)}}
    path = tmp_path / "vit_tiny_videomaev2.pth"
    torch.save(ckpt, path)
    teacher = load_teacher("videomaev2", path, num_frames=4, image_size=(32, 32), frame_start=1, **V2_OPTS)
    video = rand_video(6, 40, 48)
    tokens = teacher(video)
    pixels = teacher.preprocess(video)
    assert pixels.shape == (2, 4, 3, 32, 32)
    assert torch.equal(pixels, preprocess_video(video[:, 1:5], num_frames=None, image_size=(32, 32)))
    ref = official_forward(sd, pixels, numpy_sinusoid(2 * 4 * 4, D))
    assert tokens.shape == (2, 2, 4, 4, D) and teacher.grid == (2, 4, 4)
    torch.testing.assert_close(tokens, rearrange(ref, "b (t h w) d -> b t h w d", t=2, h=4), rtol=1e-4, atol=1e-5)
    # official VideoMAE (v1) checkpoints share the layout: "videomae" takes the file as well
    v1 = load_teacher("videomae", path, num_frames=4, image_size=(32, 32), frame_start=1, **V2_OPTS)
    assert type(v1) is VideoMAETeacher
    torch.testing.assert_close(v1(video), tokens)


@pytest.mark.parametrize("frames,size", [(8, (24, 40)), (6, (16, 16))])
def test_videomaev2_other_sizes_match_videorepa_interpolation(tmp_path, frames, size):
    sd = official_state_dict(seed=1, learned_pos=2 * 4 * 4)  # a learned table: interpolated, never regenerated
    torch.save({"module": sd}, tmp_path / "ckpt.pth")
    teacher = load_teacher("videomaev2", tmp_path / "ckpt.pth", num_frames=frames, image_size=size, **V2_OPTS)
    video = rand_video(frames + 1, 50, 70, seed=2)
    grid = (frames // 2, size[0] // PATCH, size[1] // PATCH)
    tokens = teacher(video)
    assert tokens.shape == (2, *grid, D)
    pos = videorepa_interpolate(sd["pos_embed"], (2, 4, 4), grid)
    ref = official_forward(sd, teacher.preprocess(video), pos)
    torch.testing.assert_close(tokens, rearrange(ref, "b (t h w) d -> b t h w d", t=grid[0], h=grid[1]),
                               rtol=1e-4, atol=1e-5)


def test_pos_embed_resize_and_regenerate():
    table = get_sinusoid_encoding_table(3 * 4 * 5, D)
    torch.testing.assert_close(sinusoid_pos_table(60, D), table, rtol=0, atol=1e-6)
    assert torch.equal(resize_pos_embed(table, (3, 4, 5), (3, 4, 5)), table)
    out = resize_pos_embed(table, (3, 4, 5), (6, 7, 9))
    assert out.shape == (1, 6 * 7 * 9, D) and torch.isfinite(out).all()
    # spatial-only resize on a time-constant table stays time-constant, time-only resize of such a table is exact
    const_t = table[:, :20].repeat(1, 3, 1)
    torch.testing.assert_close(resize_pos_embed(const_t, (3, 4, 5), (6, 4, 5)), table[:, :20].repeat(1, 6, 1))
    with pytest.raises(ValueError, match="positions"):
        resize_pos_embed(table, (2, 4, 5), (2, 4, 5))


@pytest.mark.parametrize("pos_embed", ["interpolate", "regenerate"])
def test_videomae_teacher_at_trained_size_equals_model(pos_embed):
    model = tiny_videomae()
    video = rand_video(4, 32, 32)
    with torch.no_grad():
        pixels = (video - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        ref = model(pixel_values=pixels).last_hidden_state
    teacher = VideoMAETeacher(model, num_frames=4, image_size=32, frame_start=0, pos_embed=pos_embed)
    tokens = teacher(video)
    torch.testing.assert_close(tokens, rearrange(ref, "b (t h w) d -> b t h w d", t=2, h=4), rtol=1e-5, atol=1e-6)


def test_videomae_regenerate_differs_from_interpolate_at_other_size():
    video = rand_video(8, 24, 40)
    a = VideoMAETeacher(tiny_videomae(), num_frames=8, image_size=(24, 40), frame_start=0, pos_embed="interpolate")
    b = VideoMAETeacher(tiny_videomae(), num_frames=8, image_size=(24, 40), frame_start=0, pos_embed="regenerate")
    ta, tb = a(video), b(video)
    assert ta.shape == tb.shape == (2, 4, 3, 5, D)
    assert not torch.allclose(ta, tb)
    with pytest.raises(ValueError, match="pos_embed"):
        VideoMAETeacher(tiny_videomae(), pos_embed="nope")


# -- transformers teachers through the real from_pretrained path -------------------------------------
@pytest.mark.parametrize("frames,size", [(4, (32, 32)), (6, (16, 40))])
def test_videomae_from_pretrained_folder_shapes(tmp_path, frames, size):
    tiny_videomae(use_mean_pooling=False).save_pretrained(tmp_path / "videomae")
    teacher = load_teacher("videomae", str(tmp_path / "videomae"), num_frames=frames, image_size=size)
    assert (teacher.num_frames, teacher.image_size, teacher.tubelet_size, teacher.patch_size, teacher.hidden_size) == (
        frames, size, 2, 8, D)
    out = teacher(rand_video(frames + 1, 48, 64))
    assert out.shape == (2, frames // 2, size[0] // 8, size[1] // 8, D) and torch.isfinite(out).all()
    normed = load_teacher("videomae", tmp_path / "videomae", num_frames=frames, image_size=size, final_norm=True)
    out_n = normed(rand_video(frames + 1, 48, 64))
    torch.testing.assert_close(out_n, F.layer_norm(out, (D,), normed.model.layernorm.weight,
                                                   normed.model.layernorm.bias, eps=1e-6), rtol=1e-4, atol=1e-5)


def test_teachers_are_frozen():
    teacher = VideoMAETeacher(tiny_videomae(), num_frames=4, image_size=32)
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    video = rand_video(5, 32, 32).requires_grad_(True)
    out = teacher(video)
    assert not out.requires_grad and out.grad_fn is None


def test_vjepa2_square_matches_model_and_nonsquare_shapes(tmp_path):
    model = tiny_vjepa2()
    model.save_pretrained(tmp_path / "vjepa2")
    video = rand_video(5, 32, 32)
    teacher = load_teacher("vjepa2", tmp_path / "vjepa2", num_frames=4, image_size=32, final_norm=True)
    assert teacher.model.predictor is None
    pixels = teacher.preprocess(video)
    with torch.no_grad():
        ref = model.get_vision_features(pixels)
    expect = rearrange(ref, "b (t h w) d -> b t h w d", t=2, h=4)
    torch.testing.assert_close(teacher(video), expect, rtol=1e-5, atol=1e-6)
    for frames, size in [(6, (16, 40)), (4, (24, 16))]:
        t = VJEPA2Teacher(tiny_vjepa2(), num_frames=frames, image_size=size)
        out = t(rand_video(frames + 1, 40, 40))
        assert out.shape == (2, frames // 2, size[0] // 8, size[1] // 8, 24) and torch.isfinite(out).all()


def test_vjepa2_position_ids_for_nonsquare_grid():
    frame, row, col = _vjepa2_position_ids(None, (2, 3), torch.zeros(1, 12, 4))
    assert frame.tolist() == [0] * 6 + [1] * 6
    assert row.tolist() == [0, 0, 0, 1, 1, 1] * 2 and col.tolist() == [0, 1, 2] * 4


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_per_frame_drops_prefix_tokens(tmp_path, registers):
    model = tiny_dinov2(registers)
    model.save_pretrained(tmp_path / "dino")
    teacher = load_teacher("dinov2", tmp_path / "dino", num_frames=3, image_size=(28, 42), chunk_size=4)
    assert teacher.num_prefix_tokens == 1 + registers and teacher.tubelet_size == 1
    video = rand_video(5, 30, 50)
    out = teacher(video)
    assert out.shape == (2, 3, 2, 3, D)
    with torch.no_grad():
        ref = model(pixel_values=teacher.preprocess(video)[1, 2:3]).last_hidden_state[:, 1 + registers:]
    torch.testing.assert_close(out[1, 2], rearrange(ref[0], "(h w) d -> h w d", h=2), rtol=1e-5, atol=1e-6)
    # without the final norm: the last layer's tokens, before the LayerNorm
    raw = DINOv2Teacher(model, num_frames=3, image_size=(28, 42), final_norm=False)(video)
    torch.testing.assert_close(F.layer_norm(raw, (D,), model.layernorm.weight, model.layernorm.bias,
                                            eps=model.config.layer_norm_eps), out, rtol=1e-4, atol=1e-5)


def test_dinov2_time_pool_is_the_released_repa_baseline():
    """time_pool=4 on 9 frames: frame 0 kept, frames 1-4 and 5-8 averaged (VideoREPA's REPA baseline pools
    49 -> 1 + 48 / 4 = 13 on the teacher side)."""
    model = tiny_dinov2()
    every = DINOv2Teacher(model, num_frames=9, image_size=(28, 42))
    pooled = DINOv2Teacher(model, num_frames=9, image_size=(28, 42), time_pool=4)
    video = rand_video(9, 30, 50)
    full, out = every(video), pooled(video)
    assert pooled.grid == (3, 2, 3) == tuple(out.shape[1:4])
    torch.testing.assert_close(out[:, 0], full[:, 0])
    torch.testing.assert_close(out[:, 1], full[:, 1:5].mean(1))
    torch.testing.assert_close(out[:, 2], full[:, 5:9].mean(1))
    with pytest.raises(ValueError, match="time_pool=4 needs num_frames"):
        DINOv2Teacher(model, num_frames=8, image_size=(28, 42), time_pool=4)


# -- V-JEPA (v1) and OmniMAE: official checkpoint layouts into our VideoViT ---------------------------------
VIT_OPTS = dict(num_heads=HEADS, trained_frames=4, trained_size=32)  # pos_embed grid (2, 4, 4)


def official_vit_encoder(seed=0):
    """Encoder weights named as the official ViT names them (jepa src/models/vision_transformer.py)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"pos_embed": r(1, 2 * 4 * 4, D, s=1.0), "patch_embed.proj.weight": r(D, 3, TUBELET, PATCH, PATCH),
          "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
            p + "attn.qkv.bias": r(3 * D), p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
            p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D), p + "mlp.fc1.weight": r(4 * D, D),
            p + "mlp.fc1.bias": r(4 * D), p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D),
        })
    return sd


def official_vjepa_checkpoint(encoder):
    """`vitl16.pth.tar`: DDP ("module.") around MultiMaskWrapper ("backbone."), the EMA encoder under
    "target_encoder" (jepa app/vjepa/train.py), next to the context encoder, predictor and counters."""
    wrap = lambda sd: {f"module.backbone.{k}": v for k, v in sd.items()}  # noqa: E731
    return {"encoder": wrap(official_vit_encoder(seed=99)), "target_encoder": wrap(encoder),
            "predictor": {"module.backbone.predictor_embed.weight": torch.zeros(4, D),
                          "module.backbone.mask_tokens.0": torch.zeros(1, 1, 4)},
            "epoch": 300, "loss": 0.12, "batch_size": 24, "world_size": 128, "lr": 6.25e-4}


def official_omnimae_checkpoint(encoder):
    """`vitb_pretrain.torch`: the flat state dict of OmniMAE(trunk, head), the patch Conv3d at index 1 of a
    Sequential after PadIm2Video, plus the MAE decoder, mask token and head (omnivore omni_mae_model.py)."""
    sd = {"trunk." + k.replace("patch_embed.proj.", "patch_embed.proj.1."): v for k, v in encoder.items()}
    sd.update({"trunk.mask_token": torch.zeros(1, D), "trunk.decoder.pos_embed": torch.zeros(1, 32, 8),
               "trunk.decoder.decoder_embed.weight": torch.zeros(8, D),
               "trunk.decoder.decoder_embed.bias": torch.zeros(8),
               "trunk.decoder.decoder_blocks.0.attn.qkv.weight": torch.zeros(24, 8),
               "trunk.decoder.norm.weight": torch.ones(8), "trunk.decoder.norm.bias": torch.zeros(8),
               "head.weight": torch.zeros(3 * TUBELET * PATCH * PATCH, 8),
               "head.bias": torch.zeros(3 * TUBELET * PATCH * PATCH)})
    return sd


OFFICIAL_CHECKPOINTS = {"vjepa": ("vitl16.pth.tar", official_vjepa_checkpoint),
                        "ominimae": ("vitb_pretrain.torch", official_omnimae_checkpoint)}


def save_official(tmp_path, name, encoder):
    filename, build = OFFICIAL_CHECKPOINTS[name]
    torch.save(build(encoder), tmp_path / filename)
    return tmp_path / filename


def official_vit_forward(sd, video, pos):
    """The official encoder on [B, 3, T, H, W] normalized pixels -> [B, N, D], last block, no final norm."""
    x = F.conv3d(video, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(TUBELET, PATCH, PATCH))
    x = x.flatten(2).transpose(1, 2) + pos
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(*x.shape[:2], 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(x.shape), sd[p + "attn.proj.weight"],
                         sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        x = x + y
    return x


def vjepa_interpolate(table, src, dst):
    """V-JEPA's pos-table resizing, written as in its code: trilinear with scale factors over (t, h, w)."""
    (t, h, w), (t2, h2, w2) = src, dst
    x = F.interpolate(table.reshape(1, t, h, w, D).permute(0, 4, 1, 2, 3), scale_factor=(t2 / t, h2 / h, w2 / w),
                      mode="trilinear")
    return x.permute(0, 2, 3, 4, 1).reshape(1, -1, D)


OFFICIAL_RESIZE = {"vjepa": vjepa_interpolate, "ominimae": videorepa_interpolate}


@pytest.mark.parametrize("name", ["vjepa", "ominimae"])
@pytest.mark.parametrize("frames,size", [(4, (32, 32)), (6, (24, 40))])
def test_video_vit_official_checkpoint_round_trip(tmp_path, name, frames, size):
    encoder = official_vit_encoder()
    path = save_official(tmp_path, name, encoder)
    teacher = load_teacher(name, path, num_frames=frames, image_size=size, frame_start=1, **VIT_OPTS)
    # every official encoder tensor, bit for bit, and nothing else (decoder, head, predictor dropped)
    ours = teacher.model.state_dict()
    assert set(ours) == set(encoder)
    assert all(torch.equal(ours[k], v) for k, v in encoder.items())

    video = rand_video(frames + 2, 40, 48)
    pixels = teacher.preprocess(video)
    assert torch.equal(pixels, preprocess_video(video[:, 1:frames + 1], num_frames=None, image_size=size))
    grid = (frames // 2, size[0] // PATCH, size[1] // PATCH)
    pos = encoder["pos_embed"] if grid == (2, 4, 4) else OFFICIAL_RESIZE[name](encoder["pos_embed"], (2, 4, 4), grid)
    ref = official_vit_forward(encoder, rearrange(pixels, "b t c h w -> b c t h w"), pos)
    tokens = teacher(video)
    assert tokens.shape == (2, *grid, D) and teacher.grid == grid
    torch.testing.assert_close(tokens, rearrange(ref, "b (t h w) d -> b t h w d", t=grid[0], h=grid[1]),
                               rtol=1e-4, atol=1e-5)


def test_video_vit_resizing_differs_between_families(tmp_path):
    """V-JEPA resizes its table trilinearly, VideoREPA's OmniMAE bicubically per frame: same weights, other tokens."""
    encoder = official_vit_encoder(seed=3)
    opts = dict(num_frames=6, image_size=(24, 40), **VIT_OPTS)
    vjepa = load_teacher("vjepa", save_official(tmp_path, "vjepa", encoder), **opts)
    omni = load_teacher("ominimae", save_official(tmp_path, "ominimae", encoder), **opts)
    assert type(vjepa) is VJEPATeacher and type(omni) is OmniMAETeacher
    video = rand_video(7, 24, 40)
    assert not torch.allclose(vjepa(video), omni(video), atol=1e-3)
    same = dict(num_frames=4, image_size=32, **VIT_OPTS)  # the trained grid: the table as is, identical tokens
    torch.testing.assert_close(load_teacher("vjepa", tmp_path / "vitl16.pth.tar", **same)(video),
                               load_teacher("omnimae", tmp_path / "vitb_pretrain.torch", **same)(video))


@pytest.mark.parametrize("name", ["vjepa", "ominimae"])
def test_video_vit_token_grid_contract(tmp_path, name):
    path = save_official(tmp_path, name, official_vit_encoder())
    for frames, size, video_frames in [(6, (16, 40), 8), (2, (48, 24), 3)]:
        teacher = load_teacher(name, path, num_frames=frames, image_size=size, **VIT_OPTS)
        out = teacher(rand_video(video_frames, 30, 50))  # frames 1..frames
        assert out.shape == (2, frames // 2, size[0] // PATCH, size[1] // PATCH, D) and torch.isfinite(out).all()
        assert out.shape[1:4] == teacher.grid
    # final_norm: the model's last LayerNorm over the same tokens
    raw = load_teacher(name, path, num_frames=4, image_size=32, **VIT_OPTS)
    normed = load_teacher(name, path, num_frames=4, image_size=32, final_norm=True, **VIT_OPTS)
    video = rand_video(5, 32, 32)
    torch.testing.assert_close(normed(video), F.layer_norm(raw(video), (D,), normed.model.norm.weight,
                                                           normed.model.norm.bias, eps=1e-6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [VJEPATeacher, OmniMAETeacher])
def test_video_vit_videorepa_defaults(cls):
    """VideoREPA's input: frames 1..48 of 49 at 160x240, patch 16, tubelet 2 -> a 24 x 10 x 15 grid."""
    torch.manual_seed(0)
    cfg = VideoViTConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=32)
    teacher = cls(VideoViT(cfg))
    defaults = (teacher.num_frames, teacher.frame_start, teacher.image_size, teacher.final_norm)
    assert defaults == (48, 1, (160, 240), False)
    out = teacher(torch.rand(1, 49, 3, 60, 90))
    assert out.shape == (1, 24, 10, 15, D) and teacher.grid == (24, 10, 15)


def test_vjepa_3d_sincos_table_matches_the_official_formula():
    def sincos(dim, pos):  # jepa src/models/utils/pos_embs.py, uniform_power=True
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, (t, h, w) = 20, (3, 4, 5)
    grid_h, grid_d, grid_w = np.meshgrid(np.arange(h, dtype=float), np.arange(t, dtype=float),
                                         np.arange(w, dtype=float))
    axis = int(np.ceil(dim / 6) * 2)
    ref = np.concatenate([sincos(axis, grid_d), sincos(axis, grid_h), sincos(axis, grid_w)], axis=1)[:, :dim]
    table = sincos_3d_pos_table((t, h, w), dim)
    assert table.shape == (1, t * h * w, dim)
    torch.testing.assert_close(table[0], torch.tensor(ref, dtype=torch.float32), rtol=0, atol=1e-6)


def test_video_vit_teachers_from_random_configs(tmp_path):
    import json

    folder = tmp_path / "tiny_vjepa"
    folder.mkdir()
    cfg = VideoViTConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=32,
                         patch_size=PATCH, num_frames=4, image_size=32, pos_embed="sincos_3d",
                         pos_interpolation="trilinear")
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    teacher = load_teacher("vjepa", f"random:{folder}", num_frames=6, image_size=(16, 24))
    assert teacher.model.config == cfg
    torch.testing.assert_close(teacher.model.pos_embed, sincos_3d_pos_table((2, 4, 4), D))
    assert teacher(rand_video(7, 16, 24)).shape == (2, 3, 2, 3, D)
    # the shipped architecture configs: full size on the meta device
    for source, width, params in [("facebook/vjepa-vitl16", 1024, 303_885_312),
                                  ("facebook/omnimae-vitb16", 768, 86_236_416)]:
        model = random_model(VideoViT, f"random:{source}", device="meta")
        assert model.pos_embed.shape == (1, 8 * 14 * 14, width)
        assert sum(p.numel() for p in model.parameters()) == params
    with pytest.raises(ValueError, match="unknown VideoViTConfig keys.*'hidden'"):
        VideoViTConfig.from_dict({"hidden": 3})


# -- errors -------------------------------------------------------------------------------------------
def test_unknown_teacher_lists_known_names():
    with pytest.raises(KeyError, match="known: dinov2, ominimae, omnimae, videomae, videomaev2, vjepa, vjepa2"):
        load_teacher("sora", "x")
    assert {"videomae", "videomaev2", "vjepa", "ominimae", "vjepa2", "dinov2"} <= set(TEACHERS)
    assert TEACHERS["omnimae"] is TEACHERS["ominimae"] is OmniMAETeacher


def test_missing_model_says_how_to_provide_it_offline(tmp_path):
    for name in ("videomae", "vjepa2", "dinov2"):
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
            load_teacher(name, tmp_path / "not_downloaded")
    with pytest.raises(FileNotFoundError, match="MODEL_ZOO"):
        load_teacher("videomaev2", tmp_path / "vit_b_k710_dl_from_giant.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint path"):
        load_teacher("videomaev2")
    for name, url in [("vjepa", "jepa/vitl16/vitl16.pth.tar"), ("ominimae", "omnimae_ckpts/vitb_pretrain.torch")]:
        with pytest.raises(FileNotFoundError, match=f"not found.*{url}"):
            load_teacher(name, tmp_path / "missing.pth")
        with pytest.raises(FileNotFoundError, match=f"needs a checkpoint path.*{url}"):
            load_teacher(name)


def test_video_vit_checkpoint_with_wrong_keys_names_file_and_keys(tmp_path):
    # a VideoMAEv2 checkpoint (q_bias / v_bias, no stored table, no final norm) is not a V-JEPA one
    torch.save({"module": official_state_dict()}, tmp_path / "vit_b_k710_dl_from_giant.pth")
    with pytest.raises(ValueError) as err:
        load_teacher("vjepa", tmp_path / "vit_b_k710_dl_from_giant.pth", **VIT_OPTS)
    msg = str(err.value)
    assert "vit_b_k710_dl_from_giant.pth" in msg and "V-JEPA" in msg
    missing, unexpected = (set(keys.split(", ")) for keys in re.findall(r"keys \[([^\]]*)\]", msg))
    assert missing == {"blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias", "norm.weight", "norm.bias", "pos_embed"}
    assert {"blocks.0.attn.q_bias", "blocks.1.attn.v_bias", "fc_norm.weight", "head.weight"} <= unexpected
    assert not unexpected & set(official_vit_encoder())
    # an OmniMAE file given to "vjepa": its keys keep "trunk.", so there is no patch embedding
    omni = save_official(tmp_path, "ominimae", official_vit_encoder())
    with pytest.raises(ValueError, match=r"vitb_pretrain\.torch is not a V-JEPA encoder checkpoint: no "
                                         r"'patch_embed\.proj\.weight'.*trunk\."):
        load_teacher("vjepa", omni, **VIT_OPTS)
    # a V-JEPA file given to "ominimae": tensors only inside "target_encoder" / "encoder"
    vjepa = save_official(tmp_path, "vjepa", official_vit_encoder())
    with pytest.raises(ValueError, match=r"vitl16\.pth\.tar holds no OmniMAE encoder weights.*'target_encoder'"):
        load_teacher("ominimae", vjepa, **VIT_OPTS)
    # the right file with the wrong training input: the table does not fit
    with pytest.raises(ValueError, match=r"pos_embed has 32 positions.*trained_size=48 give 72"):
        load_teacher("vjepa", vjepa, num_heads=HEADS, trained_frames=4, trained_size=48)


def test_too_few_frames_is_an_error():
    teacher = VideoMAETeacher(tiny_videomae(), num_frames=4, image_size=32)  # frames 1..4
    with pytest.raises(ValueError, match="frames 1..4"):
        teacher(rand_video(4, 32, 32))


# -- real data ------------------------------------------------------------------------------------------
def test_real_video_through_full_preprocessing(real_sample, tmp_path):
    import imageio.v2 as imageio
    reader = imageio.get_reader(real_sample / "garden_9frames.mp4", "ffmpeg")  # real H.264 frames
    frames = np.stack([f for _, f in zip(range(9), reader)])  # [9, 324, 640, 3] uint8
    reader.close()
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 255  # [1, 9, 3, 324, 640]
    torch.save({"module": official_state_dict()}, tmp_path / "ckpt.pth")
    teacher = load_teacher("videomaev2", tmp_path / "ckpt.pth", num_frames=8, image_size=(40, 80), **V2_OPTS)

    pixels = teacher.preprocess(video)
    assert pixels.shape == (1, 8, 3, 40, 80)
    # the normalization of the selected, resized frames, channel by channel
    resized = F.interpolate(video[0, 1:9], size=(40, 80), mode="bicubic", align_corners=False)
    expect = (resized.mean(dim=(0, 2, 3)) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels.mean(dim=(0, 1, 3, 4)), expect, rtol=1e-5, atol=1e-5)
    raw = (video[0, 1:9].mean(dim=(0, 2, 3)) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels.mean(dim=(0, 1, 3, 4)), raw, rtol=0, atol=0.05)  # resizing keeps the mean
    std_expect = resized.std(dim=(0, 2, 3)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels.std(dim=(0, 1, 3, 4)), std_expect, rtol=1e-4, atol=1e-5)
    assert math.isclose(float(video.max()), 1.0, abs_tol=0.1) and float(pixels.abs().max()) < 3.5

    tokens = teacher(video)
    assert tokens.shape == (1, 4, 5, 10, D) and torch.isfinite(tokens).all()
    assert tokens.std() > 0.1  # real content, not a constant
