"""Tiny diffusers pipelines built from configs (no network), for tests, benchmarks and quick CPU trials.

Each builder returns a real diffusers pipeline with random weights small enough to run a
step in milliseconds on a CPU, seeded so two calls give identical weights:

- `tiny_sd_pipeline(prediction_type)`: StableDiffusionPipeline (UNet + VAE + CLIP), "epsilon"
  (SD 1.x / 2.x base) or "v_prediction" (SD 2.x 768).
- `tiny_sd3_pipeline()`: StableDiffusion3Pipeline (SD3 transformer + VAE + two CLIP encoders,
  no T5: the pipeline then feeds zeros in the T5 slot, as it does for real SD3 without T5).
- `tiny_ip2p_pipeline()`: StableDiffusionInstructPix2PixPipeline (UNet with 8 input channels).
- `tiny_pixel_pipeline()`: a pixel-space text-conditioned pipeline (unet.in_channels == 3, no VAE).
- `tiny_ddpm_pipeline()`: an unconditional pixel-space DDPMPipeline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = [
    "TEXT_DIM",
    "MAX_TOKENS",
    "tiny_tokenizer",
    "tiny_text_encoder",
    "tiny_vae",
    "tiny_unet",
    "sd_scheduler",
    "tiny_sd_pipeline",
    "tiny_ip2p_pipeline",
    "tiny_sd3_transformer",
    "tiny_sd3_pipeline",
    "TinyPixelPipeline",
    "tiny_pixel_pipeline",
    "tiny_ddpm_pipeline",
    "BUILDERS",
    "write_tiny_pipeline",
]

TEXT_DIM = 32
MAX_TOKENS = 48


def tiny_tokenizer(max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): every byte is one token, 514 tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for c in chars:
            vocab.setdefault(c + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip_config(projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=520, hidden_size=TEXT_DIM,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5,
        max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM if projection else 512,
    )


def tiny_text_encoder(projection: bool = False, seed: int = 1):
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(_clip_config(projection)).eval()


def tiny_vae(seed: int = 2, shift_factor: float | None = None, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """AutoencoderKL with downsampling factor 2 and 4 latent channels."""
    torch.manual_seed(seed)
    kwargs = {}
    if shift_factor is not None:
        kwargs.update(shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, sample_size=32, scaling_factor=scaling_factor, **kwargs,
    ).eval()


def tiny_unet(in_channels: int = 4, out_channels: int = 4, seed: int = 0) -> UNet2DConditionModel:
    """Two-level cross-attention UNet (latent sides must be even)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=in_channels,
        out_channels=out_channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=4, norm_num_groups=4,
    ).eval()


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The SD 1.x / 2.x noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=tiny_unet(),
        scheduler=sd_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_ip2p_pipeline() -> StableDiffusionInstructPix2PixPipeline:
    return StableDiffusionInstructPix2PixPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(in_channels=8), scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sd3_transformer(seed: int = 3) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=32,
    ).eval()


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_text_encoder(projection=True, seed=4), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(projection=True, seed=5), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )


class TinyPixelPipeline(DiffusionPipeline):
    """A text-conditioned pixel-space pipeline: unet (3 channels) + CLIP text encoder, no VAE."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_pixel_pipeline() -> TinyPixelPipeline:
    return TinyPixelPipeline(
        unet=tiny_unet(in_channels=3, out_channels=3, seed=6), text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(), scheduler=DDPMScheduler(beta_schedule="linear"),
    )


def tiny_ddpm_pipeline() -> DDPMPipeline:
    torch.manual_seed(7)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


BUILDERS = {
    "sd": tiny_sd_pipeline,
    "sd_v": lambda: tiny_sd_pipeline("v_prediction"),
    "sd3": tiny_sd3_pipeline,
    "ip2p": tiny_ip2p_pipeline,
    "pixel": tiny_pixel_pipeline,
    "ddpm": tiny_ddpm_pipeline,
}


def write_tiny_pipeline(kind: str, folder: str | os.PathLike) -> Path:
    """Write the tiny `kind` ("sd", "sd3", "ip2p") pipeline of `gendistill.testing.diffusion` to `folder`
    with save_pretrained (atomically: a temporary folder renamed)."""
    folder = Path(folder)
    pipe = BUILDERS[kind]()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    pipe.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
