"""VideoMAE / VideoMAEv2 ViTs: official checkpoint conversion and positional-embedding resizing.

The VideoMAEv2 encoder (OpenGVLab/VideoMAEv2, `models/modeling_finetune.py`) is the VideoMAE ViT:
a Conv3d tubelet embedding, a fixed sinusoidal table over the flattened (t, h, w) tokens, and
pre-norm blocks whose qkv projection has a query and a value bias but no key bias. transformers'
`VideoMAEModel` is that architecture, so an official checkpoint (e.g. `vit_b_k710_dl_from_giant.pth`)
is converted into it rather than re-implemented:

    patch_embed.proj.{weight,bias}      -> embeddings.patch_embeddings.projection.*
    blocks.i.norm1 / norm2              -> encoder.layer.i.layernorm_before / layernorm_after
    blocks.i.attn.qkv.weight [3D, D]    -> ...attention.attention.{query,key,value}.weight
    blocks.i.attn.q_bias / v_bias       -> ...attention.attention.query.bias / value.bias
    blocks.i.attn.proj                  -> ...attention.output.dense
    blocks.i.mlp.fc1 / fc2              -> ...intermediate.dense / output.dense
    norm (pretraining encoders only)    -> layernorm
    pos_embed (learned, when present)   -> embeddings.position_embeddings
    head, fc_norm, decoder, mask_token  -> dropped
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from gendistill.core.architectures import is_random, random_model

__all__ = [
    "sinusoid_pos_table",
    "resize_pos_embed",
    "adapt_videomae_input",
    "extract_state_dict",
    "convert_videomaev2_state_dict",
    "videomaev2_config",
    "load_videomaev2",
]

# heads of the official VideoMAEv2 sizes (S, B, L, H, g), keyed by width; not stored in checkpoints
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
VIDEOMAEV2_HELP = (
    "VideoMAEv2 weights are not on the Hugging Face hub in this layout: download the checkpoint "
    "(e.g. vit_b_k710_dl_from_giant.pth from the 'Distillation' section of "
    "https://github.com/OpenGVLab/VideoMAEv2/blob/master/docs/MODEL_ZOO.md) on a machine with network, "
    "copy it here and pass its file path (or a folder written by VideoMAEModel.save_pretrained)."
)


def sinusoid_pos_table(n_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1D sin-cos table over flattened tokens -> [1, n_positions, dim] float32.

    Entry (p, j) is sin (j even) or cos (j odd) of p / 10000^(2 floor(j/2) / dim).
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    exponent = 2 * torch.div(j, 2, rounding_mode="floor") / dim
    angles = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)
    table = torch.where(j.long() % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float()[None]


def resize_pos_embed(
    table: torch.Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Resize a positional table over (t, h, w) tokens as VideoREPA does for VideoMAEv2.

    Each time slice is resized bicubically in space, then the table is resized linearly in time
    (trilinear with unchanged h, w). At `dst_grid == src_grid` it returns the table unchanged.

    Args:
        table: [1, t*h*w, D] for `src_grid` = (t, h, w).
        dst_grid: (t', h', w').
    Returns:
        [1, t'*h'*w', D], float32.
    """
    t, h, w = src_grid
    if table.shape[1] != t * h * w:
        raise ValueError(f"table has {table.shape[1]} positions, grid {src_grid} needs {t * h * w}")
    if tuple(dst_grid) == tuple(src_grid):
        return table.float().clone()
    t2, h2, w2 = dst_grid
    x = rearrange(table.float(), "1 (t h w) d -> t d h w", t=t, h=h, w=w)
    if (h2, w2) != (h, w):
        x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False)
    x = rearrange(x, "t d h w -> 1 d t h w")
    if t2 != t:
        x = F.interpolate(x, size=(t2, h2, w2), mode="trilinear", align_corners=False)
    return rearrange(x, "1 d t h w -> 1 (t h w) d")


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)


def adapt_videomae_input(model, num_frames: int, image_size, *, pos_embed: str = "interpolate") -> None:
    """Let a transformers `VideoMAEModel` take `num_frames` frames of `image_size` (h, w), in place.

    pos_embed: "interpolate" resizes the model's table from its trained grid (VideoREPA);
    "regenerate" builds the sinusoidal table for the new token count (VideoMAE's own fine-tuning).
    """
    emb = model.embeddings
    patch = emb.patch_embeddings
    p_h, p_w = _pair(patch.patch_size)
    tubelet = patch.tubelet_size
    h, w = _pair(image_size)
    if num_frames % tubelet or h % p_h or w % p_w:
        raise ValueError(f"{num_frames} frames of {h}x{w} do not tile into {tubelet}x{p_h}x{p_w} tubelets")
    # the grid the current table was made for
    if not hasattr(emb, "_gendistill_grid"):
        c_h, c_w = _pair(model.config.image_size)
        emb._gendistill_grid = (model.config.num_frames // tubelet, c_h // p_h, c_w // p_w)
        emb._gendistill_table = emb.position_embeddings
    src_grid, dst_grid = emb._gendistill_grid, (num_frames // tubelet, h // p_h, w // p_w)
    if pos_embed == "interpolate":
        table = resize_pos_embed(emb._gendistill_table, src_grid, dst_grid)
    elif pos_embed == "regenerate":
        table = sinusoid_pos_table(math.prod(dst_grid), model.config.hidden_size)
    else:
        raise ValueError(f"pos_embed must be 'interpolate' or 'regenerate', got {pos_embed!r}")
    emb.position_embeddings = table
    patch.image_size = (h, w)
    patch.num_patches = emb.num_patches = math.prod(dst_grid)


# -- official checkpoints -------------------------------------------------------------------------
def extract_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The encoder state dict of an official checkpoint: unwraps "module"/"model"/"state_dict" and
    strips "module." / "encoder." prefixes (pretraining checkpoints keep the encoder under "encoder.")."""
    sd = checkpoint
    for key in ("module", "model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


_DROPPED = re.compile(r"^(head|fc_norm|decoder|encoder_to_decoder|mask_token|cls_token|norm_pix)")
_RENAMES = [
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.attn\.q_bias$", r"encoder.layer.\1.attention.attention.query.bias"),
    (r"^blocks\.(\d+)\.attn\.v_bias$", r"encoder.layer.\1.attention.attention.value.bias"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^norm\.", "layernorm."),
]


def convert_videomaev2_state_dict(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Official VideoMAEv2 encoder keys -> `VideoMAEModel` keys (see the module docstring).

    Returns (state dict for `VideoMAEModel`, learned `pos_embed` [1, N, D] or None if sinusoidal).
    """
    out, pos_embed = {}, None
    for key, value in sd.items():
        if _DROPPED.match(key):
            continue
        if key == "pos_embed":
            pos_embed = value
            continue
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            q, k, v = value.chunk(3, dim=0)
            base = f"encoder.layer.{m.group(1)}.attention.attention"
            out[f"{base}.query.{m.group(2)}"], out[f"{base}.key.{m.group(2)}"] = q, k
            out[f"{base}.value.{m.group(2)}"] = v
            continue
        if re.match(r"^blocks\.\d+\.gamma_[12]$", key):
            raise ValueError("checkpoints with layer scale (gamma_1/gamma_2, init_values > 0) are not supported")
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in a VideoMAEv2 checkpoint")
    return out, pos_embed


def videomaev2_config(sd: dict[str, torch.Tensor], *, num_heads: int | None = None, num_frames: int = 16,
                      image_size: int = 224):
    """A `VideoMAEConfig` read off an official encoder state dict.

    num_frames, image_size: the input the checkpoint was trained on (16 x 224 for every official
    VideoMAEv2 model); they define the grid of its positional table.
    """
    from transformers import VideoMAEConfig

    proj = sd["patch_embed.proj.weight"]  # [D, 3, tubelet, p, p]
    width = proj.shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if num_heads is None:
        if width not in HEADS_BY_WIDTH:
            raise ValueError(f"cannot infer the number of heads for width {width}; pass num_heads=")
        num_heads = HEADS_BY_WIDTH[width]
    return VideoMAEConfig(
        image_size=image_size, patch_size=int(proj.shape[-1]), num_channels=int(proj.shape[1]),
        num_frames=num_frames, tubelet_size=int(proj.shape[2]), hidden_size=width, num_hidden_layers=depth,
        num_attention_heads=num_heads, intermediate_size=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
        hidden_act="gelu", layer_norm_eps=1e-6, qv_bias="blocks.0.attn.q_bias" in sd,
        use_mean_pooling="norm.weight" not in sd,  # fine-tuned encoders end without a norm
    )


def _torch_load(path: Path, weights_only: bool | None):
    if weights_only is not None:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{path} holds more than tensors; loading it with weights_only=False (trust the file)")
        return torch.load(path, map_location="cpu", weights_only=False)


def load_videomaev2(path: str | os.PathLike, *, num_heads: int | None = None, num_frames: int = 16,
                    image_size: int = 224, weights_only: bool | None = None, dtype: torch.dtype | None = None):
    """An official VideoMAEv2 checkpoint (.pth) or a `save_pretrained` folder -> `VideoMAEModel` (eval).

    num_frames, image_size: the checkpoint's training input (16, 224 for the official models).
    weights_only: None tries the safe loader first, then a full unpickle with a warning.
    """
    from transformers import VideoMAEModel

    if is_random(path):  # architecture config only (configs/models), random weights
        return random_model(VideoMAEModel, path, dtype=dtype)
    path = Path(path).expanduser()
    if path.is_dir():
        return VideoMAEModel.from_pretrained(path, **({} if dtype is None else {"dtype": dtype})).eval()
    if not path.is_file():
        raise FileNotFoundError(f"VideoMAEv2 checkpoint {str(path)!r} not found. {VIDEOMAEV2_HELP}")
    sd = extract_state_dict(_torch_load(path, weights_only))
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path} is not a VideoMAEv2 encoder checkpoint (no patch_embed.proj.weight)")
    config = videomaev2_config(sd, num_heads=num_heads, num_frames=num_frames, image_size=image_size)
    hf_sd, pos_embed = convert_videomaev2_state_dict(sd)
    model = VideoMAEModel(config)
    model.load_state_dict(hf_sd, strict=True)
    if pos_embed is not None:
        if pos_embed.shape[1] != model.embeddings.num_patches:
            n = model.embeddings.num_patches
            raise ValueError(f"pos_embed has {pos_embed.shape[1]} positions, the config {n}")
        model.embeddings.position_embeddings = pos_embed.detach().float()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
