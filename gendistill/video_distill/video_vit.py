"""A plain video ViT that loads the official V-JEPA (v1) and OmniMAE encoder checkpoints.

Both encoders are the same network: a Conv3d tubelet embedding, a fixed position table over the
flattened (t, h, w) tokens of the trained input, pre-norm blocks (LayerNorm eps 1e-6, fused qkv with
a bias on q, k and v, GELU MLP) and a final LayerNorm. Our parameter names are the official ones
(facebookresearch/jepa `src/models/vision_transformer.py`, `src/models/utils/modules.py`):

    patch_embed.proj.{weight,bias}     Conv3d [D, 3, tubelet, p, p]    (OmniMAE: patch_embed.proj.1.*)
    pos_embed                          [1, t*h*w, D] for the trained grid (16 frames x 224 px: 8 x 14 x 14)
    blocks.i.norm1.{weight,bias}
    blocks.i.attn.qkv.{weight,bias}    [3D, D], [3D]: q, k, v stacked, each split into heads
    blocks.i.attn.proj.{weight,bias}
    blocks.i.norm2.{weight,bias}
    blocks.i.mlp.fc1 / fc2.{weight,bias}
    norm.{weight,bias}                 final LayerNorm (VideoREPA does not apply it)

Checkpoint layouts (`load_video_vit`):
- V-JEPA `vitl16.pth.tar`: {"target_encoder": {"module.backbone.<key>": ...}, "encoder": ..., "predictor": ...,
  "epoch": ...}. VideoREPA loads "target_encoder" (else "encoder") and strips "module." and "backbone.".
- OmniMAE `vitb_pretrain.torch`: a flat state dict of `OmniMAE(trunk, head)`: "trunk.<key>" plus the MAE
  decoder ("trunk.decoder.*", "trunk.mask_token") and "head.*", which are dropped.

Position tables are resized to other inputs as each official code does: V-JEPA one trilinear
resize over (t, h, w); OmniMAE in VideoREPA per-frame bicubic in space, then linear in time (as for
VideoMAEv2, `videomaev2.resize_pos_embed`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from gendistill.core.architectures import is_random, random_model
from gendistill.video_distill.videomaev2 import HEADS_BY_WIDTH, _torch_load, resize_pos_embed, sinusoid_pos_table

__all__ = [
    "VideoViTConfig",
    "VideoViT",
    "FAMILIES",
    "sincos_3d_pos_table",
    "trilinear_pos_embed",
    "video_vit_state_dict",
    "load_video_vit",
]


@dataclass
class VideoViTConfig:
    """Architecture of a `VideoViT`; `num_frames` x `image_size` is the input `pos_embed` was made for.

    pos_embed: the table a random model starts with ("sincos_1d": VideoMAE/OmniMAE's table over
    flattened tokens; "sincos_3d": V-JEPA's, uniform power). pos_interpolation: how the table is
    resized for another grid ("trilinear": V-JEPA; "bicubic_linear": VideoREPA's OmniMAE/VideoMAEv2).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    tubelet_size: int = 2
    num_channels: int = 3
    num_frames: int = 16
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    pos_embed: str = "sincos_1d"
    pos_interpolation: str = "bicubic_linear"

    @classmethod
    def from_dict(cls, values: dict) -> "VideoViTConfig":
        """From a config.json; "architectures" and "model_type" are ignored, other unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"architectures", "model_type"})
        if unknown:
            raise ValueError(f"unknown VideoViTConfig keys {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return {"architectures": ["VideoViT"], **dataclasses.asdict(self)}

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) tokens of the trained input, the grid of `pos_embed`."""
        s = self.image_size // self.patch_size
        return self.num_frames // self.tubelet_size, s, s


# -- position tables --------------------------------------------------------------------------------
def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sin then cos of pos / 10000^(2i/dim), i < dim/2 (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_3d_pos_table(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """V-JEPA's fixed 3D table with uniform power -> [1, t*h*w, dim] float32.

    Each of (t, h, w) gets 2*ceil(dim/6) channels, concatenated in that order and cut to `dim`.
    """
    t, h, w = grid
    axis_dim = 2 * math.ceil(dim / 6)
    tt, hh, ww = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (t, h, w)), indexing="ij")
    table = torch.cat([_sincos_1d(axis_dim, a.reshape(-1)) for a in (tt, hh, ww)], dim=1)[:, :dim]
    return table.float()[None]


def trilinear_pos_embed(table: torch.Tensor, src_grid: tuple[int, int, int],
                        dst_grid: tuple[int, int, int]) -> torch.Tensor:
    """V-JEPA's resizing: one trilinear interpolation over (t, h, w), align_corners=False.

    table [1, t*h*w, D] for `src_grid` -> [1, t'*h'*w', D] float32 for `dst_grid`.
    """
    t, h, w = src_grid
    if table.shape[1] != t * h * w:
        raise ValueError(f"table has {table.shape[1]} positions, grid {src_grid} needs {t * h * w}")
    x = rearrange(table.float(), "1 (t h w) d -> 1 d t h w", t=t, h=h, w=w)
    x = F.interpolate(x, size=tuple(dst_grid), mode="trilinear", align_corners=False)
    return rearrange(x, "1 d t h w -> 1 (t h w) d")


_INITIAL_TABLES = {
    "sincos_1d": lambda grid, dim: sinusoid_pos_table(math.prod(grid), dim),
    "sincos_3d": sincos_3d_pos_table,
}
_RESIZERS = {"trilinear": trilinear_pos_embed, "bicubic_linear": resize_pos_embed}


# -- the network ------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (s h e) -> s b h n e", s=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, as both officials
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, cfg: VideoViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_attention_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(d, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Tubelets: [B, C, T, H, W] -> [B, (T/t)*(H/p)*(W/p), D], tokens in (t, h, w) order."""

    def __init__(self, cfg: VideoViTConfig):
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.num_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d t h w -> b (t h w) d")


class VideoViT(nn.Module):
    """The encoder: video [B, C, T, H, W] (normalized) -> last block's tokens [B, (T/t)(H/p)(W/p), D].

    `pos_embed` (a buffer) is the table for `config.grid`; other inputs get it resized as
    `config.pos_interpolation` says.
    """

    config_class = VideoViTConfig

    def __init__(self, config: VideoViTConfig):
        super().__init__()
        if config.pos_embed not in _INITIAL_TABLES or config.pos_interpolation not in _RESIZERS:
            raise ValueError(f"pos_embed must be one of {sorted(_INITIAL_TABLES)} and pos_interpolation one of "
                             f"{sorted(_RESIZERS)}, got {config.pos_embed!r}, {config.pos_interpolation!r}")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.register_buffer("pos_embed", _INITIAL_TABLES[config.pos_embed](config.grid, config.hidden_size))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def token_grid(self, video: torch.Tensor) -> tuple[int, int, int]:
        """(t, h, w) tokens of a video [B, C, T, H, W]; a clear error when it does not tile."""
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.num_channels:
            raise ValueError(f"expected a video [B, {cfg.num_channels}, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if t % cfg.tubelet_size or h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"{t} frames of {h}x{w} do not tile into {cfg.tubelet_size}x{cfg.patch_size}x"
                             f"{cfg.patch_size} tubelets")
        return t // cfg.tubelet_size, h // cfg.patch_size, w // cfg.patch_size

    def position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """[1, t*h*w, D]: `pos_embed` as is at the trained grid, else resized to `grid`."""
        if tuple(grid) == self.config.grid:
            return self.pos_embed
        return _RESIZERS[self.config.pos_interpolation](self.pos_embed, self.config.grid, tuple(grid))

    def forward(self, video: torch.Tensor, final_norm: bool = False) -> torch.Tensor:
        """video [B, C, T, H, W] -> tokens [B, N, D] of the last block (then `norm` if final_norm)."""
        grid = self.token_grid(video)
        x = self.patch_embed(video)
        x = x + self.position_table(grid).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if final_norm else x


# -- official checkpoints ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    title: str
    containers: tuple[str, ...]  # checkpoint entries holding the encoder, first found wins
    prefixes: tuple[str, ...]  # stripped from the start of every key, in this order
    dropped: str | None  # regex of keys (after stripping) that are not part of the encoder
    renames: tuple[tuple[str, str], ...]
    pos_embed: str
    pos_interpolation: str
    help: str


FAMILIES = {
    "vjepa": _Family(
        title="V-JEPA", containers=("target_encoder", "encoder", "model", "state_dict", "module"),
        prefixes=("module.", "backbone."), dropped=None, renames=(), pos_embed="sincos_3d",
        pos_interpolation="trilinear",
        help="V-JEPA (v1) weights: download https://dl.fbaipublicfiles.com/jepa/vitl16/vitl16.pth.tar (ViT-L/16, "
             "the checkpoint VideoREPA uses; see github.com/facebookresearch/jepa) on a machine with network, "
             "copy it here and pass its file path."),
    "omnimae": _Family(
        title="OmniMAE", containers=("model", "state_dict", "module"), prefixes=("module.", "trunk."),
        dropped=r"^(decoder\.|mask_token$|head\.)", renames=((r"^patch_embed\.proj\.1\.", "patch_embed.proj."),),
        pos_embed="sincos_1d", pos_interpolation="bicubic_linear",
        help="OmniMAE weights: download https://dl.fbaipublicfiles.com/omnivore/omnimae_ckpts/vitb_pretrain.torch "
             "(ViT-B pretraining, the checkpoint VideoREPA uses; see github.com/facebookresearch/omnivore, "
             "omnimae/README.md) on a machine with network, copy it here and pass its file path."),
}


def _family(name: str) -> _Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown video ViT family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _tensors(d) -> bool:
    return isinstance(d, dict) and any(isinstance(v, torch.Tensor) for v in d.values())


def video_vit_state_dict(checkpoint: dict, family: str, *, source="checkpoint") -> dict[str, torch.Tensor]:
    """An official checkpoint -> a state dict with our keys (see the module docstring).

    Takes the family's container entry (or the checkpoint itself when it holds tensors), strips the
    prefixes, drops decoder/head keys and applies the renames. `source` names the file in errors.
    """
    fam = _family(family)
    sd = next((checkpoint[k] for k in fam.containers if isinstance(checkpoint, dict) and _tensors(checkpoint.get(k))),
              checkpoint)
    if not _tensors(sd):
        top = sorted(checkpoint)[:12] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{source} holds no {fam.title} encoder weights: no tensors at the top level or under "
                         f"{list(fam.containers)}; top-level keys: {top}")
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in fam.prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if fam.dropped and re.match(fam.dropped, key):
            continue
        for pattern, repl in fam.renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _config_from_state_dict(sd: dict, family: str, *, source, num_heads: int | None, num_frames: int,
                            image_size: int) -> VideoViTConfig:
    """Width, depth, MLP, patch and tubelet read off the weights; heads from the width unless given."""
    fam = _family(family)
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{source} is not a {fam.title} encoder checkpoint: no 'patch_embed.proj.weight' "
                         f"(first keys after stripping {list(fam.prefixes)}: {sorted(sd)[:8]})")
    proj = sd["patch_embed.proj.weight"]  # [D, C, tubelet, p, p]
    if proj.ndim != 5:
        raise ValueError(f"{source}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected a Conv3d "
                         "[D, C, tubelet, p, p] (an image model?)")
    width = int(proj.shape[0])
    if num_heads is None:
        if width not in HEADS_BY_WIDTH:
            raise ValueError(f"{source}: cannot infer the number of heads for width {width}; pass num_heads=")
        num_heads = HEADS_BY_WIDTH[width]
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))]
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    return VideoViTConfig(
        hidden_size=width, num_hidden_layers=1 + max(blocks, default=-1), num_attention_heads=num_heads,
        intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * width, patch_size=int(proj.shape[-1]),
        tubelet_size=int(proj.shape[2]), num_channels=int(proj.shape[1]), num_frames=num_frames,
        image_size=image_size, pos_embed=fam.pos_embed, pos_interpolation=fam.pos_interpolation,
    )


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _load_weights(model: VideoViT, sd: dict, *, source, family: str) -> None:
    """Strict load with an error naming the file, the missing and the unexpected keys."""
    fam = _family(family)
    ours = model.state_dict()
    missing, unexpected = set(ours) - set(sd), set(sd) - set(ours)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the {fam.title} encoder layout (keys after stripping "
                         f"{list(fam.prefixes)}): missing keys [{_short(missing)}]; unexpected keys "
                         f"[{_short(unexpected)}]")
    shapes = [k for k in ours if ours[k].shape != sd[k].shape]
    if "pos_embed" in shapes:
        raise ValueError(f"{source}: pos_embed has {sd['pos_embed'].shape[1]} positions, trained_frames="
                         f"{model.config.num_frames} x trained_size={model.config.image_size} give "
                         f"{ours['pos_embed'].shape[1]}; pass the checkpoint's trained_frames / trained_size")
    if shapes:
        raise ValueError(f"{source}: shapes differ from the inferred architecture for [{_short(shapes)}]")
    model.load_state_dict(sd, strict=True)


def load_video_vit(path: str | os.PathLike, family: str, *, num_heads: int | None = None, trained_frames: int = 16,
                   trained_size: int = 224, weights_only: bool | None = None,
                   dtype: torch.dtype | None = None) -> VideoViT:
    """An official V-JEPA ("vjepa") or OmniMAE ("omnimae") checkpoint -> `VideoViT` (eval).

    `random:<hub-id or folder>` builds the architecture of that config.json with random weights.
    trained_frames, trained_size: the input the checkpoint was trained on (16 x 224 for both), the
    grid of its `pos_embed`. weights_only: None tries the safe loader first, then a full unpickle.
    """
    fam = _family(family)
    if is_random(path):
        return random_model(VideoViT, path, dtype=dtype)
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{fam.title} checkpoint {str(path)!r} {what}. {fam.help}")
    sd = video_vit_state_dict(_torch_load(path, weights_only), family, source=path)
    config = _config_from_state_dict(sd, family, source=path, num_heads=num_heads, num_frames=trained_frames,
                                     image_size=trained_size)
    model = VideoViT(config)
    _load_weights(model, sd, source=path, family=family)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
