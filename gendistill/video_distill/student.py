"""The pieces of a VideoREPA step: latents, prompt embeddings, rotary tables, the diffusion loss, and
the student (a CogVideoX transformer with the alignment heads on block `align_layer`)."""

from __future__ import annotations

import torch
from torch import nn

from gendistill.core.align.hooks import capture_block

__all__ = ["diffusion_loss", "rotary_embeddings", "encode_video", "sample_latents", "pad_latent_frames",
           "encode_prompts", "AlignedStudent"]


def diffusion_loss(alphas_cumprod: torch.Tensor, model_output: torch.Tensor, noisy: torch.Tensor,
                   latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """CogVideoX's finetuning loss for a v-prediction model.

    Args:
        alphas_cumprod: [T] the scheduler's alpha_bar.
        model_output: [B, f, C, h, w] predicted v; noisy: x_t; latents: x0 (same shape).
        timesteps: [B] integer timesteps.

    Returns:
        [] float32: mean_b mean((sqrt(a) x_t - sqrt(1 - a) v - x0)^2) / (1 - a), a = alpha_bar_t.
    """
    a = alphas_cumprod.to(device=model_output.device, dtype=torch.float32)[timesteps]
    a = a.view(-1, *([1] * (model_output.dim() - 1)))
    x0_hat = a.sqrt() * noisy.float() - (1 - a).sqrt() * model_output.float()
    per_sample = ((x0_hat - latents.float()) ** 2 / (1 - a)).flatten(1).mean(1)
    return per_sample.mean()


def rotary_embeddings(transformer_config, *, latent_frames: int, latent_height: int, latent_width: int,
                      device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin) 3D RoPE tables for CogVideoX-5B-style transformers, as CogVideoXPipeline builds them; else None."""
    if not transformer_config.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = transformer_config.patch_size, transformer_config.patch_size_t
    grid_h, grid_w = latent_height // p, latent_width // p
    base_w, base_h = transformer_config.sample_width // p, transformer_config.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=transformer_config.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=transformer_config.attention_head_dim, crops_coords=None,
                                   grid_size=(grid_h, grid_w), temporal_size=(latent_frames + p_t - 1) // p_t,
                                   grid_type="slice", max_size=(base_h, base_w), device=device)


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """video [B, F, 3, H, W] in [0, 1] -> the VAE's latent distribution parameters [B, 2C, f, h, w] (mean, logvar)."""
    x = (video.to(device=vae.device, dtype=vae.dtype) * 2 - 1).permute(0, 2, 1, 3, 4)
    return vae.encode(x).latent_dist.parameters


def sample_latents(params: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, 2C, f, h, w] distribution parameters -> scaled latents [B, f, C, h, w] float32 (noise from `generator`, on CPU)."""
    mean, logvar = params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return ((mean + std * eps) * scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def pad_latent_frames(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """[B, f, C, h, w] -> [B, f + k, C, h, w] with k copies of the first latent frame in front, k the
    fewest making f + k a multiple of `patch_size_t` (CogVideoX 1.5 patches 2 latent frames at once;
    its released finetuning pads at the front, as its pipeline does before dropping them at decode).
    Unchanged for CogVideoX 1.0 (`patch_size_t` None)."""
    k = (-latents.shape[1]) % patch_size_t if patch_size_t else 0
    return torch.cat([latents[:, :1].expand(-1, k, -1, -1, -1), latents], dim=1) if k else latents


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str], max_length: int) -> torch.Tensor:
    """Captions -> T5 embeddings [B, max_length, D] (padded / truncated as CogVideoXPipeline does)."""
    ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class AlignedStudent(nn.Module):
    """The trainable part: transformer + projector + grid aligner, one module so DDP / DeepSpeed / FSDP see all of it.

    forward(noisy [B, f, C, h, w], prompt_embeds [B, L, D], timesteps [B], rotary, teacher_grid (T', H', W'))
    -> (v prediction [B, f, C, h, w], aligned student tokens [B, T', H', W', Dt] or None).
    """

    def __init__(self, transformer: nn.Module, projector: nn.Module | None, aligner: nn.Module | None,
                 align_layer: int | None):
        super().__init__()
        self.transformer = transformer
        self.projector = projector
        self.aligner = aligner
        self.hook = capture_block(transformer, align_layer) if projector is not None else None

    def forward(self, noisy, prompt_embeds, timesteps, rotary=None, teacher_grid=None):
        out = self.transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=timesteps,
                               image_rotary_emb=rotary, return_dict=False)[0]
        if self.hook is None:
            return out, None
        tokens = self.hook.pop()  # [B, f, h', w', D]
        aligned = self.aligner(self.projector(tokens), teacher_grid)
        return out, aligned
