"""Frozen video teachers: video [B, F, 3, H, W] in [0, 1] -> tokens [B, T', H', W', D].

    teacher = load_teacher("videomaev2", "ckpt/vit_b_k710_dl_from_giant.pth")   # 48 x 160 x 240
    tokens = teacher(video)                  # [B, 24, 10, 15, 768], no grad, eval mode

Every teacher owns its preprocessing (`teacher.preprocess`): frame selection
(`video[:, frame_start : frame_start + num_frames]`; VideoREPA feeds frames 1..48 of 49), resize to
`image_size` (bicubic, as VideoREPA), ImageNet normalization. Attributes: `num_frames`,
`image_size` (h, w), `tubelet_size`, `patch_size`, `hidden_size`, `grid` (T', H', W').

Registry entries (`TEACHERS`, add more with `@TEACHERS.register("name")`):
"videomae" (transformers `VideoMAEModel`), "videomaev2" (official VideoMAEv2 checkpoint converted to
`VideoMAEModel`), "vjepa" (official V-JEPA v1 checkpoint, `video_vit.VideoViT`), "ominimae" / "omnimae"
(official OmniMAE checkpoint, `video_vit.VideoViT`), "vjepa2" (transformers `VJEPA2Model`, encoder
only), "dinov2" (transformers `Dinov2Model` / `Dinov2WithRegistersModel` per frame, CLS and register
tokens dropped).
VideoREPA takes the last block's tokens without the final norm for the video models
(`final_norm=False`) and DINOv2's normed patch tokens (`final_norm=True`).

`OffloadedTeacher(load, device)` keeps a teacher on the CPU, loaded on first use, and moves it to the
device only while it encodes (`teacher.offload` of `gendistill finetune`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from gendistill.core.architectures import is_random, random_model
from gendistill.registry import Registry
from gendistill.video_distill.video_vit import FAMILIES, VideoViT, load_video_vit
from gendistill.video_distill.videomaev2 import VIDEOMAEV2_HELP, adapt_videomae_input, load_videomaev2

__all__ = [
    "TEACHERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VideoTeacher",
    "VideoMAETeacher",
    "VideoMAEv2Teacher",
    "VJEPATeacher",
    "OmniMAETeacher",
    "VJEPA2Teacher",
    "DINOv2Teacher",
    "load_teacher",
    "preprocess_video",
    "OffloadedTeacher",
]

TEACHERS = Registry("teacher")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)


def preprocess_video(
    video: torch.Tensor, *, num_frames: int | None, image_size: tuple[int, int], frame_start: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, resize_mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Select frames, resize, normalize: [B, F, 3, H, W] in [0, 1] -> [B, num_frames, 3, h, w] float32.

    Frames `frame_start : frame_start + num_frames` are kept (all from `frame_start` when None).
    """
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"expected a video [B, F, 3, H, W], got {tuple(video.shape)}")
    end = video.shape[1] if num_frames is None else frame_start + num_frames
    if end > video.shape[1]:
        raise ValueError(f"the teacher needs frames {frame_start}..{end - 1}, the video has {video.shape[1]}")
    x = video[:, frame_start:end].float()
    b = x.shape[0]
    h, w = image_size
    if x.shape[-2:] != (h, w):
        x = rearrange(x, "b f c h w -> (b f) c h w")
        linear = resize_mode in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(h, w), mode=resize_mode, align_corners=False if linear else None,
                          antialias=antialias if linear else False)
        x = rearrange(x, "(b f) c h w -> b f c h w", b=b)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 1, 3, 1, 1)
    return (x - mean_t) / std_t


# -- loading helpers --------------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    s = str(source)
    return (os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1
            or s.endswith((".pth", ".pt", ".bin", ".safetensors", ".tar")))


def _offline_help(name: str, source: str) -> str:
    return (
        f"could not load teacher {name!r} from {str(source)!r}. To provide it offline: on a machine with "
        f"network run `huggingface-cli download <hub-id> --local-dir <folder>` (or "
        f"`Model.from_pretrained(<hub-id>).save_pretrained(<folder>)`), copy the folder here, pass the "
        f"folder as the teacher path and set HF_HUB_OFFLINE=1."
    )


def _hf_from_pretrained(model_cls, name: str, source, *, dtype=None, **kwargs):
    if is_random(source):
        return random_model(model_cls, source, dtype=dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    source = str(Path(source).expanduser()) if _looks_like_path(str(source)) else str(source)
    if _looks_like_path(source) and not os.path.exists(source):
        raise FileNotFoundError(_offline_help(name, source) + " (no such file or folder)")
    try:
        return model_cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"{_offline_help(name, source)}\n(original error: {err})") from err


# -- the interface ----------------------------------------------------------------------------------
class VideoTeacher(nn.Module):
    """A frozen encoder: `teacher(video[B, F, 3, H, W] in [0, 1]) -> tokens [B, T', H', W', D]`.

    Subclasses implement `encode(pixels[B, num_frames, 3, h, w]) -> [B, T', H', W', D]` on
    preprocessed pixels. The wrapped model stays in eval mode with `requires_grad=False`, and
    `forward` runs without grad.
    """

    default_num_frames: int | None = 48
    default_image_size: tuple[int, int] = (160, 240)
    default_frame_start: int = 1
    default_final_norm: bool = False

    def __init__(
        self, model: nn.Module, *, num_frames: int | None, image_size, tubelet_size: int, patch_size: int,
        hidden_size: int, frame_start: int = 0, final_norm: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD, resize_mode: str = "bicubic", antialias: bool = False,
    ):
        super().__init__()
        self.model = model
        self.num_frames = num_frames
        self.image_size = _pair(image_size)
        self.tubelet_size = int(tubelet_size)
        self.patch_size = int(patch_size)
        self.hidden_size = int(hidden_size)
        self.frame_start = int(frame_start)
        self.final_norm = bool(final_norm)
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize_mode, self.antialias = resize_mode, antialias
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if num_frames is not None and num_frames % self.tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not a multiple of the tubelet size {self.tubelet_size}")
        self.model.eval()
        self.model.requires_grad_(False)
        self.compute_dtype: torch.dtype | None = None  # set when the weights are stored in another dtype (fp8)

    @property
    def grid(self) -> tuple[int | None, int, int]:
        """(T', H', W') of the output tokens (T' None when num_frames is None)."""
        t = None if self.num_frames is None else self.num_frames // self.tubelet_size
        return t, self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its weights' dtype unless `compute_dtype` says otherwise)."""
        return self.compute_dtype or next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> "VideoTeacher":
        """A teacher stays in eval mode."""
        return super().train(False)

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [0, 1] -> [B, num_frames, 3, h, w] normalized (see `preprocess_video`)."""
        x = preprocess_video(video, num_frames=self.num_frames, image_size=self.image_size,
                             frame_start=self.frame_start, mean=self.mean, std=self.std,
                             resize_mode=self.resize_mode, antialias=self.antialias)
        if self.num_frames is None:  # all frames: drop the ones that do not fill a tubelet
            x = x[:, : x.shape[1] - x.shape[1] % self.tubelet_size]
        return x

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, F, 3, H, W] in [0, 1] -> tokens [B, T', H', W', D] (no grad)."""
        return self.encode(self.preprocess(video))

    def _tokens_to_grid(self, tokens: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        t = pixels.shape[1] // self.tubelet_size
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        return rearrange(tokens, "b (t h w) d -> b t h w d", t=t, h=h, w=w)

    def extra_repr(self) -> str:
        return (f"num_frames={self.num_frames}, frame_start={self.frame_start}, image_size={self.image_size}, "
                f"tubelet_size={self.tubelet_size}, patch_size={self.patch_size}, hidden_size={self.hidden_size}, "
                f"final_norm={self.final_norm}")


# -- VideoMAE family --------------------------------------------------------------------------------
@TEACHERS.register("videomae")
class VideoMAETeacher(VideoTeacher):
    """transformers `VideoMAEModel`; its positional table is resized to `num_frames` x `image_size`.

    pos_embed: "interpolate" (VideoREPA: bicubic in space, linear in time) or "regenerate" (a new
    sinusoidal table). final_norm: apply the model's last LayerNorm when it has one.
    """

    default_hub_id = "MCG-NJU/videomae-base"

    def __init__(self, model: nn.Module, *, num_frames: int | None = None, image_size=None,
                 frame_start: int | None = None, final_norm: bool | None = None, pos_embed: str = "interpolate",
                 **kwargs):
        cfg = model.config
        num_frames = self.default_num_frames if num_frames is None else num_frames
        image_size = self.default_image_size if image_size is None else image_size
        super().__init__(
            model, num_frames=num_frames, image_size=image_size, tubelet_size=cfg.tubelet_size,
            patch_size=_pair(cfg.patch_size)[0], hidden_size=cfg.hidden_size,
            frame_start=self.default_frame_start if frame_start is None else frame_start,
            final_norm=self.default_final_norm if final_norm is None else final_norm, **kwargs,
        )
        adapt_videomae_input(model, self.num_frames, self.image_size, pos_embed=pos_embed)
        self.pos_embed = pos_embed

    @classmethod
    def from_pretrained(cls, source=None, *, dtype: torch.dtype | None = None, load_kwargs: dict | None = None,
                        **options) -> "VideoMAETeacher":
        """source: a hub id, a local folder, or an official VideoMAE .pth checkpoint (same layout as
        VideoMAEv2's, see `videomaev2.load_videomaev2`, whose options it then takes)."""
        from transformers import VideoMAEModel

        source = source or cls.default_hub_id
        if str(source).endswith((".pth", ".pt")):
            keys = ("num_heads", "trained_frames", "trained_size", "weights_only")
            ckpt_opts = {k: options.pop(k) for k in keys if k in options}
            return cls(_load_official(source, dtype=dtype, **ckpt_opts), **options)
        model = _hf_from_pretrained(VideoMAEModel, "videomae", source, dtype=dtype, **(load_kwargs or {}))
        return cls(model, **options)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, h, w] (normalized) -> [B, T/tubelet, h/p, w/p, D]."""
        m = self.model
        x = m.embeddings(pixels.to(self.dtype), None)
        x = m.encoder(x).last_hidden_state
        if self.final_norm and getattr(m, "layernorm", None) is not None:
            x = m.layernorm(x)
        return self._tokens_to_grid(x, pixels)


@TEACHERS.register("videomaev2")
class VideoMAEv2Teacher(VideoMAETeacher):
    """VideoMAEv2 (ViT-B distilled from ViT-g by default) from an official checkpoint file.

    VideoREPA: frames 1..48 of 49 at 160x240, the pos table interpolated from 16x224, the last
    block's tokens without a final norm -> [B, 24, 10, 15, 768].
    """

    default_hub_id = None

    @classmethod
    def from_pretrained(cls, source=None, *, dtype: torch.dtype | None = None, num_heads: int | None = None,
                        trained_frames: int = 16, trained_size: int = 224, weights_only: bool | None = None,
                        **options) -> "VideoMAEv2Teacher":
        """source: an official .pth checkpoint or a `save_pretrained` folder of the converted model.

        trained_frames, trained_size: the input the checkpoint was trained on (16 x 224 officially).
        """
        if source is None:
            raise FileNotFoundError(f"teacher 'videomaev2' needs a checkpoint path. {VIDEOMAEV2_HELP}")
        model = _load_official(source, dtype=dtype, num_heads=num_heads, trained_frames=trained_frames,
                               trained_size=trained_size, weights_only=weights_only)
        return cls(model, **options)


def _load_official(source, *, dtype=None, num_heads=None, trained_frames=16, trained_size=224, weights_only=None):
    return load_videomaev2(source, num_heads=num_heads, num_frames=trained_frames, image_size=trained_size,
                           weights_only=weights_only, dtype=dtype)


# -- official V-JEPA (v1) and OmniMAE checkpoints: our VideoViT ------------------------------------
class _VideoViTTeacher(VideoTeacher):
    """A `video_vit.VideoViT` loaded from an official checkpoint of `family`.

    VideoREPA: frames 1..48 of 49 at 160x240 (bicubic), ImageNet normalization, the position table
    resized from its 16 x 224 grid, the last block's tokens without the final norm ->
    [B, 24, 10, 15, D].
    """

    family = ""

    def __init__(self, model: VideoViT, *, num_frames: int | None = None, image_size=None,
                 frame_start: int | None = None, final_norm: bool | None = None, **kwargs):
        cfg = model.config
        super().__init__(
            model, num_frames=self.default_num_frames if num_frames is None else num_frames,
            image_size=self.default_image_size if image_size is None else image_size,
            tubelet_size=cfg.tubelet_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
            frame_start=self.default_frame_start if frame_start is None else frame_start,
            final_norm=self.default_final_norm if final_norm is None else final_norm, **kwargs,
        )

    @classmethod
    def from_pretrained(cls, source=None, *, dtype: torch.dtype | None = None, num_heads: int | None = None,
                        trained_frames: int = 16, trained_size: int = 224, weights_only: bool | None = None,
                        **options) -> "_VideoViTTeacher":
        """source: the official checkpoint file, or `random:<config folder or id>` (random weights).

        trained_frames, trained_size: the input the checkpoint was trained on (16 x 224 officially).
        """
        if source is None:
            fam = FAMILIES[cls.family]
            raise FileNotFoundError(f"the {fam.title} teacher needs a checkpoint path. {fam.help}")
        model = load_video_vit(source, cls.family, num_heads=num_heads, trained_frames=trained_frames,
                               trained_size=trained_size, weights_only=weights_only, dtype=dtype)
        return cls(model, **options)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, h, w] (normalized) -> [B, T/tubelet, h/p, w/p, D]."""
        video = rearrange(pixels.to(self.dtype), "b t c h w -> b c t h w")
        return self._tokens_to_grid(self.model(video, final_norm=self.final_norm), pixels)


@TEACHERS.register("vjepa")
class VJEPATeacher(_VideoViTTeacher):
    """V-JEPA v1 (facebookresearch/jepa), ViT-L/16, tubelet 2, from `vitl16.pth.tar` ("target_encoder").

    Its position table is resized by one trilinear interpolation (as the official encoder does);
    tokens [B, 24, 10, 15, 1024] at VideoREPA's input.
    """

    family = "vjepa"


@TEACHERS.register("omnimae")
@TEACHERS.register("ominimae")
class OmniMAETeacher(_VideoViTTeacher):
    """OmniMAE (facebookresearch/omnivore), ViT-B/16, tubelet 2, from `vitb_pretrain.torch` ("trunk.*").

    "ominimae" is VideoREPA's spelling (`--align_models OminiMAE`). Its sinusoidal table is resized
    per frame bicubically, then linearly in time (VideoREPA's change to the official code); tokens
    [B, 24, 10, 15, 768] at VideoREPA's input.
    """

    family = "omnimae"


# -- V-JEPA 2 ---------------------------------------------------------------------------------------
def _vjepa2_position_ids(attn: nn.Module, grid_hw: tuple[int, int], x: torch.Tensor, masks=None):
    """(frame, row, col) ids of flattened tokens for an h x w patch grid (transformers assumes square)."""
    h, w = grid_hw
    if masks is not None:
        ids = masks.unsqueeze(1).repeat(1, attn.num_attention_heads, 1)
    else:
        ids = torch.arange(x.size(1), device=x.device)
    frame = torch.div(ids, h * w, rounding_mode="floor")
    rest = ids - frame * h * w
    row = torch.div(rest, w, rounding_mode="floor")
    return frame, row, rest - row * w


@TEACHERS.register("vjepa2")
class VJEPA2Teacher(VideoTeacher):
    """transformers `VJEPA2Model`, encoder only (the predictor is dropped).

    V-JEPA 2 uses 3D RoPE, so any frame count and size work; the RoPE position ids are set for the
    actual (possibly non-square) patch grid. VideoREPA replaces the final norm by identity
    (`final_norm=False`).
    """

    default_hub_id = "facebook/vjepa2-vitl-fpc64-256"

    def __init__(self, model: nn.Module, *, num_frames: int | None = None, image_size=None,
                 frame_start: int | None = None, final_norm: bool | None = None, **kwargs):
        cfg = model.config
        super().__init__(
            model, num_frames=self.default_num_frames if num_frames is None else num_frames,
            image_size=self.default_image_size if image_size is None else image_size,
            tubelet_size=cfg.tubelet_size, patch_size=_pair(cfg.patch_size)[0], hidden_size=cfg.hidden_size,
            frame_start=self.default_frame_start if frame_start is None else frame_start,
            final_norm=self.default_final_norm if final_norm is None else final_norm, **kwargs,
        )
        if getattr(model, "predictor", None) is not None:
            model.predictor = None  # never used by a teacher; frees its memory
        self._rope_grid: tuple[int, int] | None = None

    @classmethod
    def from_pretrained(cls, source=None, *, dtype: torch.dtype | None = None, load_kwargs: dict | None = None,
                        **options) -> "VJEPA2Teacher":
        from transformers import VJEPA2Model

        model = _hf_from_pretrained(VJEPA2Model, "vjepa2", source or cls.default_hub_id, dtype=dtype,
                                    **(load_kwargs or {}))
        return cls(model, **options)

    def _set_rope_grid(self, grid_hw: tuple[int, int]) -> None:
        if grid_hw == self._rope_grid:
            return
        for module in self.model.encoder.modules():
            if hasattr(module, "get_position_ids") and hasattr(module, "apply_rotary_embeddings"):
                module.get_position_ids = functools.partial(_vjepa2_position_ids, module, grid_hw)
        self._rope_grid = grid_hw

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, h, w] (normalized) -> [B, T/tubelet, h/p, w/p, D]."""
        enc = self.model.encoder
        self._set_rope_grid((pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size))
        x = enc.embeddings(pixels.to(self.dtype))
        for layer in enc.layer:
            x = layer(x, None)[0]
        if self.final_norm:
            x = enc.layernorm(x)
        return self._tokens_to_grid(x, pixels)


# -- DINOv2 (per frame, the REPA baseline) ----------------------------------------------------------
@TEACHERS.register("dinov2")
class DINOv2Teacher(VideoTeacher):
    """transformers `Dinov2Model` (or `Dinov2WithRegistersModel`) run on every frame.

    Tokens [B, F, h/14, w/14, D] (tubelet 1), CLS and register tokens dropped; VideoREPA's REPA
    baseline uses all 49 frames at 420x630 and the normed patch tokens (`final_norm=True`).
    chunk_size: frames per forward, to bound memory. time_pool: k > 1 keeps the first frame's tokens
    and averages the following F - 1 frames in groups of k -> [B, 1 + (F - 1) / k, ...]: the REPA
    baseline as released pools 49 frames to CogVideoX's 13 latent frames on the teacher side
    (`lora_trainer.py`, DINOv2 branch) instead of stretching the student.
    """

    default_hub_id = "facebook/dinov2-base"
    default_num_frames = 49
    default_image_size = (420, 630)
    default_frame_start = 0
    default_final_norm = True

    def __init__(self, model: nn.Module, *, num_frames: int | None = None, image_size=None,
                 frame_start: int | None = None, final_norm: bool | None = None, chunk_size: int = 128,
                 time_pool: int = 1, **kwargs):
        cfg = model.config
        super().__init__(
            model, num_frames=self.default_num_frames if num_frames is None else num_frames,
            image_size=self.default_image_size if image_size is None else image_size,
            tubelet_size=1, patch_size=_pair(cfg.patch_size)[0], hidden_size=cfg.hidden_size,
            frame_start=self.default_frame_start if frame_start is None else frame_start,
            final_norm=self.default_final_norm if final_norm is None else final_norm, **kwargs,
        )
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.chunk_size = int(chunk_size)
        self.time_pool = int(time_pool)
        if self.time_pool < 1 or (self.time_pool > 1 and (self.num_frames is None
                                                         or (self.num_frames - 1) % self.time_pool)):
            raise ValueError(f"time_pool={time_pool} needs num_frames = 1 + a multiple of it, got {self.num_frames}")

    @property
    def grid(self) -> tuple[int | None, int, int]:
        t, h, w = super().grid
        return (t if self.time_pool == 1 else 1 + (t - 1) // self.time_pool), h, w

    @classmethod
    def from_pretrained(cls, source=None, *, dtype: torch.dtype | None = None, load_kwargs: dict | None = None,
                        **options) -> "DINOv2Teacher":
        from transformers import AutoModel

        model = _hf_from_pretrained(AutoModel, "dinov2", source or cls.default_hub_id, dtype=dtype,
                                    **(load_kwargs or {}))
        return cls(model, **options)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, F, 3, h, w] (normalized) -> [B, F, h/p, w/p, D]."""
        b = pixels.shape[0]
        frames = rearrange(pixels.to(self.dtype), "b f c h w -> (b f) c h w")
        outs = []
        for chunk in frames.split(self.chunk_size):
            out = self.model(pixel_values=chunk, output_hidden_states=not self.final_norm)
            x = out.last_hidden_state if self.final_norm else out.hidden_states[-1]
            outs.append(x[:, self.num_prefix_tokens:])
        x = torch.cat(outs)
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        x = rearrange(x, "(b f) (h w) d -> b f h w d", b=b, h=h, w=w)
        if self.time_pool > 1:
            rest = rearrange(x[:, 1:], "b (t k) h w d -> b t k h w d", k=self.time_pool).mean(2)
            x = torch.cat([x[:, :1], rest], dim=1)
        return x


def load_teacher(name: str, path_or_hub_id: str | os.PathLike | None = None, **options) -> VideoTeacher:
    """A frozen teacher from the registry: `TEACHERS[name].from_pretrained(path_or_hub_id, **options)`.

    Args:
        name: "videomae", "videomaev2", "vjepa", "ominimae" (or "omnimae"), "vjepa2", "dinov2" or a
            plugin's entry.
        path_or_hub_id: a hub id, a local folder, or (videomaev2, vjepa, ominimae) a checkpoint file;
            None takes the entry's default hub id where it has one.
        options: teacher options (num_frames, image_size, frame_start, final_norm, pos_embed,
            dtype, ...) as the entry's `from_pretrained` documents.
    """
    return TEACHERS.get_entry(name).from_pretrained(path_or_hub_id, **options)


class OffloadedTeacher:
    """A teacher kept on the CPU and moved to `device` only while it encodes.

    `load()` builds the `VideoTeacher` on the CPU on first use (`teacher(video)`, `.module`, or an attribute
    the teacher has); `hidden_size` given here (e.g. read from cached features) answers without loading.
    Inside `with teacher.resident():` it stays on the device between calls. `loaded` and `calls` (forwards
    run) tell what happened.
    """

    def __init__(self, load, device: torch.device | str, *, hidden_size: int | None = None):
        self._load, self.device = load, torch.device(device)
        self._module: VideoTeacher | None = None
        self._hidden_size, self._resident, self.calls = hidden_size, False, 0

    @property
    def loaded(self) -> bool:
        return self._module is not None

    @property
    def module(self) -> VideoTeacher:
        """The teacher (loaded onto the CPU now if it was not)."""
        if self._module is None:
            self._module = self._load().to("cpu")
        return self._module

    @property
    def hidden_size(self) -> int:
        return self._hidden_size if self._module is None and self._hidden_size else self.module.hidden_size

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        self._hidden_size = int(value)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def _offload(self) -> None:
        if self._module is not None and self.device.type != "cpu":
            self._module.to("cpu")

    @contextlib.contextmanager
    def resident(self):
        """Keep the teacher on the device across the calls made inside (moved back to the CPU after)."""
        self._resident = True
        try:
            yield self
        finally:
            self._resident = False
            self._offload()

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """`VideoTeacher.forward` on the device: the teacher moved there for the call (and back after,
        unless resident)."""
        module = self.module.to(self.device)
        self.calls += 1
        try:
            return module(video.to(self.device))
        finally:
            if not self._resident:
                self._offload()
